"""Weight sync: seconds (and GB/s) to move the policy's weights from its learner rank 0 to a
rollout engine, for Llama models from about 1M to about 100M parameters, for each sync method
(today: through the Ray object store; the broadcast method comes with the performance issue).

    .venv/bin/python -m bench.weight_sync [--repeats 3]

Prints a table and writes bench/results/weight_sync.json."""

from __future__ import annotations

import argparse
import os
import time

from bench.common import engine_group, median, standard_model, table, write

# (label, shape overrides of the standard model)
SIZES = [
    ("1M", {"hidden_size": 128, "intermediate_size": 344}),
    ("3M (standard)", {}),
    ("11M", {"hidden_size": 384, "intermediate_size": 1032, "num_hidden_layers": 6,
             "num_attention_heads": 6, "num_key_value_heads": 6}),
    ("86M", {"hidden_size": 768, "intermediate_size": 2064, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_key_value_heads": 12}),
]  # fmt: skip


def object_store(model_dir: str, repeats: int) -> tuple[int, int, list[float]]:
    """(parameters, bytes, seconds of each sync) for the object-store method."""
    import ray

    from actors.learner import EngineSpec, LearnerGroup, ModelSpec, OptimSpec

    with (
        LearnerGroup(
            name="policy", ranks=1, engine=EngineSpec(backend="gloo"), cpus_per_rank=0.5
        ) as policy,
        engine_group(model_dir, num_cpus=0.5) as engines,
    ):
        params = policy.build(ModelSpec(model_dir), OptimSpec(lr=1e-4, total_steps=1))
        times = []
        nbytes = 0
        for version in range(repeats + 1):  # the first is warm-up
            t = time.perf_counter()
            ref = policy.publish_weights()
            engines.call("load_weights", ref, version)
            times.append(time.perf_counter() - t)
            if not nbytes:
                state = ray.get(ref)
                nbytes = sum(v.numel() * v.element_size() for v in state.values())
        return params, nbytes, times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed syncs after one warm-up")
    args = parser.parse_args()
    from cluster import RayRuntime

    rows, out = [], []
    with RayRuntime(None, num_cpus=os.cpu_count()):
        for label, shape in SIZES:
            model_dir = str(standard_model(**shape))
            params, nbytes, times = object_store(model_dir, args.repeats)
            seconds = median(times)
            rows.append([label, f"{params:,}", "object_store", seconds, nbytes / seconds / 1e9])
            out.append(
                {"params": params, "bytes": nbytes, "method": "object_store", "seconds": seconds}
            )
    print(table(f"weight sync, learner rank 0 → 1 engine, median of {args.repeats}",
                ["model", "parameters", "method", "seconds", "GB/s"], rows))  # fmt: skip
    print(f"\nwritten: {write('weight_sync', {'rows': out})}")


if __name__ == "__main__":
    main()
