"""Data files: validated record by record, errors that name the file and line, no silent cuts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainers.data import (
    DataError,
    Limits,
    collate_comparisons,
    encode_comparisons,
    encode_demonstrations,
    encode_prompt,
    encode_prompts,
    read,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(small_task: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_task / "base_model")


def _jsonl(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_DEMO = json.dumps(
    {"prompt": "write a short review of the new phone .", "response": "the phone is good ."}
)


@pytest.mark.parametrize(
    ("line", "kind", "message"),
    [
        ('{"prompt": "a", "response": ', "demonstrations", "not valid JSON"),
        ('["a", "b"]', "demonstrations", "expected a JSON object"),
        ('{"response": "x"}', "demonstrations", 'missing field "prompt"'),
        ('{"prompt": "a", "response": 3}', "demonstrations", 'field "response" must be a string'),
        ('{"prompt": "a", "response": "  "}', "demonstrations", 'field "response" is empty'),
        ('{"prompt": "a"}', "comparisons", 'missing field "responses"'),
        ('{"prompt": "a", "responses": "x"}', "comparisons", "must be a list"),
        ('{"prompt": "a", "responses": ["x"]}', "comparisons", "at least 2 ranked responses"),
        ('{"prompt": "a", "responses": ["x", "x"]}', "comparisons", "the same response twice"),
        ('{"prompt": "a", "responses": ["x", ""]}', "comparisons", '"responses"[1]'),
    ],
)
def test_a_malformed_line_names_file_and_line(
    tmp_path: Path, line: str, kind: str, message: str
) -> None:
    good = (
        GOOD_DEMO
        if kind == "demonstrations"
        else json.dumps({"prompt": "p", "responses": ["a", "b"]})
    )
    path = _jsonl(tmp_path, [good, good, line])
    with pytest.raises(DataError) as e:
        read(path, kind)
    assert f"{path}:3:" in str(e.value)
    assert message in str(e.value)


def test_missing_file_names_the_config_field(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file not found \(named by sft.train_data\)"):
        read(tmp_path / "none.jsonl", "demonstrations", "sft.train_data")


def test_parquet_is_read_through_datasets(tmp_path: Path) -> None:
    import datasets

    rows = [
        {"prompt": "p1", "responses": ["a", "b", "c"]},
        {"prompt": "p2", "responses": ["d", "e"]},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    data = read(tmp_path / "c.parquet", "comparisons")
    assert [r["responses"] for r in data] == [["a", "b", "c"], ["d", "e"]]
    assert data[1]["where"].endswith("row 1")


def test_encoding_puts_the_loss_on_the_response_and_end_token(tokenizer) -> None:
    import datasets

    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": "write a short review of the new phone .",
                "response": "the phone is good .",
                "where": "x:1",
            }
        ]
    )
    [ex] = encode_demonstrations(ds, tokenizer, Limits(32, 96))
    prompt = encode_prompt(tokenizer, "write a short review of the new phone .")
    assert ex["input_ids"][: len(prompt)] == prompt
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    response = ex["input_ids"][len(prompt) :]
    assert tokenizer.decode(response[:-1]) == "the phone is good ."
    assert ex["loss_mask"] == [0] * len(prompt) + [1] * len(response)
    # the prompt ends with the assistant header, as vLLM will be given it
    assert tokenizer.convert_ids_to_tokens(prompt[-1]) == "<|assistant|>"


def test_too_long_prompts_are_reported_not_cut(tokenizer) -> None:
    import datasets

    long_prompt = "write a short review of the " + "very " * 40 + "phone ."
    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": "write a short review of the new phone .",
                "response": "good .",
                "where": "f:1",
            },
            {"prompt": long_prompt, "response": "good .", "where": "f:2"},
        ]
    )
    with pytest.raises(DataError) as e:
        encode_demonstrations(ds, tokenizer, Limits(32, 96, "error"))
    assert "1 of 2 demonstrations exceed" in str(e.value)
    assert "f:2: prompt has" in str(e.value)
    said: list[str] = []
    kept = encode_demonstrations(ds, tokenizer, Limits(32, 96, "skip"), log=said.append)
    assert [k["where"] for k in kept] == ["f:1"]
    assert "f:2" in said[0]


def test_comparisons_batch_all_responses_in_one_forward_pass(tokenizer) -> None:
    import datasets

    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": "write a short review of the new phone .",
                "responses": ["a .", "b .", "c ."],
                "where": "f:1",
            },
            {
                "prompt": "write a short review of the old car .",
                "responses": ["d .", "e ."],
                "where": "f:2",
            },
        ]
    )
    examples = encode_comparisons(ds, tokenizer, Limits(32, 96))
    batch = collate_comparisons(examples, tokenizer.pad_token_id, normalizer=2)
    assert batch["suffix_ids"].shape[0] == 5  # K = 3 + 2 rows
    assert batch["owner"].tolist() == [0, 0, 0, 1, 1]  # each prompt computed once
    assert batch["valid"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["index"][1, :2].tolist() == [3, 4]


# -- Hugging Face TRL's dataset formats ----------------------------------------------------------

# The small task's chat template drops system turns; this one shows them, so a test sees that a
# conversation's system turn reaches the prompt ids.
SYSTEM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|> {{ m['content'] }} "
    "{% elif m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <eos>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(small_task: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_task / "base_model")
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>"]}, False)
    tok.chat_template = SYSTEM_TEMPLATE
    return tok


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYS = _turn("system", "write a short review .")
U1 = _turn("user", "write a short review of the new phone .")
A1 = _turn("assistant", "the phone is good .")
U2 = _turn("user", "write a short review of the popular game .")
A2 = _turn("assistant", "the game is very good .")
B2 = _turn("assistant", "i would not recommend it .")

# (kind, record, the prompt's turns, the responses): every TRL form the reader accepts
TRL_FORMS = {
    "prompt-completion": (
        "demonstrations",
        {"prompt": U1["content"], "completion": A1["content"]},
        [U1],
        [A1["content"]],
    ),
    "conversational prompt-completion": (
        "demonstrations",
        {"prompt": [SYS, U1, A1, U2], "completion": [A2]},
        [SYS, U1, A1, U2],
        [A2["content"]],
    ),
    "conversational language modeling": (
        "demonstrations",
        {"messages": [SYS, U1, A1, U2, A2]},
        [SYS, U1, A1, U2],
        [A2["content"]],
    ),
    "preference": (
        "comparisons",
        {"prompt": U2["content"], "chosen": A2["content"], "rejected": B2["content"]},
        [U2],
        [A2["content"], B2["content"]],
    ),
    "conversational preference": (
        "comparisons",
        {"prompt": [SYS, U1, A1, U2], "chosen": [A2], "rejected": [B2]},
        [SYS, U1, A1, U2],
        [A2["content"], B2["content"]],
    ),
    "conversational implicit-prompt preference": (
        "comparisons",
        {"chosen": [SYS, U2, A2], "rejected": [SYS, U2, B2]},
        [SYS, U2],
        [A2["content"], B2["content"]],
    ),
    "prompt-only, from prompt-completion": (
        "prompts",
        {"prompt": U1["content"], "completion": A1["content"]},
        [U1],
        [],
    ),
    "conversational prompt-only": ("prompts", {"prompt": [SYS, U1, A1, U2]}, [SYS, U1, A1, U2], []),
    "prompt from a conversation that ends with its response": (
        "prompts",
        {"messages": [SYS, U1, A1]},
        [SYS, U1],
        [],
    ),
    "prompt from a conversation that ends with a user turn": (
        "prompts",
        {"messages": [SYS, U1, A1, U2]},
        [SYS, U1, A1, U2],
        [],
    ),
    "prompts from a conversational preference": (
        "prompts",
        {"chosen": [SYS, U2, A2], "rejected": [SYS, U2, B2]},
        [SYS, U2],
        [],
    ),
}


def _write(tmp_path: Path, suffix: str, rows: list[dict]) -> Path:
    import datasets

    path = tmp_path / f"trl.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def _ids(tok, turns: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tok.apply_chat_template(turns, add_generation_prompt=generation_prompt, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids  # the test's words are all in the vocabulary
    return ids


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
@pytest.mark.parametrize("form", list(TRL_FORMS))
def test_trl_formats_are_encoded_as_their_chat_template(
    tmp_path: Path, chat_tokenizer, form: str, suffix: str
) -> None:
    kind, record, prompt, responses = TRL_FORMS[form]
    path = _write(tmp_path, suffix, [record, record])
    data = read(path, kind)
    assert len(data) == 2
    assert data[1]["where"] == (f"{path}:2" if suffix == "jsonl" else f"{path}: row 1")
    assert data[0]["messages"] == prompt
    assert data[0]["prompt"] == prompt[-1]["content"]  # the readable text: the last user turn

    tok, limits = chat_tokenizer, Limits(64, 128)
    prompt_ids = _ids(tok, prompt, generation_prompt=True)
    assert encode_prompt(tok, prompt) == prompt_ids
    if prompt[0]["role"] == "system":
        assert tok.convert_tokens_to_ids("<|system|>") in prompt_ids
    conversations = [_ids(tok, [*prompt, _turn("assistant", r)], False) for r in responses]
    if kind == "demonstrations":
        [ex, _] = encode_demonstrations(data, tok, limits)
        assert ex["input_ids"] == conversations[0]
        assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
        assert ex["input_ids"][-1] == tok.eos_token_id
        assert ex["loss_mask"] == [0] * len(prompt_ids) + [1] * (
            len(conversations[0]) - len(prompt_ids)
        )
    elif kind == "comparisons":
        assert data[0]["responses"] == responses
        [ex, _] = encode_comparisons(data, tok, limits)
        assert ex["sequences"] == conversations
    else:
        [ex, _] = encode_prompts(data, tok, limits)
        assert ex["prompt_ids"] == prompt_ids
        assert ex["text"] == prompt[-1]["content"]


def test_a_string_prompt_is_still_one_user_turn(tokenizer) -> None:
    assert encode_prompt(tokenizer, U1["content"]) == encode_prompt(tokenizer, [U1])


def test_our_formats_and_trl_forms_mix_in_one_jsonl_file(tmp_path: Path, tokenizer) -> None:
    path = _jsonl(
        tmp_path,
        [GOOD_DEMO, json.dumps(TRL_FORMS["conversational language modeling"][1])],
    )
    data = read(path, "demonstrations")
    assert data[0]["messages"] == [_turn("user", json.loads(GOOD_DEMO)["prompt"])]
    assert [r["response"] for r in data] == [json.loads(GOOD_DEMO)["response"], A2["content"]]
    assert len(encode_demonstrations(data, tokenizer, Limits(64, 128))) == 2


# (kind, malformed record, what the message must say)
TRL_MALFORMED = [
    ("prompts", {"text": "write a review ."}, 'missing field "prompt"; the record matches none'),
    ("demonstrations", {"prompt": "a"}, 'accepted for demonstrations: {"prompt": str, "response"'),
    ("comparisons", {"messages": [U1, A1]}, "formats accepted for comparisons"),
    ("demonstrations", {"prompt": ["hi"], "completion": [A1]}, '"prompt"[0] must be a message'),
    ("demonstrations", {"messages": "hi"}, 'field "messages" must be a list of messages'),
    ("demonstrations", {"messages": []}, 'field "messages" is an empty list'),
    ("comparisons", {"prompt": [_turn("tool", "x")], "chosen": [A1], "rejected": [A2]},
     "\"prompt\"[0] has role 'tool'"),
    ("demonstrations", {"messages": [{"role": "user"}, A1]}, '"messages"[0] has no "content"'),
    ("demonstrations", {"messages": [U1, _turn("assistant", " ")]},
     '"messages"[1]["content"] is empty'),
    ("prompts", {"prompt": [{"role": "user", "content": ["a"]}]},
     '"prompt"[0]["content"] must be a string'),
    ("demonstrations", {"messages": [U1, A1, U2]}, "must end with an assistant turn"),
    ("demonstrations", {"prompt": [U1], "completion": [U2]}, 'field "completion" must be one as'),
    ("comparisons", {"prompt": [U1], "chosen": [A1, A2], "rejected": [B2]},
     'field "chosen" must be one assistant turn'),
    ("demonstrations", {"prompt": [U1, A1], "completion": [A2]},
     'prompt in field "prompt" ends with an assistant turn'),
    ("prompts", {"messages": [SYS, A1]}, 'prompt in field "messages" ends with a system turn'),
    ("comparisons", {"prompt": "p", "chosen": "same .", "rejected": "same ."}, "the same response"),
    ("comparisons", {"prompt": [U1], "chosen": [A1], "rejected": [A1]}, "the same response"),
    ("comparisons", {"chosen": [U1, A1], "rejected": [U1, A1]}, "the same response"),
    ("demonstrations", {"prompt": "a", "completion": [A1]},
     'field "prompt" is a string but field "completion" is a list of messages'),
    ("comparisons", {"prompt": [U1], "chosen": "a", "rejected": "b"},
     'field "chosen" is a string'),
    ("comparisons", {"chosen": "a", "rejected": "b"}, 'add a "prompt" field'),
    ("comparisons", {"chosen": [U1, A1], "rejected": [U2, B2]}, "must share every turn"),
    ("demonstrations", {"prompt": "a", "completion": "b", "label": False}, "unpaired preference"),
    ("comparisons", {"prompt": "a", "chosen": "b"}, 'missing field "rejected"'),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "record", "message"), TRL_MALFORMED)
def test_a_malformed_trl_row_names_file_line_and_field(
    tmp_path: Path, kind: str, record: dict, message: str
) -> None:
    good = next(r for k, r, _, _ in TRL_FORMS.values() if k == kind)
    path = _jsonl(tmp_path, [json.dumps(good), json.dumps(good), json.dumps(record)])
    with pytest.raises(DataError) as e:
        read(path, kind)
    assert f"{path}:3:" in str(e.value)
    assert message in str(e.value)


def test_a_malformed_trl_row_in_parquet_names_the_row(tmp_path: Path) -> None:
    bad = {"prompt": [SYS, U1], "chosen": [A1], "rejected": [_turn("tool", "x")]}
    path = _write(tmp_path, "parquet", [TRL_FORMS["conversational preference"][1], bad])
    with pytest.raises(DataError, match=r"trl\.parquet: row 1: \"rejected\"\[0\] has role 'tool'"):
        read(path, "comparisons")


def test_a_message_that_is_not_unicode_is_refused(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, ['{"messages": [{"role": "user", "content": "\\ud800"}]}'])
    with pytest.raises(
        DataError, match=r":1: \"messages\"\[0\]\[\"content\"\] is not valid Unicode"
    ):
        read(path, "prompts")


_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.text(max_size=6))
_turns = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system"]),
            "content": st.sampled_from(["good .", "the phone ."]),
        }
    ),
    min_size=1,
    max_size=3,
)
_message = st.one_of(
    _scalar,
    st.fixed_dictionaries(
        {
            "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), _scalar),
            "content": st.one_of(st.sampled_from(["good .", "the phone ."]), _scalar),
        }
    ),
)
# mostly well-formed conversations, so that the encoders see some of what is read
_part = st.one_of(_turns, _turns, _turns, _scalar, st.lists(_message, max_size=3))
_reply = st.builds(
    lambda text: [{"role": "assistant", "content": text}],
    st.sampled_from(["good .", "bad .", "the phone .", "the game ."]),
)
_response = st.one_of(_reply, _reply, _part)
_trl_records = st.one_of(
    st.fixed_dictionaries({"messages": _part}),
    st.fixed_dictionaries({"prompt": _part, "completion": _response}),
    st.fixed_dictionaries({"prompt": _part, "chosen": _response, "rejected": _response}),
    st.fixed_dictionaries({"chosen": _part, "rejected": _part}),
    st.fixed_dictionaries({"prompt": _part, "completion": _response, "label": _scalar}),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["demonstrations", "comparisons", "prompts"]),
    records=st.lists(_trl_records, min_size=1, max_size=3),
)
def test_any_trl_shaped_file_is_read_and_encoded_or_answered_with_a_data_error(
    tmp_path: Path, tokenizer, kind: str, records: list
) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        data = read(path, kind)
    except DataError:
        return
    assert len(data) == len(records)
    encode = {
        "demonstrations": encode_demonstrations,
        "comparisons": encode_comparisons,
        "prompts": encode_prompts,
    }[kind]
    assert len(encode(data, tokenizer, Limits(10**6, 10**6))) == len(records)


def test_a_prompt_lines_other_fields_reach_the_encoded_prompt(tmp_path: Path) -> None:
    """A reward function is given the fields of a prompt's line (e.g. a reference answer)."""
    from trainers.data import Limits, encode_prompts, read
    from trainers.task import build_tokenizer

    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "what is two", "answer": "2", "meta": {"id": 7}}\n'
        '{"prompt": [{"role": "user", "content": "what is one"}], "answer": "1"}\n'
        '{"prompt": "no fields"}\n'
    )
    tok = build_tokenizer(["what is two one no fields"])
    limits = Limits(max_prompt_tokens=32, max_seq_len=64, on_too_long="error")
    encoded = encode_prompts(read(path, "prompts"), tok, limits, log=lambda _: None)
    assert [p["fields"] for p in encoded] == [
        {"answer": "2", "meta": {"id": 7}},
        {"answer": "1"},
        {},
    ]
