"""The real pretrained model that `make smollm2` makes (shared/PLATFORM.md): where it lies, and a
skip with the reason where it does not (`make test` makes it before pytest starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct's model folder; skips the test where `make smollm2` has not run."""
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} is absent: `make smollm2` makes it (`make test` does so first)")
    return SMOLLM2
