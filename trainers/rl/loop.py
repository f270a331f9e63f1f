"""The RL stage's loop: start the roles, evaluate the starting policy, run the iterations (bringing
the learner groups back from the last checkpoint when a rank dies), checkpoint, evaluate the
trained policy, save it, and return the stage's figures."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from cluster.groups import format_resources
from trainers.config import RunConfig
from trainers.rl.checkpoints import Checkpoints
from trainers.rl.evaluation import evaluate, sample_rows, write_eval
from trainers.rl.inputs import RLInputs
from trainers.rl.iteration import NonFiniteError, SkipGuard, iteration
from trainers.rl.recovery import FAULTS, Recovery, start_roles
from trainers.rl.roles import Roles
from trainers.rl.state import DriverState
from trainers.tracking import Tracker, progress

PHASES = ("iteration", "generate", "score_after_generate", "train", "weight_sync")


class StageClock:
    """Seconds the stage spent in each of its parts outside and inside the iterations (summed over
    repeats, in this process): where a stage's time goes, in its figures."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def train(
    config: RunConfig,
    inputs: RLInputs,
    out: Path,
    tracker: Tracker,
    labeler: Any = None,
    log: Any = print,
    resume: bool = False,
    restart: bool = False,
) -> dict[str, dict[str, float]]:
    """Run the RL stage; with `resume`, continue from the latest checkpoint; with `restart`, drop
    any checkpoint of an unfinished run and start over."""
    cfg = config.ppo
    started = time.perf_counter()
    state = DriverState.start(config, inputs.prompts)
    initial = state.saved(0.0, 0.0)
    checkpoints = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    skips = SkipGuard(cfg.max_skipped_steps)
    phases: dict[str, list[float]] = {}  # each iteration's seconds per phase, in this process
    clock = StageClock()
    latest = checkpoints.folders.refuse_fresh_start("PPO", resume, restart)
    with clock.part("start_roles"):
        roles, start_faults = start_roles(config, inputs, log)
    with roles:
        describe_placement(config, roles, out, log)
        recovery = Recovery(roles, state, checkpoints, initial, config, log, start_faults)
        if latest is not None:
            saved = recovery.run("resume", lambda: checkpoints.load(latest, roles))
            started -= saved["seconds"]
            state.restore(saved, config, roles)
            log(f"ppo: resumed from {latest} after iteration {state.iteration}")
        if latest is None:
            with clock.part("evaluation_before"):
                state.before, state.sft_demo_loss = recovery.run(
                    "evaluation before training",
                    lambda: evaluate(roles, inputs, config, labeler, trained=False),
                )
        bar = progress(cfg.iterations, "ppo")
        bar.update(state.iteration)
        restarted = 0  # the learner groups' restarts before this iteration
        while state.iteration < cfg.iterations:
            it = state.iteration
            try:
                with clock.part("iterations"):
                    figures, experience = iteration(config, roles, state, skips)
                state.tokens += figures["tokens"]
                state.generate_seconds += figures["time/generate"]
                # a rank lost while the checkpoint is written is recovered as in the iteration
                if state.iteration % cfg.checkpoint_every == 0 or state.iteration == cfg.iterations:
                    timeout = config.learner.collective_timeout_s
                    seconds = time.perf_counter() - started
                    with clock.part("checkpoints"):
                        checkpoints.save(state.iteration, roles, state.saved(seconds, timeout))
            except NonFiniteError as e:
                bar.close()
                last = checkpoints.latest()
                raise NonFiniteError(
                    f"ppo: iteration {it + 1}: {e}. The run stops; the last good checkpoint is "
                    + (f"{last} (continue from it with --resume)" if last else "none yet")
                ) from None
            except FAULTS as e:
                # a policy or critic rank died or hangs, or an actor died again while it was
                # being replaced: the groups go back to the last checkpoint (a group that lost a
                # rank starts again first) and the run goes on
                recovery.learners_lost(f"iteration {it + 1}", e)
                bar.n = state.iteration
                bar.refresh()
                continue
            figures["faults/learner_restarts"] = float(recovery.learner_restarts - restarted)
            restarted = recovery.learner_restarts
            figures.update(recovery.figures)
            for key in PHASES:
                phases.setdefault(key, []).append(figures[f"time/{key}"])
            log_iteration(tracker, bar, figures, experience, inputs, labeler, it, cfg)
        bar.close()
        with clock.part("evaluation_after"):
            after, ppo_demo_loss = recovery.run(
                "evaluation after training", lambda: evaluate(roles, inputs, config, labeler)
            )
        with clock.part("final_save"):
            recovery.run("final save", lambda: checkpoints.save_models(roles, out))
        memory = recovery.run("memory figures", roles.peak_memory_gb)
        faults = dict(recovery.figures)
    if faults:
        tracker.log({f"ppo/{k}": v for k, v in faults.items()})
    log(
        "ppo: peak resident memory per role (GB, the largest rank): "
        + ", ".join(f"{role} {gb:.2f}" for role, gb in memory.items())
    )
    assert state.before is not None and state.sft_demo_loss is not None
    write_eval(out / "eval_samples.jsonl", inputs, state.before, after)
    figures_out = stage_figures(
        config, state, after, ppo_demo_loss, memory, phases, time.perf_counter() - started
    )
    figures_out["ppo"].update(faults)
    figures_out["ppo"].update({f"stage_seconds/{k}": v for k, v in clock.seconds.items()})
    log_summary(figures_out, labeler, out, log)
    return figures_out


def describe_placement(config: RunConfig, roles: Roles, out: Path, log: Any) -> None:
    """Where each role runs: `placement.json` in the stage's folder, and a line each."""
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
    cfg = config.ppo
    critic = f"critic on {roles.critic.ranks}" if roles.critic is not None else "no critic"
    per_prompt = f" × {cfg.n_samples_per_prompt} responses" if cfg.n_samples_per_prompt > 1 else ""
    where = f"colocated on {roles.engines.n} workers: " if roles.hosts is not None else ""
    log(
        f"ppo: {where}{roles.engines.n} engine(s), policy on {roles.policy.ranks} rank(s), "
        f"{critic} ({cfg.advantage}); {cfg.iterations} iterations of "
        f"{cfg.rollout_batch} prompts{per_prompt}"
    )


def log_iteration(
    tracker: Tracker,
    bar: Any,
    figures: dict[str, float],
    experience: list[Any],
    inputs: RLInputs,
    labeler: Any,
    it: int,
    cfg: Any,
) -> None:
    """Iteration `it`'s figures to W&B (with a table of samples every few iterations) and its
    progress to the console."""
    row = {f"ppo/{k}": v for k, v in figures.items()}
    row["ppo/iteration"] = it + 1
    if (it + 1) % cfg.sample_table_every == 0 or it == 0:
        rows = sample_rows(ray.get(experience[0])[:8], inputs, labeler)
        tracker.table("ppo/samples", rows, it + 1)
    tracker.log(row)
    bar.update()
    bar.set_postfix(
        score=f"{figures['score']:+.3f}", kl=f"{figures['kl']:.2f}", beta=f"{figures['beta']:.3f}"
    )


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else float("nan")


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def _finite_mean(xs: list[float]) -> float:
    """The mean of the finite values (a reward function may skip a response: NaN)."""
    return _mean([x for x in xs if math.isfinite(x)])


def stage_figures(
    config: RunConfig,
    state: DriverState,
    after: dict[str, Any],
    ppo_demo_loss: float,
    memory: dict[str, float],
    phases: dict[str, list[float]],
    seconds: float,
) -> dict[str, dict[str, float]]:
    """The stage's figures for summary.json: the trained policy's ("ppo") and the starting
    policy's ("sft"), with the labeler's win rate on a built-in task."""
    before = state.before
    assert before is not None and state.sft_demo_loss is not None
    ppo = {
        "iterations": float(config.ppo.iterations),
        "seconds": seconds,
        "tokens_per_second": state.tokens / max(state.generate_seconds, 1e-9),
        "rm_score": _finite_mean(after["scores"]),
        "kl_to_sft": _mean(after["kl"]),
        "heldout_demo_loss": ppo_demo_loss,
        "final_beta": state.kl.beta,
        **{f"memory_gb/{role}": gb for role, gb in memory.items()},
        **{f"seconds_per_iteration/{k}": _median(v) for k, v in phases.items()},
    }
    sft = {"rm_score": _finite_mean(before["scores"]), "heldout_demo_loss": state.sft_demo_loss}
    if after["labeler"]:
        wins = [
            1.0 if a > b else 0.5 if a == b else 0.0
            for a, b in zip(after["labeler"], before["labeler"], strict=True)
        ]
        ppo.update(winrate_vs_sft=_mean(wins), labeler_score=_mean(after["labeler"]))
        sft["labeler_score"] = _mean(before["labeler"])
    return {"ppo": ppo, "sft": sft}


def log_summary(figures: dict[str, dict[str, float]], labeler: Any, out: Path, log: Any) -> None:
    ppo, sft = figures["ppo"], figures["sft"]
    log(
        f"ppo: RM score {sft['rm_score']:+.3f} -> {ppo['rm_score']:+.3f}, KL to SFT "
        f"{ppo['kl_to_sft']:.2f} nats/sequence, held-out demonstration loss "
        f"{sft['heldout_demo_loss']:.3f} -> {ppo['heldout_demo_loss']:.3f}"
        + (
            f"; labeler {sft['labeler_score']:+.3f} -> {ppo['labeler_score']:+.3f}, win rate vs "
            f"SFT {ppo['winrate_vs_sft']:.3f}"
            if labeler
            else ""
        )
        + f"; policy in {out / 'policy'}"
    )
