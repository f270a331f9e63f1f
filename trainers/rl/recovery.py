"""The RL stage's one recovery: whatever phase a role's process dies or hangs in (the start of the
roles, the evaluations with the alignment-tax loss, an iteration with its weight sync and
checkpoint, the final save), the same steps bring the stage back and the phase is done again.

- an engine, reward, reference or joiner actor that died or hangs is replaced (an engine with
  the policy's current weights);
- a policy or critic group that lost a rank comes back from the last checkpoint (or, before the
  first, from the run's starting models), and the driver's state with it;
- each recovery is logged (the role, the phase, what is redone, the seconds it cost) and
  counted per phase for W&B and summary.json;
- the learner groups come back at most ppo.learner_restarts times in the stage, and a phase is
  redone at most ppo.chunk_retries times in a row; past either the run stops with an error
  naming the role, the phase and the last good checkpoint.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cluster import FAULTS as ACTOR_FAULTS
from cluster import actor_fault, first_line
from trainers.config import RunConfig
from trainers.rl.checkpoints import Checkpoints
from trainers.rl.inputs import RLInputs
from trainers.rl.roles import LearnerFault, Roles
from trainers.rl.state import DriverState

T = TypeVar("T")
FAULTS = (*ACTOR_FAULTS, LearnerFault)


class PhaseFailed(RuntimeError):
    """A phase failed again after its retries, or the learners lost ranks too often."""


def start_roles(config: RunConfig, inputs: RLInputs, log: Any) -> tuple[Roles, dict[str, float]]:
    """Every role started; if a role's process dies or hangs while they start (the ones already
    started are shut down), all start again, at most ppo.chunk_retries times. Returns the roles
    and the start's fault figures."""
    retries, lost = config.ppo.chunk_retries, 0.0
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        try:
            return Roles(config, inputs, log), _counted("start_of_the_roles", attempt, lost)
        except Exception as e:
            if not actor_fault(e):
                raise
            if attempt == retries:
                raise PhaseFailed(
                    f"ppo: start of the roles: failed {attempt + 1} times ({first_line(e)}); "
                    "no checkpoint of this run is touched"
                ) from e
            lost += time.perf_counter() - t0
            log(
                f"ppo: start of the roles: {first_line(e)}; starting every role again "
                f"({time.perf_counter() - t0:.1f} s lost)"
            )
    raise AssertionError("unreachable")


def _counted(phase: str, redone: int, lost: float) -> dict[str, float]:
    return (
        {f"faults/{phase}/redone": float(redone), f"faults/{phase}/seconds": lost} if redone else {}
    )


def slug(phase: str) -> str:
    """A phase's name as a W&B key: "evaluation before training" -> evaluation_before_training
    ("iteration 3" -> iteration)."""
    return re.sub(r"\W+", "_", re.sub(r"\s*\d+$", "", phase)).strip("_")


class Recovery:
    """Brings the stage back after a role's process died or hung in any phase (see the module's
    text); `run` does a phase with it, `learners_lost` is the iterations' part of it."""

    def __init__(
        self,
        roles: Roles,
        state: DriverState,
        checkpoints: Checkpoints,
        initial: dict[str, Any],
        config: RunConfig,
        log: Any,
        figures: dict[str, float] | None = None,
    ) -> None:
        self.roles, self.state, self.checkpoints = roles, state, checkpoints
        self.initial, self.config, self.log = initial, config, log
        self.learner_restarts = 0  # in the whole stage, against ppo.learner_restarts
        self.figures: dict[str, float] = dict(figures or {})  # faults/<phase>/{redone,seconds}

    def run(self, phase: str, work: Callable[[], T]) -> T:
        """`work()`, done again after each recovery, at most ppo.chunk_retries times."""
        retries = self.config.ppo.chunk_retries
        for attempt in range(retries + 1):
            try:
                return work()
            except FAULTS as e:
                if attempt == retries:
                    raise PhaseFailed(
                        f"ppo: {phase}: failed {attempt + 1} times ({first_line(e)}); the last "
                        f"good checkpoint is {self.last()}"
                    ) from e
                t0 = time.perf_counter()
                try:
                    what = self.recover(phase, e)
                except FAULTS as again:
                    if again is e:  # no role died or hangs: a bug or bad data, not redone
                        raise
                    # e.g. a replacement that died as it started: the next try meets the dead
                    # actor and recovers again
                    what = f"the recovery met another fault ({first_line(again)})"
                self._count(phase, t0, f"{what}; redoing it")
        raise AssertionError("unreachable")

    def recover(self, phase: str, cause: BaseException) -> str:
        """Replace the dead or hung actors, and bring the learner groups back if one lost a
        rank; says what was done. `cause` is raised again if it is no role's death or hang (a
        bug, bad data: doing the phase again would fail the same way)."""
        dead = self.roles.dead_learners()
        if dead:
            replaced = self.learners_lost(phase, cause, dead, counted=False)
            replaced.append(f"the {' and '.join(dead)} group")
        else:
            replaced = self.roles.replace_dead(self.state.iteration, cause)
            if not replaced and not actor_fault(cause):
                raise cause
        return f"replaced {', '.join(replaced)}" if replaced else "nothing to replace"

    def learners_lost(
        self,
        phase: str,
        cause: BaseException,
        dead: list[str] | None = None,
        counted: bool = True,
    ) -> list[str]:
        """The groups go back to the last checkpoint after a fault that `phase` could not absorb
        itself: a policy or critic rank that died or hangs (its group starts again first), or an
        actor that died again while it was being replaced. `cause` again if no role's process
        died or hangs (a bug, bad data)."""
        t0 = time.perf_counter()
        dead = self.roles.dead_learners() if dead is None else dead
        if not dead and not actor_fault(cause):
            raise cause
        if self.learner_restarts == self.config.ppo.learner_restarts:
            what = f"the {' and '.join(dead)} group lost a rank" if dead else first_line(cause)
            raise PhaseFailed(
                f"ppo: {phase}: {what}, after the groups came back from a checkpoint "
                f"{self.learner_restarts} times (ppo.learner_restarts); the last good "
                f"checkpoint is {self.last()} (continue with --resume)"
            ) from cause
        self.learner_restarts += 1
        last = self.checkpoints.latest()
        who = f"the {' and '.join(dead)} group lost a rank" if dead else "a role failed again"
        self.log(
            f"ppo: {phase}: {who} ({first_line(cause)}); bringing the groups back from "
            f"{last or 'the start'}"
        )
        # the other dead actors are replaced first (a new engine joins the restarted policy's
        # weight group), and every engine takes the weights the groups come back with
        replaced = self.roles.replace_dead(self.state.iteration, cause, with_weights=False)
        if last is None:
            self.roles.restart_learners(self.roles.learner_names)
            self.roles.sync_weights(0)
            self.state.restore(self.initial, self.config, self.roles)
        else:
            self.roles.restart_learners(dead)
            self.state.restore(self.checkpoints.load(last, self.roles), self.config, self.roles)
        if counted:
            self._count(phase, t0, f"back at iteration {self.state.iteration}")
        return replaced

    def _count(self, phase: str, t0: float, what: str) -> None:
        lost = time.perf_counter() - t0
        key = slug(phase)
        redone = self.figures.get(f"faults/{key}/redone", 0.0) + 1
        self.figures[f"faults/{key}/redone"] = redone
        self.figures[f"faults/{key}/seconds"] = self.figures.get(f"faults/{key}/seconds", 0) + lost
        self.log(f"ppo: {phase}: {what} ({lost:.1f} s to recover)")

    def last(self) -> str:
        latest = self.checkpoints.latest()
        return f"{latest}" if latest else "none yet"
