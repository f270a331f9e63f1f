"""Loading the models that the roles hold, the same way in every role.

A reward model or critic is a sequence classifier with one output. InstructGPT starts it from a
causal LM (the SFT policy): the body's weights carry over, the LM head is dropped and the score
head is new. transformers reports both as a LOAD REPORT table (`lm_head.weight` unexpected,
`score.weight` missing) on every load, which here is the expected outcome, not a problem; a
folder that is already a sequence classifier still gets transformers' report for anything it
lacks.
"""

from __future__ import annotations

from typing import Any


def _causal_lm(config: Any) -> bool:
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def load_reward_model(path: str, *, dtype: Any, trust_remote_code: bool = False) -> Any:
    """A one-output sequence classifier from `path`: a reward model or critic folder, or a causal
    LM whose body it takes (its LM head dropped, a new score head drawn from torch's current
    random state)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    common = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.get(type(config), None)
    if cls is None or not _causal_lm(config):
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **common)

    config.num_labels = 1
    # The same class under the same name (saved folders name it in config.json), told that the
    # LM head's weights are not its own and that the score head is new.
    head = type(
        cls.__name__,
        (cls,),
        {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "_keys_to_ignore_on_load_unexpected": [r"^lm_head\."],
            "_keys_to_ignore_on_load_missing": [r"^score\."],
        },
    )
    return head.from_pretrained(path, config=config, **common)


def decoder_layers(model: Any) -> Any:
    """The model's stack of transformer blocks: the ModuleList of `config.num_hidden_layers`
    modules in its body (Llama's `model.layers`, GPT-2's `transformer.h`, ...)."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no stack of {n} transformer blocks found to freeze")


def freeze_bottom(model: Any, frozen_layers: int) -> None:
    """Leave the input embeddings and the first `frozen_layers` transformer blocks out of
    training (no gradients, no optimizer state). Backpropagation then stops at the first trained
    block, so a step costs the forward pass plus the backward pass of the blocks above it. With
    tied embeddings a causal LM's output head is the frozen embedding too."""
    if frozen_layers == 0:
        return
    layers = decoder_layers(model)
    if frozen_layers > len(layers):
        raise ValueError(
            f"frozen_layers={frozen_layers}: the model has only {len(layers)} transformer blocks"
        )
    model.get_input_embeddings().requires_grad_(False)
    for layer in layers[:frozen_layers]:
        layer.requires_grad_(False)
