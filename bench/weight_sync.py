"""Weight sync: seconds (and GB/s) to move the policy's weights from its learner rank 0 to a
rollout engine, for Llama models from about 1M to about 100M parameters, for each sync method
(through the Ray object store, and broadcast over a torch.distributed group).

    .venv/bin/python -m bench.weight_sync [--repeats 3] [--model FOLDER] [--method broadcast]

`--model` measures that model folder (e.g. .cache/models/SmolLM2-135M-Instruct) instead of the
four sizes.

Prints a table and writes bench/results/weight_sync.json."""

from __future__ import annotations

import argparse
import os
import time

from bench.common import engine_group, median, quiet, quiet_ray, standard_model, table, write

METHODS = ("object_store", "broadcast")
# (label, shape overrides of the standard model)
SIZES = [
    ("1M", {"hidden_size": 128, "intermediate_size": 344}),
    ("3M (standard)", {}),
    ("11M", {"hidden_size": 384, "intermediate_size": 1032, "num_hidden_layers": 6,
             "num_attention_heads": 6, "num_key_value_heads": 6}),
    ("86M", {"hidden_size": 768, "intermediate_size": 2064, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_key_value_heads": 12}),
]  # fmt: skip


def measure(
    model_dir: str, method: str, repeats: int, bucket_mb: float
) -> tuple[int, int, list[float]]:
    """(parameters, bytes, seconds of each sync) for `method`: object_store (rank 0 puts the
    weights in the object store, the engine fetches them) or broadcast (rank 0 broadcasts them
    over a gloo or NCCL group with the engine, in buckets); each ends with the engine's weights
    loaded."""
    import torch

    from actors.learner import EngineSpec, LearnerGroup, ModelSpec, OptimSpec

    gpu = torch.cuda.is_available()
    with (
        LearnerGroup(
            name="policy",
            ranks=1,
            engine=EngineSpec(backend="nccl" if gpu else "gloo"),
            cpus_per_rank=0.5,
            gpus_per_rank=1 if gpu else 0,
        ) as policy,
        engine_group(model_dir, num_cpus=0.5, num_gpus=1 if gpu else 0) as engines,
    ):
        params = policy.build(ModelSpec(model_dir), OptimSpec(lr=1e-4, total_steps=1))
        if method == "broadcast":
            policy.open_weight_group(engines, "nccl" if gpu else "gloo", timeout_s=300)
        bucket = int(bucket_mb * 2**20)
        times = []
        for version in range(repeats + 1):  # the first is warm-up
            t = time.perf_counter()
            if method == "broadcast":
                sending, receiving = policy.submit_broadcast(engines, version, bucket)
                [nbytes] = [b for b in policy.group.get(sending, "broadcast_weights") if b]
                engines.get(receiving, "receive_weights")
            else:
                ref = policy.publish_weights()
                engines.call("load_weights", ref, version)
            times.append(time.perf_counter() - t)
        if method != "broadcast":
            import ray

            nbytes = sum(v.numel() * v.element_size() for v in ray.get(ref).values())
        return params, nbytes, times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed syncs after one warm-up")
    parser.add_argument("--bucket-mb", type=float, default=64.0, help="broadcast bucket size")
    parser.add_argument("--model", help="a model folder to measure instead of the sizes")
    parser.add_argument("--method", choices=METHODS, action="append", help="(default: both)")
    args = parser.parse_args()

    rows, out = [], []
    with quiet_ray("weight_sync", num_cpus=os.cpu_count()):
        for label, shape in [(args.model, None)] if args.model else SIZES:
            model_dir = str(args.model) if shape is None else str(standard_model(**shape))
            for method in args.method or METHODS:
                params, nbytes, times = measure(model_dir, method, args.repeats, args.bucket_mb)
                seconds = median(times)
                rows.append([label, f"{params:,}", method, seconds, nbytes / seconds / 1e9])
                out.append({"params": params, "bytes": nbytes, "method": method,
                            "seconds": seconds})  # fmt: skip
    print(table(f"weight sync, learner rank 0 → 1 engine, median of {args.repeats}",
                ["model", "parameters", "method", "seconds", "GB/s"], rows))  # fmt: skip
    print(f"\nwritten: {write('weight_sync', {'rows': out})}")


if __name__ == "__main__":
    with quiet("weight_sync"):
        main()
