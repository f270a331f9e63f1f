"""Faults from outside for the tests: a role's process SIGKILLed (as the OOM killer would) when
a run reaches a chosen point."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

NOT_DEAD = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "ALIVE", "RESTARTING")


def actors_not_dead() -> dict[str, dict]:
    """This session's cluster's actors that are not dead (alive, pending or restarting), by
    actor id, from the GCS's actor table (no dashboard needed). Filtered by the GCS: late in a
    test session the table holds every dead actor of the tests before, and reading them all
    takes long enough for a chaos kill to miss its moment."""
    from ray._private.state import actors

    return {key: a for state in NOT_DEAD for key, a in actors(actor_state_name=state).items()}


def live_pids(actor_class: str) -> list[int]:
    """The processes of this session's cluster's live actors of `actor_class`."""
    from ray._private.state import actors

    live = actors(actor_state_name="ALIVE").values()
    return [a["Pid"] for a in live if a["ActorClassName"] == actor_class and a["Pid"]]


class Chaos:
    """SIGKILLs a role's process from outside (as the OOM killer would) when the run reaches a
    chosen point: a line of its log, or a checkpoint named in `latest`."""

    def __init__(self, latest: Path, seed: int | None = None) -> None:
        self.latest, self.rng = latest, random.Random(seed)
        self.lines: list[str] = []
        self.killed: list[str] = []
        self.threads: list[threading.Thread] = []
        self.stopped = threading.Event()

    def log(self, line: str) -> None:
        self.lines.append(line)

    def kill(self, actor_class: str, after: Callable[[], bool], jitter: float = 0.5) -> None:
        """Kill a live actor of `actor_class` once `after()` is true (then a random 0 to
        `jitter` s later)."""

        def watch() -> None:
            deadline = time.time() + 1200
            while not after() and time.time() < deadline:
                if self.stopped.wait(0.02):
                    return
            if self.stopped.wait(self.rng.uniform(0.0, jitter)):
                return
            while time.time() < deadline:
                alive = live_pids(actor_class)
                if alive:
                    os.kill(self.rng.choice(alive), signal.SIGKILL)
                    self.killed.append(actor_class)
                    return
                if self.stopped.wait(0.02):
                    return

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        self.threads.append(thread)

    def kill_now(self, actor_class: str, label: str) -> None:
        """Kill the one live actor of `actor_class` at once, in the caller's thread (a point of
        the driver's own code, which a watching thread could reach too late)."""
        [pid] = live_pids(actor_class)
        os.kill(pid, signal.SIGKILL)
        self.killed.append(label)

    def said(self, start: str) -> Callable[[], bool]:
        return lambda: any(line.startswith(start) for line in self.lines)

    def at_checkpoint(self, iteration: int) -> Callable[[], bool]:
        return self.at(self.latest, f"iter-{iteration:06d}")

    @staticmethod
    def at(latest: Path, name: str | None = None) -> Callable[[], bool]:
        """True once `latest` names checkpoint `name` (any, if None)."""

        def reached() -> bool:
            try:
                text = latest.read_text().strip()
            except FileNotFoundError:
                return False
            return text == name if name else bool(text)

        return reached

    def join(self) -> None:
        """Stop the kills still waiting (their run has ended) and wait for the threads."""
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=5)


class SlowToComeBack:
    """An actor that starts at once the first time; a replacement (the marker file exists by
    then) takes `delay_s` to start. In this module so that Ray's workers can import it."""

    def __init__(self, rank: int, world_size: int, marker: str, delay_s: float) -> None:
        if os.path.exists(marker):
            time.sleep(delay_s)
        open(marker, "a").close()
