"""Experience: a chunk of samples joined with its scores, reference log-probs and values.

One sample (a dict; lists are per response token, length A_i):

    prompt_ids      [int]     the prompt, chat template applied
    response_ids    [int]     the sampled response (ends with the end token unless cut)
    logprobs        [float]   log π_old(a_t | s_t) from the engine that sampled it
    version         int       weight version of that engine
    engine          int       rank of that engine
    ref_logprobs    [float]   log π_SFT(a_t | s_t)
    values          [float]   V(s_t), the state before a_t
    score           float     the RM's score (normalised, clipped)
    rewards         [float]   −β·KL_t, plus the score on the last token
    advantages      [float]   GAE(γ, λ), not whitened (the learners whiten over the iteration)
    returns         [float]   advantages + values

`make_experience` runs as a Ray task on refs of the chunk's parts, so the samples go from the
engines to the learners through the object store, never through the driver; it returns the chunk
and a few sums for the driver's figures.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainers.ppo_math import gae, kl_estimate, normalize_scores, token_rewards


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([list(r) + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32)


def make_experience(
    samples: list[dict[str, Any]],
    scores: list[float],
    ref_logprobs: list[list[float]],
    *parts: list[list[float]],
    beta: float,
    estimator: str,
    gamma: float,
    lam: float,
    reward_clip: float | None,
    reward_scale: float = 1.0,
    policy_parts: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """parts: the critic ranks' values of their contiguous shares, in rank order, then (the
    last `policy_parts`) the policy ranks' log-probs of theirs (ppo.old_logprobs=learner).
    Scores are divided by `reward_scale`, then clipped to ±reward_clip."""
    value_parts = parts[: len(parts) - policy_parts]
    values = [v for part in value_parts for v in part]
    learner_lp = [lp for part in parts[len(value_parts) :] for lp in part] or None
    width = max(len(s["response_ids"]) for s in samples)
    mask = _pad([[1.0] * len(s["response_ids"]) for s in samples], width)  # (B, A)
    logp = _pad([s["logprobs"] for s in samples], width)
    ref = _pad(ref_logprobs, width)
    vals = _pad(values, width)
    raw = torch.tensor(scores, dtype=torch.float32)  # (B,)
    score = normalize_scores(raw, reward_scale, reward_clip)
    kl = kl_estimate(logp, ref, estimator) * mask  # (B, A)
    rewards = token_rewards(score, kl, mask, beta)
    advantages, returns = gae(rewards, vals, mask, gamma, lam)
    # A sample with a non-finite score, log-prob, value or advantage is left out of the figures
    # (and of the whitening); the learners skip the updates whose minibatch holds it.
    finite = (
        torch.isfinite(raw)
        & torch.isfinite(advantages * mask).all(dim=1)
        & torch.isfinite(returns * mask).all(dim=1)
    )
    bad = ~finite
    mask_ok = mask * finite[:, None]
    out = []
    for i, s in enumerate(samples):
        n = len(s["response_ids"])
        out.append(
            {
                **s,
                "ref_logprobs": ref_logprobs[i],
                "values": values[i],
                "score": float(score[i]),
                "rewards": rewards[i, :n].tolist(),
                "advantages": advantages[i, :n].tolist(),
                "returns": returns[i, :n].tolist(),
            }
        )
        if learner_lp is not None:
            out[-1]["learner_logprobs"] = learner_lp[i]

    def zero_bad(t: torch.Tensor) -> torch.Tensor:
        return torch.where(bad[:, None] if t.dim() == 2 else bad, torch.zeros_like(t), t)

    adv_ok, ret_ok = zero_bad(advantages) * mask_ok, zero_bad(returns) * mask_ok
    raw_ok = zero_bad(raw)
    k1 = zero_bad((logp - ref) * mask).sum(dim=1)  # (B,) KL of each sequence, nats
    residual = (ret_ok - zero_bad(vals) * mask_ok) * mask_ok
    stats = {
        "samples": float(finite.sum()),
        "nonfinite_samples": float(bad.sum()),
        "tokens": float(mask_ok.sum()),
        "score_sum": float(raw_ok.sum()),
        "score_sq_sum": float((raw_ok.double() ** 2).sum()),
        "kl_sum": float(k1.sum()),
        "finished": float(
            sum(bool(s["finished"]) for s, f in zip(samples, finite, strict=True) if f)
        ),
        "adv_sum": float(adv_ok.sum()),
        "adv_sq_sum": float((adv_ok**2).sum()),
        "ret_sum": float(ret_ok.sum()),
        "ret_sq_sum": float((ret_ok**2).sum()),
        "res_sum": float(residual.sum()),
        "res_sq_sum": float((residual**2).sum()),
        "version_min": float(min(s["version"] for s in samples)),
        "by_engine": {
            str(e): float(sum(s["engine"] == e for s in samples))
            for e in sorted({s["engine"] for s in samples})
        },
    }
    if learner_lp is not None:
        # how far the engine's sampling distribution is from the learner's: k3 of the engine's
        # against the learner's, summed over tokens
        k3 = kl_estimate(logp, _pad(learner_lp, width), "k3") * mask
        stats["behavior_kl_sum"] = float(zero_bad(k3).sum())
    return out, stats


def summarize(stats: list[dict[str, Any]]) -> dict[str, float]:
    """An iteration's figures from its chunks' sums (`rollout/samples_engine_R`: how many samples
    engine R generated)."""
    total = {k: sum(s[k] for s in stats) for k in stats[0] if k not in ("version_min", "by_engine")}
    by_engine: dict[str, float] = {}
    for s in stats:
        for engine, count in s["by_engine"].items():
            by_engine[engine] = by_engine.get(engine, 0.0) + count
    # n is 0 when no sample of the iteration is finite: its figures are then NaN
    n, tokens = total["samples"] or math.nan, total["tokens"] or math.nan

    def var(s: float, sq: float) -> float:
        mean = s / tokens
        return max(sq / tokens - mean**2, 0.0) if tokens == tokens else math.nan

    adv_mean = total["adv_sum"] / tokens
    ret_var = var(total["ret_sum"], total["ret_sq_sum"])
    return {
        "score": total["score_sum"] / n,
        "kl": total["kl_sum"] / n,
        "response_length": tokens / n,
        "finished_share": total["finished"] / n,
        "advantage_mean": adv_mean,
        "advantage_std": var(total["adv_sum"], total["adv_sq_sum"]) ** 0.5,
        "return_mean": total["ret_sum"] / tokens,
        "return_std": ret_var**0.5,
        "explained_variance": 1.0 - var(total["res_sum"], total["res_sq_sum"]) / ret_var
        if ret_var > 0
        else math.nan,
        "tokens": tokens,
        "nonfinite_samples": total["nonfinite_samples"],
        "oldest_version": min(s["version_min"] for s in stats),
        **(
            {"behavior_kl": total["behavior_kl_sum"] / tokens} if "behavior_kl_sum" in total else {}
        ),
        **{f"rollout/samples_engine_{e}": c for e, c in sorted(by_engine.items())},
    }
