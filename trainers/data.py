"""Data: demonstrations, ranked comparisons and prompts, from JSONL or Parquet.

Records are validated one by one, and a bad one is a `DataError` naming the file and the line
(JSONL) or row (Parquet), and the field. They become a `datasets.Dataset` with a `where` column
that keeps each record's place, so every later message can point at it. Extra fields are ignored.

Our own formats:

    demonstrations   {"prompt": str, "response": str}
    comparisons      {"prompt": str, "responses": [str, ...]}   ranked best first, K >= 2, distinct
                     {"prompt": [msgs], "responses": [str, ...]}  the same with a conversation
    prompts          {"prompt": str}

Hugging Face TRL's dataset formats, where a message is {"role": "system" | "user" | "assistant",
"content": str} and [msgs] a list of them:

    demonstrations   {"prompt": str, "completion": str}                  prompt-completion
                     {"prompt": [msgs], "completion": [msgs]}            conversational
                     {"messages": [msgs]}                                language modeling, conv.
    comparisons      {"prompt": str, "chosen": str, "rejected": str}     preference, K = 2
                     {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}
                     {"chosen": [msgs], "rejected": [msgs]}              implicit prompt
    prompts          {"prompt": str} or {"prompt": [msgs]}                prompt-only
                     any of the above: its prompt, the rest ignored

A response part ("completion", "chosen", "rejected") is one assistant turn. A prompt's turns end
with a user turn; in {"messages": ...} the response is the last assistant turn and the prompt the
turns before it (for prompts, all the turns when the last is a user turn); in the implicit-prompt
form the prompt is the turns that "chosen" and "rejected" share before their last. Strings and
message lists are not mixed in one record. Not accepted: {"chosen": str, "rejected": str} (nothing
tells where the prompt ends: add a "prompt" field), {"text": str} (no prompt), TRL's unpaired
preference (a "label" field: its undesired completions are no demonstrations) and stepwise
supervision.

Each record keeps its prompt as a conversation, a `messages` column of {"role", "content"} turns
(a string prompt is one user turn), and as a readable text, the `prompt` column (the last user
turn's content), which the labeler and the logs read. Text is encoded with the tokenizer's chat
template: the prompt's turns plus the assistant header, the response after it, then the end token.
Examples longer than the configured limits are reported with their places, never cut.
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
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

ROLES = ("system", "user", "assistant")

_MSGS = '[{"role": "system"|"user"|"assistant", "content": str}, ...]'
FORMATS: dict[str, tuple[str, ...]] = {
    "demonstrations": (
        '{"prompt": str, "response": str}',
        'TRL {"prompt": str, "completion": str}',
        'TRL {"prompt": [msgs], "completion": [msgs]}',
        'TRL {"messages": [msgs]}',
    ),
    "comparisons": (
        '{"prompt": str, "responses": [str, ...]}',
        'TRL {"prompt": str, "chosen": str, "rejected": str}',
        'TRL {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}',
        'TRL {"chosen": [msgs], "rejected": [msgs]}',
    ),
    "prompts": (
        '{"prompt": str}',
        'TRL {"prompt": [msgs]}',
        'TRL {"messages": [msgs]}',
        'TRL {"chosen": [msgs], "rejected": [msgs]}',
    ),
}


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


def _no_format(where: str, kind: str, problem: str) -> DataError:
    """A record that matches none of `kind`'s formats: say what is wrong and what is accepted."""
    accepted = "; ".join(FORMATS[kind])
    return DataError(
        f"{where}: {problem}; the record matches none of the formats accepted for {kind}: "
        f"{accepted} (msgs: {_MSGS})"
    )


def _kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "a list of messages"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


def _mixed(where: str, prompt: Any, field: str, value: Any) -> DataError:
    return DataError(
        f'{where}: field "prompt" is {_kind_of(prompt)} but field "{field}" is {_kind_of(value)}; '
        "a record holds strings only or lists of messages only"
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _messages(value: Any, field: str, where: str) -> list[Message]:
    """A conversation's turns, checked, as {"role", "content"} (other keys dropped)."""
    if not isinstance(value, list):
        raise DataError(
            f'{where}: field "{field}" must be a list of messages, not {type(value).__name__}'
        )
    if not value:
        raise DataError(f'{where}: field "{field}" is an empty list of messages')
    turns = []
    for i, message in enumerate(value):
        at = f'"{field}"[{i}]'
        if not isinstance(message, dict):
            raise DataError(
                f'{where}: {at} must be a message object {{"role": ..., "content": str}}, '
                f"not {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(
                f'{where}: {at} has role {_show(role)}; a role is "system", "user" or "assistant"'
            )
        if "content" not in message or message["content"] is None:
            raise DataError(f'{where}: {at} has no "content"')
        content = message["content"]
        if not isinstance(content, str):
            raise DataError(
                f'{where}: {at}["content"] must be a string, not {type(content).__name__}'
            )
        if not content.strip():
            raise DataError(f'{where}: {at}["content"] is empty')
        _unicode(content, f'{at}["content"]', where)
        turns.append({"role": role, "content": content})
    return turns


def _prompt_turns(turns: list[Message], field: str, where: str) -> list[Message]:
    """The turns of a prompt: at least one, the last a user turn."""
    if not turns:
        raise DataError(
            f'{where}: field "{field}" has no turns before its assistant response (the prompt)'
        )
    last = turns[-1]["role"]
    if last != "user":
        article = "an" if last == "assistant" else "a"
        raise DataError(
            f'{where}: the prompt in field "{field}" ends with {article} {last} turn; '
            "a prompt must end with a user turn"
        )
    return turns


def _response_turn(record: dict[str, Any], field: str, where: str) -> str:
    """The content of a response part in TRL's conversational forms: one assistant turn."""
    if field not in record:
        raise DataError(f'{where}: missing field "{field}"')
    turns = _messages(record[field], field, where)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        roles = ", ".join(t["role"] for t in turns)
        raise DataError(
            f'{where}: field "{field}" must be one assistant turn (the response), '
            f"has {len(turns)} turn(s): {roles}"
        )
    return turns[0]["content"]


def _split_last(turns: list[Message], field: str, where: str) -> tuple[list[Message], str]:
    """(the turns before the last, the last's content): the last must be an assistant turn."""
    last = turns[-1]["role"]
    if last != "assistant":
        raise DataError(
            f'{where}: field "{field}" must end with an assistant turn (the response), '
            f"not a {last} turn"
        )
    return turns[:-1], turns[-1]["content"]


def _distinct(chosen: str, rejected: str, where: str) -> list[str]:
    if chosen == rejected:
        raise DataError(f'{where}: "chosen" and "rejected" are the same response')
    return [chosen, rejected]


def _record(turns: list[Message], where: str, **rest: Any) -> dict[str, Any]:
    """A record whose prompt is `turns`; its readable `prompt` is the last (user) turn's text."""
    return {"prompt": turns[-1]["content"], "messages": turns, "where": where, **rest}


def _from_messages(record: dict[str, Any], kind: Kind, where: str) -> dict[str, Any]:
    """TRL's conversational language-modeling form, {"messages": [...]}."""
    turns = _messages(record["messages"], "messages", where)
    if kind == "demonstrations":
        prompt, response = _split_last(turns, "messages", where)
        return _record(_prompt_turns(prompt, "messages", where), where, response=response)
    if kind == "prompts":
        prompt = turns[:-1] if turns[-1]["role"] == "assistant" else turns
        return _record(_prompt_turns(prompt, "messages", where), where)
    raise _no_format(where, kind, 'field "messages" holds one conversation, not ranked responses')


def _implicit_prompt(record: dict[str, Any], kind: Kind, where: str) -> dict[str, Any]:
    """TRL's preference form without a prompt: the turns that chosen and rejected share."""
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        raise DataError(
            f'{where}: missing field "prompt": TRL\'s implicit-prompt preference form is '
            'accepted only with lists of messages, where the turns that "chosen" and "rejected" '
            "share are the prompt; with strings, nothing tells where the prompt ends (add a "
            '"prompt" field)'
        )
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(
            f'{where}: field "chosen" is {_kind_of(chosen)} but field "rejected" is '
            f"{_kind_of(rejected)}; a record holds strings only or lists of messages only"
        )
    shared, best = _split_last(_messages(chosen, "chosen", where), "chosen", where)
    other, worse = _split_last(_messages(rejected, "rejected", where), "rejected", where)
    if shared != other:
        raise DataError(
            f'{where}: fields "chosen" and "rejected" must share every turn before their last '
            "(the implicit prompt), and then hold one assistant turn each"
        )
    prompt = _prompt_turns(shared, "chosen", where)
    if kind == "prompts":
        return _record(prompt, where)
    return _record(prompt, where, responses=_distinct(best, worse, where))


def _conversational(record: dict[str, Any], kind: Kind, where: str) -> dict[str, Any]:
    """TRL's conversational forms with a "prompt" field that is a list of messages."""
    prompt = _prompt_turns(_messages(record["prompt"], "prompt", where), "prompt", where)
    if kind == "demonstrations":
        if "completion" not in record:
            raise _no_format(where, kind, 'missing field "completion"')
        if isinstance(record["completion"], str):
            raise _mixed(where, record["prompt"], "completion", record["completion"])
        _not_unpaired(record, where)
        return _record(prompt, where, response=_response_turn(record, "completion", where))
    if kind == "comparisons":
        if "responses" in record:  # ours, with a conversation as its prompt
            return _record(prompt, where, responses=_ranked(record, kind, where))
        if "chosen" not in record and "rejected" not in record:
            raise _no_format(where, kind, 'missing fields "chosen" and "rejected"')
        for field in ("chosen", "rejected"):
            if isinstance(record.get(field), str):
                raise _mixed(where, record["prompt"], field, record[field])
        best = _response_turn(record, "chosen", where)
        worse = _response_turn(record, "rejected", where)
        return _record(prompt, where, responses=_distinct(best, worse, where))
    return _record(prompt, where)


def _not_unpaired(record: dict[str, Any], where: str) -> None:
    if isinstance(record.get("label"), bool):
        raise DataError(
            f'{where}: field "label" marks TRL\'s unpaired preference format, which is not '
            "accepted (its undesired completions are no demonstrations)"
        )


def validate(record: Any, kind: Kind, where: str) -> dict[str, Any]:
    """The record's fields of `kind`, checked; extra fields are ignored.

    {"prompt": readable text, "messages": the prompt's turns, "where", and "response" for
    demonstrations or "responses" (best first) for comparisons}.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if prompt is None:  # (Parquet gives None for a column that a row lacks)
        if record.get("messages") is not None:
            return _from_messages(record, kind, where)
        if (
            kind != "demonstrations"
            and record.get("chosen") is not None
            and record.get("rejected") is not None
        ):
            return _implicit_prompt(record, kind, where)
        if "prompt" not in record:
            raise _no_format(where, kind, 'missing field "prompt"')
    if isinstance(prompt, list):
        return _conversational(record, kind, where)
    if not isinstance(prompt, str):
        raise DataError(
            f'{where}: field "prompt" must be a string or a list of messages, '
            f"not {type(prompt).__name__}"
        )
    text = _text(record, "prompt", where)
    out = _record([{"role": "user", "content": text}], where)
    if kind == "demonstrations":
        if "response" in record or "completion" not in record:
            if "response" not in record:
                raise _no_format(where, kind, 'missing field "response"')
            out["response"] = _text(record, "response", where)
        else:  # TRL's prompt-completion form
            if isinstance(record["completion"], list):
                raise _mixed(where, prompt, "completion", record["completion"])
            _not_unpaired(record, where)
            out["response"] = _text(record, "completion", where)
    elif kind == "comparisons":
        if "responses" not in record and ("chosen" in record or "rejected" in record):
            for field in ("chosen", "rejected"):  # TRL's preference form
                if isinstance(record.get(field), list):
                    raise _mixed(where, prompt, field, record[field])
            best, worse = _text(record, "chosen", where), _text(record, "rejected", where)
            out["responses"] = _distinct(best, worse, where)
            return out
        out["responses"] = _ranked(record, kind, where)
    return out


def _ranked(record: dict[str, Any], kind: Kind, where: str) -> list[str]:
    """Our comparison's "responses": K >= 2 distinct non-empty strings, best first."""
    responses = record.get("responses")
    if responses is None:
        raise _no_format(where, kind, 'missing field "responses" (a list, ranked best first)')
    if not isinstance(responses, list):
        raise DataError(f'{where}: field "responses" must be a list of strings, ranked best first')
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
    return list(responses)


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
    """[{"prompt_ids", "text", "where"}]: the prompt's turns plus the assistant header; "text" is
    the readable prompt (its last user turn)."""
    out, too_long = [], []
    for rec in dataset:
        ids = encode_prompt(tokenizer, _prompt_of(rec))
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
