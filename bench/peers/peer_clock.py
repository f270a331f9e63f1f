"""What the peer scripts share: their common arguments and set-up, a TRL callback that marks the
end of every `every`-th optimizer step, and the one JSON line each prints for bench/common.py's
`run_peer`. The scripts import it from their own folder (on sys.path when they run), in the
peer's environment."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import Any

TRAINING: dict[str, Any] = {
    "report_to": [],
    "save_strategy": "no",
    "logging_steps": 10_000,
    "use_cpu": True,
    "bf16": False,
    "fp16": False,
    "seed": 0,
    "dataloader_num_workers": 0,
}
"""TRL's training arguments that both workloads share: fp32 on the CPU, seed 0, nothing saved
or reported."""


def parse(description: str, unit: str, extra: dict[str, dict[str, Any]]) -> argparse.Namespace:
    """The workload's arguments (and `extra`'s, name: add_argument's keywords); then torch's
    threads set and the libraries' warnings off."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward-model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help=f"{unit}s before timing")
    for name, keywords in extra.items():
        parser.add_argument(name, **keywords)
    args = parser.parse_args()
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    return args


def clock(callback_class: type, every: int = 1) -> tuple[Any, list[float]]:
    """A callback (an instance of a subclass of TRL's `TrainerCallback`, given) and the list of
    times it appends to: the start of training, then every `every`-th optimizer step's end."""
    marks: list[float] = []

    class Clock(callback_class):  # type: ignore[misc, valid-type]
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, _args: Any, state: Any, *__: Any, **___: Any) -> None:
            if state.global_step % every == 0:
                marks.append(time.perf_counter())

    return Clock(), marks


def report(peer: str, marks: list[float], expected: int, warmup: int, **figures: Any) -> None:
    """Print the periods between the marks and their median after `warmup` as one JSON line."""
    periods = [b - a for a, b in itertools.pairwise(marks)]
    assert len(periods) == expected, f"{peer}: {len(periods)} periods timed, {expected} expected"
    seconds = statistics.median(periods[warmup:])
    line = {"peer": peer, "seconds": seconds, "periods": [round(p, 4) for p in periods]}
    print(json.dumps({**line, **figures}))
