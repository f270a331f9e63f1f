"""The built-in task: deterministic, a labeler that means what it says, calibrated noise."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from trainers.config import TaskConfig
from trainers.task import (
    ADJECTIVES,
    build_task,
    labeler_breakdown,
    labeler_score,
    write_response,
)

pytestmark = pytest.mark.unit

PROMPT = "write a short review of the new phone ."


def test_same_seed_same_files(small_task: Path, tmp_path: Path) -> None:
    build_task(TaskConfig(train_prompts=256, heldout_prompts=64), tmp_path)
    for name in (
        "sft_train.jsonl",
        "rm_train.jsonl",
        "rm_heldout.jsonl",
        "prompts_heldout.jsonl",
        "base_model/model.safetensors",
        "base_model/tokenizer.json",
    ):
        assert (tmp_path / name).read_bytes() == (small_task / name).read_bytes(), name


def test_labeler_prefers_positive_and_penalises_flaws() -> None:
    good = "the phone is very great . i would recommend it ."
    bad = "the phone is very awful . i would not recommend it ."
    assert labeler_score(PROMPT, good) > 0.5 > -0.5 > labeler_score(PROMPT, bad)
    off_topic = "the laptop is very great . i would recommend it ."
    assert labeler_breakdown(PROMPT, off_topic)["off_topic"] == 1.0
    assert labeler_score(PROMPT, off_topic) < labeler_score(PROMPT, good) - 0.9
    repetitive = "the phone is great . " * 5 + "i would recommend it ."
    assert labeler_score(PROMPT, repetitive) < labeler_score(PROMPT, good) - 0.5
    for malformed in (
        "the phone is great",
        "phone great",
        "the phone is great excellent amazing wonderful .",
        "",
        "the phone is <unk> great .",
    ):
        assert labeler_breakdown(PROMPT, malformed)["malformed"] == 1.0, malformed


def test_demonstrations_are_mediocre_under_the_labeler(small_task: Path) -> None:
    demos = [json.loads(line) for line in (small_task / "sft_train.jsonl").open()]
    mean = statistics.fmean(labeler_score(d["prompt"], d["response"]) for d in demos)
    rng = random.Random(0)
    positive = statistics.fmean(
        labeler_score(PROMPT, write_response(rng, "phone", "positive")) for _ in range(200)
    )
    assert mean < 0.0 < 0.5 < positive


def test_label_noise_matches_the_configured_agreement(small_task: Path) -> None:
    manifest = json.loads((small_task / "task.json").read_text())
    assert abs(manifest["labeler_agreement_train"] - 0.73) < 0.03
    assert abs(manifest["labeler_agreement_heldout"] - 0.73) < 0.06  # 64 prompts: noisier
    rows = [json.loads(line) for line in (small_task / "rm_train.jsonl").open()]
    assert all(4 <= len(r["responses"]) <= 6 for r in rows)
    assert all(len(set(r["responses"])) == len(r["responses"]) for r in rows)


def test_heldout_prompts_are_new_combinations(small_task: Path) -> None:
    train = {json.loads(line)["prompt"] for line in (small_task / "prompts_train.jsonl").open()}
    held = {json.loads(line)["prompt"] for line in (small_task / "prompts_heldout.jsonl").open()}
    assert train and held and not train & held


def test_base_model_and_tokenizer_load_and_speak_the_task(small_task: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = small_task / "base_model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM CPU
    words = " ".join(sorted(ADJECTIVES["positive"]))
    assert tok.unk_token_id not in tok(words)["input_ids"]
    assert tok.decode(tok("the phone is great .")["input_ids"]) == "the phone is great ."
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    assert text == f"<|user|> {PROMPT} <|assistant|>"
