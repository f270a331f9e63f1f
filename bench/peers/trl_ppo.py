"""The peer: Hugging Face TRL's PPOTrainer (1.12, the last release that ships it, as
trl.experimental.ppo) on one of our benchmark workloads, timed step by step. It runs in its own
virtual environment (`make peers`: bench/peers/trl-ppo.txt), never in ours, so it imports nothing
of the project but peer_clock.py beside it; bench/ppo_iteration.py starts it and reads the one
JSON line it prints.

    .venv-peers/trl-ppo/bin/python bench/peers/trl_ppo.py --policy DIR --reward-model DIR \
        --prompts prompts.json --new-tokens 64 --minibatch 8 --threads 1

The workload is ours: the same prompts (token ids), exactly --new-tokens new tokens (no stop
token), one PPO epoch over minibatches of --minibatch, fp32, on the CPU; the policy, its reference,
the value model and the RM are the same folders our run loads. A step is one batch: generation,
the reference, value and reward forwards, and the epoch of policy and value updates."""

from __future__ import annotations

import json
import tempfile

from peer_clock import TRAINING, clock, parse, report  # bench/peers/, the script's own folder


def main() -> None:
    args = parse(
        __doc__.split("\n\n")[0],
        "step",
        {"--steps": {"type": int, "default": 3, "help": "timed steps"}},
    )
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    with open(args.prompts) as f:
        prompts: list[list[int]] = json.load(f)
    batch = len(prompts)
    steps = args.warmup + args.steps
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_dict({"input_ids": prompts * steps})

    def load(cls, path):
        return cls.from_pretrained(path, dtype=torch.float32)

    policy = load(AutoModelForCausalLM, args.policy)
    reference = load(AutoModelForCausalLM, args.policy)
    rm = load(AutoModelForSequenceClassification, args.reward_model)
    value = load(AutoModelForSequenceClassification, args.reward_model)
    for model in (rm, value):
        model.config.pad_token_id = tokenizer.pad_token_id

    timer, marks = clock(TrainerCallback)

    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.minibatch,
            gradient_accumulation_steps=batch // args.minibatch,
            num_mini_batches=batch // args.minibatch,
            num_ppo_epochs=1,
            total_episodes=batch * steps,
            response_length=args.new_tokens,
            stop_token=None,  # exactly --new-tokens tokens, as our workload
            temperature=1.0,
            learning_rate=1e-6,
            kl_coef=0.05,
            num_sample_generations=0,
            **TRAINING,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=reference,
            reward_model=rm,
            train_dataset=dataset,
            value_model=value,
            callbacks=[timer],
        )
        trainer.train()
    report(
        "trl-ppo",
        marks,
        steps,
        args.warmup,
        threads=args.threads,
        rollouts=batch,
        new_tokens=args.new_tokens,
    )


if __name__ == "__main__":
    main()
