"""Stage 2a, collect: InstructGPT's comparisons, rankings of the SFT policy's own samples.

For each prompt (the training prompts, then the held-out ones) the rollout engines sample K
responses (`collect.samples_per_prompt`, the prompt K times in one request); exact duplicates and
empty responses are dropped (a prompt left with fewer than 2 is skipped and counted), and a
labeler ranks the rest:

    task             the built-in task's hidden labeler, through Plackett-Luce noise whose
                     temperature is calibrated (on each chunk's scores) to task.labeler_agreement,
                     as the task makes its own comparisons
    module:function  f(prompt, responses) -> a ranking (ints: indices best first) or scores
                     (floats: higher better)
    human            `to_rank.jsonl` is written and the run stops (`RankingNeeded`) until
                     collect.ranked_file holds the rankings

Files in `<run>/collect/`, per split (train, heldout):

    comparisons_{split}.partial.jsonl  the samples (and rankings) of every finished chunk, one
                                       line a prompt, appended and fsynced chunk by chunk: a
                                       stopped stage resumes after them
    samples_{split}.jsonl              the partial file, renamed when every prompt is sampled
    comparisons_{split}.jsonl          the ranked comparisons {"prompt", "responses": best first}
                                       that the RM reads (written last, renamed into place)
    sampling.json                      the settings the samples were made with
    to_rank.jsonl                      labeler human: the responses to rank, shuffled

A prompt with more turns than one user turn (a system prompt, a conversation) keeps its turns
in the comparison: {"prompt": [messages], "responses": [...]}.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import numbers
import os
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.common import engine_group
from trainers.config import ConfigError, RunConfig
from trainers.data import DataError, Limits, encode_prompts, read
from trainers.tracking import Tracker, progress

SPLITS = ("train", "heldout")
SEED_BASE = 2_000_000_011  # engines are reseeded at seed-derived values per chunk (see _reseed)


def comparisons_files(out: Path) -> dict[str, Path]:
    """{split: the ranked comparisons the stage writes into `out`} (what the RM reads)."""
    return {s: out / f"comparisons_{s}.jsonl" for s in SPLITS}


class RankingNeeded(RuntimeError):
    """labeler human: the samples wait for people to rank them (the message says how)."""


class LabelerError(DataError):
    """A labeler function returned something that is no ranking of the responses."""


class SamplesConflict(FileExistsError):
    """The stage's folder holds samples made with other settings."""


# -- inputs ----------------------------------------------------------------------------------


@dataclass
class Prompt:
    index: int  # place in the (capped) prompt list of its split
    where: str
    text: str  # the readable prompt (its last user turn): what a labeler reads
    messages: list[dict[str, str]]  # the prompt's turns, for the chat template
    prompt_ids: list[int]

    @property
    def conversational(self) -> bool:
        return len(self.messages) != 1 or self.messages[0]["role"] != "user"


@dataclass
class CollectInputs:
    policy: str
    tokenizer: Any
    prompts: dict[str, list[Prompt]]  # split -> prompts
    files: dict[str, str]  # split -> prompts file
    labeler: Callable[[str, list[str]], Any] | None  # None: human
    ranked: dict[str, list[int]] | None = None  # human with ranked_file: id -> ranking


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


def prepare(
    config: RunConfig,
    policy: str,
    prompts: str,
    heldout_prompts: str,
    out: Path,
    tokenizer: Any,
    log: Any = print,
) -> CollectInputs:
    """Read and encode the prompts, import the labeler and, for labeler human with
    collect.ranked_file, check the rankings against the samples (all before Ray starts)."""
    cfg = config.collect
    limits = Limits.of(config.data)
    caps = {"train": cfg.max_prompts, "heldout": cfg.max_heldout_prompts}
    files = {"train": prompts, "heldout": heldout_prompts}
    fields = {"train": "collect.prompts", "heldout": "collect.heldout_prompts"}
    split_prompts: dict[str, list[Prompt]] = {}
    for split in SPLITS:
        dataset = read(files[split], "prompts", fields[split])
        if caps[split] is not None:
            dataset = dataset.select(range(min(caps[split], len(dataset))))
        turns = {rec["where"]: rec["messages"] for rec in dataset}
        encoded = encode_prompts(dataset, tokenizer, limits, log)
        split_prompts[split] = [
            Prompt(i, e["where"], e["text"], turns[e["where"]], e["prompt_ids"])
            for i, e in enumerate(encoded)
        ]
    if cfg.labeler == "human":
        labeler = None
    elif cfg.labeler == "task":
        assert config.task is not None  # the config checks it
        labeler = task_labeler(config.task.labeler_agreement)
    else:
        labeler = load_labeler(cfg.labeler)
    inputs = CollectInputs(policy, tokenizer, split_prompts, files, labeler)
    if cfg.labeler == "human" and cfg.ranked_file is not None:
        samples = {split: out / f"samples_{split}.jsonl" for split in SPLITS}
        missing = [str(p) for p in samples.values() if not p.is_file()]
        if missing:
            raise DataError(
                f"collect.ranked_file is set ({cfg.ranked_file}), but {' and '.join(missing)} "
                "do not exist: run once without collect.ranked_file to sample the responses and "
                "export them to rank"
            )
        lines = [line for split in SPLITS for line in _read_lines(samples[split])]
        inputs.ranked = read_ranked(Path(cfg.ranked_file), lines, out / "to_rank.jsonl")
    return inputs


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


# -- files -------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(raw) for raw in f if raw.strip()]


def _read_partial(path: Path) -> list[dict[str, Any]]:
    """The whole lines of a partial file; a line cut short by a stop while it was written (the
    last one) is dropped, and the file rewritten without it."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines, good = [], 0
    for raw in text.splitlines(keepends=True):
        try:
            if not raw.endswith("\n"):
                raise ValueError("cut short")
            lines.append(json.loads(raw))
            good += len(raw.encode("utf-8"))
        except ValueError:
            break
    if good != len(text.encode("utf-8")):
        with path.open("r+b") as f:
            f.truncate(good)
    return lines


def _append(path: Path, lines: list[dict[str, Any]]) -> None:
    """Append a chunk's lines in one write, and make them durable before going on."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def sampling_settings(config: RunConfig, inputs: CollectInputs) -> dict[str, Any]:
    """What the samples (and automatic rankings) depend on: another value makes the kept
    samples stale."""
    from trainers.common import fingerprint

    cfg = config.collect.model_dump(mode="json")
    cfg.pop("ranked_file")
    return json.loads(
        json.dumps(
            {
                "format": 1,
                "collect": cfg,
                "labeler_agreement": config.task.labeler_agreement
                if config.collect.labeler == "task" and config.task is not None
                else None,
                "seed": config.seed,
                "data": config.data.model_dump(mode="json"),
                "dtype": config.rollout.dtype,
                "policy": str(inputs.policy),
                "inputs": fingerprint(inputs.policy, *inputs.files.values()),
            }
        )
    )


def _prompt_id(split: str, p: Prompt, samples: list[str]) -> str:
    """A prompt's id: its split and place, and a digest of its samples (a ranking made for
    other samples of the same prompt does not fit them)."""
    digest = hashlib.sha1(json.dumps([p.text, samples]).encode("utf-8")).hexdigest()[:8]
    return f"{split}-{p.index:05d}-{digest}"


def _reseed(config: RunConfig, split: str, chunk: int) -> int:
    """The seed an engine restarts its random stream at before a chunk: a chunk's samples do
    not depend on the engine that draws them or on what it drew before, so a resumed stage
    draws what one that never stopped would have."""
    return SEED_BASE * (config.seed + 1) + (0 if split == "train" else 500_000) + chunk * 7


# -- the stage ---------------------------------------------------------------------------------


def _engines(config: RunConfig, policy: str, log: Any) -> Any:
    """`rollout.engines` vLLM engines on the policy, placed as the PPO stage places them."""
    return engine_group(config, policy, config.collect.max_new_tokens, log)


def _sample_lines(
    split: str, prompts: list[Prompt], samples: list[dict[str, Any]], k: int, tokenizer: Any
) -> list[dict[str, Any]]:
    """One line per prompt: its distinct non-empty responses in the order sampled."""
    lines = []
    for j, p in enumerate(prompts):
        mine = samples[j * k : (j + 1) * k]
        distinct: list[str] = []
        for s in mine:
            text = tokenizer.decode(s["response_ids"], skip_special_tokens=True).strip()
            if text and text not in distinct:
                distinct.append(text)
        line: dict[str, Any] = {
            "index": p.index,
            "id": _prompt_id(split, p, distinct),
            "where": p.where,
            "prompt": p.text,
        }
        if p.conversational:
            line["messages"] = p.messages
        line.update(
            samples=distinct,
            generated=len(mine),
            tokens=sum(len(s["response_ids"]) for s in mine),
            ranking=None,
            scores=None,
        )
        lines.append(line)
    return lines


def _sample(
    config: RunConfig,
    inputs: CollectInputs,
    pending: list[tuple[str, int, list[Prompt]]],
    partials: dict[str, Path],
    log: Any,
) -> tuple[int, float]:
    """Sample the pending chunks on the engines, rank each as it arrives and append its lines to
    its split's partial file. Returns (tokens generated, seconds of generation)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from actors.rollout import Sampling
    from cluster import RemoteCallError

    cfg = config.collect
    k = cfg.samples_per_prompt
    sampling = Sampling(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p
    )
    timeout = config.learner.collective_timeout_s
    bar = progress(sum(len(ps) for _, _, ps in pending), "collect")
    engines = _engines(config, inputs.policy, log)
    tokens = 0
    try:
        ray.get([a.__ray_ready__.remote() for a in engines.actors], timeout=timeout)
        started = time.perf_counter()
        queue = deque(pending)
        flight: dict[Any, tuple[int, tuple[str, int, list[Prompt]]]] = {}

        def deal(rank: int) -> None:
            if queue:
                split, index, prompts = queue.popleft()
                ids = [p.prompt_ids for p in prompts for _ in range(k)]
                actor = engines.actors[rank]
                ref = actor.generate.remote(ids, sampling, None, _reseed(config, split, index))
                flight[ref] = (rank, (split, index, prompts))

        for _ in range(2):  # two chunks per engine: one generates while the other is ranked
            for rank in range(engines.n):
                deal(rank)
        while flight:
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=timeout)
            if not ready:
                raise RemoteCallError(f"collect: no chunk was generated within {timeout:.0f} s")
            rank, (split, index, prompts) = flight.pop(ready[0])
            try:
                samples = ray.get(ready[0])
            except (RayActorError, RayTaskError) as e:
                raise RemoteCallError(f"collect: rollout rank {rank}: generate failed: {e}") from e
            deal(rank)
            lines = _sample_lines(split, prompts, samples, k, inputs.tokenizer)
            if inputs.labeler is not None:
                rank_chunk(inputs.labeler, cfg.labeler, lines, _reseed(config, split, index))
            _append(partials[split], lines)
            tokens += sum(line["tokens"] for line in lines)
            bar.update(len(prompts))
        seconds = time.perf_counter() - started
    finally:
        bar.close()
        engines.shutdown()
    return tokens, seconds


def train(
    config: RunConfig,
    inputs: CollectInputs,
    out: Path,
    tracker: Tracker,
    log: Any = print,
    restart: bool = False,
) -> dict[str, float]:
    """Sample, rank and write the comparisons of both splits; returns the stage's figures.
    Samples kept from a stopped run with the same settings are used, not drawn again; with
    `restart`, they are dropped."""
    cfg = config.collect
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    partials = {s: out / f"comparisons_{s}.partial.jsonl" for s in SPLITS}
    kept = {s: out / f"samples_{s}.jsonl" for s in SPLITS}
    finals = comparisons_files(out)
    manifest = out / "sampling.json"
    settings = sampling_settings(config, inputs)
    if restart:
        for path in [*partials.values(), *kept.values(), *finals.values(), manifest]:
            path.unlink(missing_ok=True)
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old != settings:
            differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise SamplesConflict(
                f"{out} holds samples made with other settings ({', '.join(differ)} differ); "
                "pass --restart to sample again, or choose another output_dir"
            )
    else:
        for path in [*partials.values(), *kept.values()]:
            path.unlink(missing_ok=True)  # samples of unknown settings
        manifest.write_text(json.dumps(settings, indent=1) + "\n")

    # what earlier runs sampled
    done: dict[str, dict[int, dict[str, Any]]] = {}
    for split in SPLITS:
        if kept[split].is_file():
            lines = _read_lines(kept[split])
        else:
            lines = _read_partial(partials[split])
        by_where = {p.index: p.where for p in inputs.prompts[split]}
        done[split] = {}
        for line in lines:
            if by_where.get(line["index"]) != line["where"]:
                raise SamplesConflict(
                    f"{partials[split]}: line for {line['where']} does not match prompt "
                    f"{line['index']} of {inputs.files[split]}; pass --restart to sample again"
                )
            done[split][line["index"]] = line
    resumed = sum(len(d) for d in done.values())
    pending = []
    for split in SPLITS:
        prompts = inputs.prompts[split]
        for index, start in enumerate(range(0, len(prompts), cfg.chunk_size)):
            chunk = prompts[start : start + cfg.chunk_size]
            todo = [p for p in chunk if p.index not in done[split]]
            if todo:
                pending.append((split, index, todo))
    tokens, gen_seconds = 0, 0.0
    if pending:
        n = sum(len(ps) for _, _, ps in pending)
        log(
            f"collect: sampling {cfg.samples_per_prompt} responses for each of {n} prompts on "
            f"{config.rollout.engines} engine(s)"
            + (f" ({resumed} prompts kept from an earlier run)" if resumed else "")
        )
        tokens, gen_seconds = _sample(config, inputs, pending, partials, log)
        for split in SPLITS:
            for line in _read_partial(partials[split]):
                done[split][line["index"]] = line
    elif resumed:
        log(f"collect: every prompt's samples kept from an earlier run ({out})")
    lines = {s: [done[s][p.index] for p in inputs.prompts[s]] for s in SPLITS}
    for split in SPLITS:  # every prompt sampled: the samples are kept whole
        if partials[split].is_file():
            _write_jsonl(kept[split], lines[split])
            partials[split].unlink()

    if inputs.labeler is None:  # labeler human
        if cfg.ranked_file is None:
            to_rank = out / "to_rank.jsonl"
            n = export_to_rank([x for s in SPLITS for x in lines[s]], to_rank, config.seed)
            raise RankingNeeded(
                f"collect: the responses of {n} prompts wait to be ranked, in {to_rank}.\n"
                "  Rank each line's responses and save a JSONL file with one line per line of "
                'it: {"id": <the line\'s id>, "ranking": [<its response ids, best first>]} '
                "(every response id of the line, once).\n"
                "  Then set collect.ranked_file to that file and run again; the samples are "
                f"kept in {out}/samples_*.jsonl and are not drawn again."
            )
        # checked before Ray started; again here, against these samples (with --restart they
        # were drawn again, and a ranking of the ones before does not fit them)
        ranked = read_ranked(
            Path(cfg.ranked_file), [x for s in SPLITS for x in lines[s]], out / "to_rank.jsonl"
        )
        for split in SPLITS:
            for line in lines[split]:
                if len(line["samples"]) >= 2:
                    line["ranking"] = ranked[line["id"]]
    for split in SPLITS:
        _write_jsonl(
            finals[split],
            [comparison(x, x["ranking"]) for x in lines[split] if len(x["samples"]) >= 2],
        )
    figures = _figures(config, lines, resumed, tokens, gen_seconds, time.perf_counter() - started)
    tracker.log({f"collect/{k}": v for k, v in figures.items()})
    log(
        f"collect: {figures['prompts']:.0f} training and {figures['heldout_prompts']:.0f} "
        f"held-out comparisons of {figures['responses_per_prompt']:.2f} responses on average "
        f"({figures['skipped_prompts']:.0f} prompts skipped, too few distinct responses)"
        + (
            f"; labeler agreement {figures['labeler_agreement']:.3f}"
            if "labeler_agreement" in figures
            else ""
        )
        + f"; in {finals['train']}"
    )
    return figures


def _figures(
    config: RunConfig,
    lines: dict[str, list[dict[str, Any]]],
    resumed: int,
    tokens: int,
    gen_seconds: float,
    seconds: float,
) -> dict[str, float]:
    every = [x for s in SPLITS for x in lines[s]]
    ranked = [x for x in every if len(x["samples"]) >= 2]
    figures = {
        "prompts": float(sum(len(x["samples"]) >= 2 for x in lines["train"])),
        "heldout_prompts": float(sum(len(x["samples"]) >= 2 for x in lines["heldout"])),
        "skipped_prompts": float(len(every) - len(ranked)),
        "resumed_prompts": float(resumed),
        "responses_per_prompt": sum(len(x["samples"]) for x in ranked) / max(len(ranked), 1),
        "mean_response_tokens": sum(x["tokens"] for x in every)
        / max(sum(x["generated"] for x in every), 1),
        "seconds": seconds,
        "tokens_per_second": tokens / gen_seconds if gen_seconds > 0 else 0.0,
    }
    if config.collect.labeler == "task":
        from trainers.task import pairwise_agreement

        figures["labeler_agreement"] = pairwise_agreement(
            [[x["scores"][i] for i in x["ranking"]] for x in ranked]
        )
    elif config.collect.labeler != "human":
        scored = [x["scores"] for x in ranked if x["scores"] is not None]
        if scored:
            pairs = ties = 0
            for s in scored:
                for i in range(len(s)):
                    for j in range(i + 1, len(s)):
                        pairs += 1
                        ties += s[i] == s[j]
            figures["tied_pairs"] = ties / max(pairs, 1)
    return figures
