"""Reward functions for tests/test_reward_fn.py, named as "tests.reward_fns:NAME" (`tests` is a
namespace package: importable wherever the repository root is on sys.path, as it is in the test
session's Ray workers, which get the driver's working directory on theirs).

Each takes the batch as lists and returns one reward a sample. A response that contains "bad"
is the one that each faulty function gets wrong.
"""

from __future__ import annotations

from typing import Any

CALLS: list[dict[str, Any]] = []  # the arguments of each call, in this process


def exact_match(prompts: list[Any], responses: list[str], answer: list[str | None]) -> list[float]:
    """1 if the response is the record's "answer", else 0 (and 0 where a record has none)."""
    CALLS.append({"prompts": prompts, "responses": responses, "answer": answer})
    return [float(a is not None and r == a) for r, a in zip(responses, answer, strict=True)]


def nan_on_bad(prompts: list[Any], responses: list[str], **fields: Any) -> list[float]:
    CALLS.append({"prompts": prompts, "responses": responses, **fields})
    return [float("nan") if "bad" in r else 1.0 for r in responses]


def text_on_bad(prompts: list[Any], responses: list[str], **fields: Any) -> list[Any]:
    CALLS.append({"prompts": prompts, "responses": responses, **fields})
    return ["high" if "bad" in r else 1 for r in responses]


def raise_on_bad(prompts: list[Any], responses: list[str], answer: list[Any]) -> list[float]:
    """exact_match, but it raises for the whole batch when one of its responses is bad."""
    for r in responses:
        if "bad" in r:
            CALLS.append({"prompts": prompts, "responses": responses, "answer": answer})
            raise ValueError(f"cannot score {r!r}")
    return exact_match(prompts, responses, answer)


def one_too_many(prompts: list[Any], responses: list[str], **fields: Any) -> list[float]:
    CALLS.append({"prompts": prompts, "responses": responses, **fields})
    return [0.0] * (len(prompts) + 1)


NOT_CALLABLE = 3


# -- for the RL stage's tests on the built-in review task ------------------------------------


def nan_if_terrible(prompts: list[Any], responses: list[str], **fields: Any) -> list[float]:
    """0.5 a response, NaN for one that says "terrible" (a sample the function cannot score)."""
    return [float("nan") if "terrible" in r.split() else 0.5 for r in responses]


def raise_if_terrible(prompts: list[Any], responses: list[str], **fields: Any) -> list[float]:
    for r in responses:
        if "terrible" in r.split():
            raise ValueError(f"cannot score {r!r}")
    return [0.0] * len(responses)
