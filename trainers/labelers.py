"""The collect stage's labelers, which rank the K responses sampled for a prompt:

    task             the built-in task's hidden labeler, through Plackett-Luce noise whose
                     temperature is calibrated (on each chunk's scores) to task.labeler_agreement,
                     as the task makes its own comparisons
    module:function  f(prompt, responses) -> a ranking (ints: indices best first) or scores
                     (floats: higher better)
    human            the responses are exported to rank (`export_to_rank`, each prompt's in a
                     shuffled order), and the file of people's rankings is read back
                     (`read_ranked`), every id checked against the samples

and the RM's comparison record of a ranked prompt (`comparison`).
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainers.config import ConfigError
from trainers.data import DataError


class LabelerError(DataError):
    """A labeler function returned something that is no ranking of the responses."""


def load_labeler(spec: str) -> Callable[[str, list[str]], Any]:
    """The function named by "module:function"; a ConfigError naming collect.labeler if it
    cannot be imported."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(
            f"collect.labeler: cannot import module {module_name!r} ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"collect.labeler: module {module_name!r} has no function {name!r}")
    return fn


def task_labeler(agreement: float) -> Callable[..., Any]:
    """Marker for the built-in labeler: ranking needs the chunk's scores together (its noise is
    calibrated on them), so `rank_chunk` handles it; this carries its settings."""

    def labeler(prompt: str, responses: list[str]) -> list[float]:
        from trainers.task import labeler_score

        return [labeler_score(prompt, r) for r in responses]

    labeler.agreement = agreement  # type: ignore[attr-defined]
    return labeler


# -- ranking ---------------------------------------------------------------------------------


def ranking_of(output: Any, n: int, what: str) -> tuple[list[int], list[float] | None]:
    """A labeler function's answer for n responses -> (ranking best first, scores or None).

    A list of ints is a ranking (a permutation of 0..n-1, best first); a list of floats is
    scores (higher better; ties keep the sampled order)."""
    if hasattr(output, "tolist"):  # a tensor or an array
        output = output.tolist()
    if not isinstance(output, (list, tuple)) or len(output) != n:
        raise LabelerError(
            f"{what}: expected a ranking (ints, best first) or scores (floats) of the "
            f"{n} responses, got {_show(output)}"
        )
    if all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in output):
        ranking = [int(x) for x in output]
        if sorted(ranking) != list(range(n)):
            raise LabelerError(
                f"{what}: the ranking {ranking} is not a permutation of 0..{n - 1} (return "
                "floats for scores)"
            )
        return ranking, None
    if all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in output):
        scores = [float(x) for x in output]
        if not all(math.isfinite(s) for s in scores):
            raise LabelerError(f"{what}: scores must be finite, got {scores}")
        return sorted(range(n), key=lambda i: -scores[i]), scores
    raise LabelerError(
        f"{what}: expected a list of ints (a ranking) or of floats (scores), got {_show(output)}"
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def rank_chunk(
    labeler: Callable[[str, list[str]], Any],
    spec: str,
    lines: list[dict[str, Any]],
    rng_seed: int,
) -> None:
    """Rank the responses of a chunk's prompts in place ("ranking", and "scores" where the
    labeler gives them); skipped prompts (fewer than 2 responses) are left alone."""
    ranked = [line for line in lines if len(line["samples"]) >= 2]
    if not ranked:
        return
    if hasattr(labeler, "agreement"):  # the built-in task: noise calibrated on the chunk
        from trainers.task import calibrate_temperature, noisy_ranking

        scores = [labeler(line["prompt"], line["samples"]) for line in ranked]
        temperature = calibrate_temperature(scores, labeler.agreement)
        rng = random.Random(rng_seed)
        for line, s in zip(ranked, scores, strict=True):
            line["ranking"] = noisy_ranking(rng, s, temperature)
            line["scores"] = s
        return
    for line in ranked:
        what = f"collect.labeler {spec} on {line['where']}"
        try:
            output = labeler(line["prompt"], list(line["samples"]))
        except Exception as e:
            raise LabelerError(f"{what}: the labeler failed: {type(e).__name__}: {e}") from e
        line["ranking"], line["scores"] = ranking_of(output, len(line["samples"]), what)


def comparison(line: dict[str, Any], ranking: list[int]) -> dict[str, Any]:
    """The RM's comparison record of a sampled prompt, ranked: {"prompt", "responses": best
    first}, the prompt a string, or its turns where it has others than one user turn."""
    responses = [line["samples"][i] for i in ranking]
    return {"prompt": line.get("messages", line["prompt"]), "responses": responses}


# -- human labelers ---------------------------------------------------------------------------


def response_id(prompt_id: str, k: int) -> str:
    return f"{prompt_id}-{k}"


def export_to_rank(lines: list[dict[str, Any]], path: Path, seed: int) -> int:
    """Write the prompts to rank, each with its responses in a shuffled order (seeded by the
    prompt's id); returns how many."""
    tmp = path.with_suffix(".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            if len(line["samples"]) < 2:
                continue
            order = list(range(len(line["samples"])))
            random.Random(f"{seed}:{line['id']}").shuffle(order)
            row: dict[str, Any] = {"id": line["id"], "prompt": line["prompt"]}
            if "messages" in line:
                row["messages"] = line["messages"]
            row["responses"] = [
                {"id": response_id(line["id"], k), "text": line["samples"][k]} for k in order
            ]
            f.write(json.dumps(row) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_ranked(
    path: Path, lines: list[dict[str, Any]], to_rank: Path | None = None
) -> dict[str, list[int]]:
    """The rankings of a human-ranked file, {prompt id: indices into its samples, best first};
    every line is checked against the samples, and every problem is a DataError naming the file
    and the line."""
    if not path.is_file():
        raise DataError(f"{path}: ranked file not found (named by collect.ranked_file)")
    prompts = {line["id"]: line for line in lines if len(line["samples"]) >= 2}
    seen: dict[str, int] = {}
    out: dict[str, list[int]] = {}
    shown = to_rank.name if to_rank is not None else "to_rank.jsonl"
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise DataError(
                    f'{where}: expected {{"id": <a prompt id of {shown}>, "ranking": [response '
                    "ids, best first]}"
                )
            pid = row["id"]
            if pid not in prompts:
                raise DataError(f"{where}: unknown prompt id {pid!r} (not in {shown})")
            if pid in seen:
                raise DataError(
                    f"{where}: prompt id {pid!r} is ranked twice (first on line {seen[pid]})"
                )
            seen[pid] = lineno
            ranking = row.get("ranking")
            n = len(prompts[pid]["samples"])
            ids = [response_id(pid, k) for k in range(n)]
            if not isinstance(ranking, list) or not all(isinstance(r, str) for r in ranking):
                raise DataError(
                    f'{where}: field "ranking" must be a list of the prompt\'s response ids '
                    f"(strings), best first: {ids}"
                )
            if sorted(ranking) != sorted(ids):
                unknown = sorted(set(ranking) - set(ids))
                missing = sorted(set(ids) - set(ranking))
                repeated = sorted({r for r in ranking if ranking.count(r) > 1})
                problems = [
                    f"{label} {items}"
                    for label, items in (
                        ("unknown ids", unknown),
                        ("missing ids", missing),
                        ("repeated ids", repeated),
                    )
                    if items
                ]
                raise DataError(
                    f"{where}: the ranking of {pid!r} is not a permutation of its {n} response "
                    f"ids ({'; '.join(problems)})"
                )
            out[pid] = [ids.index(r) for r in ranking]
    missing_prompts = [pid for pid in prompts if pid not in out]
    if missing_prompts:
        more = f" and {len(missing_prompts) - 1} more" if len(missing_prompts) > 1 else ""
        raise DataError(
            f"{path}: no ranking for prompt id {missing_prompts[0]!r}{more} of {shown} (every "
            "prompt there needs one line)"
        )
    return out
