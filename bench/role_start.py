"""What starting the PPO stage's roles costs: the demo's PPO stage (configs/tiny.yaml: one vLLM
engine, the RM, the reference, a 2-rank policy, a 1-rank critic, the joiner) run for one
iteration, with the CPU-seconds of each of the run's processes read from /proc when the driver
says the roles are up, and the seconds on the clock from the run's start to that line.

    python -m bench.role_start

The models are the built-in task's untrained policy and a randomly initialised RM of its shape
(what the weights are does not change what a start costs). Prints a table and writes
bench/results/role_start.json."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine, quiet, table, write
from bench.ppo_iteration import reward_model

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(names: tuple[str, ...]) -> dict[str, tuple[str, float]]:
    """pid -> (process title, user + system CPU-seconds) of this machine's processes whose
    command line starts with one of `names`."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if title.startswith(names):
            found[pid] = (title, (int(fields[11]) + int(fields[12])) / TICK)
    return found


def main() -> None:
    from trainers.config import load_config
    from trainers.pipeline import run
    from trainers.task import build_task

    with tempfile.TemporaryDirectory() as tmp, quiet("role_start"):
        out = Path(tmp) / "run"
        task = ["task.train_prompts=64", "task.heldout_prompts=16"]
        tiny = ROOT / "configs" / "tiny.yaml"
        build_task(load_config(tiny, task).task, out / "task")
        policy = out / "task" / "base_model"
        config = load_config(
            tiny,
            [
                *task,
                f"output_dir={out}",
                "stages=[ppo]",
                "wandb.mode=disabled",
                f"ppo.policy={policy}",
                f"ppo.reward_model={reward_model(policy)}",
                "ppo.iterations=1",
                "ppo.rollout_batch=16",
            ],
        )
        ready: dict[str, Any] = {}
        started = time.perf_counter()

        def log(line: str) -> None:
            if "engine(s)" in line and not ready:  # the line the driver says once roles are up
                ready["seconds"] = time.perf_counter() - started
                ready["cpu"] = cpu_seconds(("ray::",))
                times = os.times()
                ready["driver"] = times.user + times.system

        run(config, log=log)
    roles = sorted(ready["cpu"].values(), key=lambda v: -v[1])
    rows = [[title.removeprefix("ray::").split(".")[0], cpu] for title, cpu in roles if cpu >= 0.5]
    rows += [["driver (this process, since it started)", ready["driver"]]]
    total = sum(r[1] for r in rows)
    print(
        table(
            f"the demo's PPO roles: up {ready['seconds']:.1f} s after the run's start, "
            f"{total:.1f} CPU-seconds by then on {os.cpu_count()} cores",
            ["process", "CPU-seconds"],
            rows,
        )
    )
    path = write(
        "role_start",
        {
            "machine": machine(),
            "seconds_to_ready": ready["seconds"],
            "cpu_seconds": total,
            "processes": [{"process": p, "cpu_seconds": c} for p, c in rows],
        },
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
