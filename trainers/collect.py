"""Stage 2a, collect: InstructGPT's comparisons, rankings of the SFT policy's own samples.

For each prompt (the training prompts, then the held-out ones) the rollout engines sample K
responses (`collect.samples_per_prompt`, the prompt K times in one request); exact duplicates and
empty responses are dropped (a prompt left with fewer than 2 is skipped and counted), and a
labeler ranks the rest: `task` (the built-in task's hidden labeler, through calibrated noise), a
`module:function`, or `human`: `to_rank.jsonl` is written and the run stops (`RankingNeeded`)
until collect.ranked_file holds the rankings.

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

This module holds the stage (`train`, which resumes, ranks and writes the files, and its
figures); its parts are in trainers/collect_inputs.py (the prompts and the labeler, `prepare`),
trainers/collect_sampling.py (sampling on the engines, chunk by chunk), trainers/labelers.py (the
labelers, and the human rankings' export and import) and trainers/collect_files.py (the JSONL
files). The names of these that other code uses are imported from here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from trainers.collect_files import _read_lines, _read_partial, _write_jsonl
from trainers.collect_inputs import SPLITS as SPLITS
from trainers.collect_inputs import CollectInputs as CollectInputs
from trainers.collect_inputs import Prompt as Prompt
from trainers.collect_inputs import prepare as prepare
from trainers.collect_sampling import SEED_BASE as SEED_BASE
from trainers.collect_sampling import _prompt_id as _prompt_id  # (read by the tests)
from trainers.collect_sampling import _sample
from trainers.config import RunConfig
from trainers.labelers import LabelerError as LabelerError
from trainers.labelers import comparison as comparison
from trainers.labelers import export_to_rank as export_to_rank
from trainers.labelers import load_labeler as load_labeler
from trainers.labelers import rank_chunk as rank_chunk
from trainers.labelers import ranking_of as ranking_of
from trainers.labelers import read_ranked as read_ranked
from trainers.labelers import response_id as response_id
from trainers.labelers import task_labeler as task_labeler
from trainers.tracking import Tracker


def comparisons_files(out: Path) -> dict[str, Path]:
    """{split: the ranked comparisons the stage writes into `out`} (what the RM reads)."""
    return {s: out / f"comparisons_{s}.jsonl" for s in SPLITS}


class RankingNeeded(RuntimeError):
    """labeler human: the samples wait for people to rank them (the message says how)."""


class SamplesConflict(FileExistsError):
    """The stage's folder holds samples made with other settings."""


# -- the stage ---------------------------------------------------------------------------------


def sampling_settings(config: RunConfig, inputs: CollectInputs) -> dict[str, Any]:
    """What the samples (and automatic rankings) depend on: another value makes the kept
    samples stale."""
    from trainers.stage_record import LOCATION_FIELDS, fingerprint

    cfg = config.collect.model_dump(mode="json")
    for field in LOCATION_FIELDS["collect"]:  # where the inputs lie: "inputs" has what they hold
        cfg.pop(field)
    cfg.pop("engines")  # a chunk's samples do not depend on the engine that draws them
    return json.loads(
        json.dumps(
            {
                "format": 2,
                "collect": cfg,
                "labeler_agreement": config.task.labeler_agreement
                if config.collect.labeler == "task" and config.task is not None
                else None,
                "seed": config.seed,
                "data": config.data.model_dump(mode="json"),
                "dtype": config.rollout.dtype,
                "inputs": fingerprint(policy=inputs.policy, **inputs.files),
            }
        )
    )


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
        by_text = {p.index: p.text for p in inputs.prompts[split]}
        done[split] = {}
        for line in lines:
            if by_text.get(line["index"]) != line["prompt"]:
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
            f"{cfg.engines or config.rollout.engines} engine(s)"
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
