"""Rollout throughput on the standard workload: our engine behind its Ray actor (results
delivered to the driver) against transformers' `generate` with its KV cache, on the same model,
prompts and sampling (temperature 1, exactly 64 new tokens), in one run; plus vLLM alone in this
process, the floor that the actor adds to. Both eager (`rollout.enforce_eager: true`, the default)
and compiled (torch.compile; its start, in the last column, includes the compilation or the load
of its cached code).

    .venv/bin/python -m bench.rollout [--repeats 5]

Prints a table and writes bench/results/rollout.json."""

from __future__ import annotations

import argparse
import os
import time

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


def hf_generate(model_dir: str, prompts: list[list[int]], repeats: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    times = []
    for r in range(repeats + 1):  # the first is warm-up
        torch.manual_seed(r)
        t = time.perf_counter()
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
        times.append(time.perf_counter() - t)
        assert out.shape == (ROLLOUTS, len(prompts[0]) + NEW_TOKENS)
    return times[1:]


def engine_in_actor(
    model_dir: str, prompts: list[list[int]], repeats: int, enforce_eager: bool
) -> tuple[float, list[float]]:
    """Our RolloutEngine in a Ray actor, the samples delivered to this process: (seconds to
    start the engine, seconds of each timed generation)."""
    import ray

    from actors.rollout import Sampling

    sampling = Sampling(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    times = []
    with quiet_ray("rollout", num_cpus=os.cpu_count()):
        t = time.perf_counter()
        with engine_group(model_dir, enforce_eager=enforce_eager) as engines:
            engines.call("get_version")  # the actor starts in the background: wait until it is up
            start = time.perf_counter() - t
            engine = engines.actors[0]
            for _ in range(repeats + 1):
                t = time.perf_counter()
                samples = ray.get(engine.generate.remote(prompts, sampling))
                times.append(time.perf_counter() - t)
                assert all(len(s["response_ids"]) == NEW_TOKENS for s in samples)
    return start, times[1:]


def vllm_alone(
    model_dir: str,
    prompts: list[list[int]],
    repeats: int,
    enforce_eager: bool = True,
    new_tokens: int = NEW_TOKENS,
) -> list[float]:
    """vLLM's LLM in this process (the floor under our engine). The engine is released at the
    end, so that the next one starts on a free machine."""
    import gc

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
        )  # as our engine samples
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
            )
            times.append(time.perf_counter() - t)
        del llm
        gc.collect()
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the anchors were measured with one torch thread
    model_dir, prompts = str(standard_model()), standard_prompts()
    tokens = ROLLOUTS * NEW_TOKENS
    hf = median(hf_generate(model_dir, prompts, args.repeats))
    figures: dict[str, float] = {"hf_seconds": hf, "hf_tokens_per_s": tokens / hf}
    rows: list[list[object]] = [["transformers generate (KV cache)", hf, tokens / hf, 1.0, ""]]
    for mode, eager in (("eager", True), ("compiled", False)):
        alone = median(vllm_alone(model_dir, prompts, args.repeats, eager))
        start, times = engine_in_actor(model_dir, prompts, args.repeats, eager)
        ours = median(times)
        rows += [
            [f"vLLM alone, in process, {mode}", alone, tokens / alone, hf / alone, ""],
            [f"our engine in its Ray actor, delivered, {mode}", ours, tokens / ours, hf / ours,
             f"{start:.0f} s"],
        ]  # fmt: skip
        figures |= {
            f"vllm_alone_{mode}_seconds": alone,
            f"vllm_alone_{mode}_tokens_per_s": tokens / alone,
            f"engine_{mode}_seconds": ours,
            f"engine_{mode}_tokens_per_s": tokens / ours,
            f"engine_{mode}_start_seconds": start,
        }
    # the engine's figure is that of its faster setting (rollout.enforce_eager)
    best = (
        "eager"
        if figures["engine_eager_seconds"] <= figures["engine_compiled_seconds"]
        else "compiled"
    )
    figures |= {
        "engine_mode": best,
        "engine_tokens_per_s": figures[f"engine_{best}_tokens_per_s"],
        "engine_seconds": figures[f"engine_{best}_seconds"],
    }
    print(table(f"rollout: {ROLLOUTS} prompts × {len(prompts[0])} tokens → {NEW_TOKENS} new "
                "tokens, median of {args.repeats}".replace("{args.repeats}", str(args.repeats)),
                ["", "seconds", "tokens/s", "× generate", "engine start"], rows))  # fmt: skip
    path = write("rollout", figures)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    with quiet("rollout"):
        main()
