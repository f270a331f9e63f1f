"""Encoding: records into token ids, and token ids into padded batches.

Text is encoded with the tokenizer's chat template: the prompt's turns plus the assistant header,
the response after it, then the end token. Examples longer than the configured limits (`Limits`,
the run config's `data` section) are reported with their places, never cut. Batches are
right-padded tensors, and an epoch's batches come in an order fixed by the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.batching import common_prefix_length
from trainers.formats import DataError, Message

# -- encoding ----------------------------------------------------------------------------------


def check_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """The tokenizer has what the recipe needs: a chat template, an end and a pad token."""
    missing = [
        what
        for what, ok in (
            ("a chat template (chat_template)", bool(getattr(tokenizer, "chat_template", None))),
            ("an end token (eos_token)", tokenizer.eos_token_id is not None),
            ("a padding token (pad_token)", tokenizer.pad_token_id is not None),
        )
        if not ok
    ]
    if missing:
        raise DataError(f"{folder}: the tokenizer lacks {' and '.join(missing)}")


def encode_prompt(tokenizer: Any, prompt: str | list[Message]) -> list[int]:
    """Token ids of the prompt's turns (a string is one user turn), then the assistant header."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_of(rec: dict[str, Any]) -> str | list[Message]:
    """A record's prompt: its turns where it has them (read's records), else its text."""
    return rec.get("messages") or rec["prompt"]


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Token ids of a response, ending with the end token."""
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_seq_len: int
    on_too_long: str = "error"

    @classmethod
    def of(cls, data: Any) -> Limits:
        """The limits of the run config's `data` section."""
        return cls(data.max_prompt_tokens, data.max_seq_len, data.on_too_long)


def require_batch(field: str, batch: int, examples: list[Any], what: str, path: str) -> None:
    """A stage's batch must fit in its data: `field` names the setting, `path` the file."""
    if len(examples) < batch:
        raise DataError(
            f"{field} ({batch}) is larger than the {len(examples)} usable {what} in {path}"
        )


def _enforce(too_long: list[str], total: int, limits: Limits, what: str, log: Any) -> None:
    if not too_long:
        return
    shown = "\n  ".join(too_long[:10]) + ("\n  ..." if len(too_long) > 10 else "")
    msg = (
        f"{len(too_long)} of {total} {what} exceed data.max_prompt_tokens="
        f"{limits.max_prompt_tokens} or data.max_seq_len={limits.max_seq_len}:\n  {shown}"
    )
    if limits.on_too_long == "error":
        raise DataError(msg + '\n(raise the limits, or set data.on_too_long: "skip")')
    log(f"skipping {msg}")


def _length_problem(prompt: list[int], seqs: list[int], limits: Limits) -> str | None:
    if len(prompt) > limits.max_prompt_tokens:
        return f"prompt has {len(prompt)} tokens"
    if max(seqs) > limits.max_seq_len:
        return f"prompt + response has {max(seqs)} tokens"
    return None


def encode_demonstrations(
    dataset: Any, tokenizer: Any, limits: Limits, log: Any = print
) -> list[dict[str, Any]]:
    """[{"input_ids", "loss_mask", "where"}]: loss on the response and its end token only."""
    out, too_long = [], []
    for rec in dataset:
        p = encode_prompt(tokenizer, _prompt_of(rec))
        r = encode_response(tokenizer, rec["response"])
        problem = _length_problem(p, [len(p) + len(r)], limits)
        if problem:
            too_long.append(f"{rec['where']}: {problem}")
            continue
        out.append(
            {"input_ids": p + r, "loss_mask": [0] * len(p) + [1] * len(r), "where": rec["where"]}
        )
    _enforce(too_long, len(dataset), limits, "demonstrations", log)
    return out


def encode_prompts(
    dataset: Any, tokenizer: Any, limits: Limits, log: Any = print
) -> list[dict[str, Any]]:
    """[{"prompt_ids", "text", "where", "fields"}]: the prompt's turns plus the assistant header;
    "text" is the readable prompt (its last user turn), "fields" the line's other fields."""
    out, too_long = [], []
    for rec in dataset:
        ids = encode_prompt(tokenizer, _prompt_of(rec))
        if len(ids) > limits.max_prompt_tokens:
            too_long.append(f"{rec['where']}: prompt has {len(ids)} tokens")
            continue
        fields = json.loads(rec["fields"]) if rec.get("fields") else {}
        out.append(
            {"prompt_ids": ids, "text": rec["prompt"], "where": rec["where"], "fields": fields}
        )
    _enforce(too_long, len(dataset), limits, "prompts", log)
    return out


def encode_comparisons(
    dataset: Any, tokenizer: Any, limits: Limits, log: Any = print
) -> list[dict[str, Any]]:
    """[{"sequences": [ids of prompt + response_k, best first], "where"}]."""
    out, too_long = [], []
    for rec in dataset:
        p = encode_prompt(tokenizer, _prompt_of(rec))
        seqs = [p + encode_response(tokenizer, r) for r in rec["responses"]]
        problem = _length_problem(p, [len(s) for s in seqs], limits)
        if problem:
            too_long.append(f"{rec['where']}: {problem}")
            continue
        out.append({"sequences": seqs, "where": rec["where"]})
    _enforce(too_long, len(dataset), limits, "comparisons", log)
    return out


# -- batches -----------------------------------------------------------------------------------


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_sft(examples: list[dict[str, Any]], pad_id: int, normalizer: float) -> dict[str, Any]:
    """input_ids, attention_mask, loss_mask: (B, T), right-padded; `normalizer` is the global
    batch's count of loss tokens (see trainers.losses)."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": _pad(ids, pad_id),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "loss_mask": _pad([e["loss_mask"] for e in examples], 0),
        "normalizer": float(normalizer),
    }


def collate_comparisons(
    examples: list[dict[str, Any]], pad_id: int, normalizer: float
) -> dict[str, Any]:
    """All K responses of every prompt as rows of one forward pass, the prompt computed once:

    prefix_ids, prefix_mask: (P, L), each prompt's shared tokens, right-padded; suffix_ids,
    suffix_mask: (N, S) with N = Σ K_p, the rest of each row, right-padded; owner: (N,), the
    prompt of each row; index: (P, K_max), the row of each ranked response (0 where absent);
    valid: (P, K_max). `normalizer`: prompts in the global batch.
    """
    prefixes: list[list[int]] = []
    suffixes: list[list[int]] = []
    owner: list[int] = []
    index, valid = [], []
    k_max = max(len(e["sequences"]) for e in examples)
    shared = [common_prefix_length(e["sequences"]) for e in examples]
    if min(shared) == 0:  # rows that share nothing (not one prompt's): one plain pass
        shared = [0] * len(examples)
    for p, (e, n) in enumerate(zip(examples, shared, strict=True)):
        seqs = e["sequences"]
        k = len(seqs)
        index.append(list(range(len(suffixes), len(suffixes) + k)) + [0] * (k_max - k))
        valid.append([1] * k + [0] * (k_max - k))
        prefixes.append(list(seqs[0][:n]))
        suffixes.extend(list(s[n:]) for s in seqs)
        owner.extend([p] * k)
    return {
        "prefix_ids": _pad(prefixes, pad_id),
        "prefix_mask": _pad([[1] * len(r) for r in prefixes], 0),
        "suffix_ids": _pad(suffixes, pad_id),
        "suffix_mask": _pad([[1] * len(r) for r in suffixes], 0),
        "owner": torch.tensor(owner, dtype=torch.long),
        "index": torch.tensor(index, dtype=torch.long),
        "valid": torch.tensor(valid, dtype=torch.bool),
        "normalizer": float(normalizer),
    }


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each full batch of one epoch, in an order fixed by (seed, epoch); the last
    partial batch is left out (every step sees the same number of examples)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
