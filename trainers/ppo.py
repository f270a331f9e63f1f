"""Stage 3: PPO (and PPO-ptx) against the reward model, with a KL penalty to the SFT policy.

The roles are Ray actors: vLLM engines (rollout), the RM (reward), the frozen SFT policy
(reference), a DeepSpeed critic group and the DeepSpeed policy group. One iteration, top to
bottom (`iteration`):

1. the prompts go to the engines in chunks;
2. as soon as a chunk is generated, its object ref goes to reward, reference and critic, and the
   joiner actor joins their answers into experience (rewards, GAE): the samples never pass
   through the driver, and scoring overlaps the generation of the other chunks;
3. the policy and critic groups fetch the experience themselves and train on it at the same time
   (PPO epochs over shuffled minibatches);
4. the policy's new weights go to every engine (through the object store, or broadcast over a
   torch.distributed group); each sample records the weight version that produced it.

In overlapped mode (`ppo.overlap`) the engines generate the next iteration's batch during step 3,
with the weights one version behind.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.joiner import Joiner
from actors.learner import LearnerGroup, ModelSpec
from actors.rollout import Sampling
from actors.scorers import ReferencePolicy, RewardModel
from cluster import ActorGroup, RemoteCallError
from cluster.groups import format_resources
from trainers.common import autoscaling_timeout, engine_group, learner_group, optim_spec
from trainers.config import PPOConfig, RunConfig
from trainers.data import (
    Limits,
    encode_demonstrations,
    encode_prompts,
    read,
    require_batch,
)
from trainers.experience import make_experience, summarize
from trainers.objectives import (
    critic_batch,
    learner_logprobs,
    policy_batch,
    ppo_objective,
    sample_values,
    value_objective,
)
from trainers.ppo_math import AdaptiveKLController, FixedKLController, RunningMoments
from trainers.sft import demonstration_loss
from trainers.tracking import Tracker, progress

# Engines are reseeded from here up at each iteration; the evaluation's seeds are below it.
TRAIN_SEED_BASE = 1_000_000_007


@dataclass
class PPOInputs:
    policy: str
    reward_model: str
    critic_model: str
    tokenizer: Any
    prompts: list[dict[str, Any]]
    heldout_prompts: list[dict[str, Any]]
    ptx: list[dict[str, Any]]
    heldout_demos: list[dict[str, Any]]


def prepare(
    config: RunConfig,
    *,
    policy: str,
    reward_model: str,
    critic_model: str,
    prompts: str,
    heldout_prompts: str,
    ptx: str,
    heldout_demos: str,
    tokenizer: Any,
    log: Any = print,
) -> PPOInputs:
    """Read and encode the prompts and demonstrations (before Ray starts)."""
    limits = Limits.of(config.data)
    inputs = PPOInputs(
        policy=policy,
        reward_model=reward_model,
        critic_model=critic_model,
        tokenizer=tokenizer,
        prompts=encode_prompts(read(prompts, "prompts", "ppo.prompts"), tokenizer, limits, log),
        heldout_prompts=encode_prompts(
            read(heldout_prompts, "prompts", "ppo.heldout_prompts"), tokenizer, limits, log
        ),
        ptx=encode_demonstrations(
            read(ptx, "demonstrations", "ppo.ptx_data"), tokenizer, limits, log
        ),
        heldout_demos=encode_demonstrations(
            read(heldout_demos, "demonstrations", "ppo.heldout_demonstrations"),
            tokenizer,
            limits,
            log,
        ),
    )
    require_batch("ppo.rollout_batch", config.ppo.rollout_batch, inputs.prompts, "prompts", prompts)
    return inputs


class PromptStream:
    """Prompts in a shuffled order, a new order each pass, fixed by the seed; its position is
    its whole state (for resuming)."""

    def __init__(self, prompts: list[dict[str, Any]], seed: int) -> None:
        self.prompts, self.seed = prompts, seed
        self.epoch, self.offset = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        return order

    def state(self) -> list[int]:
        """[epoch, offset]: all that a checkpoint needs to continue the stream."""
        return [self.epoch, self.offset]

    def restore(self, state: list[int]) -> None:
        self.epoch, self.offset = state
        self._order = self._shuffle()

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.prompts[self._order[self.offset]])
            self.offset += 1
        return out


class LearnerFault(RuntimeError):
    """A rank of the policy or critic group died or hangs: the groups go back to a checkpoint."""


class NonFiniteError(RuntimeError):
    """Too many updates in a row were skipped for a non-finite loss."""


class SkipGuard:
    """Counts the policy's and the critic's updates skipped in a row for a non-finite loss
    (a NaN or infinite reward, value, advantage or loss); `limit` in a row stops the run."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_row = {"policy": 0, "critic": 0}
        self.total = {"policy": 0, "critic": 0}

    def update(self, name: str, steps: list[dict[str, float]]) -> None:
        for step in steps:
            if step.get("skipped"):
                self.in_row[name] += 1
                self.total[name] += 1
            else:
                self.in_row[name] = 0
            if self.in_row[name] >= self.limit:
                raise NonFiniteError(
                    f"{self.in_row[name]} {name} updates in a row were skipped for a non-finite "
                    f"loss (ppo.max_skipped_steps={self.limit}); look at the reward model's "
                    "scores and the learning rates"
                )


class Roles:
    """Every actor of the PPO stage; shuts them all down on exit."""

    def __init__(self, config: RunConfig, inputs: PPOInputs, log: Any = print) -> None:
        self.log = log
        self.groups: list[Any] = []
        try:
            self._start(config, inputs, log)
        except BaseException:
            self.__exit__()  # a role that fails to start takes down the ones already started
            raise

    def _start(self, config: RunConfig, inputs: PPOInputs, log: Any) -> None:
        self.engines = self._add(
            engine_group(config, inputs.policy, config.ppo.max_new_tokens, log)
        )
        # Joining a chunk's experience is a few tensor operations: the joiner reserves no CPU
        # (only the memory it holds), so it runs while the other actors hold every CPU.
        self.joiner = self._add(
            ActorGroup(
                Joiner,
                1,
                name="joiner",
                num_cpus=0,
                memory_gb=0.5,
                placement_timeout_s=config.learner.placement_timeout_s,
                call_timeout_s=config.learner.collective_timeout_s,
            )
        )
        self.reward = self._scorer(RewardModel, "reward", config, inputs.reward_model, log)
        self.reference = self._scorer(ReferencePolicy, "reference", config, inputs.policy, log)
        self.config, self.inputs = config, inputs
        self.sync = weight_sync_method(config)
        self.bucket_bytes = int(config.rollout.sync_bucket_mb * 2**20)
        self._sending: list[Any] = []  # the policy's refs of a broadcast sync under way
        self.policy: LearnerGroup
        self.critic: LearnerGroup
        self._learners(["policy", "critic"])
        self.ptx_ref = ray.put(inputs.ptx)
        self.ptx_size = len(inputs.ptx)
        self.pad_id = int(inputs.tokenizer.pad_token_id)

    def _learners(self, names: list[str]) -> None:
        """Start the named groups (policy, critic) and build them from the run's starting
        models, all at once: their ranks start, connect and load in parallel with each other
        (and with the engines and scorers, which start meanwhile)."""
        config, cfg, r = self.config, self.config.ppo, self.config.rollout
        steps = cfg.iterations * cfg.epochs * (cfg.rollout_batch // cfg.minibatch_size)
        trust = config.trust_remote_code
        specs = {
            "policy": (
                config.learner,
                ModelSpec(self.inputs.policy, trust_remote_code=trust),
                optim_spec(cfg.policy_optim, steps),
            ),
            "critic": (
                cfg.critic,
                ModelSpec(self.inputs.critic_model, kind="reward", trust_remote_code=trust),
                optim_spec(cfg.critic_optim, steps),
            ),
        }
        building = []
        for name in names:
            section, model, optim = specs[name]
            group = self._add(
                learner_group(section, config.seed, name, cfg.minibatch_size, config.ray, self.log)
            )
            setattr(self, name, group)
            building.append((group, group.submit_build(model, optim)))
        for group, refs in building:
            group.finish_build(refs)
        if "policy" in names and self.sync == "broadcast":
            gpus = r.gpus_per_engine > 0 and config.learner.gpus_per_rank > 0
            self.policy.open_weight_group(
                self.engines, "nccl" if gpus else "gloo", config.learner.collective_timeout_s
            )

    def dead_learners(self) -> list[str]:
        """The learner groups (policy, critic) with a rank that died or does not answer."""
        return [g.group.name for g in (self.policy, self.critic) if g.group.any_dead()]

    def restart_learners(self, names: list[str]) -> None:
        """Start the named learner groups again from the run's starting models (the caller
        then loads the latest checkpoint into every group)."""
        for name in names:
            old = getattr(self, name)
            old.shutdown()
            self.groups.remove(old)
        self._learners(names)

    def recover(self, version: int, cause: BaseException) -> list[str]:
        """Replace every engine, reward, reference or joiner actor that died or hangs (a new
        actor in its place; an engine also gets the policy's current weights, as `version`).
        Returns what was replaced. If nothing was: a LearnerFault if a policy or critic rank
        died or hangs (`train` brings the groups back from a checkpoint); else, if `cause` is no
        actor's death or hang (a bug, bad data), `cause` again: it would fail the same way when
        issued again."""
        replaced = []
        for group in (self.engines, self.reward, self.reference, self.joiner):
            for rank in range(group.n):
                if group.alive(rank):
                    continue
                self.log(f"ppo: {group.name} rank {rank} died or hangs ({_first_line(cause)}); "
                         "replacing it")  # fmt: skip
                actor = group.replace(rank)
                if group is self.engines:
                    weights = self.policy.publish_weights()
                    ray.get(
                        actor.load_weights.remote(weights, version), timeout=group.call_timeout_s
                    )
                replaced.append(f"{group.name}[{rank}]")
        if not replaced:
            dead = self.dead_learners()
            if dead:  # a learner group comes back from a checkpoint: `train` does it
                raise LearnerFault(f"{' and '.join(dead)}: a rank died or hangs") from cause
            if not _actor_fault(cause):
                raise cause
        return replaced

    def submit_sync(self, version: int) -> list[Any]:
        """Start sending the policy's weights to every engine, as `version`; returns the refs
        of the engines' loads (`finish_sync` waits for them)."""
        if self.sync == "broadcast":
            self._sending, receiving = self.policy.submit_broadcast(
                self.engines, version, self.bucket_bytes
            )
            return receiving
        return self.engines.submit("load_weights", self.policy.publish_weights(), version)

    def finish_sync(self, receiving: list[Any]) -> None:
        """Wait for a sync to end; a RemoteCallError names the engine that failed or hung."""
        sending, self._sending = self._sending, []
        if sending:  # the sender's error names an engine that did not answer
            self.policy.group.get(sending, "broadcast_weights")
        self.engines.get(receiving, f"{self.sync} weight sync")

    def sync_weights(self, version: int) -> None:
        """The policy's weights to every engine, as `version`, loaded when this returns."""
        self.finish_sync(self.submit_sync(version))

    def placement(self) -> dict[str, list[dict[str, Any]]]:
        """Where every rank of every role runs: {role: [{rank, node_id, ip, node_resources}]}."""
        groups = {
            "rollout": self.engines,
            "reward": self.reward,
            "reference": self.reference,
            "policy": self.policy.group,
            "critic": self.critic.group,
        }
        return {name: group.nodes() for name, group in groups.items()}

    def peak_memory_gb(self) -> dict[str, float]:
        """Each role's peak resident memory so far (GB; its largest rank)."""
        peaks = {
            name: max(m["rss_gb"] for m in group.call("peak_memory_gb"))
            for name, group in (
                ("rollout", self.engines),
                ("reward", self.reward),
                ("reference", self.reference),
                ("joiner", self.joiner),
            )
        }
        return {
            **peaks,
            "policy": self.policy.peak_memory_gb(),
            "critic": self.critic.peak_memory_gb(),
        }

    def _scorer(self, cls: type, name: str, config: RunConfig, path: str, log: Any) -> ActorGroup:
        """One frozen scorer actor, sized by the config section of the same name."""
        role = getattr(config, name)
        return self._add(
            ActorGroup(
                cls,
                1,
                name=name,
                num_cpus=role.cpus,
                num_gpus=role.gpus,
                memory_gb=role.memory_gb,
                resources=role.resources,
                placement_timeout_s=config.learner.placement_timeout_s,
                autoscaling_timeout_s=autoscaling_timeout(config.ray),
                log=log,
                call_timeout_s=config.learner.collective_timeout_s,
                actor_kwargs={
                    "path": path,
                    "batch_size": role.batch_size,
                    "trust_remote_code": config.trust_remote_code,
                },
            )
        )

    def _add(self, group: Any) -> Any:
        self.groups.append(group)
        return group

    def __enter__(self) -> Roles:
        return self

    def __exit__(self, *exc: object) -> None:
        for group in reversed(self.groups):
            group.shutdown()


def weight_sync_method(config: RunConfig) -> str:
    """rollout.weight_sync, with auto resolved: the broadcast, which bench/weight_sync.py
    measured at about twice the object store's speed on the CPU at every size from 1M to 86M
    parameters (gloo). On GPUs (NCCL) it is what the field uses; not measured here yet."""
    method = config.rollout.weight_sync
    return "broadcast" if method == "auto" else method


def _actor_fault(e: BaseException) -> bool:
    """An actor died or hung (a call on an actor that has since been replaced fails so too)."""
    while isinstance(e, RemoteCallError) and e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, (RayActorError, GetTimeoutError)):
        return True
    return isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), RayActorError)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _sampling(cfg: PPOConfig, *, training: bool) -> Sampling:
    """The sampling of the training rollouts and of the evaluation. `ppo.ignore_eos` (fixed
    lengths, for benchmarks) holds for the rollouts only: the evaluation judges responses where
    the policy ends them."""
    return Sampling(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        ignore_eos=cfg.ignore_eos and training,
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
) -> Rollout:
    """Take iteration `it`'s prompts and deal them to the engines. `generated`: its samples as
    a checkpoint kept them (overlapped mode), joined again instead of generated again."""
    cfg = config.ppo
    sampling = _sampling(cfg, training=True)
    scale = max(scores.std, 1e-8) if cfg.normalize_reward else 1.0
    if generated is not None:
        chunks = [[s["prompt_ids"] for s in chunk] for chunk in generated]
        index = {ray.put(chunk): i for i, chunk in enumerate(generated)}
    else:
        # Each engine's random stream restarts from a seed fixed by the run's seed and the
        # iteration, and each engine takes its chunks in a fixed order: the samples do not
        # depend on what the engines drew before, so a resumed run draws the same ones as a run
        # that never stopped.
        reseed = TRAIN_SEED_BASE * (config.seed + 1) + it * 1009
        prompts = stream.take(cfg.rollout_batch)
        chunks = _chunks([p["prompt_ids"] for p in prompts], config.rollout.chunk_size)
        index = generate(roles, chunks, sampling, reseed=reseed)
    return Rollout(it, chunks, sampling, kl.beta, scale, index, time.perf_counter())


def _join(config: RunConfig, roles: Roles, rollout: Rollout, done: Any) -> tuple[Any, Any]:
    """The experience of a generated chunk: scored, valued and joined by actors (refs)."""
    cfg = config.ppo
    # ppo.old_logprobs=learner: the policy's own log-probs, from the weights it holds before
    # it trains on this batch (in overlapped mode the call waits behind the current training)
    learner_lp = (
        roles.policy.submit_forward_slice(
            done, partial(learner_logprobs, pad_id=roles.pad_id, temperature=cfg.temperature)
        )
        if cfg.old_logprobs == "learner"
        else []
    )
    return (
        roles.joiner.actors[0]
        .run.options(num_returns=2)
        .remote(
            make_experience,
            done,
            roles.reward.actors[0].score.remote(done),
            roles.reference.actors[0].logprobs.remote(done, cfg.temperature),
            *roles.critic.submit_forward_slice(done, partial(sample_values, pad_id=roles.pad_id)),
            *learner_lp,
            policy_parts=len(learner_lp),
            beta=rollout.beta,
            estimator=cfg.kl.estimator,
            gamma=cfg.gamma,
            lam=cfg.lam,
            reward_clip=cfg.reward_clip,
            reward_scale=rollout.reward_scale,
        )
    )


def pump(config: RunConfig, roles: Roles, rollout: Rollout, busy: list[Any] | None = None) -> None:
    """Join the rollout's chunks as their generation ends, until every chunk is generated or,
    with `busy` (refs of other work), until all of `busy` is done. Chunks that do not end within
    the deadline are left to `collect`, which issues them again."""
    timeout = config.learner.collective_timeout_s
    busy = list(busy or [])
    while rollout.waiting:
        if busy:
            _, busy = ray.wait(busy, num_returns=len(busy), timeout=0)
            if not busy:
                return
        ready, _ = ray.wait(rollout.waiting + busy, num_returns=1, timeout=timeout)
        if not ready:  # nothing ended within the deadline: hangs are handled by `collect`
            return
        for done in ready:
            if done in rollout.index and done in rollout.waiting:
                rollout.waiting.remove(done)
                i = rollout.index[done]
                rollout.experience[i], rollout.stats[i] = _join(config, roles, rollout, done)
    if rollout.generated is None:
        rollout.generated = time.perf_counter()


def collect(
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
                        f"ppo: chunk {i} failed {attempt + 1} times: {_first_line(e)}"
                    ) from e
                replaced += len(roles.recover(version, e))
                reissued += 1
                roles.log(f"ppo: iteration {rollout.it + 1}: chunk {i} issued again")
                engines = roles.engines.actors
                done = engines[i % len(engines)].generate.remote(prompt_ids, rollout.sampling)
                rollout.experience[i], rollout.stats[i] = _join(config, roles, rollout, done)
    return chunk_stats, reissued, replaced


def iteration(
    config: RunConfig,
    roles: Roles,
    stream: PromptStream,
    kl: FixedKLController,
    scores: RunningMoments,
    version: int,
    it: int,
    skips: SkipGuard | None = None,
    rollout: Rollout | None = None,
) -> tuple[dict[str, float], list[Any], Rollout | None]:
    """One PPO iteration, on `rollout` (started by the iteration before, in overlapped mode) or
    on a batch it generates now. Returns its figures, the refs of its experience chunks and, in
    overlapped mode, the next iteration's rollout, generated while this one trained. `scores`
    holds the running moments of the RM scores (used when ppo.normalize_reward is on)."""
    cfg = config.ppo
    pad_id = roles.pad_id
    t0 = time.perf_counter()

    # 1-2. generate in chunks; each chunk goes on to reward, reference and critic when it is done
    if rollout is None:
        rollout = start_rollout(config, roles, stream, kl, scores, it)
    pump(config, roles, rollout)
    t_generated = time.perf_counter()
    chunk_stats, reissued, replaced = collect(config, roles, rollout, version)
    experience = rollout.experience
    for c in chunk_stats:
        scores.update_from_sums(c["samples"], c["score_sum"], c["score_sq_sum"])
    figures = summarize(chunk_stats)
    figures["faults/chunks_reissued"] = float(reissued)
    t_scored = time.perf_counter()

    # 3. policy and critic train at the same time on the experience they fetch themselves
    rng = random.Random(config.seed * 1_000_003 + it)
    n = cfg.rollout_batch
    plan = []
    for _ in range(cfg.epochs):
        order = rng.sample(range(n), n)
        for start in range(0, n, cfg.minibatch_size):
            ptx = rng.sample(range(roles.ptx_size), cfg.ptx_batch_size) if cfg.ptx_coef else []
            plan.append({"samples": order[start : start + cfg.minibatch_size], "ptx": ptx})
    adv_mean, adv_std = 0.0, 1.0
    if cfg.whiten_advantages:
        adv_mean, adv_std = figures["advantage_mean"], max(figures["advantage_std"], 1e-8)
    policy_refs = roles.policy.submit_train_on(
        [*experience, roles.ptx_ref],
        plan,
        partial(
            ppo_objective,
            clip=cfg.clip,
            temperature=cfg.temperature,
            entropy_coef=cfg.entropy_coef,
            ptx_coef=cfg.ptx_coef,
            behavior_weight_cap=cfg.behavior_weight_cap,
        ),
        partial(policy_batch, pad_id=pad_id, adv_mean=adv_mean, adv_std=adv_std),
    )
    critic_refs = roles.critic.submit_train_on(
        experience,
        plan,
        partial(value_objective, clip=cfg.value_clip),
        partial(critic_batch, pad_id=pad_id),
    )
    # overlapped: the engines generate the next batch with the weights they hold (this
    # iteration's, one version behind the policy it will train) while the learners train
    upcoming = None
    if cfg.overlap and it + 1 < cfg.iterations:
        upcoming = start_rollout(config, roles, stream, kl, scores, it + 1)
        pump(config, roles, upcoming, busy=[*policy_refs, *critic_refs])
    policy_steps = LearnerGroup.sum_shares(roles.policy.group.get(policy_refs, "train_on"))
    critic_steps = LearnerGroup.sum_shares(roles.critic.group.get(critic_refs, "train_on"))
    t_trained = time.perf_counter()

    # 4. the new weights go to every engine (an engine that died since is replaced, with them);
    # an engine still generating the next batch loads them when it has finished, and the
    # batch's chunks are joined meanwhile
    try:
        syncing = roles.submit_sync(version + 1)
        if upcoming is not None:
            pump(config, roles, upcoming, busy=syncing)
        roles.finish_sync(syncing)
    except RemoteCallError as e:
        replaced += len(roles.recover(version + 1, e))
        roles.sync_weights(version + 1)
    t_synced = time.perf_counter()

    # the roles that overlap with generation report their own working time (the busiest rank)
    for name, group in (
        ("rollout", roles.engines),
        ("reward", roles.reward),
        ("reference", roles.reference),
        ("critic_forward", roles.critic.group),
    ):
        try:
            figures[f"time/{name}_busy"] = max(group.call("take_busy_seconds"))
        except RemoteCallError as e:  # died after its work: replaced now, not at the next use
            replaced += len(roles.recover(version + 1, e))
    figures["faults/actors_replaced"] = float(replaced)
    lag = version - figures.pop("oldest_version")
    kl.update(figures["kl"], n)
    for name, steps in (("policy", policy_steps), ("critic", critic_steps)):
        # a skipped update (non-finite loss) is counted, and left out of the averages
        taken = [s for s in steps if not s.get("skipped")]
        figures[f"{name}/skipped_steps"] = float(len(steps) - len(taken))
        for key in taken[0] if taken else {}:
            figures[f"{name}/{key}" if key in ("lr", "grad_norm") else key] = sum(
                s[key] for s in taken
            ) / len(taken)
        if skips is not None:
            skips.update(name, steps)
    figures.update(
        {
            "beta": rollout.beta,
            "weight_version_lag": lag,
            "time/generate": (rollout.generated or t_generated) - rollout.started,
            "time/wait_for_generation": t_generated - t0,
            "time/score_after_generate": t_scored - t_generated,
            "time/train": t_trained - t_scored,
            "time/weight_sync": t_synced - t_trained,
            "time/iteration": t_synced - t0,
            "tokens_per_second": figures["tokens"]
            / max((rollout.generated or t_generated) - rollout.started, 1e-9),
        }
    )
    return figures, experience, upcoming


def sample_policy(
    roles: Roles, inputs: PPOInputs, config: RunConfig, labeler: Any
) -> dict[str, Any]:
    """One response per held-out prompt from the engines' current weights, judged: RM score,
    KL to the reference (nats per sequence) and, on the built-in task, the hidden labeler."""
    sampling = _sampling(config.ppo, training=False)
    # A prompt gets the same seed before and after training: its two responses differ only by
    # the policy (common random numbers).
    seed = config.seed * 1_000_003
    prompt_ids = [p["prompt_ids"] for p in inputs.heldout_prompts]
    refs = generate(roles, _chunks(prompt_ids, config.rollout.chunk_size), sampling, seed)
    order = sorted(refs, key=refs.__getitem__)
    timeout = config.learner.collective_timeout_s
    samples = [s for chunk in ray.get(order, timeout=timeout) for s in chunk]
    samples_ref = ray.put(samples)
    scores = ray.get(roles.reward.actors[0].score.remote(samples_ref), timeout=timeout)
    reference = roles.reference.actors[0]
    ref_lp = ray.get(reference.logprobs.remote(samples_ref, sampling.temperature), timeout=timeout)
    tok = inputs.tokenizer
    texts = [tok.decode(s["response_ids"], skip_special_tokens=True) for s in samples]
    kls = [sum(s["logprobs"]) - sum(r) for s, r in zip(samples, ref_lp, strict=True)]
    judged = (
        [labeler(p["text"], t) for p, t in zip(inputs.heldout_prompts, texts, strict=True)]
        if labeler
        else []
    )
    return {"texts": texts, "scores": scores, "kl": kls, "labeler": judged}


def demo_loss(roles: Roles, inputs: PPOInputs, batch_size: int) -> float:
    """The policy's NLL per token on held-out demonstrations (the alignment tax's measure)."""
    return demonstration_loss(roles.policy, inputs.heldout_demos, roles.pad_id, batch_size)


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else float("nan")


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def train(
    config: RunConfig,
    inputs: PPOInputs,
    out: Path,
    tracker: Tracker,
    labeler: Any = None,
    log: Any = print,
    resume: bool = False,
    restart: bool = False,
) -> dict[str, dict[str, float]]:
    """Run PPO; with `resume`, continue from the latest checkpoint; with `restart`, drop any
    checkpoint of an unfinished run and start over."""
    cfg = config.ppo
    started = time.perf_counter()
    kl: FixedKLController = (
        AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon)
        if cfg.kl.adaptive
        else FixedKLController(cfg.kl.beta)
    )
    stream = PromptStream(inputs.prompts, config.seed)
    moments = RunningMoments()
    checkpoints = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    skips = SkipGuard(cfg.max_skipped_steps)
    upcoming: Rollout | None = None
    phases: dict[str, list[float]] = {}  # each iteration's seconds per phase, in this process
    if restart:
        import shutil

        shutil.rmtree(checkpoints.root, ignore_errors=True)
    latest = checkpoints.latest()
    if latest is not None and not resume:
        raise CheckpointExists(
            f"{latest} holds a checkpoint of an unfinished PPO run; pass --resume to continue "
            "it, or --restart to start over"
        )
    with Roles(config, inputs, log) as roles:
        placement = roles.placement()
        out.mkdir(parents=True, exist_ok=True)
        (out / "placement.json").write_text(json.dumps(placement, indent=1) + "\n")
        for role, ranks in placement.items():
            log(
                f"ppo: {role} on "
                + ", ".join(
                    f"node {r['node_id'][:8]} ({r['ip']}) {format_resources(r['node_resources'])}"
                    for r in ranks
                )
            )
        log(
            f"ppo: {config.rollout.engines} engine(s), policy on {roles.policy.ranks} rank(s), "
            f"critic on {roles.critic.ranks}; {cfg.iterations} iterations of "
            f"{cfg.rollout_batch} prompts"
        )
        initial = {
            "iteration": 0,
            "kl": kl.state_dict(),
            "reward_moments": moments.state_dict(),
            "stream": stream.state(),
            "tokens": 0.0,
            "generate_seconds": 0.0,
            "upcoming": None,
        }

        def restore(state: dict[str, Any]) -> int:
            """The driver back in a checkpoint's state (the groups and engines are already);
            returns the iteration to go on from."""
            nonlocal upcoming, tokens, generate_seconds
            kl.load_state_dict(state["kl"])
            moments.load_state_dict(state["reward_moments"])
            stream.restore(state["stream"])
            tokens, generate_seconds = state["tokens"], state["generate_seconds"]
            upcoming = None
            if state.get("upcoming") is not None:  # overlapped: the batch generated meanwhile
                upcoming = start_rollout(
                    config, roles, stream, kl, moments, state["iteration"],
                    state["upcoming"]["samples"],
                )  # fmt: skip
                upcoming.beta = state["upcoming"]["beta"]
                upcoming.reward_scale = state["upcoming"]["reward_scale"]
            return int(state["iteration"])

        if latest is not None:
            state = checkpoints.load(latest, roles)
            before, sft_demo_loss = state["before"], state["sft_demo_loss"]
            started -= state["seconds"]
            start = restore(state)
            log(f"ppo: resumed from {latest} after iteration {start}")
        else:
            before = sample_policy(roles, inputs, config, labeler)
            sft_demo_loss = demo_loss(roles, inputs, cfg.minibatch_size)
            start, tokens, generate_seconds = 0, 0.0, 0.0
        bar = progress(cfg.iterations, "ppo")
        bar.update(start)
        it, restarts, restarted = start, 0, 0
        while it < cfg.iterations:
            try:
                figures, experience, upcoming = iteration(
                    config, roles, stream, kl, moments, it, it, skips, upcoming
                )
            except NonFiniteError as e:
                bar.close()
                last = checkpoints.latest()
                raise NonFiniteError(
                    f"ppo: iteration {it + 1}: {e}. The run stops; the last good checkpoint is "
                    + (f"{last} (continue from it with --resume)" if last else "none yet")
                ) from None
            except (RemoteCallError, LearnerFault) as e:
                # A learner or critic rank died or hangs: both groups go back to the last
                # checkpoint (a group that lost a rank starts again first) and the run goes on.
                dead = roles.dead_learners()
                if not dead:
                    raise
                last = checkpoints.latest()
                if restarts == cfg.learner_restarts:
                    raise LearnerFault(
                        f"ppo: iteration {it + 1}: the {' and '.join(dead)} group lost a rank "
                        f"again, after {restarts} restarts (ppo.learner_restarts); the last "
                        f"checkpoint is {last or 'none yet'} (continue with --resume)"
                    ) from e
                restarts += 1
                restarted += 1
                log(
                    f"ppo: iteration {it + 1}: the {' and '.join(dead)} group lost a rank "
                    f"({_first_line(e)}); bringing the groups back from {last or 'the start'}"
                )
                if last is None:  # both start again from the run's starting models
                    roles.restart_learners(["policy", "critic"])
                    roles.sync_weights(0)
                    it = restore(initial)
                else:
                    roles.restart_learners(dead)
                    it = restore(checkpoints.load(last, roles))
                bar.n = it
                bar.refresh()
                continue
            figures["faults/learner_restarts"] = float(restarted)
            restarted = 0
            tokens += figures["tokens"]
            generate_seconds += figures["time/generate"]
            for key in ("iteration", "generate", "score_after_generate", "train", "weight_sync"):
                phases.setdefault(key, []).append(figures[f"time/{key}"])
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                checkpoints.save(
                    it + 1,
                    roles,
                    {
                        "iteration": it + 1,
                        "kl": kl.state_dict(),
                        "reward_moments": moments.state_dict(),
                        "stream": stream.state(),
                        "before": before,
                        "sft_demo_loss": sft_demo_loss,
                        "tokens": tokens,
                        "generate_seconds": generate_seconds,
                        "seconds": time.perf_counter() - started,
                        # overlapped: the next batch, generated by the weights before this
                        # checkpoint's, is kept (and scored again on resume)
                        "upcoming": None
                        if upcoming is None
                        else {
                            "samples": upcoming.samples(config.learner.collective_timeout_s),
                            "beta": upcoming.beta,
                            "reward_scale": upcoming.reward_scale,
                        },
                    },
                )
            row = {f"ppo/{k}": v for k, v in figures.items()}
            row["ppo/iteration"] = it + 1
            if (it + 1) % cfg.sample_table_every == 0 or it == 0:
                tracker.table(
                    "ppo/samples", sample_rows(ray.get(experience[0])[:8], inputs, labeler), it + 1
                )
            tracker.log(row)
            bar.update()
            bar.set_postfix(
                score=f"{figures['score']:+.3f}",
                kl=f"{figures['kl']:.2f}",
                beta=f"{figures['beta']:.3f}",
            )
            it += 1
        bar.close()
        after = sample_policy(roles, inputs, config, labeler)
        ppo_demo_loss = demo_loss(roles, inputs, cfg.minibatch_size)
        roles.policy.save(out / "policy")
        roles.critic.save(out / "critic")
        memory = roles.peak_memory_gb()
    log(
        "ppo: peak resident memory per role (GB, the largest rank): "
        + ", ".join(f"{role} {gb:.2f}" for role, gb in memory.items())
    )
    seconds = time.perf_counter() - started
    _write_eval(out / "eval_samples.jsonl", inputs, before, after)
    ppo = {
        "iterations": float(cfg.iterations),
        "seconds": seconds,
        "tokens_per_second": tokens / max(generate_seconds, 1e-9),
        "rm_score": _mean(after["scores"]),
        "kl_to_sft": _mean(after["kl"]),
        "heldout_demo_loss": ppo_demo_loss,
        "final_beta": kl.beta,
        **{f"memory_gb/{role}": gb for role, gb in memory.items()},
        **{f"seconds_per_iteration/{k}": _median(v) for k, v in phases.items()},
    }
    sft = {"rm_score": _mean(before["scores"]), "heldout_demo_loss": sft_demo_loss}
    if labeler is not None:
        wins = [
            1.0 if a > b else 0.5 if a == b else 0.0
            for a, b in zip(after["labeler"], before["labeler"], strict=True)
        ]
        ppo.update(winrate_vs_sft=_mean(wins), labeler_score=_mean(after["labeler"]))
        sft["labeler_score"] = _mean(before["labeler"])
    log(
        f"ppo: RM score {sft['rm_score']:+.3f} -> {ppo['rm_score']:+.3f}, KL to SFT "
        f"{ppo['kl_to_sft']:.2f} nats/sequence, held-out demonstration loss "
        f"{sft_demo_loss:.3f} -> {ppo_demo_loss:.3f}"
        + (
            f"; labeler {sft['labeler_score']:+.3f} -> {ppo['labeler_score']:+.3f}, win rate vs "
            f"SFT {ppo['winrate_vs_sft']:.3f}"
            if labeler
            else ""
        )
        + f"; policy in {out / 'policy'}"
    )
    return {"ppo": ppo, "sft": sft}


class CheckpointExists(RuntimeError):
    """An unfinished run's checkpoint is in the way of a fresh start."""


class Checkpoints:
    """`<ppo>/checkpoints/iter-NNNNNN/`: the policy's and critic's DeepSpeed states (weights,
    optimizer, schedule) and `driver.json` (iteration, KL controller, prompt position, the SFT
    policy's evaluation). A checkpoint is written into a `.tmp` folder and renamed when whole;
    `latest` names the newest whole one and moves only after the rename, so a run killed while
    writing resumes from the one before."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root, self.keep = root, keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        return folder if (folder / "driver.json").is_file() else None

    def save(self, iteration: int, roles: Roles, driver: dict[str, Any]) -> Path:
        import json
        import shutil

        name = f"iter-{iteration:06d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        roles.policy.save_checkpoint(tmp / "policy")
        roles.critic.save_checkpoint(tmp / "critic")
        (tmp / "driver.json").write_text(json.dumps(driver) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = self.root / "latest.tmp"
        pointer.write_text(name + "\n")
        pointer.replace(self.root / "latest")
        whole = sorted(p for p in self.root.glob("iter-*") if not p.name.endswith(".tmp"))
        for old in whole[: -self.keep]:
            shutil.rmtree(old)
        return final

    def load(self, folder: Path, roles: Roles) -> dict[str, Any]:
        """Put the groups back in the checkpoint's state and the engines on its weights."""
        import json

        driver = json.loads((folder / "driver.json").read_text())
        roles.policy.load_checkpoint(folder / "policy")
        roles.critic.load_checkpoint(folder / "critic")
        roles.sync_weights(driver["iteration"])
        return dict(driver)


def _write_eval(
    path: Path, inputs: PPOInputs, before: dict[str, Any], after: dict[str, Any]
) -> None:
    """The held-out prompts with the SFT and the PPO policy's responses side by side."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, prompt in enumerate(inputs.heldout_prompts):
            row = {"prompt": prompt["text"]}
            for name, result in (("sft", before), ("ppo", after)):
                row[f"{name}_response"] = result["texts"][i]
                row[f"{name}_rm_score"] = result["scores"][i]
                row[f"{name}_kl"] = result["kl"][i]
                if result["labeler"]:
                    row[f"{name}_labeler_score"] = result["labeler"][i]
            f.write(json.dumps(row) + "\n")


def sample_rows(samples: list[dict[str, Any]], inputs: PPOInputs, labeler: Any) -> list[list[Any]]:
    tok = inputs.tokenizer
    rows = []
    for s in samples:
        prompt = tok.decode(s["prompt_ids"], skip_special_tokens=True)
        response = tok.decode(s["response_ids"], skip_special_tokens=True)
        judged = labeler(prompt, response) if labeler else None
        rows.append(
            [
                prompt,
                response,
                s["score"],
                sum(s["logprobs"]) - sum(s["ref_logprobs"]),
                judged,
                s["version"],
            ]
        )
    return rows
