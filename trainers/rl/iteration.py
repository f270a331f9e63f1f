"""One RL iteration: generate, score and join, train, sync (`iteration`, as the README tells it),
and the pieces it is made of."""

from __future__ import annotations

import random
import time
from functools import partial
from typing import Any

from actors.learner import LearnerGroup
from cluster import RemoteCallError
from trainers.config import RunConfig
from trainers.experience import summarize
from trainers.objectives import critic_batch, policy_batch, ppo_objective, value_objective
from trainers.rl.roles import Roles
from trainers.rl.rollout import Rollout, gather, pump, start_rollout
from trainers.rl.state import DriverState


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


def iteration(
    config: RunConfig, roles: Roles, state: DriverState, skips: SkipGuard | None = None
) -> tuple[dict[str, float], list[Any]]:
    """Iteration `state.iteration`, on the batch the iteration before started (overlapped mode)
    or on one it generates now; when it returns, `state` is the state after it (in overlapped
    mode `state.upcoming` is the next iteration's batch, generated meanwhile). Returns its
    figures and the refs of its experience chunks."""
    it, t = state.iteration, {"start": time.perf_counter()}

    # 1-2. the prompts go to the engines in chunks; each generated chunk is scored, valued and
    # joined into experience by actors while the other chunks are still being generated
    rollout = state.upcoming or start_rollout(
        config, roles, state.stream, state.kl, state.moments, it
    )
    pump(config, roles, rollout)
    t["generated"] = time.perf_counter()
    chunk_stats, reissued, replaced = gather(config, roles, rollout, version=it)
    figures = experience_figures(chunk_stats, state, reissued)
    if roles.critic is None:  # no values: nothing for them to explain
        figures.pop("explained_variance")
    t["scored"] = time.perf_counter()

    # 3. policy and critic train at the same time on the experience they fetch themselves; in
    # overlapped mode the engines generate the next batch meanwhile, with the weights they hold
    dropped = dropped_samples(chunk_stats)
    training = submit_training(config, roles, rollout, figures, dropped)
    state.upcoming = None
    if config.ppo.overlap and it + 1 < config.ppo.iterations:
        state.upcoming = start_rollout(config, roles, state.stream, state.kl, state.moments, it + 1)
        pump(config, roles, state.upcoming, busy=[r for refs in training.values() for r in refs])
    steps = finish_training(roles, training)
    t["trained"] = time.perf_counter()

    # 4. the new weights go to every engine
    replaced += sync_weights(config, roles, it + 1, state.upcoming)
    t["synced"] = time.perf_counter()

    replaced += busy_times(roles, figures, it + 1)
    figures["faults/actors_replaced"] = float(replaced)
    figures["weight_version_lag"] = it - figures.pop("oldest_version")
    state.kl.update(figures["kl"], config.ppo.samples)
    step_figures(figures, steps, skips)
    figures.update(phase_times(rollout, t, figures["tokens"]))
    state.iteration = it + 1
    return figures, rollout.experience


def experience_figures(
    chunk_stats: list[dict[str, Any]], state: DriverState, reissued: int
) -> dict[str, float]:
    """The batch's figures from its chunks' sums; the reward's running moments take them in."""
    for c in chunk_stats:
        state.moments.update_from_sums(c["samples"], c["score_sum"], c["score_sq_sum"])
    figures = summarize(chunk_stats)
    figures["faults/chunks_reissued"] = float(reissued)
    return figures


def dropped_samples(chunk_stats: list[dict[str, Any]]) -> set[int]:
    """The batch's samples (indices over its chunks in order) to leave out of training."""
    dropped, offset = set(), 0
    for c in chunk_stats:
        dropped.update(offset + i for i in c["drop"])
        offset += int(c["size"])
    return dropped


def train_plan(
    config: RunConfig, it: int, ptx_size: int, dropped: set[int] | None = None
) -> list[dict[str, list[int]]]:
    """The iteration's optimizer steps: for each epoch, a shuffled order of the batch's samples
    (of its groups, with `ppo.group_minibatches`; a group's samples are consecutive) less the
    `dropped`, cut into minibatches, each with its PPO-ptx demonstrations (fixed by the seed)."""
    cfg = config.ppo
    rng = random.Random(config.seed * 1_000_003 + it)
    n, size = cfg.samples, cfg.n_samples_per_prompt
    plan = []
    for _ in range(cfg.epochs):
        if cfg.group_minibatches:
            groups = rng.sample(range(n // size), n // size)
            order = [g * size + i for g in groups for i in range(size)]
        else:
            order = rng.sample(range(n), n)
        if dropped:
            order = [i for i in order if i not in dropped]
        for start in range(0, len(order), cfg.minibatch_size):
            ptx = rng.sample(range(ptx_size), cfg.ptx_batch_size) if cfg.ptx_coef else []
            plan.append({"samples": order[start : start + cfg.minibatch_size], "ptx": ptx})
        # after drops, a last minibatch too small to give every rank a sample joins the one before
        if len(plan) > 1 and len(plan[-1]["samples"]) < config.learner.ranks:
            plan[-2]["samples"] += plan.pop()["samples"]
    return [step for step in plan if len(step["samples"]) >= config.learner.ranks]


def submit_training(
    config: RunConfig,
    roles: Roles,
    rollout: Rollout,
    figures: dict[str, float],
    dropped: set[int],
) -> dict[str, list[Any]]:
    """Start the policy's (and the critic's) training on the batch's experience: {group name:
    refs}."""
    cfg, pad_id, experience = config.ppo, roles.pad_id, rollout.experience
    plan = train_plan(config, rollout.it, roles.ptx_size, dropped)
    adv_mean, adv_std = 0.0, 1.0
    if cfg.whiten:
        adv_mean, adv_std = figures["advantage_mean"], max(figures["advantage_std"], 1e-8)
    kl_loss = cfg.kl.mode == "loss"
    training = {}
    training["policy"] = roles.policy.submit_train_on(
        [*experience, roles.ptx_ref],
        plan,
        partial(
            ppo_objective,
            clip=cfg.clip,
            temperature=cfg.temperature,
            entropy_coef=cfg.entropy_coef,
            ptx_coef=cfg.ptx_coef,
            behavior_weight_cap=cfg.behavior_weight_cap,
            clip_high=cfg.clip_high,
            aggregation=cfg.loss_aggregation,
            max_new_tokens=cfg.max_new_tokens,
            kl_coef=rollout.beta if kl_loss else 0.0,
        ),
        partial(policy_batch, pad_id=pad_id, adv_mean=adv_mean, adv_std=adv_std, kl_loss=kl_loss),
    )
    if roles.critic is not None:
        training["critic"] = roles.critic.submit_train_on(
            experience,
            plan,
            partial(value_objective, clip=cfg.value_clip),
            partial(critic_batch, pad_id=pad_id),
        )
    return training


def finish_training(roles: Roles, training: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Wait for the training; {group name: its optimizer steps' figures}."""
    groups = roles.learners()
    return {
        name: LearnerGroup.sum_shares(groups[name].group.get(refs, "train_on"))
        for name, refs in training.items()
    }


def sync_weights(config: RunConfig, roles: Roles, version: int, upcoming: Rollout | None) -> int:
    """The policy's new weights, as `version`, to every engine; an engine that died since is
    replaced, with them. An engine still generating the next batch (overlapped mode) loads them
    when it has finished, and the batch's chunks are joined meanwhile. Returns how many actors
    were replaced."""
    try:
        syncing = roles.submit_sync(version)
        if upcoming is not None:
            pump(config, roles, upcoming, busy=syncing)
        roles.finish_sync(syncing)
        return 0
    except RemoteCallError as e:
        replaced = len(roles.recover(version, e))
        roles.sync_weights(version)
        return replaced


def busy_times(roles: Roles, figures: dict[str, float], version: int) -> int:
    """`time/ROLE_busy`: the working time that the roles which overlap with generation report
    (their busiest rank). Returns how many actors were replaced (one that died after its work is
    replaced now, not at its next use)."""
    replaced = 0
    groups = [("rollout", roles.engines)]
    groups += [(r.group.name, r.group) for r in roles.rewards] + [("reference", roles.reference)]
    if roles.critic is not None:
        groups.append(("critic_forward", roles.critic.group))
    for name, group in groups:
        try:
            figures[f"time/{name}_busy"] = max(group.call("take_busy_seconds"))
        except RemoteCallError as e:
            replaced += len(roles.recover(version, e))
    return replaced


def step_figures(
    figures: dict[str, float], steps: dict[str, list[Any]], skips: SkipGuard | None
) -> None:
    """The optimizer steps' figures, averaged; a skipped update (non-finite loss) is counted,
    and left out of the averages."""
    for name, group_steps in steps.items():
        taken = [s for s in group_steps if not s.get("skipped")]
        figures[f"{name}/skipped_steps"] = float(len(group_steps) - len(taken))
        for key in taken[0] if taken else {}:
            figures[f"{name}/{key}" if key in ("lr", "grad_norm") else key] = sum(
                s[key] for s in taken
            ) / len(taken)
        if skips is not None:
            skips.update(name, group_steps)


def phase_times(rollout: Rollout, t: dict[str, float], tokens: float) -> dict[str, float]:
    """`time/PHASE` (seconds) and the generation's tokens per second."""
    generated = rollout.generated or t["generated"]
    return {
        "beta": rollout.beta,
        "time/generate": generated - rollout.started,
        "time/wait_for_generation": t["generated"] - t["start"],
        "time/score_after_generate": t["scored"] - t["generated"],
        "time/train": t["trained"] - t["scored"],
        "time/weight_sync": t["synced"] - t["trained"],
        "time/iteration": t["synced"] - t["start"],
        "tokens_per_second": tokens / max(generated - rollout.started, 1e-9),
    }
