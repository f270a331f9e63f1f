"""The verifiable task: deterministic, held-out problems unseen, within the data limits, a reward
that means what it says, demonstrations that slip at the rate they are set to."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from trainers.arithmetic import (
    HIGH,
    LOW,
    SLIPS,
    WORDS,
    arithmetic_labeler,
    build_arithmetic_task,
    demonstration,
    exact_match,
    final_answer,
    parse_prompt,
    prompt_of,
    solve,
    split_problems,
)
from trainers.config import DataConfig, TaskConfig
from trainers.data import encode_prompt, encode_response
from trainers.task import task_manifest

pytestmark = pytest.mark.unit

CFG = TaskConfig(train_prompts=256, heldout_prompts=64)
PROMPT = prompt_of(47, 38)  # "what is 4 7 + 3 8 ?"
RIGHT = "ones 7 + 8 = 1 5 . tens 4 + 3 + 1 = 0 8 . the answer is 8 5 ."
RNG = random.Random(0)  # solve() draws from it only for a slip


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("arithmetic")
    build_arithmetic_task(CFG, folder)
    return folder


def _rows(folder: Path, name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (folder / name).open()]


def _pairs(rows: list[dict[str, str]]) -> set[frozenset[int]]:
    out = set()
    for r in rows:
        problem = parse_prompt(r["prompt"])
        assert problem is not None, r["prompt"]
        out.add(frozenset(problem))
    return out


def test_same_seed_same_files(task: Path, tmp_path: Path) -> None:
    build_arithmetic_task(CFG, tmp_path)
    for name in (
        "sft_train.jsonl",
        "sft_heldout.jsonl",
        "prompts_train.jsonl",
        "prompts_heldout.jsonl",
        "base_model/model.safetensors",
        "base_model/tokenizer.json",
        "task.json",
    ):
        assert (tmp_path / name).read_bytes() == (task / name).read_bytes(), name
    manifest = json.loads((task / "task.json").read_text())
    assert manifest["kind"] == "arithmetic"
    assert manifest["settings"] == task_manifest(CFG)["settings"]
    assert manifest["counts"]["sft_train"] == CFG.train_prompts
    assert manifest["counts"]["prompts_heldout"] == CFG.heldout_prompts


def test_another_seed_other_problems(task: Path, tmp_path: Path) -> None:
    build_arithmetic_task(CFG.model_copy(update={"seed": 1}), tmp_path)
    assert _rows(tmp_path, "prompts_heldout.jsonl") != _rows(task, "prompts_heldout.jsonl")


def test_heldout_problems_never_occur_in_training(task: Path) -> None:
    train = _pairs(_rows(task, "sft_train.jsonl")) | _pairs(_rows(task, "prompts_train.jsonl"))
    held = _rows(task, "prompts_heldout.jsonl")
    assert len(_pairs(held)) == len(held) == CFG.heldout_prompts  # distinct, in either order
    assert not train & _pairs(held)
    # the demonstrations and the prompts of a split are the same problems, in the same order
    for split in ("train", "heldout"):
        demos, prompts = _rows(task, f"sft_{split}.jsonl"), _rows(task, f"prompts_{split}.jsonl")
        assert [d["prompt"] for d in demos] == [p["prompt"] for p in prompts]


def test_training_takes_every_problem_before_repeating() -> None:
    train, held = split_problems(random.Random(0), 2000, 200)
    n_pairs = (HIGH - LOW + 1) * (HIGH - LOW + 2) // 2
    assert len(train) == 2000 and len(held) == 200
    distinct = set(train)
    assert 1000 < len(distinct) < 2000  # all the problems left (about 1,200), some twice
    assert all(LOW <= x <= HIGH for p in train + held for x in p)
    with pytest.raises(ValueError, match="heldout_prompts"):
        split_problems(random.Random(0), 100, n_pairs // 2 + 1)


def test_reference_answers_are_the_sums(task: Path) -> None:
    for split in ("train", "heldout"):
        for row in _rows(task, f"prompts_{split}.jsonl"):
            a, b = parse_prompt(row["prompt"])  # type: ignore[misc]
            assert row["answer"] == str(a + b)


def test_within_the_data_limits_with_the_task_tokenizer(task: Path) -> None:
    from transformers import AutoTokenizer

    limits = DataConfig()
    tok = AutoTokenizer.from_pretrained(task / "base_model")
    assert tok.chat_template and tok.unk_token_id is not None
    # every problem the task can pose, with every response it can write (each slip included)
    longest_prompt = longest_seq = 0
    rng = random.Random(0)
    for a in range(LOW, HIGH + 1):
        for b in range(LOW, HIGH + 1):
            p = encode_prompt(tok, prompt_of(a, b))
            assert tok.unk_token_id not in p
            longest_prompt = max(longest_prompt, len(p))
            for slip in (None, *SLIPS):
                r = encode_response(tok, solve(rng, a, b, slip))
                assert tok.unk_token_id not in r
                longest_seq = max(longest_seq, len(p) + len(r))
    assert longest_prompt <= limits.max_prompt_tokens
    assert longest_seq <= limits.max_seq_len
    # the written files say the same, and use only the task's words
    for name in ("sft_train.jsonl", "sft_heldout.jsonl"):
        for d in _rows(task, name):
            assert set(f"{d['prompt']} {d['response']}".split()) <= set(WORDS)
    assert len(tok) == 5 + len(WORDS)


def test_exact_match_right_wrong_and_malformed() -> None:
    cases = {
        RIGHT: 1.0,
        "the answer is 8 5": 1.0,  # no full stop, no steps
        "the answer is 85 .": 1.0,  # a number in one piece
        RIGHT + " the answer is 9 5 . what is": 1.0,  # trailing tokens, a second answer ignored
        "ones 7 + 8 = 1 5 . the answer is 8 5 <eos> <pad> <pad>": 1.0,
        "ones 7 + 8 = 1 5 . tens 4 + 3 + 0 = 0 7 . the answer is 7 5 .": 0.0,  # forgot the carry
        "the answer is 8 6 . the answer is 8 5 .": 0.0,  # only the first answer counts
        "the answer is 8 5 0 .": 0.0,
        "the answer is 0 8 5 .": 0.0,  # a leading zero is another way of writing it
        "ones 7 + 8 = 1 5 . tens 4 + 3 + 1 = 0 8 .": 0.0,  # no answer
        "the answer is . 8 5": 0.0,
        "8 5": 0.0,
        "": 0.0,
        "<unk> <unk>": 0.0,
    }
    responses = list(cases)
    got = exact_match([PROMPT] * len(responses), responses, ["85"] * len(responses))
    assert dict(zip(responses, got, strict=True)) == cases
    for r, want in cases.items():  # the labeler, from the prompt alone, agrees
        assert arithmetic_labeler(PROMPT, r) == want, r
    assert final_answer(RIGHT) == "85" and final_answer("answer is") is None
    with pytest.raises(ValueError, match="one each"):
        exact_match([PROMPT], [RIGHT, RIGHT], ["85"])
    with pytest.raises(ValueError, match="not a prompt"):
        arithmetic_labeler("write a short review of the new phone .", RIGHT)


def test_prompts_parse_back() -> None:
    assert PROMPT == "what is 4 7 + 3 8 ?"
    assert parse_prompt(PROMPT) == (47, 38)
    assert parse_prompt("What is 47 + 38 ?") == (47, 38)
    assert parse_prompt("what is 4 7 - 3 8 ?") is None


def test_clean_responses_are_right_and_every_slip_is_wrong() -> None:
    rng = random.Random(0)
    for a in range(LOW, HIGH + 1):
        for b in range(LOW, HIGH + 1):
            prompt = prompt_of(a, b)
            assert arithmetic_labeler(prompt, solve(rng, a, b)) == 1.0
            for slip in SLIPS:
                if slip == "carry" and a % 10 + b % 10 < 10:
                    continue  # no carry to forget: demonstration() never picks it there
                assert arithmetic_labeler(prompt, solve(rng, a, b, slip)) == 0.0, (a, b, slip)
    assert solve(rng, 47, 38) == RIGHT


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_slip_rate_near_its_setting(rate: float) -> None:
    rng = random.Random(1)
    n = 5000
    demos = [
        demonstration(rng, rng.randint(LOW, HIGH), rng.randint(LOW, HIGH), rate) for _ in range(n)
    ]
    wrong = sum(1.0 - arithmetic_labeler(d["prompt"], d["response"]) for d in demos) / n
    assert abs(wrong - rate) < 0.025  # 3.9 binomial standard deviations at 0.3


def test_every_demonstration_is_checked_by_the_labeler(task: Path) -> None:
    manifest = json.loads((task / "task.json").read_text())
    for split in ("train", "heldout"):
        demos = _rows(task, f"sft_{split}.jsonl")
        scores = []
        for d in demos:
            a, b = parse_prompt(d["prompt"])  # type: ignore[misc]
            score = arithmetic_labeler(d["prompt"], d["response"])
            # a demonstration is right exactly when it is the clean worked response
            assert score == float(d["response"] == solve(RNG, a, b)), d
            scores.append(score)
        accuracy = sum(scores) / len(scores)
        assert manifest[f"demo_accuracy_{split}"] == accuracy
        assert abs((1.0 - accuracy) - manifest["slip_rate"]) < 0.15  # 64 to 256 demonstrations


def test_slip_rate_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="slip_rate"):
        build_arithmetic_task(CFG, tmp_path, slip_rate=1.0)
