"""Checkpoints of a stage's learner groups, written whole or not at all: `<root>/<prefix>-NNNNNN/`
holds each group's DeepSpeed state (weights, optimizer, schedule) and `driver.json`, the driver's
state. A checkpoint is written into a `.tmp` folder and renamed when whole; `latest` names the
newest whole one and moves only after the rename, so a run killed while writing goes back to the
one before.

A checkpoint that does not fit on the disk stops the run with a `CheckpointSpaceError` before a
byte is written (the space it needs is the last checkpoint's size), or, when the disk fills while
it is written, with the partial folder removed: the checkpoints already written stay as they
were, and the run continues from the last one with --resume once there is room. The stage's
trained model, saved at its end, is written and checked the same way (`save_model`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class CheckpointExists(RuntimeError):
    """An unfinished run's checkpoint is in the way of a fresh start."""


class CheckpointSpaceError(RuntimeError):
    """A checkpoint does not fit on the disk that holds the stage's checkpoints."""


# Less than this free on the checkpoints' disk after a failed write: the disk filled up.
FULL_DISK_BYTES = 256 * 2**20


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class Checkpoints:
    def __init__(self, root: Path, keep: int, prefix: str = "iter") -> None:
        self.root, self.keep, self.prefix = root, keep, prefix

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        return folder if (folder / "driver.json").is_file() else None

    def save(self, n: int, groups: dict[str, Any], driver: dict[str, Any]) -> Path:
        """Checkpoint `n`: every group's state (a collective call on each) and `driver`."""
        name = f"{self.prefix}-{n:06d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        last = self.latest()
        if last is not None:
            need, free = folder_bytes(last), shutil.disk_usage(self.root).free
            if need > free:
                raise CheckpointSpaceError(
                    f"{self.root}: checkpoint {name} needs about {_size(need)} (the size of "
                    f"{last.name}) and the disk has {_size(free)} free. {self._advice(last)}"
                )
        tmp.mkdir(parents=True)
        with self._whole_or_removed(tmp, tmp, f"checkpoint {name}", "checkpoint", last):
            for role, group in groups.items():
                group.save_checkpoint(tmp / role)
            (tmp / "driver.json").write_text(json.dumps(driver) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = self.root / "latest.tmp"
        pointer.write_text(name + "\n")
        pointer.replace(self.root / "latest")
        whole = sorted(p for p in self.root.glob(f"{self.prefix}-*") if not p.name.endswith(".tmp"))
        for old in whole[: -self.keep]:
            shutil.rmtree(old)
        return final

    def _advice(self, last: Path | None, room: str | None = None) -> str:
        """What the user does next, after the run stopped for want of space (`room`: what the
        space is for)."""
        if last is None:
            return "The run stops here, with no checkpoint yet: free some space and run it again"
        room = room or f"the stage keeps {self.keep} and writes a new one before the oldest goes"
        return (
            f"The run stops here; {last} is the last whole checkpoint: free some space ({room}), "
            "then continue from it with --resume"
        )

    def save_model(
        self, group: Any, out: Path, config_updates: dict[str, Any] | None = None
    ) -> None:
        """The stage's trained model as a Hugging Face folder at `out` (`group.save`: its rank
        0 writes `out`.tmp and renames it when whole). A disk without room for the weights (2
        bytes a parameter at least) stops the run before a byte is written, and a disk that
        fills while they are written stops it with the partial folder removed: a
        CheckpointSpaceError that names the stage's last whole checkpoint, if any."""
        out.parent.mkdir(parents=True, exist_ok=True)
        need, free = 2 * int(getattr(group, "parameters", 0)), shutil.disk_usage(out.parent).free
        last, room = self.latest(), "room for the model's folder"
        if need > free:
            raise CheckpointSpaceError(
                f"{out}: the trained model needs at least {_size(need)} and the disk has "
                f"{_size(free)} free. {self._advice(last, room)}"
            )
        tmp = Path(f"{out}.tmp")
        with self._whole_or_removed(tmp, out, "the trained model", "folder", last, room):
            group.save(out, config_updates)

    @contextmanager
    def _whole_or_removed(
        self, tmp: Path, where: Path, what: str, partial: str, last: Path | None,
        room: str | None = None,
    ) -> Iterator[None]:  # fmt: skip
        """Writing `what` into `tmp`: a failure that leaves the disk full (under
        FULL_DISK_BYTES free) removes the partial folder and stops the run with a
        CheckpointSpaceError; any other failure is raised as it came (a role's fault, which
        the caller recovers)."""
        try:
            yield
        except Exception as e:
            free = shutil.disk_usage(tmp.parent).free
            if free >= FULL_DISK_BYTES:
                raise
            written = folder_bytes(tmp) if tmp.is_dir() else 0
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSpaceError(
                f"{where}: the disk filled up while {what} was written ({_size(written)} "
                f"written, {_size(free)} left; the partial {partial} is removed). "
                f"{self._advice(last, room)}"
            ) from e

    def load(self, folder: Path, groups: dict[str, Any]) -> dict[str, Any]:
        """Every group back in the checkpoint's state; returns its driver.json."""
        driver = json.loads((folder / "driver.json").read_text())
        for role, group in groups.items():
            group.load_checkpoint(folder / role)
        return dict(driver)

    def refuse_fresh_start(self, stage: str, resume: bool, restart: bool) -> Path | None:
        """The checkpoint to resume from (None for a fresh start): with `restart` any checkpoint
        is dropped; a checkpoint without `resume` is a CheckpointExists error."""
        if restart:
            shutil.rmtree(self.root, ignore_errors=True)
        latest = self.latest()
        if latest is not None and not resume:
            raise CheckpointExists(
                f"{latest} holds a checkpoint of an unfinished {stage} stage; pass --resume to "
                "continue it, or --restart to start over"
            )
        return latest
