"""The record formats of the data files (ours and Hugging Face TRL's), and `validate`, which
checks one record and gives its fields in one shape. A bad record is a `DataError` naming its
place (file and line, or row) and the field; extra fields are ignored.

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
turn's content), which the labeler and the logs read.
"""

from __future__ import annotations

from typing import Any, Literal

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
