"""The RL stage's checkpoints: the learners' DeepSpeed states and the driver's state, written
whole or not at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from trainers.rl.roles import Roles


class CheckpointExists(RuntimeError):
    """An unfinished run's checkpoint is in the way of a fresh start."""


class Checkpoints:
    """`<ppo>/checkpoints/iter-NNNNNN/`: the policy's and (with GAE) the critic's DeepSpeed
    states (weights, optimizer, schedule) and `driver.json` (iteration, KL controller, prompt
    position, the SFT policy's evaluation). A checkpoint is written into a `.tmp` folder and
    renamed when whole; `latest` names the newest whole one and moves only after the rename, so
    a run killed while writing resumes from the one before."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root, self.keep = root, keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        return folder if (folder / "driver.json").is_file() else None

    def save(self, iteration: int, roles: Roles, driver: dict[str, Any]) -> Path:
        name = f"iter-{iteration:06d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for role, group in roles.learners().items():
            group.save_checkpoint(tmp / role)
        (tmp / "driver.json").write_text(json.dumps(driver) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = self.root / "latest.tmp"
        pointer.write_text(name + "\n")
        pointer.replace(self.root / "latest")
        whole = sorted(p for p in self.root.glob("iter-*") if not p.name.endswith(".tmp"))
        for old in whole[: -self.keep]:
            shutil.rmtree(old)
        return final

    def load(self, folder: Path, roles: Roles) -> dict[str, Any]:
        """Put the groups back in the checkpoint's state and the engines on its weights."""
        driver = json.loads((folder / "driver.json").read_text())
        for role, group in roles.learners().items():
            group.load_checkpoint(folder / role)
        roles.sync_weights(driver["iteration"])
        return dict(driver)
