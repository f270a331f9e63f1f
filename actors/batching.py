"""One batch layout for sampled sequences, shared by every role that reads them.

Prompts are left-padded and responses right-padded, so every response starts at the same column
P (the widest prompt): the outputs that score or choose response token t sit at column P − 1 + t
for every row. Position ids count real tokens only, so padding never shifts a position.

Where every prompt of a batch starts with the same tokens (a chat template's system prompt and
the task's own wording: 30 of SmolLM2's 40-token prompts in the built-in task), those tokens are
taken out of the rows and computed once, their keys and values given to every row
(`_packed_inputs`): the same outputs, to float rounding, for fewer tokens' work. Where rows
repeat a prompt (a group's n samples of it: GRPO, RLOO), each prompt is computed once for its
rows instead, when that saves more (`prompt_groups`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

# A shared prefix shorter than this is computed in every row: its one-row pass is a forward call
# of its own for a few tokens' saving. The tiny task's prompts are about 11 tokens long, so its
# batches (and the demo's figures) are as they were.
MIN_SHARED_TOKENS = 16


def pack(samples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """samples: [{prompt_ids, response_ids, ...}] -> tensors:

    input_ids, attention_mask, position_ids: (B, P + A); response_mask: (B, A);
    prompt_width: P (an int); and where the rows' prompts start with tokens computed once for
    them, prefix_ids: those tokens, which the rows then leave out (their position ids continue
    the prefix's): (1, L), the first tokens every prompt shares (see `shared_prompt_length`);
    or, where rows repeat prompts (see `prompt_groups`), (G, L) each distinct prompt but its
    last token, right-padded, with prefix_mask (G, L) and prefix_owner (B,), a row's prefix.
    """
    shared = shared_prompt_length(samples)
    groups = prompt_groups(samples, shared)
    if groups is not None:
        prefixes, owner = groups
        own = [len(prefixes[o]) for o in owner]
    else:
        own = [shared] * len(samples)
    p = max(len(s["prompt_ids"]) - k for s, k in zip(samples, own, strict=True))
    a = max(max(len(s["response_ids"]) for s in samples), 1)
    ids, attn, resp = [], [], []
    for s, k in zip(samples, own, strict=True):
        prompt, response = list(s["prompt_ids"])[k:], list(s["response_ids"])
        left, right = p - len(prompt), a - len(response)
        ids.append([pad_id] * left + prompt + response + [pad_id] * right)
        attn.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        resp.append([1] * len(response) + [0] * right)
    attention_mask = torch.tensor(attn, dtype=torch.long)
    batch = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        + torch.tensor(own, dtype=torch.long)[:, None],
        "response_mask": torch.tensor(resp, dtype=torch.float32),
        "prompt_width": p,
    }
    if groups is not None:
        width = max(len(x) for x in prefixes)
        batch["prefix_ids"] = torch.tensor([x + [pad_id] * (width - len(x)) for x in prefixes])
        batch["prefix_mask"] = torch.tensor(
            [[1] * len(x) + [0] * (width - len(x)) for x in prefixes]
        )
        batch["prefix_owner"] = torch.tensor(owner, dtype=torch.long)
    elif own[0]:
        batch["prefix_ids"] = torch.tensor([list(samples[0]["prompt_ids"])[: own[0]]])
    return batch


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many first tokens all the sequences share, leaving each at least its last token."""
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences[1:]):
        n += 1
    return n


def shared_prompt_length(samples: list[dict[str, Any]]) -> int:
    """How many first tokens every prompt of the batch shares, where computing them once saves
    work: at least `MIN_SHARED_TOKENS`, over two rows or more, and each prompt keeps one token
    of its own (its last, whose output chooses the response's first token). 0 otherwise."""
    if len(samples) < 2:
        return 0
    n = common_prefix_length([s["prompt_ids"] for s in samples])
    return n if n >= MIN_SHARED_TOKENS else 0


def prompt_groups(
    samples: list[dict[str, Any]], shared: int
) -> tuple[list[list[int]], list[int]] | None:
    """Where rows repeat prompts (a group's n samples of one prompt), each distinct prompt but
    its last token (which a row keeps: its output chooses the response's first token) as a
    prefix computed once, and each row's prefix: (prefixes, owner). Only where every prefix is
    at least `MIN_SHARED_TOKENS` long and this saves more tokens' work than the batch-wide
    shared prefix of `shared` tokens (`shared_prompt_length`), which it then replaces; None
    otherwise."""
    index: dict[tuple[int, ...], int] = {}
    owner = [index.setdefault(tuple(s["prompt_ids"][:-1]), len(index)) for s in samples]
    if len(index) == len(samples):
        return None
    prefixes = [list(key) for key in index]
    if min(len(x) for x in prefixes) < MIN_SHARED_TOKENS:
        return None
    saved = sum(len(prefixes[o]) for o in owner) - sum(len(x) for x in prefixes)
    if saved <= (len(samples) - 1) * shared:
        return None
    return prefixes, owner


def _packed_inputs(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """A packed batch's inputs for `model` (a causal LM, or a transformer without its head).
    With a shared prefix: the model's transformer computes the prefix once and every row attends
    to its keys and values (gradients flow through them to the weights, summed over the rows); a
    model whose forward takes no `past_key_values` gets the prefix put back in front of every
    row instead (the same outputs, at the full cost)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    prefix = batch.get("prefix_ids")
    if prefix is None:
        return inputs
    rows, n = inputs["input_ids"].shape[0], prefix.shape[1]
    mask = inputs["attention_mask"]
    positions = torch.arange(n, device=prefix.device)[None, :].expand(prefix.shape[0], n)
    owner = batch.get("prefix_owner")
    if owner is None:  # one prefix for every row
        owner = torch.zeros(rows, dtype=torch.long, device=prefix.device)
        prefix_pass: dict[str, Any] = {}
        rows_prefix_mask = torch.ones(rows, n, dtype=mask.dtype, device=mask.device)
    else:  # each row's prompt, right-padded: padding masked, so no query row is fully masked
        prefix_pass = {"attention_mask": batch["prefix_mask"]}
        rows_prefix_mask = batch["prefix_mask"][owner].to(mask.dtype)
    attention_mask = torch.cat([rows_prefix_mask, mask], dim=1)
    body = _transformer(model)
    if not (_takes(model, "past_key_values") and _takes(body, "past_key_values")):
        return {
            "input_ids": torch.cat([prefix[owner], inputs["input_ids"]], dim=1),
            "attention_mask": attention_mask,
            "position_ids": torch.cat([positions[owner], inputs["position_ids"]], dim=1),
        }
    cache = body(
        input_ids=prefix, position_ids=positions, use_cache=True, **prefix_pass
    ).past_key_values
    cache.batch_select_indices(owner)
    return {**inputs, "attention_mask": attention_mask, "past_key_values": cache}


def _transformer(model: Any) -> Any:
    """The model's transformer without its head (a DeepSpeed engine wraps the model; a
    transformer is its own)."""
    module = getattr(model, "module", model)
    name = getattr(module, "base_model_prefix", "")
    inner = getattr(module, name, None) if name else None
    return inner if isinstance(inner, torch.nn.Module) else module


def _takes(model: Any, argument: str) -> bool:
    """The model's forward takes `argument` (a DeepSpeed engine: its module's)."""
    forward = getattr(model, "module", model).forward
    try:
        return argument in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def response_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B, A, V): a causal LM's outputs that choose the response tokens of a packed batch
    (columns P − 1 to P + A − 2), computed only there: the LM head (49,152 outputs a token on
    SmolLM2) is not applied at prompt positions: they are the batch's last A + 1 columns but
    one."""
    p, a = batch["prompt_width"], batch["response_mask"].shape[1]
    assert batch["input_ids"].shape[1] == p + a
    return _last_logits(model, _packed_inputs(model, batch), a + 1)[:, :a]


def target_logits(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """A causal LM's outputs over a right-padded batch (input_ids, attention_mask, loss_mask:
    (B, T)) from column c, the first whose next token is a target in any row, to the end:
    ((B, T − c, V), c). The LM head is not applied at the prompt positions before c (on SmolLM2
    a demonstration's 40-token prompt is two thirds of it), and the first columns that every row
    shares before c (a system prompt) are computed once, as `pack` does. Read them with
    `trainers.losses.token_logprobs(logits, input_ids[:, c:])` and `loss_mask[:, c:]`."""
    ids, mask, t = batch["input_ids"], batch["attention_mask"], batch["input_ids"].shape[1]
    columns = batch["loss_mask"][:, 1:].bool().any(dim=0).nonzero()
    c = int(columns[0]) if len(columns) else t - 1
    same = ((ids == ids[:1]) & mask.bool()).all(dim=0).long()  # (T,) every row's real, equal token
    shared = int(same[:c].cumprod(dim=0).sum()) if len(ids) > 1 else 0
    shared = shared if shared >= MIN_SHARED_TOKENS else 0
    if not shared:
        return _last_logits(model, {"input_ids": ids, "attention_mask": mask}, t - c), c
    rest = {
        "input_ids": ids[:, shared:],
        "attention_mask": mask[:, shared:],
        "position_ids": torch.arange(shared, t, device=ids.device).expand(len(ids), -1),
        "prefix_ids": ids[:1, :shared],
    }
    return _last_logits(model, _packed_inputs(model, rest), t - c), c


def _last_logits(model: Any, inputs: dict[str, Any], k: int) -> torch.Tensor:
    """(B, k, V): a causal LM's outputs at the last k columns, the LM head applied only there
    (transformers' `logits_to_keep`); a model without it computes them all and they are sliced."""
    if _takes(model, "logits_to_keep"):
        return model(**inputs, logits_to_keep=k).logits
    return model(**inputs).logits[:, -k:]


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
    hidden = _transformer(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    return _at_last_token(model, hidden, attention_mask)


def packed_scores(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B,) `last_token_scores` of a packed batch, its shared prefix computed once."""
    return _at_last_token(model, packed_states(model, batch), batch["attention_mask"])


def packed_states(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B, P + A, H): a sequence classifier's (reward model, critic) last hidden states over a
    packed batch's columns, its shared prefix computed once."""
    body = _transformer(model)
    return body(**_packed_inputs(body, batch)).last_hidden_state


def _at_last_token(model: Any, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    logits = getattr(model, "module", model).score(hidden)  # (B, T, 1), as transformers has it
    columns = torch.arange(hidden.shape[1], device=hidden.device)
    last = (columns * attention_mask.to(columns.dtype)).argmax(dim=1)  # (B,)
    return logits[torch.arange(hidden.shape[0], device=hidden.device), last, 0].float()


def shared_prefix_scores(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(N,) a one-output sequence classifier read at the last token of each row, where rows
    share a prefix (a prompt's K ranked responses share the prompt): each prefix is computed
    once and its keys and values serve every row that starts with it, which is what a full pass
    over the rows computes (the same scores and gradients, to float rounding) for less: on
    SmolLM2 with 40-token prompts and 33-token responses, 4 a prompt, a training step costs about
    0.6 of the full pass's. Batch: see trainers.encoding.collate_comparisons. Prefixes are
    right-padded and the padding masked, so no query row is fully masked."""
    module, body = getattr(model, "module", model), _transformer(model)
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
