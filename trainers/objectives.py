"""What the learners compute: picklable functions `fn(model, batch)` handed to them by the drivers.

Training objectives return `(loss, metrics)` where the loss is this rank's share of the global
batch's loss and every metric is a share too (the learner group adds them over ranks).
Evaluation functions return one row per example, so the driver can join and trim them.
"""

from __future__ import annotations

from typing import Any

import torch

from actors.batching import (
    last_token_scores,
    pack,
    packed_states,
    response_logits,
    response_logprobs,
    sample_logprobs,
    shared_prefix_scores,
    target_logits,
    unpack_rows,
)
from cluster.groups import split_evenly
from trainers.data import collate_sft
from trainers.losses import masked_sum, pairwise_accuracy, ranking_loss, sft_loss, token_logprobs
from trainers.ppo_math import (
    behavior_weights,
    entropy_from_logits,
    kl_loss,
    policy_loss,
    value_loss,
)


def demonstration_nll(model: Any, batch: dict[str, Any], normalizer: float) -> torch.Tensor:
    """The summed NLL of a collated batch of demonstrations' response tokens over `normalizer`,
    the LM head applied only from the first response position on."""
    logits, c = target_logits(model, batch)
    return sft_loss(logits, batch["input_ids"][:, c:], batch["loss_mask"][:, c:], normalizer)


def sft_objective(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    loss = demonstration_nll(model, batch, batch["normalizer"])
    return loss, {"loss": float(loss.detach())}


def sft_eval(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B, 2): each example's summed response NLL and its count of response tokens."""
    logits, c = target_logits(model, batch)
    mask = batch["loss_mask"][:, c + 1 :].float()  # (B, T-1-c)
    nll = -token_logprobs(logits, batch["input_ids"][:, c:]) * mask
    return torch.stack([nll.sum(dim=1), mask.sum(dim=1)], dim=1)


def _ranked_scores(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(P, K): the reward of each prompt's ranked responses, from one forward pass of all rows
    (each prompt computed once for its K responses)."""
    flat = shared_prefix_scores(model, batch)  # (N,)
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
    return last_token_scores(model, batch["input_ids"], batch["attention_mask"])


# -- PPO -----------------------------------------------------------------------------------------
#
# The experience of an iteration lives in the object store as chunks (lists of sample dicts, see
# trainers.experience). Each learner rank fetches them, and for each optimizer step cuts its share
# of the minibatch with a `*_batch` function below, then runs a `*_objective` on it.


def _device_batch(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    device = model.device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _padded(rows: list[dict[str, Any]], key: str, width: int) -> torch.Tensor:
    """(B, width) float tensor of each row's per-token list `key`, zero-padded."""
    return torch.tensor(
        [list(r[key]) + [0.0] * (width - len(r[key])) for r in rows], dtype=torch.float32
    )


def critic_values(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """(B, A) values of a packed batch: the critic (a sequence classifier's body and score head)
    read at every position; the value of response token t is at the state before it."""
    hidden = packed_states(model, batch)
    values = getattr(model, "module", model).score(hidden).squeeze(-1).float()  # (B, T)
    p, a = batch["prompt_width"], batch["response_mask"].shape[1]
    return values[:, p - 1 : p - 1 + a]


def learner_logprobs(
    model: Any, samples: list[dict[str, Any]], pad_id: int, temperature: float
) -> list[list[float]]:
    """The policy's per-token log-probs of sampled responses, at the sampling temperature (as
    the engine reports them), for ppo.old_logprobs=learner."""
    if not samples:
        return []
    return sample_logprobs(model, _device_batch(model, pack(samples, pad_id)), temperature)


def sample_values(model: Any, samples: list[dict[str, Any]], pad_id: int) -> list[list[float]]:
    """The critic's per-token values of sampled responses (for the experience)."""
    if not samples:
        return []
    batch = _device_batch(model, pack(samples, pad_id))
    return unpack_rows(critic_values(model, batch), batch)


def _minibatch(data: list[Any], indices: list[int], rank: int, world: int, pad_id: int):
    samples = [s for chunk in data for s in chunk]
    rows = [samples[i] for i in indices]
    mine = split_evenly(rows, world)[rank]
    batch = pack(mine, pad_id)
    batch["tokens"] = float(sum(len(r["response_ids"]) for r in rows))  # the global counts
    batch["sequences"] = float(len(rows))
    return mine, batch


def policy_batch(
    data: list[Any],
    step: dict[str, Any],
    rank: int,
    world: int,
    *,
    pad_id: int,
    adv_mean: float,
    adv_std: float,
    kl_loss: bool = False,
) -> dict[str, Any]:
    """data: the experience chunks, then the ptx demonstrations; step: {"samples": indices,
    "ptx": indices}. With `kl_loss` the batch carries the reference's log-probs."""
    *chunks, ptx_examples = data
    mine, batch = _minibatch(chunks, step["samples"], rank, world, pad_id)
    width = batch["response_mask"].shape[1]
    if "learner_logprobs" in mine[0]:  # ppo.old_logprobs=learner: decoupled PPO
        batch["old_logprobs"] = _padded(mine, "learner_logprobs", width)
        batch["behavior_logprobs"] = _padded(mine, "logprobs", width)
    else:
        batch["old_logprobs"] = _padded(mine, "logprobs", width)
    batch["advantages"] = (_padded(mine, "advantages", width) - adv_mean) / adv_std
    if kl_loss:
        batch["ref_logprobs"] = _padded(mine, "ref_logprobs", width)
    if step["ptx"]:
        rows = [ptx_examples[i] for i in step["ptx"]]
        tokens = sum(sum(e["loss_mask"][1:]) for e in rows)
        ptx = collate_sft(split_evenly(rows, world)[rank], pad_id, tokens)
        batch.update({f"ptx_{k}": v for k, v in ptx.items()})
    return batch


def critic_batch(
    data: list[Any], step: dict[str, Any], rank: int, world: int, *, pad_id: int
) -> dict[str, Any]:
    mine, batch = _minibatch(data, step["samples"], rank, world, pad_id)
    width = batch["response_mask"].shape[1]
    batch["old_values"] = _padded(mine, "values", width)
    batch["returns"] = _padded(mine, "returns", width)
    return batch


def ppo_objective(
    model: Any,
    batch: dict[str, Any],
    *,
    clip: float,
    temperature: float,
    entropy_coef: float,
    ptx_coef: float,
    behavior_weight_cap: float = 5.0,
    clip_high: float | None = None,
    aggregation: str = "token_mean",
    max_new_tokens: int | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (minus an entropy bonus), plus γ · the LM loss on demonstrations
    (PPO-ptx) when the batch carries them, plus `kl_coef` · the k3 KL to the reference when it
    carries the reference's log-probs (the KL as a loss term). When it carries the engine's
    log-probs besides the old ones (ppo.old_logprobs=learner), each token is weighted by their
    capped ratio. Loss and metrics are this rank's shares."""
    scoring = response_logits(model, batch).float()  # (B, A, V)
    if temperature != 1.0:
        scoring = scoring / temperature
    logp = response_logprobs(scoring, batch)  # (B, A)
    mask, n = batch["response_mask"], batch["tokens"]
    weights = None
    if "behavior_logprobs" in batch:
        weights = behavior_weights(
            batch["old_logprobs"], batch["behavior_logprobs"], behavior_weight_cap
        )
    loss, m = policy_loss(
        logp,
        batch["old_logprobs"],
        batch["advantages"],
        mask,
        clip,
        n,
        weights=weights,
        clip_high=clip_high,
        aggregation=aggregation,
        sequences=batch["sequences"],
        constant=max_new_tokens,
    )
    share = float(mask.sum()) / n
    total = loss
    if entropy_coef > 0:
        entropy = masked_sum(entropy_from_logits(scoring), mask) / n
        total = total - entropy_coef * entropy
    else:  # reported only: its backward over the vocabulary would add zeros to the gradients
        with torch.no_grad():
            entropy = masked_sum(entropy_from_logits(scoring.detach()), mask) / n
    metrics = {
        "policy_loss": float(loss.detach()),
        "entropy": float(entropy.detach()),
        "clipfrac": m.clipfrac * share,
        "approx_kl": m.approx_kl * share,
    }
    if weights is not None:
        metrics["behavior_weight"] = float(masked_sum(weights, mask)) / n
    if "ref_logprobs" in batch and kl_coef > 0:
        kl, kl_mean = kl_loss(
            logp,
            batch["ref_logprobs"],
            mask,
            aggregation=aggregation,
            tokens=n,
            sequences=batch["sequences"],
            constant=max_new_tokens,
        )
        total = total + kl_coef * kl
        metrics["kl_loss"] = float(kl.detach())
        metrics["kl_k3"] = kl_mean * share
    if "ptx_input_ids" in batch and ptx_coef > 0:
        demos = {k: batch[f"ptx_{k}"] for k in ("input_ids", "attention_mask", "loss_mask")}
        ptx = demonstration_nll(model, demos, batch["ptx_normalizer"])
        total = total + ptx_coef * ptx
        metrics["ptx_loss"] = float(ptx.detach())
    return total, metrics


def value_objective(
    model: Any, batch: dict[str, Any], *, clip: float | None
) -> tuple[torch.Tensor, dict[str, float]]:
    values = critic_values(model, batch)
    mask, n = batch["response_mask"], batch["tokens"]
    loss, clipfrac = value_loss(values, batch["old_values"], batch["returns"], mask, clip, n)
    share = float(mask.sum()) / n
    return loss, {"value_loss": float(loss.detach()), "value_clipfrac": clipfrac * share}
