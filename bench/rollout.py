"""Rollout throughput on the standard workload: our engine behind its Ray actor (results
delivered to the driver) against transformers' `generate` with its KV cache, on the same model,
prompts and sampling (temperature 1, exactly 64 new tokens), in one run; plus vLLM alone in this
process, the floor that the actor adds to. Both eager (`rollout.enforce_eager: true`, the default)
and compiled (torch.compile; its start, in the last column, includes the compilation or the load
of its cached code). Every contender is started first, then each round times each of them once,
in a rotating order: the machine's speed drifts by a third within an hour, and interleaving puts
every contender under the same drift.

    .venv/bin/python -m bench.rollout [--repeats 5]

Prints a table and writes bench/results/rollout.json."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from bench.common import (
    NEW_TOKENS,
    ROLLOUTS,
    engine_group,
    median,
    native_output,
    quiet,
    quiet_ray,
    standard_model,
    standard_prompts,
    table,
    write,
)

Run = Callable[[], None]


def hf_generate(model_dir: str, prompts: list[list[int]]) -> Run:
    """transformers' `generate` with its KV cache, sampling as the engine does."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)

    def run() -> None:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape == (ROLLOUTS, len(prompts[0]) + NEW_TOKENS)

    return run


def engine_in_actor(engines: Any, prompts: list[list[int]]) -> Run:
    """Our RolloutEngine in a Ray actor, the samples delivered to this process."""
    import ray

    from actors.rollout import Sampling

    sampling, engine = Sampling(max_new_tokens=NEW_TOKENS, ignore_eos=True), engines.actors[0]

    def run() -> None:
        samples = ray.get(engine.generate.remote(prompts, sampling))
        assert all(len(s["response_ids"]) == NEW_TOKENS for s in samples)

    return run


def vllm_in_process(
    model_dir: str, prompts: list[list[int]], enforce_eager: bool, new_tokens: int = NEW_TOKENS
) -> tuple[Any, Run]:
    """vLLM's LLM in this process (the floor under our engine), sampling as our engine does:
    (the LLM, a run)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # as our engine (actors/rollout.py)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with native_output():
        llm = LLM(
            model=model_dir, dtype="float32", enforce_eager=enforce_eager, max_model_len=128, seed=0
        )
    params = SamplingParams(
        temperature=1.0, max_tokens=new_tokens, ignore_eos=True, logprobs=0, detokenize=False
    )
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def run() -> None:
        with native_output():
            llm.generate(requests, params, use_tqdm=False)

    return llm, run


def vllm_alone(
    model_dir: str,
    prompts: list[list[int]],
    repeats: int,
    enforce_eager: bool = True,
    new_tokens: int = NEW_TOKENS,
) -> list[float]:
    """Seconds of each of `repeats` generations (after a warm-up) of vLLM alone in this process.
    The engine is released at the end, so that the next one starts on a free machine."""
    import gc

    llm, run = vllm_in_process(model_dir, prompts, enforce_eager, new_tokens)
    times = timed({"vllm": run}, repeats)["vllm"]
    del llm, run
    gc.collect()
    return times


def timed(runs: dict[str, Run], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run in each of `repeats` rounds after a warm-up round; a round takes the
    runs in turn, each round starting one further along."""
    names, times = list(runs), {name: [] for name in runs}
    for r in range(repeats + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            runs[name]()
            if r:
                times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the anchors were measured with one torch thread
    model_dir, prompts = str(standard_model()), standard_prompts()
    tokens = ROLLOUTS * NEW_TOKENS
    runs: dict[str, Run] = {"hf": hf_generate(model_dir, prompts)}
    starts: dict[str, float] = {}
    modes = {"eager": True, "compiled": False}
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_ray("rollout", num_cpus=os.cpu_count()))
        for mode, eager in modes.items():
            _, runs[f"vllm_alone_{mode}"] = vllm_in_process(model_dir, prompts, eager)
            t = time.perf_counter()
            engines = stack.enter_context(engine_group(model_dir, enforce_eager=eager))
            engines.call("get_version")  # the actor starts in the background: wait until it is up
            starts[mode] = time.perf_counter() - t
            runs[f"engine_{mode}"] = engine_in_actor(engines, prompts)
        seconds = {name: median(ts) for name, ts in timed(runs, args.repeats).items()}
    hf = seconds["hf"]
    figures: dict[str, Any] = {"hf_seconds": hf, "hf_tokens_per_s": tokens / hf}
    rows: list[list[object]] = [["transformers generate (KV cache)", hf, tokens / hf, 1.0, ""]]
    for mode in modes:
        alone, ours = seconds[f"vllm_alone_{mode}"], seconds[f"engine_{mode}"]
        rows += [
            [f"vLLM alone, in process, {mode}", alone, tokens / alone, hf / alone, ""],
            [f"our engine in its Ray actor, delivered, {mode}", ours, tokens / ours, hf / ours,
             f"{starts[mode]:.0f} s"],
        ]  # fmt: skip
        figures |= {
            f"vllm_alone_{mode}_seconds": alone,
            f"vllm_alone_{mode}_tokens_per_s": tokens / alone,
            f"engine_{mode}_seconds": ours,
            f"engine_{mode}_tokens_per_s": tokens / ours,
            f"engine_{mode}_start_seconds": starts[mode],
        }
    # the engine's figure is that of its faster setting (rollout.enforce_eager)
    best = min(modes, key=lambda mode: figures[f"engine_{mode}_seconds"])
    figures |= {
        "engine_mode": best,
        "engine_tokens_per_s": figures[f"engine_{best}_tokens_per_s"],
        "engine_seconds": figures[f"engine_{best}_seconds"],
    }
    print(table(f"rollout: {ROLLOUTS} prompts × {len(prompts[0])} tokens → {NEW_TOKENS} new "
                f"tokens, median of {args.repeats} interleaved rounds",
                ["", "seconds", "tokens/s", "× generate", "engine start"], rows))  # fmt: skip
    path = write("rollout", figures)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    with quiet("rollout"):
        main()
