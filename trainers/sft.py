"""Stage 1, supervised fine-tuning: the causal LM learns the demonstrations' responses."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from actors.learner import ModelSpec
from cluster.groups import split_evenly
from trainers.common import evaluate, learner_group, optim_spec
from trainers.config import RunConfig
from trainers.data import (
    Limits,
    collate_sft,
    encode_demonstrations,
    read,
    require_batch,
    shuffled_batches,
)
from trainers.objectives import sft_eval, sft_objective
from trainers.tracking import Tracker, progress


@dataclass
class SFTInputs:
    model: str
    tokenizer: Any
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]


def prepare(
    config: RunConfig, model: str, train: str, heldout: str, tokenizer: Any, log: Any = print
) -> SFTInputs:
    """Read and encode the demonstrations (every problem is found here, before Ray starts)."""
    enc = partial(
        encode_demonstrations, tokenizer=tokenizer, limits=Limits.of(config.data), log=log
    )
    inputs = SFTInputs(
        model=model,
        tokenizer=tokenizer,
        train=enc(read(train, "demonstrations", "sft.train_data")),
        heldout=enc(read(heldout, "demonstrations", "sft.heldout_data")),
    )
    require_batch("sft.batch_size", config.sft.batch_size, inputs.train, "demonstrations", train)
    return inputs


def demonstration_loss(
    group: Any, examples: list[dict[str, Any]], pad_id: int, batch_size: int
) -> float:
    """The group's model's mean NLL per response token over encoded demonstrations."""
    collate = partial(collate_sft, pad_id=pad_id, normalizer=1)
    rows = evaluate(group, sft_eval, examples, collate, batch_size)
    return sum(float(r[0]) for r in rows) / sum(float(r[1]) for r in rows)


def heldout_loss(group: Any, inputs: SFTInputs, batch_size: int) -> float:
    return demonstration_loss(group, inputs.heldout, inputs.tokenizer.pad_token_id, batch_size)


def train(
    config: RunConfig, inputs: SFTInputs, out: Path, tracker: Tracker, log: Any = print
) -> dict[str, float]:
    """Train on the learner group and save `out` (a Hugging Face folder); returns the figures."""
    cfg = config.sft
    started = time.perf_counter()
    pad = inputs.tokenizer.pad_token_id
    steps_per_epoch = len(inputs.train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    with learner_group(
        config.learner, config.seed, "sft-learner", cfg.batch_size, config.ray, log
    ) as group:
        params = group.build(
            ModelSpec(inputs.model, trust_remote_code=config.trust_remote_code),
            optim_spec(cfg.optim, total),
        )
        log(
            f"sft: {params:,} parameters on {group.ranks} rank(s), "
            f"ZeRO-{config.learner.zero_stage}; {len(inputs.train)} demonstrations, {total} steps"
        )
        untrained = heldout_loss(group, inputs, cfg.batch_size)
        tracker.log({"sft/heldout_loss": untrained, "sft/epoch": 0})
        bar = progress(total, "sft")
        metrics: dict[str, float] = {}
        held = untrained
        for epoch in range(cfg.epochs):
            for idx in shuffled_batches(len(inputs.train), cfg.batch_size, config.seed, epoch):
                batch = [inputs.train[i] for i in idx]
                tokens = sum(sum(e["loss_mask"][1:]) for e in batch)
                shards = [collate_sft(s, pad, tokens) for s in split_evenly(batch, group.ranks)]
                metrics = group.train_step(sft_objective, shards)
                tracker.log({f"sft/{k}": v for k, v in metrics.items()})
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", heldout=f"{held:.3f}")
            held = heldout_loss(group, inputs, cfg.batch_size)
            tracker.log({"sft/heldout_loss": held, "sft/epoch": epoch + 1})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", heldout=f"{held:.3f}")
        bar.close()
        group.save(out)
        memory = group.peak_memory_gb()
    log(f"sft: held-out loss {held:.4f} per token (untrained {untrained:.4f}); model in {out}")
    return {
        "heldout_loss": held,
        "untrained_loss": untrained,
        "train_loss": metrics["loss"],
        "steps": float(total),
        "seconds": time.perf_counter() - started,
        "memory_gb/learner": memory,
    }
