"""The prompts' shared first tokens computed once (`actors.batching`): each role's pass over a
real model's batch, with them computed once and with them computed in every row, in one process,
one after the other, on the same batch.

    .venv/bin/python -m bench.shared_prefix [--model .cache/models/SmolLM2-135M-Instruct]

The batch: the built-in task's training prompts ("write a short review of the ...") in the
model's chat template (SmolLM2's adds its system prompt: 30 of a prompt's 39-41 tokens are the
same in every prompt), each with 32 response tokens drawn at random (seed 0), fp32, one torch
thread. Rows as in `configs/smollm2.yaml`: a policy rank's share of a PPO minibatch (4), the
critic's minibatch (8), a scoring call (16), a batch of held-out demonstrations (32). Prints a
table and writes bench/results/shared_prefix.json."""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from bench.common import ROOT, machine, median, quiet, table, write

SMOLLM2 = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"


def _samples(tokenizer: Any, n: int) -> list[dict[str, Any]]:
    from trainers.encoding import encode_prompt
    from trainers.task import PROMPT_TEMPLATE, QUALIFIERS, TOPICS

    rng = random.Random(0)
    out = []
    for _ in range(n):
        text = PROMPT_TEMPLATE.format(qualifier=rng.choice(QUALIFIERS), topic=rng.choice(TOPICS))
        response = [rng.randrange(100, tokenizer.vocab_size) for _ in range(32)]
        out.append({"prompt_ids": encode_prompt(tokenizer, text), "response_ids": response})
    return out


def _passes(policy: Any, critic: Any, samples: list[dict[str, Any]], pad: int) -> dict[str, Any]:
    """name -> (rows, a function running the pass once)."""
    import torch

    from actors.batching import pack, packed_scores, sample_logprobs
    from trainers.encoding import collate_sft
    from trainers.objectives import critic_values, sft_eval, sft_objective

    def policy_step() -> None:
        from actors.batching import response_logits, response_logprobs

        batch = pack(samples[:4], pad)
        logp = response_logprobs(response_logits(policy, batch), batch, 0.7)
        (logp * batch["response_mask"]).sum().backward()

    def critic_step() -> None:
        batch = pack(samples[:8], pad)
        (critic_values(critic, batch) * batch["response_mask"]).sum().backward()

    @torch.no_grad()
    def reference() -> None:
        sample_logprobs(policy, pack(samples[:16], pad), 0.7)

    @torch.no_grad()
    def reward() -> None:
        packed_scores(critic, pack(samples[:16], pad))

    demos = [
        {
            "input_ids": s["prompt_ids"] + s["response_ids"],
            "loss_mask": [0] * len(s["prompt_ids"]) + [1] * len(s["response_ids"]),
        }
        for s in samples[:32]
    ]

    @torch.no_grad()
    def demonstrations() -> None:
        sft_eval(policy, collate_sft(demos, pad, normalizer=1))

    def sft_step() -> None:
        loss, _ = sft_objective(policy, collate_sft(demos[:8], pad, normalizer=1))
        loss.backward()

    return {
        "policy PPO step (fwd + bwd)": (4, policy_step),
        "critic step (fwd + bwd)": (8, critic_step),
        "reference log-probs": (16, reference),
        "reward scores": (16, reward),
        "demonstration loss (alignment tax)": (32, demonstrations),
        "SFT / PPO-ptx step (fwd + bwd)": (8, sft_step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SMOLLM2))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with quiet("shared_prefix"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import actors.batching as batching
        from actors.models import load_reward_model

        torch.set_num_threads(1)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        torch.manual_seed(0)
        critic = load_reward_model(args.model, dtype=torch.float32)
        samples = _samples(tokenizer, 32)
        shared = batching.shared_prompt_length(samples)
        width = len(samples[0]["prompt_ids"]) + 32
        every_row = 10**9  # no run of shared tokens is this long: every row computes them
        default = batching.MIN_SHARED_TOKENS
        rows, figures = [], {}
        for name, (n, run) in _passes(policy, critic, samples, tokenizer.pad_token_id).items():
            seconds: dict[str, list[float]] = {"once": [], "every row": []}
            for _ in range(args.repeats + 1):  # the first of each is a warm-up
                for mode, minimum in (("every row", every_row), ("once", default)):
                    batching.MIN_SHARED_TOKENS = minimum
                    policy.zero_grad(set_to_none=True)
                    critic.zero_grad(set_to_none=True)
                    started = time.perf_counter()
                    run()
                    seconds[mode].append(time.perf_counter() - started)
                batching.MIN_SHARED_TOKENS = default
            full, once = median(seconds["every row"][1:]), median(seconds["once"][1:])
            figures[name] = {"rows": n, "every_row_seconds": full, "once_seconds": once}
            rows.append([name, n, f"{full:.3f}", f"{once:.3f}", f"{once / full:.2f}"])
            print(f"{name}: {full:.3f} s -> {once:.3f} s", flush=True)
    title = (
        f"{args.model}: {shared} shared tokens of about {width} a row, 1 thread, median of "
        f"{args.repeats} after a warm-up"
    )
    print(table(title, ["pass", "rows", "every row (s)", "once (s)", "ratio"], rows))
    write(
        "shared_prefix",
        {"model": args.model, "shared_tokens": shared, "passes": figures, "machine": machine()},
    )


if __name__ == "__main__":
    main()
