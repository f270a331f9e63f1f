"""The RL stage's checkpoints: the policy's and (with GAE) the critic's DeepSpeed states and
`driver.json` (iteration, KL controller, prompt position, the SFT policy's evaluation), written
whole or not at all (trainers.checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainers.checkpoints import CheckpointExists
from trainers.checkpoints import Checkpoints as _Folders
from trainers.rl.roles import Roles

__all__ = ["CheckpointExists", "Checkpoints"]


class Checkpoints:
    """`<ppo>/checkpoints/iter-NNNNNN/`, of the roles' learner groups."""

    def __init__(self, root: Path, keep: int) -> None:
        self.folders = _Folders(root, keep, "iter")
        self.root = root

    def latest(self) -> Path | None:
        return self.folders.latest()

    def save(self, iteration: int, roles: Roles, driver: dict[str, Any]) -> Path:
        return self.folders.save(iteration, roles.learners(), driver)

    def save_models(self, roles: Roles, out: Path) -> None:
        """The trained policy (and critic) as model folders in the stage's folder `out`, each
        written whole or not at all (a full disk: `trainers.checkpoints.Checkpoints.save_model`)."""
        for name, group in roles.learners().items():
            self.folders.save_model(group, out / name)

    def load(self, folder: Path, roles: Roles) -> dict[str, Any]:
        """Put the groups back in the checkpoint's state and the engines on its weights."""
        driver = self.folders.load(folder, roles.learners())
        roles.sync_weights(driver["iteration"])
        return driver
