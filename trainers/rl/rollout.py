"""The rollout stream: an iteration's prompts dealt to the engines in chunks, and each chunk, as
soon as it is generated, scored by the reward and reference actors, valued by the critic and
joined into experience by the joiner actor (the samples never pass through the driver). A chunk
whose actor died or hung is issued again once the actor is replaced."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.rollout import Sampling
from cluster import RemoteCallError, first_line
from trainers.config import PPOConfig, RunConfig
from trainers.experience import make_experience
from trainers.objectives import learner_logprobs, sample_values
from trainers.ppo_math import FixedKLController, RunningMoments
from trainers.rl.inputs import PromptStream
from trainers.rl.roles import Roles

# Engines are reseeded from here up at each iteration; the evaluation's seeds are below it.
TRAIN_SEED_BASE = 1_000_000_007


def chunked(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def sampling_of(cfg: PPOConfig, *, training: bool) -> Sampling:
    """The sampling of the training rollouts and of the evaluation. `ppo.ignore_eos` (fixed
    lengths, for benchmarks) holds for the rollouts only: the evaluation judges responses where
    the policy ends them."""
    return Sampling(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        ignore_eos=cfg.ignore_eos and training,
        n=cfg.n_samples_per_prompt if training else 1,
    )


def generate(
    roles: Roles,
    chunks: list[list[list[int]]],
    sampling: Sampling,
    seed: int | None = None,
    reseed: int | None = None,
) -> dict[Any, int]:
    """Deal the chunks of prompt ids to the engines in turn; {ref of a chunk's samples: chunk
    index}. With `seed`, the i-th prompt overall is sampled with seed + i, on whichever engine it
    lands. With `reseed`, engine r restarts its random stream at reseed + r before its first
    chunk."""
    engines = roles.engines.actors
    refs = {}
    offset = 0
    for i, chunk in enumerate(chunks):
        seeds = None if seed is None else [seed + offset + j for j in range(len(chunk))]
        offset += len(chunk)
        first = None if reseed is None or i >= len(engines) else reseed + i
        refs[engines[i % len(engines)].generate.remote(chunk, sampling, seeds, first)] = i
    return refs


@dataclass
class Rollout:
    """One iteration's batch in the making: its chunks' generation refs and, as each chunk is
    generated, its experience (scored, valued and joined by actors). The KL coefficient and
    the reward scale it is scored with are fixed when it starts, so that a resumed run scores it
    the same."""

    it: int
    chunks: list[list[list[int]]]  # each chunk's prompt ids
    sampling: Sampling
    beta: float
    reward_scale: float
    index: dict[Any, int]  # a chunk's generation ref -> its index
    started: float
    records: list[list[dict[str, Any]]]  # each chunk's samples' prompt records, for functions
    waiting: list[Any] = field(default_factory=list)  # generation refs not joined yet
    experience: list[Any] = field(default_factory=list)
    stats: list[Any] = field(default_factory=list)
    generated: float | None = None  # when its last chunk was generated

    def __post_init__(self) -> None:
        self.waiting = list(self.index)
        self.experience = [None] * len(self.chunks)
        self.stats = [None] * len(self.chunks)

    def samples(self, timeout: float) -> list[list[dict[str, Any]]]:
        """The generated samples of every chunk (waits for the generation to end)."""
        order = sorted(self.index, key=self.index.__getitem__)
        return ray.get(order, timeout=timeout)


def start_rollout(
    config: RunConfig,
    roles: Roles,
    stream: PromptStream,
    kl: FixedKLController,
    scores: RunningMoments,
    it: int,
    generated: list[list[dict[str, Any]]] | None = None,
    records: list[list[dict[str, Any]]] | None = None,
) -> Rollout:
    """Take iteration `it`'s prompts and deal them to the engines. `generated` and `records`:
    its samples and their prompt records as a checkpoint kept them (overlapped mode), joined
    again instead of generated again."""
    cfg = config.ppo
    sampling = sampling_of(cfg, training=True)
    scale = max(scores.std, 1e-8) if cfg.normalize_reward else 1.0
    if generated is not None:  # a prompt's responses are next to each other
        n = cfg.n_samples_per_prompt
        chunks = [[s["prompt_ids"] for s in chunk[::n]] for chunk in generated]
        index = {ray.put(chunk): i for i, chunk in enumerate(generated)}
        records = records or [[{} for _ in chunk] for chunk in generated]
    else:
        # Each engine's random stream restarts from a seed fixed by the run's seed and the
        # iteration, and each engine takes its chunks in a fixed order: the samples do not
        # depend on what the engines drew before, so a resumed run draws the same ones as a run
        # that never stopped.
        reseed = TRAIN_SEED_BASE * (config.seed + 1) + it * 1009
        prompts = stream.take(cfg.rollout_batch)
        size = roles.config.chunk_size(len(prompts))
        chunks = chunked([p["prompt_ids"] for p in prompts], size)
        index = generate(roles, chunks, sampling, reseed=reseed)
        n = cfg.n_samples_per_prompt
        records = [
            [prompt_record(p) for p in part for _ in range(n)] for part in chunked(prompts, size)
        ]
    return Rollout(it, chunks, sampling, kl.beta, scale, index, time.perf_counter(), records)


def prompt_record(prompt: dict[str, Any]) -> dict[str, Any]:
    """What a reward function is given of a prompt: its text and the other fields of its line."""
    return {"prompt": prompt["text"], **prompt.get("fields", {})}


def join(config: RunConfig, roles: Roles, rollout: Rollout, done: Any, i: int) -> tuple[Any, Any]:
    """The experience of a generated chunk: scored, valued and joined by actors (refs); where a
    role has several actors (colocated: one on each host), by those of the chunk's engine."""
    cfg = config.ppo
    at = i % roles.engines.n
    # ppo.old_logprobs=learner: the policy's own log-probs, from the weights it holds before
    # it trains on this batch (in overlapped mode the call waits behind the current training)
    learner_lp = (
        roles.policy.submit_forward_slice(
            done, partial(learner_logprobs, pad_id=roles.pad_id, temperature=cfg.temperature)
        )
        if cfg.old_logprobs == "learner"
        else []
    )
    scores = roles.score(done, rollout.records[i], at)
    values = (
        roles.critic.submit_forward_slice(done, partial(sample_values, pad_id=roles.pad_id))
        if roles.critic is not None
        else []
    )
    return (
        roles.joiner.actors[at % roles.joiner.n]
        .run.options(num_returns=2)
        .remote(
            make_experience,
            done,
            *scores[:1],
            roles.reference.actors[at % roles.reference.n].logprobs.remote(done, cfg.temperature),
            *scores[1:],
            *values,
            *learner_lp,
            extra_scores=len(scores) - 1,
            score_weights=roles.score_weights,
            value_parts=len(values),
            drop_nonfinite=config.reward.on_error == "skip",
            policy_parts=len(learner_lp),
            beta=rollout.beta if cfg.kl.mode == "reward" else 0.0,
            estimator=cfg.kl.estimator,
            gamma=cfg.gamma,
            lam=cfg.lam,
            reward_clip=cfg.reward_clip,
            missing_eos_penalty=cfg.missing_eos_penalty,
            reward_scale=rollout.reward_scale,
            advantage=cfg.advantage,
            group_size=cfg.n_samples_per_prompt,
            group_std=cfg.group_std,
            drop_zero_signal=cfg.drop_zero_signal_groups,
        )
    )


def pump(config: RunConfig, roles: Roles, rollout: Rollout, busy: list[Any] | None = None) -> None:
    """Join the rollout's chunks as their generation ends, until every chunk is generated or,
    with `busy` (refs of other work), until all of `busy` is done. Chunks that do not end within
    the deadline are left to `gather`, which issues them again."""
    timeout = config.learner.collective_timeout_s
    busy = list(busy or [])
    while rollout.waiting:
        if busy:
            _, busy = ray.wait(busy, num_returns=len(busy), timeout=0)
            if not busy:
                return
        ready, _ = ray.wait(rollout.waiting + busy, num_returns=1, timeout=timeout)
        if not ready:  # nothing ended within the deadline: hangs are handled by `gather`
            return
        for done in ready:
            if done in rollout.index and done in rollout.waiting:
                rollout.waiting.remove(done)
                i = rollout.index[done]
                rollout.experience[i], rollout.stats[i] = join(config, roles, rollout, done, i)
    if rollout.generated is None:
        rollout.generated = time.perf_counter()


def gather(
    config: RunConfig, roles: Roles, rollout: Rollout, version: int
) -> tuple[list[dict[str, Any]], int, int]:
    """Every chunk's statistics, once its experience is joined. A chunk whose engine, reward or
    reference actor died (or hung past the deadline) is issued again, whole, once the actor is
    replaced; only its last attempt counts. Returns (chunk stats, reissued, replaced)."""
    cfg = config.ppo
    timeout = config.learner.collective_timeout_s
    chunk_stats: list[Any] = [None] * len(rollout.chunks)
    reissued = replaced = 0
    for i, prompt_ids in enumerate(rollout.chunks):
        for attempt in range(cfg.chunk_retries + 1):
            try:
                if rollout.stats[i] is None:
                    raise GetTimeoutError(f"chunk {i} did not finish within {timeout:.0f} s")
                chunk_stats[i] = ray.get(rollout.stats[i], timeout=timeout)
                break
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                if attempt == cfg.chunk_retries:
                    raise RemoteCallError(
                        f"ppo: chunk {i} failed {attempt + 1} times: {first_line(e)}"
                    ) from e
                replaced += len(roles.recover(version, e))
                reissued += 1
                roles.log(f"ppo: iteration {rollout.it + 1}: chunk {i} issued again")
                engines = roles.engines.actors
                done = engines[i % len(engines)].generate.remote(prompt_ids, rollout.sampling)
                rollout.experience[i], rollout.stats[i] = join(config, roles, rollout, done, i)
    return chunk_stats, reissued, replaced
