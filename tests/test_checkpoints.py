"""Checkpoints and the trained model's folder on a disk that fills up: the run stops with an error
that says so, and the checkpoints already written stay whole (trainers.checkpoints)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from trainers.checkpoints import Checkpoints, CheckpointSpaceError

pytestmark = pytest.mark.unit


class Usage(NamedTuple):
    total: int
    used: int
    free: int


class Group:
    """A learner group's checkpoint call as the stage makes it: it writes its state into the
    folder (`size` bytes), or fails part-way as a full disk makes it fail."""

    def __init__(self, size: int = 1000) -> None:
        self.size, self.fail = size, False
        self.parameters = size // 4  # float32 weights

    def save(self, out: Path, config_updates: dict[str, Any] | None = None) -> None:
        """The trained model's folder, as rank 0 writes it: into `out`.tmp, renamed when whole."""
        tmp = Path(f"{out}.tmp")
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"w" * (self.size // 2))
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        (tmp / "config.json").write_text("{}")
        tmp.rename(out)

    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"x" * (self.size // 2))
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        (folder / "optim.pt").write_bytes(b"x" * (self.size - self.size // 2))


def _disk(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """The checkpoints' disk reports `free` bytes left."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_checkpoint_larger_than_the_free_space_is_refused_before_a_byte_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=2)
    group = Group(size=4000)
    checkpoints.save(10, {"policy": group}, {"iteration": 10})
    before = _files(tmp_path / "ckpt")
    _disk(monkeypatch, free=3000)  # under the last checkpoint's 4,000 bytes and its driver.json
    with pytest.raises(CheckpointSpaceError) as e:
        checkpoints.save(20, {"policy": group}, {"iteration": 20})
    message = str(e.value)
    assert str(tmp_path / "ckpt") in message and "iter-000020" in message
    assert "iter-000010 is the last whole checkpoint" in message and "--resume" in message
    assert _files(tmp_path / "ckpt") == before  # nothing written, nothing removed
    assert checkpoints.latest() == tmp_path / "ckpt" / "iter-000010"
    _disk(monkeypatch, free=10**9)  # room again: the next checkpoint is written
    checkpoints.save(20, {"policy": group}, {"iteration": 20})
    assert checkpoints.latest() == tmp_path / "ckpt" / "iter-000020"


def test_a_disk_that_fills_while_a_checkpoint_is_written_stops_the_run_and_keeps_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=2)
    policy, critic = Group(), Group()
    checkpoints.save(10, {"policy": policy, "critic": critic}, {"iteration": 10})
    before = _files(tmp_path / "ckpt")
    critic.fail = True
    _disk(monkeypatch, free=4096)  # what the disk has left once the write failed
    with pytest.raises(CheckpointSpaceError) as e:
        checkpoints.save(20, {"policy": policy, "critic": critic}, {"iteration": 20})
    message = str(e.value)
    assert "the disk filled up while checkpoint iter-000020 was written" in message
    assert "iter-000010 is the last whole checkpoint" in message
    assert isinstance(e.value.__cause__, OSError)
    # the partial checkpoint is gone (its space freed), the whole one and `latest` as they were
    assert not (tmp_path / "ckpt" / "iter-000020.tmp").exists()
    assert _files(tmp_path / "ckpt") == before
    assert checkpoints.latest() == tmp_path / "ckpt" / "iter-000010"


def test_the_first_checkpoint_failing_on_a_full_disk_says_there_is_none_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=1, prefix="step")
    group = Group()
    group.fail = True
    _disk(monkeypatch, free=0)
    with pytest.raises(CheckpointSpaceError, match="no checkpoint yet: free some space"):
        checkpoints.save(5, {"learner": group}, {"step": 5})
    assert checkpoints.latest() is None
    assert not any((tmp_path / "ckpt").iterdir())


def test_a_failed_write_on_a_disk_with_room_is_the_role_s_fault_raised_as_it_came(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank that died while writing is not a full disk: its error reaches the stage's fault
    recovery unchanged."""

    class Died(RuntimeError):
        pass

    class Dying(Group):
        def save_checkpoint(self, folder: Path) -> Any:
            folder.mkdir(parents=True)
            raise Died("rank 0 died")

    checkpoints = Checkpoints(tmp_path / "ckpt", keep=2)
    _disk(monkeypatch, free=10**10)
    with pytest.raises(Died):
        checkpoints.save(10, {"policy": Dying()}, {"iteration": 10})
    assert checkpoints.latest() is None


def test_the_trained_model_on_a_full_disk_stops_the_run_and_names_the_checkpoint_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model saved at a stage's end: refused before a byte is written where its weights
    cannot fit; where the disk fills while it is written, the partial folder is removed; both
    name the stage's last whole checkpoint, which --resume continues from."""
    checkpoints = Checkpoints(tmp_path / "ppo" / "checkpoints", keep=2)
    policy = Group(size=4000)
    checkpoints.save(30, {"policy": policy}, {"iteration": 30})
    out = tmp_path / "ppo" / "policy"

    _disk(monkeypatch, free=1000)  # under 2 bytes a parameter (the 1,000 parameters' 2,000)
    with pytest.raises(CheckpointSpaceError) as e:
        checkpoints.save_model(policy, out)
    assert f"{out}: the trained model needs at least" in str(e.value)
    assert "iter-000030 is the last whole checkpoint" in str(e.value)
    assert not out.exists() and not Path(f"{out}.tmp").exists()

    policy.fail = True
    _disk(monkeypatch, free=10**7)  # room by the count, and 10 MB left once the write failed
    with pytest.raises(CheckpointSpaceError) as e:
        checkpoints.save_model(policy, out)
    assert "the disk filled up while the trained model was written" in str(e.value)
    assert "--resume" in str(e.value) and isinstance(e.value.__cause__, OSError)
    assert not out.exists() and not Path(f"{out}.tmp").exists()

    policy.fail = False
    _disk(monkeypatch, free=10**10)
    checkpoints.save_model(policy, out)
    assert (out / "config.json").is_file() and checkpoints.latest() is not None


def test_a_model_save_that_fails_on_a_disk_with_room_is_raised_as_it_came(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=1, prefix="step")
    group = Group()
    group.fail = True  # an OSError, but the disk has room: not a full disk
    _disk(monkeypatch, free=10**10)
    with pytest.raises(OSError, match="No space left") as e:
        checkpoints.save_model(group, tmp_path / "model")
    assert not isinstance(e.value, CheckpointSpaceError)
