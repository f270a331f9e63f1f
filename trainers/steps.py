"""The supervised stages' steps (SFT, RM) on a learner group that survives a rank's death.

The group checkpoints every `checkpoint_every` optimizer steps (by default at each epoch's end
but the last) into `<stage>/checkpoints/step-NNNNNN/`. When a rank dies or hangs (a call past
learner.collective_timeout_s), the group starts again, loads the last checkpoint (or, before the
first, the stage's starting model) and the steps after it are done again, in the same order: the
batches are fixed by the seed, the epoch and the step. At most `learner_restarts` times in a
stage; then the stage stops with an error naming the group and the last good checkpoint, which
`--resume` continues from. The checkpoints are removed when the stage's model is saved.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.learner import LearnerGroup
from cluster import FAULTS, first_line
from trainers.checkpoints import Checkpoints
from trainers.tracking import progress


class StageFailed(RuntimeError):
    """A supervised stage's learner group lost ranks more often than its restarts allow."""


@dataclass
class StepHooks:
    """What a supervised stage does, each given the group and the stage's state (a JSON-able
    dict that checkpoints save; state["step"] counts the optimizer steps done)."""

    before: Callable[[LearnerGroup, dict[str, Any]], None]  # before the first step
    step: Callable[[LearnerGroup, dict[str, Any]], None]  # optimizer step state["step"]
    epoch_end: Callable[[LearnerGroup, dict[str, Any]], None]  # after an epoch's last step
    finish: Callable[[LearnerGroup, dict[str, Any]], dict[str, float]]  # save; the figures
    postfix: Callable[[dict[str, Any]], dict[str, str]]  # the progress bar's figures


def stage_checkpoints(out: Path) -> Checkpoints:
    """A supervised stage's checkpoints, beside its model folder `out`."""
    return Checkpoints(out.parent / "checkpoints", keep=1, prefix="step")


def run_steps(
    stage: str,
    section: Any,
    start_group: Callable[[], LearnerGroup],
    hooks: StepHooks,
    *,
    per_epoch: int,
    out: Path,
    resume: bool,
    restart: bool,
    log: Any,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Run a supervised stage's steps (`section`: its config, with epochs, checkpoint_every and
    learner_restarts; `out`: its model folder, the checkpoints go beside it) with `hooks`,
    bringing the group back after a rank's death or hang. Returns `hooks.finish`'s figures with
    the stage's fault figures, and the stage's final state."""
    total, learner_restarts = per_epoch * section.epochs, section.learner_restarts
    checkpoints = stage_checkpoints(out)
    root = checkpoints.root
    latest = checkpoints.refuse_fresh_start(stage, resume, restart)
    every = section.checkpoint_every or per_epoch
    bar = progress(total, stage)
    initial: dict[str, Any] = {"step": 0}

    def begin(last: Path | None) -> tuple[LearnerGroup, dict[str, Any]]:
        """A group at checkpoint `last` (or the start) and its state; one whose rank died or
        hung as it started or loaded starts again."""
        for attempt in range(learner_restarts + 1):
            group = None
            try:
                group = start_group()
                state = (
                    checkpoints.load(last, {"learner": group})
                    if last is not None
                    else copy.deepcopy(initial)
                )
                return group, state
            except FAULTS as e:
                if group is not None:
                    group.shutdown()
                if attempt == learner_restarts:
                    raise StageFailed(
                        f"{stage}: the learner group failed to start {attempt + 1} times "
                        f"({first_line(e)}); the last good checkpoint is "
                        f"{checkpoints.latest() or 'none yet'}"
                    ) from e
                log(f"{stage}: a rank died or hangs as the group starts ({first_line(e)}); "
                    "starting it again")  # fmt: skip
        raise AssertionError("unreachable")

    group, state = begin(latest)
    faults = {"faults/learner_restarts": 0.0, "faults/recovery_seconds": 0.0}
    try:
        if latest is not None:
            log(f"{stage}: resumed from {latest} after step {state['step']}")
        bar.update(state["step"])
        while True:
            try:
                if state["step"] == 0:
                    hooks.before(group, state)
                while state["step"] < total:
                    hooks.step(group, state)
                    state["step"] += 1
                    bar.update()
                    if state["step"] % per_epoch == 0:
                        hooks.epoch_end(group, state)
                    bar.set_postfix(hooks.postfix(state))
                    if state["step"] % every == 0 and state["step"] < total:
                        checkpoints.save(state["step"], {"learner": group}, state)
                figures = hooks.finish(group, state)
                shutil.rmtree(root, ignore_errors=True)  # the model is saved: no use left
                return {**figures, **faults}, state
            except FAULTS as e:
                t0 = time.perf_counter()
                if not group.group.any_dead():
                    raise  # no rank died or hangs: a bug or bad data, that would fail again
                last = checkpoints.latest()
                if faults["faults/learner_restarts"] == learner_restarts:
                    raise StageFailed(
                        f"{stage}: step {state['step'] + 1}: the {group.group.name} group lost a "
                        f"rank again, after {learner_restarts} restarts ({stage}.learner_"
                        f"restarts); the last good checkpoint is {last or 'none yet'}"
                        + (" (continue with --resume)" if last else "")
                    ) from e
                log(
                    f"{stage}: step {state['step'] + 1}: a rank of the {group.group.name} group "
                    f"died or hangs ({first_line(e)}); bringing it back from "
                    f"{last or 'the start'}"
                )
                group.shutdown()
                group, state = begin(last)
                faults["faults/learner_restarts"] += 1
                faults["faults/recovery_seconds"] += time.perf_counter() - t0
                log(
                    f"{stage}: back at step {state['step']}; redoing the steps after it "
                    f"({time.perf_counter() - t0:.1f} s to recover)"
                )
                bar.n = state["step"]
                bar.refresh()
    finally:
        bar.close()
        group.shutdown()
