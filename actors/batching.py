"""One batch layout for sampled sequences, shared by every role that reads them.

Prompts are left-padded and responses right-padded, so every response starts at the same column
P (the widest prompt): the outputs that score or choose response token t sit at column P − 1 + t
for every row. Position ids count real tokens only, so padding never shifts a position.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def pack(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """samples: [{prompt_ids, response_ids, ...}] -> tensors:

    input_ids, attention_mask, position_ids: (B, P + A); response_mask: (B, A);
    prompt_width: P (an int).
    """
    p = max(len(s["prompt_ids"]) for s in samples)
    a = max(max(len(s["response_ids"]) for s in samples), 1)
    ids, attn, resp = [], [], []
    for s in samples:
        prompt, response = list(s["prompt_ids"]), list(s["response_ids"])
        left, right = p - len(prompt), a - len(response)
        ids.append([pad_id] * left + prompt + response + [pad_id] * right)
        attn.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        resp.append([1] * len(response) + [0] * right)
    attention_mask = torch.tensor(attn, dtype=torch.long)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        "response_mask": torch.tensor(resp, dtype=torch.float32),
        "prompt_width": p,
    }


def response_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B, A, V): a causal LM's outputs that choose the response tokens of a packed batch
    (columns P − 1 to P + A − 2), computed only there: the LM head (49,152 outputs a token on
    SmolLM2) is not applied at prompt positions: they are the batch's last A + 1 columns but
    one."""
    p, a = batch["prompt_width"], batch["response_mask"].shape[1]
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": batch["position_ids"],
    }
    assert batch["input_ids"].shape[1] == p + a
    return _last_logits(model, inputs, a + 1)[:, :a]


def target_logits(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """A causal LM's outputs over a right-padded batch (input_ids, attention_mask, loss_mask:
    (B, T)) from column c, the first whose next token is a target in any row, to the end:
    ((B, T − c, V), c). The LM head is not applied at the prompt positions before c (on SmolLM2
    a demonstration's 40-token prompt is two thirds of it). Read them with
    `trainers.losses.token_logprobs(logits, input_ids[:, c:])` and `loss_mask[:, c:]`."""
    ids, t = batch["input_ids"], batch["input_ids"].shape[1]
    columns = batch["loss_mask"][:, 1:].bool().any(dim=0).nonzero()
    c = int(columns[0]) if len(columns) else t - 1
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    return _last_logits(model, inputs, t - c), c


def _last_logits(model: Any, inputs: dict[str, Any], k: int) -> torch.Tensor:
    """(B, k, V): a causal LM's outputs at the last k columns, the LM head applied only there
    (transformers' `logits_to_keep`); a model without it computes them all and they are sliced."""
    if _keeps_logits(model):
        return model(**inputs, logits_to_keep=k).logits
    return model(**inputs).logits[:, -k:]


def _keeps_logits(model: Any) -> bool:
    """The model's forward takes `logits_to_keep` (a DeepSpeed engine: its module's)."""
    forward = getattr(model, "module", model).forward
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def response_logprobs(
    scoring: torch.Tensor, batch: dict[str, Any], temperature: float = 1.0
) -> torch.Tensor:
    """(B, A) log-probs of the response tokens of a packed batch, from `response_logits`'s
    (B, A, V), at the sampling temperature (the distribution the engine sampled from). The
    chosen token's logit minus the log-sum-exp: no second (B, A, V) tensor of log-probs."""
    p, a = batch["prompt_width"], batch["response_mask"].shape[1]
    scoring = scoring.float()
    if temperature != 1.0:
        scoring = scoring / temperature
    tokens = batch["input_ids"][:, p : p + a]  # (B, A)
    chosen = scoring.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(scoring, dim=-1)


def sample_logprobs(model: Any, batch: dict[str, Any], temperature: float) -> list[list[float]]:
    """Each sample's per-token log-probs of its response under a causal LM, at the sampling
    temperature: what the engine reports for the tokens it sampled, what the reference policy
    gives for the KL penalty and the learner for decoupled PPO (one function, so that all three
    agree by construction). `batch` is a packed batch on the model's device."""
    return unpack_rows(response_logprobs(response_logits(model, batch), batch, temperature), batch)


def unpack_rows(values: torch.Tensor, batch: dict[str, Any]) -> list[list[float]]:
    """(B, A) per-token values -> each sample's list over its own response tokens."""
    lengths = batch["response_mask"].sum(dim=1).long().tolist()
    return [row[:n].tolist() for row, n in zip(values, lengths, strict=True)]


def with_end_token(sample: dict[str, Any], eos_id: int) -> dict[str, Any]:
    """The sample as a reward model was trained on it: each of its training responses ends with
    the end token (trainers.encoding.encode_response), a response cut at max_new_tokens too. A
    response that does not end with it gets it added; the sample itself is not changed."""
    ids = sample["response_ids"]
    if len(ids) and ids[-1] == eos_id:
        return sample
    return {**sample, "response_ids": [*ids, eos_id]}


def last_token_scores(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) a one-output sequence classifier (reward model, critic) read at each row's last real
    token, found by the attention mask. transformers finds it by the pad id, which skips the end
    token of every finished response when the tokenizer's pad is its end token (SmolLM2:
    pad = eos = <|im_end|>): the RM would never see whether a response ended or was cut."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    body = getattr(module, module.base_model_prefix)
    hidden = body(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    logits = module.score(hidden)  # (B, T, 1), as transformers computes it
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (columns * attention_mask.to(columns.dtype)).argmax(dim=1)  # (B,)
    return logits[torch.arange(input_ids.shape[0], device=input_ids.device), last, 0].float()


def shared_prefix_scores(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(N,) a one-output sequence classifier read at the last token of each row, where rows
    share a prefix (a prompt's K ranked responses share the prompt): each prefix is computed
    once and its keys and values serve every row that starts with it, which is what a full pass
    over the rows computes (the same scores and gradients, to float rounding) for less: on
    SmolLM2 with 40-token prompts and 33-token responses, 4 a prompt, a training step costs about
    0.6 of the full pass's. Batch: see trainers.encoding.collate_comparisons. Prefixes are
    right-padded and the padding masked, so no query row is fully masked."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    body = getattr(module, module.base_model_prefix)
    prefix_mask, suffix_mask, owner = batch["prefix_mask"], batch["suffix_mask"], batch["owner"]
    prefix_len = prefix_mask.sum(dim=1)
    if prefix_mask.shape[1] == 0:  # nothing shared: one plain pass
        return last_token_scores(model, batch["suffix_ids"], suffix_mask)
    prefix = body(
        input_ids=batch["prefix_ids"],
        attention_mask=prefix_mask,
        position_ids=torch.arange(prefix_mask.shape[1], device=owner.device).expand_as(prefix_mask),
        use_cache=True,
    )
    cache = prefix.past_key_values
    cache.batch_select_indices(owner)  # each row gets its prefix's keys and values
    columns = torch.arange(suffix_mask.shape[1], device=owner.device)
    hidden = body(
        input_ids=batch["suffix_ids"],
        attention_mask=torch.cat([prefix_mask[owner], suffix_mask], dim=1),
        position_ids=prefix_len[owner, None] + columns[None, :],
        past_key_values=cache,
        use_cache=False,
    ).last_hidden_state
    logits = module.score(hidden)  # (N, S, 1)
    last = suffix_mask.sum(dim=1) - 1
    return logits[torch.arange(len(last), device=owner.device), last, 0].float()
