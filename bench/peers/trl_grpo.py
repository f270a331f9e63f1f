"""The peer: Hugging Face TRL's GRPOTrainer (its latest release, bench/peers/trl-grpo.txt) on our
GRPO benchmark workload, timed iteration by iteration. It runs in its own virtual environment
(`make peers`), never in ours, so it imports nothing of the project but peer_clock.py beside it;
bench/grpo_iteration.py starts it and reads the one JSON line it prints.

    .venv-peers/trl-grpo/bin/python bench/peers/trl_grpo.py --policy DIR --reward-model DIR \
        --prompts prompts.json --samples 4 --new-tokens 64 --minibatch 8 --threads 1

The workload is ours: the same prompts (their token ids, decoded by the policy's tokenizer),
`--samples` responses each of exactly --new-tokens tokens (eos suppressed until then), one epoch
over minibatches of --minibatch (one optimizer step each, as ours), the KL to the reference
(beta 0.05, so the reference runs as ours does), the RM folder as the reward, fp32 on the CPU.
An iteration is one generation batch and the optimizer steps over it."""

from __future__ import annotations

import json
import tempfile

from peer_clock import TRAINING, clock, parse, report  # bench/peers/, the script's own folder


def main() -> None:
    args = parse(
        __doc__.split("\n\n")[0],
        "iteration",
        {
            "--samples": {"type": int, "default": 4, "help": "responses per prompt"},
            "--iterations": {"type": int, "default": 3, "help": "timed iterations"},
        },
    )
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    with open(args.prompts) as f:
        prompts: list[list[int]] = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [tokenizer.decode(p) for p in prompts]
    lengths = {len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts}
    iterations = args.warmup + args.iterations
    rollouts = len(prompts) * args.samples
    per_iteration = rollouts // args.minibatch  # optimizer steps in one generation batch
    timer, marks = clock(TrainerCallback, every=per_iteration)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.minibatch,
            gradient_accumulation_steps=1,
            steps_per_generation=per_iteration,
            num_generations=args.samples,
            num_iterations=1,
            max_steps=iterations * per_iteration,
            max_completion_length=args.new_tokens,
            generation_kwargs={"min_new_tokens": args.new_tokens},
            temperature=1.0,
            beta=0.05,
            learning_rate=1e-6,
            **TRAINING,
        )
        trainer = GRPOTrainer(
            model=args.policy,
            reward_funcs=args.reward_model,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": texts * iterations}),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    report(
        "trl-grpo",
        marks,
        iterations,
        args.warmup,
        threads=args.threads,
        rollouts=rollouts,
        prompt_tokens=sorted(lengths),
        new_tokens=args.new_tokens,
    )


if __name__ == "__main__":
    main()
