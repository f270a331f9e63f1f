"""Scaling the rollout: PPO iteration and generation time on the standard workload with one and
with two rollout engines, each engine on its own node of a local two-node Ray cluster (real
`ray start` nodes on this machine, token auth on; the learners and scorers on the head).

    .venv/bin/python -m bench.scaling [--iterations 4] [--warmup 1] [--rollouts 32]

With two engines the batch is dealt as two chunks of 16 prompts, one per engine; with one, as a
chunk of 32. `--rollouts 256` runs the same with 256 prompts per iteration, where the engines'
compute outweighs their per-step overhead. Prints a table and writes bench/results/scaling.json
(scaling_256.json for 256 rollouts)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from bench.common import NEW_TOKENS, ROLLOUTS, quiet, quiet_ray, table, write


def measure(engines: int, args: Any) -> dict[str, Any]:
    """Runs in a driver that joined the cluster (`--join`): the PPO iterations' figures."""
    import bench.ppo_iteration as ppo_bench
    from bench.common import standard_model, standard_prompts

    policy_dir = standard_model()
    rm_dir = ppo_bench.reward_model(policy_dir)
    args.set = [
        f"rollout.engines={engines}",
        f"ppo.rollout_batch={args.rollouts}",
        f"rollout.chunk_size={args.rollouts // engines}",
        "rollout.cpus_per_engine=1",
        "rollout.resources_per_engine={rollout_node: 1}",
        "learner.resources_per_rank={head_node: 1}",
        "ppo.critic.resources_per_rank={head_node: 1}",
        "reward.resources={head_node: 1}",
        "reference.resources={head_node: 1}",
    ]
    with quiet_ray("scaling", "auto"):
        result = ppo_bench.run_mode(
            False, policy_dir, rm_dir, standard_prompts(args.rollouts), args
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=4, help="timed iterations per setup")
    parser.add_argument("--warmup", type=int, default=1, help="iterations before timing")
    parser.add_argument("--rollouts", type=int, default=ROLLOUTS, help="prompts per iteration")
    parser.add_argument("--join", type=int, default=0, help=argparse.SUPPRESS)  # engines, inside
    args = parser.parse_args()
    if args.join:
        print("RESULT " + json.dumps(measure(args.join, args)))
        return

    from cluster.localnodes import LocalNodes

    results = {}
    for engines in (1, 2):
        with LocalNodes() as nodes:
            # the head hosts the learners and scorers; each worker node hosts one engine
            nodes.start_head(2, {"head_node": 8})
            nodes.add_worker(1, {"rollout_node": 1})
            nodes.add_worker(1, {"rollout_node": 1})
            run = subprocess.run(
                [sys.executable, "-m", "bench.scaling", f"--join={engines}",
                 f"--iterations={args.iterations}", f"--warmup={args.warmup}",
                 f"--rollouts={args.rollouts}"],
                env={**nodes.env, "RAY_ADDRESS": nodes.address},
                capture_output=True, text=True, timeout=1200,
            )  # fmt: skip
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            raise SystemExit(f"the {engines}-engine run failed:\n{run.stderr[-4000:]}")
        results[engines] = json.loads(lines[-1].removeprefix("RESULT "))
    one, two = results[1], results[2]
    rows = [
        [f"{n} engine{'s' if n > 1 else ''}", r["phases"]["generate_wall"], r["seconds"]]
        for n, r in results.items()
    ]
    ratio = two["phases"]["generate_wall"] / one["phases"]["generate_wall"]
    rows.append(["2 engines / 1 engine", ratio, two["seconds"] / one["seconds"]])
    print(table(f"scaling: two local nodes, {args.rollouts} prompts × {NEW_TOKENS} new tokens, "
                f"median of {args.iterations} iterations",
                ["", "generate (s)", "iteration (s)"], rows))  # fmt: skip
    path = write(
        "scaling" if args.rollouts == ROLLOUTS else f"scaling_{args.rollouts}",
        {
            "rollouts": args.rollouts,
            "one_engine_generate_seconds": one["phases"]["generate_wall"],
            "two_engines_generate_seconds": two["phases"]["generate_wall"],
            "one_engine_iteration_seconds": one["seconds"],
            "two_engines_iteration_seconds": two["seconds"],
            "generate_ratio": ratio,
        },
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    with quiet("scaling"):
        main()
