"""Data files: validated record by record, errors that name the file and line, no silent cuts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainers.data import (
    DataError,
    Limits,
    collate_comparisons,
    encode_comparisons,
    encode_demonstrations,
    encode_prompt,
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
    assert batch["input_ids"].shape[0] == 5  # K = 3 + 2 rows
    assert batch["valid"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["index"][1, :2].tolist() == [3, 4]
