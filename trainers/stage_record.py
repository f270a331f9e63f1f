"""`<run>/<stage>/stage.json`: what a finished stage ran with and reached, so that a run started
again skips it, and stops rather than overwrite it when the settings have changed.

A stage's record holds its settings and a fingerprint of its inputs by content (each file's size
and SHA-256, under the name of the input): a run folder copied or moved to another disk or
another node's mount, with or without its files' modification times, is the same finished work;
an input whose content changed is not. Where the inputs lie (the config's path fields) is not
compared, and neither are the settings of fault recovery.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Settings that decide how a stage survives faults and how often it saves, never what it
# computes: a finished stage is the same work whatever they were (and a record written before
# one of them existed still matches).
RECOVERY_FIELDS = frozenset(
    {
        "checkpoint_every",
        "keep_checkpoints",
        "learner_restarts",
        "chunk_retries",
        "placement_timeout_s",
        "collective_timeout_s",
        "autoscaling_timeout_s",
    }
)

# Each stage's settings that say where an input lies, never what it holds: the inputs'
# fingerprint compares their content.
LOCATION_FIELDS = {
    "sft": frozenset({"model", "train_data", "heldout_data"}),
    "rm": frozenset({"model", "train_data", "heldout_data", "normalize_data"}),
    "collect": frozenset({"policy", "prompts", "heldout_prompts", "ranked_file"}),
    "ppo": frozenset(
        {
            "policy",
            "reward_model",
            "critic_model",
            "prompts",
            "heldout_prompts",
            "ptx_data",
            "heldout_demonstrations",
        }
    ),
}

_CHUNK = 1 << 22
_digests: dict[tuple[str, int, int], str] = {}  # (file, size, mtime) -> SHA-256: read once


def _content(path: Path) -> list[Any]:
    """[size, SHA-256] of a file (a file unchanged since this process read it is not read
    again: a run's later stages fingerprint the earlier ones' outputs)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(_CHUNK):
                sha.update(block)
        _digests[key] = sha.hexdigest()
    return [stat.st_size, _digests[key]]


def fingerprint(**inputs: str | Path | None) -> dict[str, Any]:
    """What each named input holds: a file's [size, SHA-256], a folder's {path inside it: the
    same} for every file under it, None for an input not given. SmolLM2's 538 MB weights take
    about half a second."""
    out: dict[str, Any] = {}
    for name, given in inputs.items():
        if given is None:
            out[name] = None
            continue
        path = Path(given)
        if path.is_dir():
            out[name] = {f.relative_to(path).as_posix(): _content(f) for f in _files(path)}
        else:
            out[name] = _content(path)
    return out


def _files(path: Path) -> list[Path]:
    """The file, or every file under the folder, in order."""
    return sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]


def _outcome(settings: Any, stage: str | None = None) -> Any:
    """`settings` without RECOVERY_FIELDS (at any depth) and LOCATION_FIELDS (in their stage's
    section)."""
    if not isinstance(settings, dict):
        return settings
    drop = RECOVERY_FIELDS | LOCATION_FIELDS.get(stage or "", frozenset())
    kept = {k: v for k, v in settings.items() if k not in drop}
    return {k: _outcome(v, k if stage is None else "") for k, v in kept.items()}


def _by_location(inputs: Any) -> bool:
    """A record written before inputs were fingerprinted by content: {file: [size, mtime]}."""
    if not isinstance(inputs, dict) or not inputs:
        return False
    stats = inputs.values()
    return all(isinstance(v, list) and len(v) == 2 and isinstance(v[1], int) for v in stats)


def _located(*paths: str | Path) -> dict[str, list[int]]:
    """Such a record's fingerprint of the same inputs: each file's size and modification time
    under its path."""
    out: dict[str, list[int]] = {}
    for p in map(Path, paths):
        for f in _files(p):
            stat = f.stat()
            out[str(f)] = [stat.st_size, stat.st_mtime_ns]
    return out


class StageRecord:
    """`<run>/<stage>/stage.json`: the settings a stage ran with and the figures it reached.

    A finished stage with the same settings is not run again; with other settings the run stops
    (unless restarted) rather than overwrite finished work. The settings of RECOVERY_FIELDS and
    LOCATION_FIELDS are recorded but not compared.
    """

    def __init__(
        self, folder: Path, settings: dict[str, Any], inputs: dict[str, str | Path | None]
    ) -> None:
        """`inputs`: the stage's input files and folders by name (None: not given)."""
        self.path = folder / "stage.json"
        self.settings = json.loads(
            json.dumps({**settings, "inputs": fingerprint(**inputs)}, default=str)
        )
        self._given = [p for p in inputs.values() if p is not None]

    def _recorded(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(the record's settings, this run's), each as compared; None: no record."""
        if not self.path.is_file():
            return None
        old = _outcome(json.loads(self.path.read_text()).get("settings", {}))
        new = _outcome(self.settings)
        if _by_location(old.get("inputs")) and old["inputs"] == _located(*self._given):
            old["inputs"] = new["inputs"]  # an earlier version's record, its files unchanged
        return old, new

    def finished(self) -> dict[str, Any] | None:
        compared = self._recorded()
        if compared is None or compared[0] != compared[1]:
            return None
        return dict(json.loads(self.path.read_text())["metrics"])

    def differences(self) -> list[str]:
        compared = self._recorded()
        if compared is None:
            return []
        old, new = compared
        return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))

    def write(self, metrics: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "metrics": metrics}, indent=2) + "\n")
        tmp.replace(self.path)
