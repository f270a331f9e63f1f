"""Data: demonstrations, ranked comparisons and prompts, from JSONL or Parquet.

Records are validated one by one, and a bad one is a `DataError` naming the file and the line
(JSONL) or row (Parquet). They become a `datasets.Dataset` with a `where` column that keeps each
record's place, so every later message can point at it. Text is encoded with the tokenizer's chat
template: the prompt as a user turn plus the assistant header, the response after it, then the
end token. Examples longer than the configured limits are reported with their places, never cut.

    demonstrations   {"prompt": str, "response": str}
    comparisons      {"prompt": str, "responses": [str, ...]}   ranked best first, K >= 2, distinct
    prompts          {"prompt": str}
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

Kind = Literal["demonstrations", "comparisons", "prompts"]


class DataError(ValueError):
    """Unusable data; the message names the file and the line or row."""


# -- reading -----------------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(place, parsed record) for each record of a JSONL or Parquet file."""
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines (a trailing newline) hold nothing
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    elif path.suffix == ".parquet":
        import datasets

        try:
            table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        for i, row in enumerate(table):
            yield f"{path}: row {i}", row
    else:
        raise DataError(f"{path}: unknown format (expected .jsonl or .parquet)")


def _text(record: dict[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise DataError(f'{where}: missing field "{key}"')
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{key}" must be a string, not {type(value).__name__}')
    if not value.strip():
        raise DataError(f'{where}: field "{key}" is empty')
    _unicode(value, f'field "{key}"', where)
    return value


def _unicode(value: str, what: str, where: str) -> None:
    """JSON's escapes can make text that is not Unicode (an unpaired surrogate such as \\ud800),
    which no tokenizer takes: refuse it here, naming the line."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{where}: {what} is not valid Unicode text (an unpaired surrogate escape)"
        ) from None


def validate(record: Any, kind: Kind, where: str) -> dict[str, Any]:
    """The record's fields of `kind`, checked; extra fields are ignored."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    out: dict[str, Any] = {"prompt": _text(record, "prompt", where), "where": where}
    if kind == "demonstrations":
        out["response"] = _text(record, "response", where)
    elif kind == "comparisons":
        responses = record.get("responses")
        if responses is None:
            raise DataError(f'{where}: missing field "responses" (a list, ranked best first)')
        if not isinstance(responses, list):
            raise DataError(
                f'{where}: field "responses" must be a list of strings, ranked best first'
            )
        if len(responses) < 2:
            raise DataError(
                f'{where}: "responses" needs at least 2 ranked responses, has {len(responses)}'
            )
        for i, r in enumerate(responses):
            if not isinstance(r, str) or not r.strip():
                raise DataError(f'{where}: "responses"[{i}] must be a non-empty string')
            _unicode(r, f'"responses"[{i}]', where)
        if len(set(responses)) != len(responses):
            raise DataError(f'{where}: "responses" holds the same response twice')
        out["responses"] = list(responses)
    return out


def read(path: str | Path, kind: Kind, field: str = "") -> Any:
    """A validated `datasets.Dataset` of `kind` records with a `where` column.

    `field` is the config field that named the file, for the message when it is missing.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        named = f" (named by {field})" if field else ""
        raise DataError(f"{path}: data file not found{named}")
    records = [validate(rec, kind, where) for where, rec in _rows(path)]
    if not records:
        raise DataError(f"{path}: holds no records")
    return datasets.Dataset.from_list(records)


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


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of the prompt as a user turn, followed by the assistant header."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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
        p, r = encode_prompt(tokenizer, rec["prompt"]), encode_response(tokenizer, rec["response"])
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
    """[{"prompt_ids", "text", "where"}]: the prompt as a user turn plus the assistant header."""
    out, too_long = [], []
    for rec in dataset:
        ids = encode_prompt(tokenizer, rec["prompt"])
        if len(ids) > limits.max_prompt_tokens:
            too_long.append(f"{rec['where']}: prompt has {len(ids)} tokens")
            continue
        out.append({"prompt_ids": ids, "text": rec["prompt"], "where": rec["where"]})
    _enforce(too_long, len(dataset), limits, "prompts", log)
    return out


def encode_comparisons(
    dataset: Any, tokenizer: Any, limits: Limits, log: Any = print
) -> list[dict[str, Any]]:
    """[{"sequences": [ids of prompt + response_k, best first], "where"}]."""
    out, too_long = [], []
    for rec in dataset:
        p = encode_prompt(tokenizer, rec["prompt"])
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
    """All K responses of every prompt as rows of one forward pass.

    input_ids, attention_mask: (N, T) with N = Σ K_p; index: (P, K_max), the row of each ranked
    response (0 where absent); valid: (P, K_max). `normalizer`: prompts in the global batch.
    """
    rows: list[list[int]] = []
    index, valid = [], []
    k_max = max(len(e["sequences"]) for e in examples)
    for e in examples:
        k = len(e["sequences"])
        index.append(list(range(len(rows), len(rows) + k)) + [0] * (k_max - k))
        valid.append([1] * k + [0] * (k_max - k))
        rows.extend(e["sequences"])
    return {
        "input_ids": _pad(rows, pad_id),
        "attention_mask": _pad([[1] * len(r) for r in rows], 0),
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
