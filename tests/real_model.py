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


def tiny_tied_llama(folder: Path, **config: int) -> Path:
    """A tiny random Llama whose LM head is its embedding, as SmolLM2's, saved as a causal LM
    into `folder` (config overrides, e.g. pad_token_id); for tests that need the real model's
    shape of problem without its size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {
        "vocab_size": 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "pad_token_id": 0,
    }
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**shape, **config}, tie_word_embeddings=True)).save_pretrained(
        folder
    )
    return folder
