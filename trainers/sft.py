"""Stage 1, supervised fine-tuning: the causal LM learns the demonstrations' responses."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from actors.learner import LearnerGroup, ModelSpec
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
from trainers.steps import StepHooks, run_steps, stage_checkpoints
from trainers.tracking import Tracker


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
    config: RunConfig,
    inputs: SFTInputs,
    out: Path,
    tracker: Tracker,
    log: Any = print,
    resume: bool = False,
    restart: bool = False,
) -> dict[str, float]:
    """Train on the learner group and save `out` (a Hugging Face folder); returns the figures.
    A rank that dies brings the group back from the stage's last checkpoint (trainers.steps)."""
    cfg = config.sft
    started = time.perf_counter()
    pad = inputs.tokenizer.pad_token_id
    steps_per_epoch = len(inputs.train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs

    def start_group() -> LearnerGroup:
        learner = config.stage_learner("sft")
        group = learner_group(learner, config.seed, "sft-learner", cfg.batch_size, config.ray, log)
        params = group.build(
            ModelSpec(inputs.model, trust_remote_code=config.trust_remote_code),
            optim_spec(cfg.optim, total),
        )
        log(
            f"sft: {params:,} parameters on {group.ranks} rank(s), "
            f"ZeRO-{learner.zero_stage}; {len(inputs.train)} demonstrations, {total} steps"
        )
        return group

    def before(group: LearnerGroup, state: dict[str, Any]) -> None:
        state["untrained"] = state["held"] = heldout_loss(group, inputs, cfg.batch_size)
        tracker.log({"sft/heldout_loss": state["untrained"], "sft/epoch": 0})

    def step(group: LearnerGroup, state: dict[str, Any]) -> None:
        epoch, i = divmod(state["step"], steps_per_epoch)
        idx = shuffled_batches(len(inputs.train), cfg.batch_size, config.seed, epoch)[i]
        batch = [inputs.train[j] for j in idx]
        tokens = sum(sum(e["loss_mask"][1:]) for e in batch)
        shards = [collate_sft(s, pad, tokens) for s in split_evenly(batch, group.ranks)]
        metrics = group.train_step(sft_objective, shards)
        state["loss"] = metrics["loss"]
        tracker.log({f"sft/{k}": v for k, v in metrics.items()})

    def epoch_end(group: LearnerGroup, state: dict[str, Any]) -> None:
        state["held"] = heldout_loss(group, inputs, cfg.batch_size)
        tracker.log(
            {"sft/heldout_loss": state["held"], "sft/epoch": state["step"] // steps_per_epoch}
        )

    def postfix(state: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{state['loss']:.3f}", "heldout": f"{state['held']:.3f}"}

    def finish(group: LearnerGroup, state: dict[str, Any]) -> dict[str, float]:
        stage_checkpoints(out).save_model(group, out)
        return {"memory_gb/learner": group.peak_memory_gb()}

    figures, state = run_steps(
        "sft",
        cfg,
        start_group,
        StepHooks(before, step, epoch_end, finish, postfix),
        per_epoch=steps_per_epoch,
        out=out,
        resume=resume,
        restart=restart,
        log=log,
    )
    held, untrained = state["held"], state["untrained"]
    log(f"sft: held-out loss {held:.4f} per token (untrained {untrained:.4f}); model in {out}")
    return {
        "heldout_loss": held,
        "untrained_loss": untrained,
        "train_loss": state["loss"],
        "steps": float(total),
        "seconds": time.perf_counter() - started,
        **figures,
    }
