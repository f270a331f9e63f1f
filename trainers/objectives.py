"""What the learners compute: picklable functions `fn(model, batch)` handed to them by the drivers.

Training objectives return `(loss, metrics)` where the loss is this rank's share of the global
batch's loss and every metric is a share too (the learner group adds them over ranks).
Evaluation functions return one row per example, so the driver can join and trim them.
"""

from __future__ import annotations

from typing import Any

import torch

from trainers.losses import pairwise_accuracy, ranking_loss, sft_loss, token_logprobs


def sft_objective(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = sft_loss(logits, batch["input_ids"], batch["loss_mask"], batch["normalizer"])
    return loss, {"loss": float(loss.detach())}


def sft_eval(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B, 2): each example's summed response NLL and its count of response tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["loss_mask"][:, 1:].float()  # (B, T-1)
    nll = -token_logprobs(logits, batch["input_ids"]) * mask  # (B, T-1)
    return torch.stack([nll.sum(dim=1), mask.sum(dim=1)], dim=1)


def _ranked_scores(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(P, K): the reward of each prompt's ranked responses, from one forward pass of all rows."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    flat = out.logits[:, 0].float()  # (N,): the score at each row's last real token
    return flat[batch["index"]]  # (P, K)


def rm_objective(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    scores = _ranked_scores(model, batch)
    loss = ranking_loss(scores, batch["valid"], batch["normalizer"])
    acc, pairs = pairwise_accuracy(scores.detach(), batch["valid"])
    return loss, {"loss": float(loss.detach()), "pairs_correct": acc * pairs, "pairs": float(pairs)}


def rm_eval(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(P, K): ranked scores, NaN where a prompt has fewer than K responses."""
    scores = _ranked_scores(model, batch)
    return scores.masked_fill(~batch["valid"].bool(), float("nan"))


def rm_score(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B,): the reward of each sequence."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[:, 0].float()
