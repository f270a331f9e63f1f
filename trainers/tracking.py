"""Where a run's figures go: Weights & Biases (offline by default) and the console."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class Tracker:
    """One W&B run for one `instructray run`; every stage logs under its own prefix.

    mode "offline" writes under `<run>/wandb/` and never touches the network (`wandb sync` uploads
    it later); "online" needs WANDB_API_KEY in the environment; "disabled" logs nothing.
    """

    def __init__(
        self,
        *,
        mode: str,
        project: str,
        entity: str | None,
        name: str,
        run_dir: Path,
        config: dict[str, Any],
    ) -> None:
        self.mode = mode
        self.run: Any = None
        self._step = 0
        if mode == "disabled":
            return
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            dir=str(run_dir),
            mode=mode,
            config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    @property
    def folder(self) -> str | None:
        """The W&B run's local folder (what `wandb sync` takes)."""
        return None if self.run is None else str(Path(self.run.dir).parent)

    def log(self, metrics: dict[str, float]) -> None:
        """Log one row; the W&B step counts rows over the whole run."""
        if self.run is not None:
            self.run.log(metrics, step=self._step)
        self._step += 1

    def table(self, key: str, rows: list[list[Any]], iteration: int) -> None:
        """A table of sample prompts and responses (logged with the next row)."""
        if self.run is not None:
            import wandb

            columns = ["prompt", "response", "rm_score", "kl", "labeler_score", "version"]
            self.run.log(
                {key: wandb.Table(columns=columns, data=rows), f"{key}_iteration": iteration},
                step=self._step,
            )

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def progress(total: int, desc: str) -> Any:
    """A console progress bar; where the output is not a terminal (a log file, a Ray job's
    logs) it writes a line every 15 s instead of redrawing many times a second."""
    import sys

    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.1 if tty else 15.0
    )
