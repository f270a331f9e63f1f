"""A model folder that cannot be used is refused before any actor starts, naming the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trainers.common import ModelFolderError, check_model_folder

pytestmark = pytest.mark.unit


def _copy(small_task: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(small_task / "base_model", dst)
    return dst


def test_a_good_folder_gives_its_tokenizer(small_task: Path) -> None:
    tok = check_model_folder(small_task / "base_model", "sft.model")
    assert tok.eos_token == "<eos>"


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match=r"sft\.model: .*none: model folder does not exist"):
        check_model_folder(tmp_path / "none", "sft.model")


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match=r"no config\.json"):
        check_model_folder(tmp_path, "sft.model")


def test_pickle_weights_are_not_read(small_task: Path, tmp_path: Path) -> None:
    folder = _copy(small_task, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=r"no \*\.safetensors weights"):
        check_model_folder(folder, "sft.model")


def test_no_tokenizer(small_task: Path, tmp_path: Path) -> None:
    folder = _copy(small_task, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    with pytest.raises(ModelFolderError, match=r"rm\.model: .*no usable tokenizer"):
        check_model_folder(folder, "rm.model")


def test_no_chat_template(small_task: Path, tmp_path: Path) -> None:
    folder = _copy(small_task, tmp_path)
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ModelFolderError, match="the tokenizer lacks a chat template"):
        check_model_folder(folder, "sft.model")


class _RunsCode:
    """What a planted checkpoint file would hold: unpickling it calls a function."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """The learners read DeepSpeed checkpoints (`--resume`) without running pickled code."""
    import pickle

    import torch

    from actors.learner import _safe_torch_load

    marker = tmp_path / "code-ran"
    planted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": _RunsCode(marker)}, planted)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _safe_torch_load(str(planted), map_location="cpu")
    assert not marker.exists()
    # a plain one loads
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3}, tmp_path / "plain.pt")
    assert _safe_torch_load(str(tmp_path / "plain.pt"))["global_steps"] == 3
