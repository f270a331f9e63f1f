"""Stage 2, the reward model: ranked comparisons, InstructGPT's pairwise loss, zero-mean scores.

The RM is a sequence classifier with one output, initialised from the SFT model. Each step takes
a batch of prompts with all K of their ranked responses (one forward pass over the K·P rows) and
the loss of all K·(K−1)/2 pairs of a prompt averaged per prompt. After training, the mean score
of the demonstrations is written into the model's config as `reward_offset`: score − offset
puts the demonstrations at 0 on average, as the paper normalised its RM (transformers' score head
has no bias, so the shift lives in config.json; the reward actor applies it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from actors.learner import LearnerGroup, ModelSpec
from cluster.groups import split_evenly
from trainers.common import evaluate, learner_group, optim_spec
from trainers.config import RunConfig
from trainers.data import (
    Limits,
    collate_comparisons,
    collate_sft,
    encode_comparisons,
    encode_demonstrations,
    read,
    require_batch,
    shuffled_batches,
)
from trainers.losses import pairwise_accuracy
from trainers.objectives import rm_eval, rm_objective, rm_score
from trainers.steps import StepHooks, run_steps, stage_checkpoints
from trainers.tracking import Tracker


@dataclass
class RMInputs:
    model: str
    tokenizer: Any
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    heldout_texts: list[dict[str, Any]]
    normalize: list[dict[str, Any]]


def prepare(
    config: RunConfig,
    model: str,
    train: str,
    heldout: str,
    normalize: str,
    tokenizer: Any,
    log: Any = print,
) -> RMInputs:
    limits = Limits.of(config.data)
    enc = partial(encode_comparisons, tokenizer=tokenizer, limits=limits, log=log)
    held_ds = read(heldout, "comparisons", "rm.heldout_data")
    inputs = RMInputs(
        model=model,
        tokenizer=tokenizer,
        train=enc(read(train, "comparisons", "rm.train_data")),
        heldout=enc(held_ds),
        heldout_texts=[],
        normalize=encode_demonstrations(
            read(normalize, "demonstrations", "rm.normalize_data"), tokenizer, limits, log
        ),
    )
    kept = {e["where"] for e in inputs.heldout}
    inputs.heldout_texts = [r for r in held_ds if r["where"] in kept]
    require_batch("rm.batch_size", config.rm.batch_size, inputs.train, "comparisons", train)
    return inputs


def _as_matrix(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged score rows (NaN-padded) -> (P, K_max) scores and validity."""
    k = max(r.shape[0] for r in rows)
    scores = torch.full((len(rows), k), float("nan"))
    for i, r in enumerate(rows):
        scores[i, : r.shape[0]] = r
    valid = ~torch.isnan(scores)
    return scores.nan_to_num(0.0), valid


def heldout_accuracy(group: Any, inputs: RMInputs, batch_size: int) -> float:
    pad = inputs.tokenizer.pad_token_id
    rows = evaluate(
        group,
        rm_eval,
        inputs.heldout,
        partial(collate_comparisons, pad_id=pad, normalizer=1),
        batch_size,
    )
    scores, valid = _as_matrix(rows)
    return pairwise_accuracy(scores, valid)[0]


def labeler_ceiling(inputs: RMInputs, labeler: Any) -> float:
    """How often the noiseless labeler agrees with the held-out labels (the best an RM can do
    against noisy labels), on the same pairs as the RM's accuracy."""
    rows = [
        torch.tensor([labeler(r["prompt"], resp) for resp in r["responses"]])
        for r in inputs.heldout_texts
    ]
    scores, valid = _as_matrix(rows)
    return pairwise_accuracy(scores, valid)[0]


def demonstration_mean(group: Any, inputs: RMInputs, batch_size: int) -> float:
    pad = inputs.tokenizer.pad_token_id
    rows = evaluate(
        group,
        rm_score,
        inputs.normalize,
        partial(collate_sft, pad_id=pad, normalizer=1),
        batch_size,
    )
    return float(torch.stack(rows).mean())


def _postfix(loss: float, heldout_acc: float) -> dict[str, str]:
    """The progress bar's figures: the held-out accuracy only once it has been measured (at the
    end of the first epoch), never a NaN placeholder before it."""
    shown = {"loss": f"{loss:.3f}"}
    if not math.isnan(heldout_acc):
        shown["heldout_acc"] = f"{heldout_acc:.3f}"
    return shown


def train(
    config: RunConfig,
    inputs: RMInputs,
    out: Path,
    tracker: Tracker,
    labeler: Any = None,
    log: Any = print,
    resume: bool = False,
    restart: bool = False,
) -> dict[str, float]:
    """Train the RM on the learner group, set its zero and save `out`; returns the figures. A
    rank that dies brings the group back from the stage's last checkpoint (trainers.steps)."""
    cfg = config.rm
    started = time.perf_counter()
    pad = inputs.tokenizer.pad_token_id
    steps_per_epoch = len(inputs.train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    results: dict[str, float] = {}
    if labeler is not None:
        results["labeler_ceiling"] = labeler_ceiling(inputs, labeler)

    def start_group() -> LearnerGroup:
        learner = config.stage_learner("rm")
        group = learner_group(learner, config.seed, "rm-learner", cfg.batch_size, config.ray, log)
        params = group.build(
            ModelSpec(
                inputs.model,
                kind="reward",
                trust_remote_code=config.trust_remote_code,
                frozen_layers=cfg.frozen_layers,
            ),
            optim_spec(cfg.optim, total),
        )
        log(
            f"rm: {params:,} parameters on {group.ranks} rank(s)"
            + (f" (embeddings and {cfg.frozen_layers} blocks frozen)" if cfg.frozen_layers else "")
            + f"; {len(inputs.train)} comparisons"
            f" ({sum(len(e['sequences']) for e in inputs.train)} responses), {total} steps"
        )
        return group

    def before(group: LearnerGroup, state: dict[str, Any]) -> None:
        state["heldout_acc"] = math.nan  # measured at the end of the first epoch

    def step(group: LearnerGroup, state: dict[str, Any]) -> None:
        epoch, i = divmod(state["step"], steps_per_epoch)
        idx = shuffled_batches(len(inputs.train), cfg.batch_size, config.seed, epoch)[i]
        batch = [inputs.train[j] for j in idx]
        shards = [collate_comparisons(s, pad, len(batch)) for s in split_evenly(batch, group.ranks)]
        metrics = group.train_step(rm_objective, shards)
        train_acc = metrics.pop("pairs_correct") / max(metrics.pop("pairs"), 1.0)
        tracker.log({**{f"rm/{k}": v for k, v in metrics.items()}, "rm/train_accuracy": train_acc})
        state["loss"] = metrics["loss"]

    def epoch_end(group: LearnerGroup, state: dict[str, Any]) -> None:
        state["heldout_acc"] = heldout_accuracy(group, inputs, cfg.batch_size)
        epoch = state["step"] // steps_per_epoch
        tracker.log({"rm/heldout_accuracy": state["heldout_acc"], "rm/epoch": epoch})

    def finish(group: LearnerGroup, state: dict[str, Any]) -> dict[str, float]:
        state["offset"] = offset = demonstration_mean(group, inputs, cfg.batch_size)
        stage_checkpoints(out).save_model(group, out, {"reward_offset": offset})
        return {"memory_gb/learner": group.peak_memory_gb()}

    figures, state = run_steps(
        "rm",
        cfg,
        start_group,
        StepHooks(before, step, epoch_end, finish, lambda s: _postfix(s["loss"], s["heldout_acc"])),
        per_epoch=steps_per_epoch,
        out=out,
        resume=resume,
        restart=restart,
        log=log,
    )
    acc, offset = state["heldout_acc"], state["offset"]
    results.update(
        heldout_accuracy=acc, reward_offset=offset, train_loss=state["loss"], steps=float(total)
    )
    results.update({"seconds": time.perf_counter() - started, **figures})
    ceiling = results.get("labeler_ceiling")
    log(
        f"rm: held-out pairwise accuracy {acc:.4f}"
        + (f" (noiseless labeler's agreement with the labels: {ceiling:.4f})" if ceiling else "")
        + f"; demonstrations' mean raw score {offset:+.4f} is its zero; model in {out}"
    )
    return results
