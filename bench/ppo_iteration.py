"""Seconds per PPO iteration on the standard workload, synchronous and overlapped, with the time
of each phase, the share of generation, each role's peak memory, and the floors the iteration is
held to: the engine alone generating the batch (vLLM in this process) and the policy alone
training on it (plain torch, one process), on the same machine in the same run. With --model,
the same on another policy (its RM and critic: a new one-output head on a copy of it, random).

    .venv/bin/python -m bench.ppo_iteration [--iterations 6] [--warmup 2]
    .venv/bin/python -m bench.ppo_iteration --model .cache/models/SmolLM2-135M-Instruct \
        --rollouts 16 --new-tokens 32       # the real model's workload (make smollm2)

Every role is the real actor of a run (bench/ppo_iteration.yaml): one vLLM engine, the RM, the
reference policy, a one-rank critic and a one-rank DeepSpeed policy, driven by trainers.rl's own
`iteration` (separate placement); and colocated: a worker per core, each hosting a rank of the
policy and of the critic, an engine, the RM and the reference. Also the machine's fp32
matrix-product rate, measured in the same run, and each mode's useful FLOP rate against it (the
FLOPs an iteration needs, counted from the model's layers), and the peer: Hugging Face TRL's
PPOTrainer 1.12 on the same workload, in its own environment (`make peers`), with 1 and with 2
torch threads (its faster count is the one compared). Prints tables and writes
bench/results/ppo_iteration.json (with --model: ppo_iteration_MODEL.json and
real_iteration.json)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from bench.common import (
    NEW_TOKENS,
    RESULTS,
    ROLLOUTS,
    ROOT,
    SEED,
    iteration_flops,
    matmul_gflops,
    median,
    peer_table,
    quiet,
    quiet_ray,
    run_peer,
    save_model,
    standard_model,
    standard_prompts,
    table,
    write,
)

CONFIG = ROOT / "bench" / "ppo_iteration.yaml"
MINIBATCH = 8


def reward_model(policy_dir: Path) -> Path:
    """A randomly initialised sequence classifier of the standard shape (the RM and the critic)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    folder = policy_dir.with_name(policy_dir.name + "-rm")
    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig.from_pretrained(policy_dir)
    config.num_labels = 1
    torch.manual_seed(SEED)
    model = LlamaForSequenceClassification(config)
    return save_model(folder, model, AutoTokenizer.from_pretrained(policy_dir))


def train_alone(
    policy_dir: Path, prompts: list[list[int]], repeats: int, new_tokens: int = NEW_TOKENS
) -> list[float]:
    """The training floor: one PPO epoch of the policy over the batch (minibatches of 8, our
    objective, AdamW), in this process with one torch thread, nothing else running."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from trainers.objectives import policy_batch, ppo_objective

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # as the learners
    rng = random.Random(SEED)
    samples = [
        {
            "prompt_ids": p,
            "response_ids": [rng.randrange(3, 512) for _ in range(new_tokens)],
            "logprobs": [-6.2] * new_tokens,
            "advantages": [rng.gauss(0, 1) for _ in range(new_tokens)],
        }
        for p in prompts
    ]
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        t = time.perf_counter()
        for start in range(0, len(samples), MINIBATCH):
            step = {"samples": list(range(start, start + MINIBATCH)), "ptx": []}
            batch = policy_batch([samples, []], step, 0, 1, pad_id=0, adv_mean=0.0, adv_std=1.0)
            loss, _ = ppo_objective(
                model, batch, clip=0.2, temperature=1.0, entropy_coef=0.0, ptx_coef=0.0
            )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times[1:]


def placement_overrides(placement: str) -> list[str]:
    """Colocated: a worker per core, each hosting the policy's rank, an engine, the reference,
    the RM and a critic rank (separate: bench/ppo_iteration.yaml's roles as they are)."""
    if placement == "separate":
        return []
    return ["placement=colocated", f"learner.ranks={os.cpu_count()}", "learner.cpus_per_rank=1"]


def add_engine_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sync-engine-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="rollout.torch_threads of the separate placement's synchronous mode, where the "
        "engine generates alone (default: the machine's cores)",
    )


def add_placement_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--placement",
        choices=("separate", "colocated", "both"),
        default="both",
        help="the roles' placement(s) to time",
    )


def engine_threads(args: Any, overlap: bool, placement: str) -> list[str]:
    """Separate and synchronous, the engine generates alone: `--sync-engine-threads` threads
    (rollout.torch_threads; default the machine's cores), and where the policy trains alone (no
    critic beside it: `--sync-learner-threads`, GRPO's benchmark) its rank as many
    (learner.torch_threads). Overlapped, the engine generates beside the training, and
    colocated, each role shares its worker's threads: one."""
    if overlap or placement != "separate":
        return []
    learner = getattr(args, "sync_learner_threads", None)
    return [
        f"rollout.torch_threads={args.sync_engine_threads}",
        *([f"learner.torch_threads={learner}"] if learner else []),
    ]


def bench_config(
    policy_dir: Path, rm_dir: Path, args: Any, overlap: bool = False, placement: str = "separate"
) -> Any:
    """bench/ppo_iteration.yaml with the models, the iteration count, the placement and --set
    overrides."""
    from trainers.config import load_config

    data = RESULTS / "data" / "prompts.jsonl"  # the config names a prompt file; unused here
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text('{"prompt": "unused"}\n')
    return load_config(
        CONFIG,
        [
            f"ppo.iterations={args.warmup + args.iterations}",
            f"ppo.overlap={str(overlap).lower()}",
            f"ppo.prompts={data}",
            f"ppo.heldout_prompts={data}",
            f"ppo.policy={policy_dir}",
            f"ppo.reward_model={rm_dir}",
            f"output_dir={RESULTS / 'ppo_iteration_run'}",
            *placement_overrides(placement),
            *engine_threads(args, overlap, placement),
            *args.set,
        ],
    )


def run_mode(
    overlap: bool,
    policy_dir: Path,
    rm_dir: Path,
    prompts: list[list[int]],
    args: Any,
    placement: str = "separate",
) -> dict[str, Any]:
    """Iterations of trainers.rl on real actors; per-iteration wall time (the period between
    iterations, which is what overlapping shortens) and phase times."""
    from transformers import AutoTokenizer

    from trainers.rl import RLInputs
    from trainers.rl.iteration import iteration
    from trainers.rl.roles import Roles
    from trainers.rl.state import DriverState

    config = bench_config(policy_dir, rm_dir, args, overlap, placement)
    total = config.ppo.iterations
    encoded = [{"prompt_ids": p, "text": "", "where": f"prompt {i}"} for i, p in enumerate(prompts)]
    inputs = RLInputs(
        policy=str(policy_dir),
        reward_model=str(rm_dir),
        critic_model=str(rm_dir),
        tokenizer=AutoTokenizer.from_pretrained(policy_dir),
        prompts=encoded,
        heldout_prompts=[],
        ptx=[],
        heldout_demos=[],
    )
    state = DriverState.start(config, encoded)
    periods, rows = [], []
    with Roles(config, inputs, log=lambda _: None) as roles:
        last = time.perf_counter()
        for _ in range(total):
            figures, _ = iteration(config, roles, state)
            now = time.perf_counter()
            periods.append(now - last)
            rows.append(figures)
            last = now
        memory = roles.peak_memory_gb()
    timed = rows[args.warmup :]
    new_tokens = config.ppo.max_new_tokens
    samples = config.ppo.samples
    assert all(f["tokens"] == samples * new_tokens for f in timed), "not exact new tokens"
    phases = {
        "generate": median([f["time/rollout_busy"] for f in timed]),
        "generate_wall": median([f["time/generate"] for f in timed]),
        "reward": median([f["time/reward_busy"] for f in timed]),
        "reference": median([f["time/reference_busy"] for f in timed]),
        **(
            {"critic_forward": median([f["time/critic_forward_busy"] for f in timed])}
            if config.ppo.uses_critic
            else {}
        ),
        "train": median([f["time/train"] for f in timed]),
        "weight_sync": median([f["time/weight_sync"] for f in timed]),
    }
    seconds = median(periods[args.warmup :])
    return {
        "seconds": seconds,
        "iterations": [round(p, 4) for p in periods],
        "phases": phases,
        "generation_share": phases["generate"] / seconds,
        "max_weight_version_lag": max(f["weight_version_lag"] for f in timed),
        "peak_memory_gb": memory,
    }


PHASES = ("generate", "reward", "reference", "critic_forward", "train", "weight_sync")


def floors(
    policy_dir: Path, sequences: list[list[int]], args: Any, eager: bool
) -> tuple[float, float]:
    """The iteration's floors, each measured alone on the machine before the run: the engine
    generating the sequences (vLLM in this process, with the run's engine setting) and the
    policy training on them (plain torch, one process); medians, in seconds."""
    from bench.rollout import vllm_alone

    new = args.new_tokens
    gen = median(vllm_alone(str(policy_dir), sequences, args.repeats, eager, new_tokens=new))
    return gen, median(train_alone(policy_dir, sequences, args.repeats, new))


def floor_rows(gen: float, train: float, eager: bool, columns: int) -> list[list[Any]]:
    pad = [""] * (columns - 2)
    mode = "eager" if eager else "compiled"
    return [
        [f"floor: engine alone, generate ({mode})", gen, *pad],
        ["floor: policy alone, train", train, *pad],
    ]


def phase_rows(
    r: dict[str, Any], label: str, phases: tuple[str, ...], columns: int
) -> list[list[Any]]:
    """An iteration's row and a row per phase (seconds, median)."""
    pad = [""] * (columns - 2)
    return [[label, r["seconds"], *pad], *[[f"  {k}", r["phases"][k], *pad] for k in phases]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations per mode")
    parser.add_argument("--warmup", type=int, default=2, help="iterations before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each floor")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    parser.add_argument("--model", help="the policy's folder (default: the standard model)")
    parser.add_argument("--rollouts", type=int, default=ROLLOUTS, help="prompts per iteration")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="exact response length")
    parser.add_argument(
        "--peer-steps", type=int, default=3, help="timed TRL steps per thread count (0: no peer)"
    )
    add_engine_threads_argument(parser)
    add_placement_argument(parser)
    args = parser.parse_args()
    args.set = [
        f"ppo.rollout_batch={args.rollouts}",
        f"ppo.max_new_tokens={args.new_tokens}",
        f"rollout.chunk_size={args.rollouts}",
        *args.set,
    ]
    import torch

    torch.set_num_threads(1)  # the anchors were measured with one torch thread
    from transformers import AutoConfig

    policy_dir = Path(args.model) if args.model else standard_model()
    rm_dir = reward_model(policy_dir)
    prompts = standard_prompts(args.rollouts, AutoConfig.from_pretrained(policy_dir).vocab_size)
    eager = bench_config(policy_dir, rm_dir, args).rollout.enforce_eager
    gen_floor, train_floor = floors(policy_dir, prompts, args, eager)
    cores = os.cpu_count() or 1
    rate = {"1": matmul_gflops(1), str(cores): matmul_gflops(cores)}
    uses_critic = bench_config(policy_dir, rm_dir, args).ppo.uses_critic
    flops = iteration_flops(policy_dir, len(prompts), len(prompts[0]), args.new_tokens, uses_critic)
    trl = None
    if args.peer_steps:
        trl = run_peer(
            "trl-ppo",
            "trl_ppo.py",
            [
                *("--policy", str(policy_dir), "--reward-model", str(rm_dir)),
                *("--new-tokens", str(args.new_tokens), "--minibatch", str(MINIBATCH)),
                *("--steps", str(args.peer_steps), "--warmup", "1"),
            ],
            prompts,
            "ppo_iteration",
        )
    placements = ("separate", "colocated") if args.placement == "both" else (args.placement,)
    results = {}
    with quiet_ray("ppo_iteration", num_cpus=os.cpu_count()):
        for placement in placements:
            prefix = "" if placement == "separate" else "colocated_"
            for name, overlap in (("sync", False), ("overlapped", True)):
                results[prefix + name] = run_mode(
                    overlap, policy_dir, rm_dir, prompts, args, placement
                )
    floor_sum, floor_max = gen_floor + train_floor, max(gen_floor, train_floor)
    rows = floor_rows(gen_floor, train_floor, eager, columns=4)
    for name, r in results.items():
        first = len(rows)
        rows += phase_rows(r, f"{name.replace('_', ' ')}: iteration", PHASES, columns=4)
        if name.endswith("sync"):
            rows[first][2] = f"{r['seconds'] / floor_sum:.2f}× sum of floors"
            rows[first][3] = f"generation {r['generation_share']:.0%}"
        else:
            rows[first][2] = f"{r['seconds'] / floor_max:.2f}× larger floor"
            rows[first][3] = f"lag ≤ {r['max_weight_version_lag']:.0f} version"
    print(table(f"PPO iteration of {policy_dir.name}: {len(prompts)} prompts × {len(prompts[0])} "
                f"tokens → {args.new_tokens} new tokens, 1 epoch, minibatch {MINIBATCH}; median "
                f"of {args.iterations} after {args.warmup} warm-up",
                ["", "seconds", "vs floor", ""], rows))  # fmt: skip
    for r in results.values():
        r["useful_gflops"] = flops / r["seconds"] / 1e9
    print(table(f"useful FLOP rate: {flops / 1e12:.3f} TFLOP an iteration (counted from the "
                f"model's layers) against fp32 matrix products measured now: {rate['1']:.1f} "
                f"GFLOP/s on 1 thread, {rate[str(cores)]:.1f} on {cores}",
                ["mode", "seconds", "useful GFLOP/s", f"of the {cores}-thread rate"],
                [[name.replace("_", " "), r["seconds"], r["useful_gflops"],
                  f"{r['useful_gflops'] / rate[str(cores)]:.0%}"]
                 for name, r in results.items()]))  # fmt: skip
    if trl is not None:
        ours = {name.replace("_", " "): r for name, r in results.items()}
        print(peer_table(trl, "Hugging Face TRL's PPOTrainer 1.12", "step", ours))
    mem = [
        [f"{name.replace('_', ' ')}: {role}", gb]
        for name, r in results.items()
        for role, gb in r["peak_memory_gb"].items()
    ]
    print(table("peak resident memory per role (GB, the largest rank; colocated: a worker)",
                ["mode: role", "GB"], mem))  # fmt: skip
    floors_of = {
        "floor_sum_seconds": floor_sum,
        "floor_max_seconds": floor_max,
        "generate_alone_seconds": gen_floor,
        "train_alone_seconds": train_floor,
        "enforce_eager": eager,
    }
    compute = {"matmul_gflops_by_threads": rate, "iteration_tflop": flops / 1e12}
    path = write(
        "ppo_iteration" if args.model is None else f"ppo_iteration_{policy_dir.name}",
        {
            **{name: {**r, **floors_of} for name, r in results.items()},
            **compute,
            "trl_ppo": trl,
            "trl_ppo_seconds": trl and trl["seconds"],
        },
    )
    print(f"\nwritten: {path}")
    if args.model is not None and {"sync", "colocated_sync"} <= results.keys():
        best = min(("sync", "colocated_sync"), key=lambda n: results[n]["seconds"])
        path = write(
            "real_iteration",
            {
                "model": policy_dir.name,
                "separate": results["sync"],
                "colocated": results["colocated_sync"],
                "trl_ppo_seconds": trl and trl["seconds"],
                "trl_ppo": trl,
                "matmul_gflops": rate[str(cores)],
                "useful_gflops": results[best]["useful_gflops"],
                **compute,
            },
        )
        print(f"written: {path}")


if __name__ == "__main__":
    with quiet("ppo_iteration"):
        main()
