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
