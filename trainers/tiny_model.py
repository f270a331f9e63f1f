"""The built-in tasks' tiny random-init causal LM."""

from __future__ import annotations

from typing import Any


def build_model(cfg: Any, tokenizer: Any, seed: int) -> Any:
    """The tiny random-init causal LM (cfg: TinyModelConfig)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[cfg.architecture]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**common), dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model
