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


def actors_not_dead() -> dict[str, dict]:
    """This session's cluster's actors that are not dead (alive, pending or restarting), by
    actor id, from the GCS's actor table (no dashboard needed)."""
    from ray._private.state import actors

    return {key: a for key, a in actors().items() if a["State"] != "DEAD"}


def live_pids(actor_class: str) -> list[int]:
    """The processes of this session's cluster's live actors of `actor_class`."""
    live = [a for a in actors_not_dead().values() if a["State"] == "ALIVE" and a["Pid"]]
    return [a["Pid"] for a in live if a["ActorClassName"] == actor_class]


class Chaos:
    """SIGKILLs a role's process from outside (as the OOM killer would) when the run reaches a
    chosen point: a line of its log, or a checkpoint named in `latest`."""

    def __init__(self, latest: Path, seed: int | None = None) -> None:
        self.latest, self.rng = latest, random.Random(seed)
        self.lines: list[str] = []
        self.killed: list[str] = []
        self.threads: list[threading.Thread] = []

    def log(self, line: str) -> None:
        self.lines.append(line)

    def kill(self, actor_class: str, after: Callable[[], bool], jitter: float = 0.5) -> None:
        """Kill a live actor of `actor_class` once `after()` is true (then a random 0 to
        `jitter` s later)."""

        def watch() -> None:
            deadline = time.time() + 1200
            while not after() and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(self.rng.uniform(0.0, jitter))
            while time.time() < deadline:
                alive = live_pids(actor_class)
                if alive:
                    os.kill(self.rng.choice(alive), signal.SIGKILL)
                    self.killed.append(actor_class)
                    return
                time.sleep(0.02)

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
        for thread in self.threads:
            thread.join(timeout=5)
