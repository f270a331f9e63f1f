"""Experience: a chunk of samples joined with its rewards, reference log-probs and values.

One sample (a dict; lists are per response token, length A_i):

    prompt_ids      [int]     the prompt, chat template applied
    response_ids    [int]     the sampled response (ends with the end token unless cut)
    logprobs        [float]   log π_old(a_t | s_t) from the engine that sampled it
    version         int       weight version of that engine
    engine          int       rank of that engine
    ref_logprobs    [float]   log π_SFT(a_t | s_t)
    values          [float]   V(s_t), the state before a_t (0 without a critic)
    score           float     the reward: its sources' weighted sum (normalised, clipped)
    advantages      [float]   the estimator's (ppo.advantage), not whitened (the learners whiten
                              over the iteration when ppo.whiten_advantages says so)
    returns         [float]   GAE: advantages + values; critic-free: the advantages

`make_experience` runs as a Ray task on refs of the chunk's parts, so the samples go from the
engines to the learners through the object store, never through the driver; it returns the chunk
and a few sums for the driver's figures.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainers.advantages import estimate_advantages, zero_signal
from trainers.ppo_math import gae, kl_estimate, normalize_scores, token_rewards


def _pad(rows: list[list[float]], width: int) -> torch.Tensor:
    return torch.tensor([list(r) + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32)


def make_experience(
    samples: list[dict[str, Any]],
    scores: list[float],
    ref_logprobs: list[list[float]],
    *parts: list[Any],
    beta: float,
    estimator: str,
    gamma: float,
    lam: float,
    reward_clip: float | None,
    reward_scale: float = 1.0,
    policy_parts: int = 0,
    extra_scores: int = 0,
    score_weights: tuple[float, ...] = (1.0,),
    value_parts: int | None = None,
    advantage: str = "gae",
    group_size: int = 1,
    group_std: bool = True,
    drop_zero_signal: bool = False,
    drop_nonfinite: bool = False,
    missing_eos_penalty: float = 0.0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """parts, in order: the scores of the reward's other sources (`extra_scores` of them), the
    critic ranks' values of their contiguous shares in rank order (`value_parts`; default: all
    parts left before the policy's; none without a critic), then the policy ranks' log-probs of
    theirs (the last `policy_parts`; ppo.old_logprobs=learner). The reward is the sources' sum
    weighted by `score_weights`, less `missing_eos_penalty` for a response cut at the token
    limit (not `finished`), divided by `reward_scale`, then clipped to ±reward_clip; the
    figures' score is the sources' sum alone.

    A chunk holds whole groups: its samples are its prompts' `group_size` responses, a prompt's
    one after the other. `advantage` names the estimator (trainers.advantages); `beta` is the KL
    coefficient in the reward (0 when the KL is a loss term). The stats' `drop` lists the
    samples to leave out of training: those of zero-signal groups with `drop_zero_signal`, those
    with a non-finite reward with `drop_nonfinite`."""
    sources = [scores, *parts[:extra_scores]]
    parts = parts[extra_scores:]
    n_values = len(parts) - policy_parts if value_parts is None else value_parts
    values = [v for part in parts[:n_values] for v in part]
    learner_lp = [lp for part in parts[n_values:] for lp in part] or None
    if not values:  # no critic: the estimator reads no values
        values = [[0.0] * len(s["response_ids"]) for s in samples]
    width = max(len(s["response_ids"]) for s in samples)
    mask = _pad([[1.0] * len(s["response_ids"]) for s in samples], width)  # (B, A)
    logp = _pad([s["logprobs"] for s in samples], width)
    ref = _pad(ref_logprobs, width)
    vals = _pad(values, width)
    raw = combine_scores(sources, score_weights)  # (B,)
    cut = torch.tensor([0.0 if s["finished"] else 1.0 for s in samples])
    score = normalize_scores(raw - missing_eos_penalty * cut, reward_scale, reward_clip)
    kl = kl_estimate(logp, ref, estimator) * mask  # (B, A)
    group = torch.arange(len(samples)) // group_size  # (B,) the prompt of each sample
    if advantage == "gae":
        advantages, returns = gae(token_rewards(score, kl, mask, beta), vals, mask, gamma, lam)
    else:
        advantages, returns = _group_advantages(
            advantage, score, kl, mask, beta, group, gamma, group_std
        )
    # A sample with a non-finite score, log-prob, value or advantage is left out of the figures
    # (and of the whitening); the learners skip the updates whose minibatch holds it (or it is
    # left out of training, with `drop_nonfinite`).
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
        "size": float(len(samples)),
        **group_stats(raw, finite, mask, group, group_size),
        "drop": _dropped(raw, finite, group, group_size, drop_zero_signal, drop_nonfinite),
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


def weighted_sum(sources: list[list[float]], weights: tuple[float, ...]) -> list[float]:
    """Each sample's reward: its sources' scores weighted and summed in float64 (NaN where any
    source's is); one source of weight 1 is its scores as they are."""
    if len(sources) != len(weights):
        raise ValueError(f"{len(sources)} reward sources but {len(weights)} weights")
    if len(sources) == 1 and weights[0] == 1.0:
        return list(sources[0])
    return [
        sum(w * float(s[i]) for w, s in zip(weights, sources, strict=True))
        for i in range(len(sources[0]))
    ]


def combine_scores(sources: list[list[float]], weights: tuple[float, ...]) -> torch.Tensor:
    """(B,) the reward as the learners' float32: `weighted_sum` of the sources."""
    return torch.tensor(weighted_sum(sources, weights), dtype=torch.float32)


def _group_advantages(
    name: str,
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    group: torch.Tensor,
    gamma: float,
    group_std: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A critic-free estimator over the samples with a finite score and KL (the others get NaN,
    and a group's baseline is taken over its finite members; RLOO leaves out a member that has
    no other)."""
    ok = torch.isfinite(score) & torch.isfinite(kl).all(dim=1)
    if name == "rloo":
        _, inverse, counts = torch.unique(group[ok], return_inverse=True, return_counts=True)
        alone = torch.zeros_like(ok)
        alone[ok] = counts[inverse] < 2
        ok &= ~alone
    advantages = torch.full_like(kl, float("nan"))
    returns = torch.full_like(kl, float("nan"))
    idx = ok.nonzero().squeeze(1)
    if len(idx):
        a, r = estimate_advantages(
            name,
            scores=score[idx],
            kl=kl[idx],
            mask=mask[idx],
            beta=beta,
            group=group[idx],
            gamma=gamma,
            std_normalize=group_std,
        )
        advantages[idx], returns[idx] = a, r
    return advantages, returns


def group_stats(
    raw: torch.Tensor, finite: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, size: int
) -> dict[str, float]:
    """Sums over the chunk's groups (none when a prompt has one response): their count, those
    whose finite scores are all equal (zero signal), and the std of scores and of response
    lengths within each group."""
    if size == 1:
        return {}
    lengths = mask.sum(dim=1)  # (B,)
    stats = {"groups": 0.0, "zero_signal_groups": 0.0, "group_score_std_sum": 0.0}
    stats["group_length_std_sum"] = 0.0
    flat = _zero_signal(raw, finite, group)
    for g in group.unique():
        members = (group == g) & finite
        stats["groups"] += 1.0
        if members.sum() == 0:
            continue
        stats["zero_signal_groups"] += float(bool(flat[members].all()))
        stats["group_score_std_sum"] += float(raw[members].std(unbiased=False))
        stats["group_length_std_sum"] += float(lengths[members].std(unbiased=False))
    return stats


def _zero_signal(raw: torch.Tensor, finite: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(B,) the finite members of groups whose finite scores are all equal."""
    flat = torch.zeros_like(finite)
    if finite.any():
        flat[finite] = zero_signal(raw[finite], group[finite])
    return flat


def _dropped(
    raw: torch.Tensor,
    finite: torch.Tensor,
    group: torch.Tensor,
    size: int,
    zero_signal_groups: bool,
    nonfinite: bool,
) -> list[int]:
    """The chunk's samples to leave out of training."""
    drop = torch.zeros_like(finite)
    if nonfinite:
        drop |= ~finite
    if zero_signal_groups and size > 1:
        drop |= _zero_signal(raw, finite, group)
    return [int(i) for i in drop.nonzero().squeeze(1)]


def summarize(stats: list[dict[str, Any]]) -> dict[str, float]:
    """An iteration's figures from its chunks' sums (`rollout/samples_engine_R`: how many samples
    engine R generated)."""
    total = {
        k: sum(s[k] for s in stats)
        for k in stats[0]
        if k not in ("version_min", "by_engine", "drop")
    }
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
        "dropped_samples": float(sum(len(s["drop"]) for s in stats)),
        **(
            {
                "group/score_std": total["group_score_std_sum"] / total["groups"],
                "group/length_std": total["group_length_std_sum"] / total["groups"],
                "group/zero_signal_share": total["zero_signal_groups"] / total["groups"],
            }
            if total.get("groups")
            else {}
        ),
    }
