"""The collect stage's sampling: K responses per prompt from the rollout engines, chunk by chunk.

Each chunk's prompts go to an engine (two chunks in flight per engine: one generates while the
other is ranked), reseeded at a value of the run's seed, the split and the chunk, so that a
chunk's samples do not depend on which engine draws them; each prompt keeps its distinct
non-empty responses, which the labeler ranks, and the chunk's lines are appended to its split's
partial file.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from pathlib import Path
from typing import Any

from trainers.collect_files import _append
from trainers.collect_inputs import CollectInputs, Prompt
from trainers.common import engine_group
from trainers.config import RolloutConfig, RunConfig
from trainers.labelers import rank_chunk
from trainers.tracking import progress

SEED_BASE = 2_000_000_011  # engines are reseeded at seed-derived values per chunk (see _reseed)


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


def engine_section(config: RunConfig) -> RolloutConfig:
    """The rollout section as this stage uses it: `collect.engines` (default `rollout.engines`)
    engines, sharing the threads that rollout gives its engines (at least one each)."""
    r = config.rollout
    n = config.collect.engines or r.engines
    return r.model_copy(
        update={"engines": n, "torch_threads": max(1, r.engines * r.torch_threads // n)}
    )


def _engines(config: RunConfig, policy: str, log: Any) -> Any:
    """This stage's vLLM engines on the policy, placed as the PPO stage places them."""
    config = config.model_copy(update={"rollout": engine_section(config)})
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
    from cluster import RemoteCallError, actor_fault

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
        replaced = 0
        for rank in range(engines.n):  # an engine that died or hangs as it starts is replaced
            if not engines.alive(rank, timeout):
                replaced += 1
                engines.replace(rank)
                log(f"collect: rollout rank {rank} died or hangs as it starts; replaced it")
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
            lost: set[int] = set()  # engines that died or hang: replaced, their chunks redone
            if not ready:  # nothing within the deadline: an engine that does not answer hangs
                lost = {rank for rank, _ in flight.values() if not engines.alive(rank)}
                if not lost:
                    raise RemoteCallError(f"collect: no chunk was generated within {timeout:.0f} s")
            else:
                rank, (split, index, prompts) = flight[ready[0]]
                try:
                    samples = ray.get(ready[0])
                except (RayActorError, RayTaskError) as e:
                    if not actor_fault(e):
                        raise RemoteCallError(
                            f"collect: rollout rank {rank}: generate failed: {e}"
                        ) from e
                    lost = {rank}
            if lost:
                replaced += len(lost)
                if replaced > cfg.chunk_retries:
                    raise RemoteCallError(
                        f"collect: engines died or hung {replaced} times (collect.chunk_retries="
                        f"{cfg.chunk_retries}); the prompts collected so far are kept in "
                        f"{', '.join(str(p) for p in partials.values())}: run again to continue"
                    )
                redo = [ref for ref, (r, _) in flight.items() if r in lost]
                # their chunks go back to the front of the queue, in the order they were dealt
                queue.extendleft(reversed([flight.pop(ref)[1] for ref in redo]))
                for r in sorted(lost):
                    t0 = time.perf_counter()
                    engines.replace(r)
                    log(f"collect: rollout rank {r} died or hangs; replaced it and redoing its "
                        f"chunks ({time.perf_counter() - t0:.1f} s to recover)")  # fmt: skip
                    deal(r)
                    deal(r)
                continue
            del flight[ready[0]]
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
