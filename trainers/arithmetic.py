"""The second built-in task, "verifiable": sums of two two-digit numbers, for GRPO with an
exact-match reward.

Everything is generated from a seed and written to disk as ordinary files, as trainers.task does:

    task/sft_train.jsonl, sft_heldout.jsonl        worked demonstrations   {"prompt", "response"}
    task/prompts_train.jsonl, prompts_heldout.jsonl                        {"prompt", "answer"}
    task/base_model/                          tiny random-init causal LM + word-level tokenizer
    task/task.json                            the settings, "kind": "arithmetic", the counts

A problem and its worked response, in the task's word-level language. Digits are tokens, so a
number is a digit sequence and the model adds column by column instead of looking a sum up:

    what is 4 7 + 3 8 ?
    ones 7 + 8 = 1 5 . tens 4 + 3 + 1 = 0 8 . the answer is 8 5 .

Every column's total is written with two digits (carry, digit), so every problem takes the same
fixed steps; the answer drops a leading 0. The reward is exact match of the final answer
(`exact_match` against the reference answer, `arithmetic_labeler` from the prompt alone).

A fraction `slip_rate` of the demonstrations hold a slip, as a mediocre human demonstrator's would:
a forgotten carry, a column total off by one (carried on consistently) or a miscopied answer; every
slip makes the final answer wrong. SFT imitates the slips when it samples at temperature 1, the
reward prefers right answers, so RL has room above the SFT policy.

The addends are 10..49 (the tens column never carries out, the answer has two digits): measured
with the demo's SFT (configs/tiny.yaml's model, 3 epochs over 2,000 demonstrations, batch 32, lr
1e-3), the SFT policy answers about 35% of the held-out problems right at temperature 1 and about
90% greedily; with addends 10..99 the same SFT reaches only about 15% (T = 1) and 45% (greedy).

Held-out problems are pairs {a, b} whose sum occurs in training in neither order.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from trainers.task import _write_jsonl, build_model, task_manifest, word_level_tokenizer

LOW, HIGH = 10, 49  # the addends: 1,600 ordered problems, 820 unordered pairs
SLIP_RATE = 0.3
"""fraction of the demonstrations whose final answer is wrong (the demonstrator's slips)"""
SLIPS = ("carry", "column", "copy")
PROMPT_TEMPLATE = "what is {a} + {b} ?"
PROMPT_RE = re.compile(r"^\s*what is ((?:\d\s*)+)\+((?:\s*\d)+)\s*\?\s*$")
TOKEN_RE = re.compile(r"<[^>\s]+>|\w+|[^\w\s]")  # words as the task tokenizer splits them


def spell(n: int) -> str:
    """A number as the task writes it: one token a digit (85 -> "8 5")."""
    return " ".join(str(n))


def prompt_of(a: int, b: int) -> str:
    return PROMPT_TEMPLATE.format(a=spell(a), b=spell(b))


def parse_prompt(prompt: str) -> tuple[int, int] | None:
    """The addends of a task prompt, or None if it is not one of the task's prompts."""
    m = PROMPT_RE.match(prompt.lower())
    if not m:
        return None
    return int(re.sub(r"\s", "", m.group(1))), int(re.sub(r"\s", "", m.group(2)))


# ---------------------------------------------------------------------------------------------
# the reward


def final_answer(response: str) -> str | None:
    """The response's final answer: the digits right after its first "answer is", joined.

    "... the answer is 8 5 ." -> "85" (and "the answer is 85" -> "85"). What follows the digits
    (a full stop, more text, another "answer is") is ignored: only the first stated answer counts,
    so stating several earns nothing. None when no digit follows an "answer is".
    """
    words = TOKEN_RE.findall(response.lower())
    for i in range(len(words) - 1):
        if words[i] == "answer" and words[i + 1] == "is":
            digits = []
            for w in words[i + 2 :]:
                if not w.isdigit():
                    break
                digits.append(w)
            return "".join(digits) or None
    return None


def _match(response: str, answer: str) -> float:
    stated = final_answer(response)
    return float(stated is not None and stated == answer.strip())


def exact_match(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """The RL stage's reward, batched (one prompt, response and reference answer a sample):
    1.0 where the response's `final_answer` is the reference answer as written (digits, no
    leading zeros: "085" is not "85"), else 0.0."""
    if not len(prompts) == len(responses) == len(answer):
        raise ValueError(
            f"exact_match: {len(prompts)} prompts, {len(responses)} responses and "
            f"{len(answer)} answers; one each expected"
        )
    return [_match(r, str(a)) for r, a in zip(responses, answer, strict=True)]


def arithmetic_labeler(prompt: str, response: str) -> float:
    """The same judgment from the prompt alone (parsed and solved): 1.0 or 0.0."""
    problem = parse_prompt(prompt)
    if problem is None:
        raise ValueError(f"arithmetic_labeler: not a prompt of the arithmetic task: {prompt!r}")
    return _match(response, str(sum(problem)))


# ---------------------------------------------------------------------------------------------
# the generator


def _column(x: int, y: int, carry: int | None, total: int) -> str:
    """One step: "x + y [+ carry] = c d", the column's total as two digits."""
    terms = f"{x} + {y}" if carry is None else f"{x} + {y} + {carry}"
    return f"{terms} = {total // 10} {total % 10}"


def solve(rng: random.Random, a: int, b: int, slip: str | None = None) -> str:
    """The worked response for a + b; a `slip` (one of SLIPS) makes its final answer wrong."""
    ones = a % 10 + b % 10
    if slip == "column":  # the ones column's total off by one, carried on consistently
        ones += rng.choice((-1, 1)) if ones else 1
    carry = ones // 10
    if slip == "carry":  # the carry is forgotten (picked only where there is one)
        carry = 0
    tens = a // 10 + b // 10 + carry
    answer = tens * 10 + ones % 10
    if slip == "copy":  # right steps, a miscopied answer
        answer += rng.choice((-1, 1, 10))
    return (
        f"ones {_column(a % 10, b % 10, None, ones)} . "
        f"tens {_column(a // 10, b // 10, carry, tens)} . "
        f"the answer is {spell(answer)} ."
    )


def demonstration(rng: random.Random, a: int, b: int, slip_rate: float) -> dict[str, str]:
    """{"prompt", "response"}: the worked response, with a slip at rate `slip_rate`."""
    slip = None
    if rng.random() < slip_rate:
        slip = rng.choice([s for s in SLIPS if s != "carry" or a % 10 + b % 10 >= 10])
    return {"prompt": prompt_of(a, b), "response": solve(rng, a, b, slip)}


def split_problems(
    rng: random.Random, n_train: int, n_heldout: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Ordered problems (a, b) for training and held out.

    The held-out problems are distinct pairs that occur in training in neither order. Training
    takes every other problem (both orders) once, shuffled, before any repeats: with 200 pairs
    held out about 1,200 problems are left, fewer than the demo's 2,000 training prompts.
    """
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(a, HIGH + 1)]
    if n_heldout > len(pairs) // 2:
        raise ValueError(
            f"task.heldout_prompts ({n_heldout}) is more than half the {len(pairs)} distinct "
            "pairs of the arithmetic task; training would have too few"
        )
    rng.shuffle(pairs)
    held = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs[:n_heldout]]
    pool = sorted({p for a, b in pairs[n_heldout:] for p in ((a, b), (b, a))})
    train: list[tuple[int, int]] = []
    while len(train) < n_train:
        rng.shuffle(pool)
        train += pool[: n_train - len(train)]
    return train, held


# ---------------------------------------------------------------------------------------------
# tokenizer and the task folder


# Every word of the task's language (a test checks that the demonstrations use no other).
WORDS = (*"0123456789", "+", ".", "=", "?", "answer", "is", "ones", "tens", "the", "what")


def build_tokenizer() -> Any:
    """The word-level tokenizer of the task's fixed language, with trainers.task's special tokens
    and chat template.

    Not trainers.task.build_tokenizer: that one adds the review task's ~80 words, which no
    demonstration here uses and which the briefly trained tiny model still samples at T = 1.
    """
    return word_level_tokenizer(list(WORDS))


def build_arithmetic_task(cfg: Any, folder: Path, slip_rate: float = SLIP_RATE) -> dict[str, Any]:
    """Generate the task's files into `folder` (cfg: TaskConfig; its seed, train_prompts,
    heldout_prompts and model; not its comparison settings); returns task.json's contents.

    The manifest is written last, so a folder without it is an unfinished build.
    """
    if not 0.0 <= slip_rate < 1.0:
        raise ValueError(f"slip_rate must be in [0, 1), got {slip_rate}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    train, held = split_problems(rng, cfg.train_prompts, cfg.heldout_prompts)
    problems = {"train": train, "heldout": held}
    accuracy = {}
    for split, ps in problems.items():
        demos = [demonstration(rng, a, b, slip_rate) for a, b in ps]
        _write_jsonl(folder / f"sft_{split}.jsonl", demos)
        rows = [{"prompt": prompt_of(a, b), "answer": str(a + b)} for a, b in ps]
        _write_jsonl(folder / f"prompts_{split}.jsonl", rows)
        right = sum(arithmetic_labeler(d["prompt"], d["response"]) for d in demos)
        accuracy[split] = right / len(demos)

    tokenizer = build_tokenizer()
    model = build_model(cfg.model, tokenizer, cfg.seed)
    model.save_pretrained(folder / "base_model", safe_serialization=True)
    tokenizer.save_pretrained(folder / "base_model")

    manifest = {
        **task_manifest(cfg),
        "kind": "arithmetic",
        "slip_rate": slip_rate,
        "demo_accuracy_train": accuracy["train"],  # 1 - the measured slip rate
        "demo_accuracy_heldout": accuracy["heldout"],
        "counts": {
            "sft_train": len(problems["train"]),
            "sft_heldout": len(problems["heldout"]),
            "prompts_train": len(problems["train"]),
            "prompts_heldout": len(problems["heldout"]),
            "distinct_train_problems": len(set(problems["train"])),
            "vocab": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    }
    (folder / "task.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
