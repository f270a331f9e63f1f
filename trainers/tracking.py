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


class LibraryLog:
    """Keeps the libraries' chatter in the driver process (Python warnings, the log records of
    transformers, datasets, DeepSpeed, vLLM and Ray's Python side, datasets' and transformers'
    progress bars) out of the console and in a file of the run folder; `close` undoes it. The
    console keeps the run's own lines and progress bars, and errors."""

    LOGGERS = (
        "py.warnings",
        "transformers",
        "datasets",
        "DeepSpeed",
        "deepspeed",
        "vllm",
        "torch",
        # a note at every local cluster's start on the token auth that RayRuntime turns on
        "ray._private.authentication",
    )

    def __init__(self, path: Path) -> None:
        import logging

        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path, encoding="utf-8")
        self.handler.setFormatter(
            logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", "%H:%M:%S")
        )
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        logging.captureWarnings(True)
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, list(logger.handlers), logger.propagate))
            logger.handlers = [self.handler]
            logger.propagate = False
        self._bars = _library_bars(False)

    def close(self) -> None:
        import logging

        for logger, handlers, propagate in self._saved:
            logger.handlers = handlers
            logger.propagate = propagate
        self._saved = []
        logging.captureWarnings(False)
        _library_bars(self._bars)
        self.handler.close()


def _library_bars(enabled: bool) -> bool:
    """Turn the progress bars of datasets and transformers on or off; returns whether they were
    on."""
    import datasets
    from transformers.utils import logging as hf_logging

    was = datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled()
    if enabled:
        datasets.enable_progress_bars()
        hf_logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
    return was
