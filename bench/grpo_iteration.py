"""Seconds per GRPO iteration on the standard workload: 32 rollouts = 8 prompts × 4 samples,
32-token prompts, exactly 64 new tokens, one epoch, minibatch 8, fp32; against the floors the
iteration is held to, measured on the same machine in the same run: the engine alone generating
the 32 responses (vLLM in this process) and the policy alone training on them (plain torch, one
process).

    .venv/bin/python -m bench.grpo_iteration [--iterations 6] [--warmup 2]
    .venv/bin/python -m bench.grpo_iteration --model .cache/models/SmolLM2-135M-Instruct \
        --prompts 4 --new-tokens 32         # the real model's workload (make smollm2)

The roles are the real actors of a run (bench/ppo_iteration.yaml with ppo.advantage grpo and
ppo.group_minibatches: a minibatch holds whole groups, so a prompt is computed once for its 4
responses in training as in scoring; `--set ppo.group_minibatches=false` times the responses
shuffled one by one): one vLLM engine sampling the 4 responses of a prompt together, the RM, the
reference and a one-rank DeepSpeed policy; no critic, so the policy trains alone and its rank
gets the machine's cores, as the engine does when it generates (`--sync-learner-threads`,
`--sync-engine-threads`; the floors run one thread); the same roles overlapped (`ppo.overlap`:
the engine, on one thread, generates the next batch while the policy, on the other, trains on
this one); then colocated (a worker per core hosting a policy rank, an engine, the RM and the
reference, a thread each); and the peer, Hugging Face TRL's GRPOTrainer (1.16) on the same
workload in its own environment (`make peers`), with 1 and with 2 torch threads (its faster count
is the one compared; its iteration: one generation batch and the minibatch steps over it).
Prints tables and writes bench/results/grpo_iteration.json ({"seconds", "floor_sum_seconds",
...}: seconds per iteration, median)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.common import (
    NEW_TOKENS,
    ROLLOUTS,
    peer_table,
    quiet,
    quiet_ray,
    run_peer,
    standard_model,
    standard_prompts,
    table,
    write,
)
from bench.ppo_iteration import (
    MINIBATCH,
    add_engine_threads_argument,
    add_placement_argument,
    bench_config,
    floor_rows,
    floors,
    phase_rows,
    reward_model,
    run_mode,
)

GROUP = 4  # samples per prompt
MODES = (  # name, placement, overlapped
    ("separate", "separate", False),
    ("separate, overlapped", "separate", True),
    ("colocated", "colocated", False),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="iterations before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each floor")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    parser.add_argument("--model", help="the policy's folder (default: the standard model)")
    parser.add_argument("--prompts", type=int, default=ROLLOUTS // GROUP, help="per iteration")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="exact response length")
    parser.add_argument(
        "--peer-iterations", type=int, default=3, help="timed TRL iterations (0: no peer)"
    )
    add_engine_threads_argument(parser)
    parser.add_argument(
        "--sync-learner-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="learner.torch_threads of the separate placement, where the policy trains alone "
        "(no critic; default the machine's cores)",
    )
    add_placement_argument(parser)
    args = parser.parse_args()
    n_prompts = args.prompts
    args.set = [
        "ppo.advantage=grpo",
        f"ppo.rollout_batch={n_prompts}",
        f"ppo.n_samples_per_prompt={GROUP}",
        f"ppo.max_new_tokens={args.new_tokens}",
        f"rollout.chunk_size={n_prompts}",
        "ppo.group_minibatches=true",
        *args.set,
    ]
    import torch

    torch.set_num_threads(1)  # the anchors were measured with one torch thread
    from transformers import AutoConfig

    policy_dir = Path(args.model) if args.model else standard_model()
    rm_dir = reward_model(policy_dir)
    prompts = standard_prompts(n_prompts, AutoConfig.from_pretrained(policy_dir).vocab_size)
    responses = [p for p in prompts for _ in range(GROUP)]  # the floors' 32 sequences
    config = bench_config(policy_dir, rm_dir, args)
    eager = config.rollout.enforce_eager
    gen_floor, train_floor = floors(policy_dir, responses, args, eager)
    trl = None
    if args.peer_iterations:
        trl = run_peer(
            "trl-grpo",
            "trl_grpo.py",
            [
                *("--policy", str(policy_dir), "--reward-model", str(rm_dir)),
                *("--samples", str(GROUP), "--new-tokens", str(args.new_tokens)),
                *("--minibatch", str(MINIBATCH), "--iterations", str(args.peer_iterations)),
            ],
            prompts,
            "grpo_iteration",
        )
    modes = [
        (name, placement, overlap)
        for name, placement, overlap in MODES
        if args.placement in ("both", placement)
    ]
    with quiet_ray("grpo_iteration", num_cpus=os.cpu_count()):
        ours = {
            name: run_mode(overlap, policy_dir, rm_dir, prompts, args, placement)
            for name, placement, overlap in modes
        }
    floor_sum, floor_max = gen_floor + train_floor, max(gen_floor, train_floor)
    cut = "whole groups" if config.ppo.group_minibatches else "responses shuffled one by one"
    phases = ("generate", "reward", "reference", "train", "weight_sync")
    rows = floor_rows(gen_floor, train_floor, eager, columns=3)
    for name, r in ours.items():
        rows += phase_rows(r, f"{name}: iteration", phases, 3)
        rows[-len(phases) - 1][2] = (
            f"{r['seconds'] / floor_max:.2f}× larger floor"
            if "overlapped" in name
            else f"{r['seconds'] / floor_sum:.2f}× sum of floors"
        )
    print(table(f"GRPO iteration of {Path(policy_dir).name}: {n_prompts} prompts × {GROUP} "
                f"samples, {len(prompts[0])} → {args.new_tokens} new tokens, 1 epoch, minibatch "
                f"{MINIBATCH} ({cut}); median of {args.iterations} after "
                f"{args.warmup} warm-up",
                ["", "seconds", "vs floor"], rows))  # fmt: skip
    if trl is not None:
        print(peer_table(trl, "Hugging Face TRL's GRPOTrainer 1.16", "iteration", ours))
    path = write(
        "grpo_iteration" if args.model is None else f"grpo_iteration_{policy_dir.name}",
        {
            **ours.get("separate", {}),
            "overlapped": ours.get("separate, overlapped"),
            "colocated": ours.get("colocated"),
            "floor_sum_seconds": floor_sum,
            "generate_alone_seconds": gen_floor,
            "train_alone_seconds": train_floor,
            "trl_grpo": trl,
            "trl_grpo_seconds": trl and trl["seconds"],
        },
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    with quiet("grpo_iteration"):
        main()
