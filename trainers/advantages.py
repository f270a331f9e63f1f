"""Advantage estimators by name: GAE with a critic (PPO), and the critic-free group baselines of
GRPO, RLOO and REINFORCE++. Tensors and plain numbers in, tensors out.

No ray, deepspeed or vllm, no config object (a unit test checks). Shapes as in
trainers.ppo_math: B sequences, A response tokens, right-padded; `mask` (B, A) is 1 on real
response tokens. `group` (B,) is the id of each sample's prompt: the K samples of one prompt
share it, and need not sit next to each other.

Every estimator follows the same three steps (OpenRLHF's structure):
  1. shape the sequence scores with the method's baseline (`shaped_scores`);
  2. per-token rewards: −β·KL on every token plus the shaped score on the last token
     (`token_rewards`; β = 0 when the KL is a loss term instead, see `kl_loss`);
  3. gae: GAE(γ, λ) against the critic's values; the others: discounted returns, which are both
     the advantages and the returns.

Whitening over the batch is the learners' job, not done here. It is usual for gae and
reinforce++ (`USUALLY_WHITENED`: REINFORCE++ has no other baseline), not for grpo and rloo (their
group baseline already centres, and GRPO already scales, each prompt's scores).
"""

from __future__ import annotations

from typing import Protocol

import torch

from trainers.ppo_math import gae, token_rewards

BASELINES = ("none", "grpo", "rloo")


def _group_index(group: torch.Tensor | None, scores: torch.Tensor, method: str) -> torch.Tensor:
    """(B,) dense index 0 .. G−1 of each sample's group."""
    if group is None:
        raise ValueError(f"{method} needs `group`, the prompt id of each sample")
    if group.shape != scores.shape or scores.dim() != 1:
        raise ValueError(
            f"scores and group must both be (B,), got {tuple(scores.shape)} and "
            f"{tuple(group.shape)}"
        )
    inverse: torch.Tensor = torch.unique(group, return_inverse=True)[1]
    return inverse


def shaped_scores(
    scores: torch.Tensor,
    group: torch.Tensor | None,
    method: str,
    *,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """(B,) sequence scores after the method's baseline. scores: (B,) float; group: (B,) ids.

    none  the scores unchanged (gae, reinforce++); `group` is not read.
    grpo  (score − group mean), divided by (the group's unbiased std + eps) when `std_normalize`
          (as TRL and DeepSeekMath); a group of one member gets 0.
    rloo  score − the mean of the *other* members of its group; every group needs at least 2.
    """
    if method == "none":
        return scores
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r} (one of {', '.join(BASELINES)})")
    index = _group_index(group, scores, method)  # (B,)
    n_groups = int(index.max()) + 1 if index.numel() else 0
    counts = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    counts.index_add_(0, index, torch.ones_like(scores))  # (G,)
    # Deviations from a member of the group (its min) rather than raw scores: the same result,
    # but a group of equal scores centres to exactly 0 (sum/K of K equal floats is often off by
    # an ulp, which the division by a ~0 std would blow up to an advantage of ±0.1).
    pivot = torch.zeros_like(counts).scatter_reduce(
        0, index, scores, "amin", include_self=False
    )  # (G,)
    dev = scores - pivot[index]  # (B,)
    dev_sums = torch.zeros_like(counts).index_add_(0, index, dev)  # (G,)
    if method == "rloo":
        if bool((counts < 2).any()):
            raise ValueError(
                "RLOO needs at least 2 samples per prompt (a group has "
                f"{int(counts.min())}); sample more than one response per prompt"
            )
        return dev - (dev_sums[index] - dev) / (counts[index] - 1)  # minus the others' mean
    # grpo
    centred = dev - (dev_sums / counts)[index]  # (B,)
    if std_normalize:
        sq = torch.zeros_like(counts).index_add_(0, index, centred**2)  # (G,)
        std = (sq / (counts - 1).clamp(min=1)).sqrt()  # (G,) unbiased
        centred = centred / (std[index] + eps)
    single = counts[index] < 2  # (B,)
    return torch.where(single, torch.zeros_like(centred), centred)


def zero_signal(scores: torch.Tensor, group: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """(B,) bool: True for the members of a group whose scores are all equal (max − min ≤ tol),
    a group of one included. Such a group gives every member the same (zero) advantage under a
    group baseline: no signal (DAPO's dynamic sampling drops them)."""
    index = _group_index(group, scores, "zero_signal")  # (B,)
    n_groups = int(index.max()) + 1 if index.numel() else 0
    empty = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    high = empty.scatter_reduce(0, index, scores, "amax", include_self=False)  # (G,)
    low = empty.scatter_reduce(0, index, scores, "amin", include_self=False)  # (G,)
    return (high - low)[index] <= tol


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, A) return_t = Σ_{k ≥ t} γ^(k−t) r_k over each row's real tokens; 0 on padding.

    rewards, mask: (B, A), right-padded (rewards on padding are not read).
    """
    mask = mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


class AdvantageEstimator(Protocol):
    """The common signature of the registered estimators: keyword arguments as in
    `estimate_advantages`; returns (advantages, returns), both (B, A), zero on padding."""

    def __call__(
        self,
        *,
        scores: torch.Tensor,
        kl: torch.Tensor,
        mask: torch.Tensor,
        beta: float,
        group: torch.Tensor | None,
        values: torch.Tensor | None,
        gamma: float,
        lam: float,
        std_normalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def gae_advantages(
    *,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    group: torch.Tensor | None,
    values: torch.Tensor | None,
    gamma: float,
    lam: float,
    std_normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO: GAE(γ, λ) on the raw scores against the critic's `values` (B, A)."""
    if values is None:
        raise ValueError("the gae estimator needs the critic's `values` (B, A); got None")
    rewards = token_rewards(shaped_scores(scores, group, "none"), kl, mask, beta)
    return gae(rewards, values, mask, gamma, lam)


def _returns_as_advantages(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    returns = discounted_returns(token_rewards(scores, kl, mask, beta), mask, gamma)
    return returns, returns


def grpo_advantages(
    *,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    group: torch.Tensor | None,
    values: torch.Tensor | None,
    gamma: float,
    lam: float,
    std_normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: scores minus the group mean (over the group std when `std_normalize`); no critic
    (`values`, `lam` are not read)."""
    shaped = shaped_scores(scores, group, "grpo", std_normalize=std_normalize)
    return _returns_as_advantages(shaped, kl, mask, beta, gamma)


def rloo_advantages(
    *,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    group: torch.Tensor | None,
    values: torch.Tensor | None,
    gamma: float,
    lam: float,
    std_normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: scores minus the mean of the other samples of their prompt; no critic."""
    shaped = shaped_scores(scores, group, "rloo")
    return _returns_as_advantages(shaped, kl, mask, beta, gamma)


def reinforce_pp_advantages(
    *,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    group: torch.Tensor | None,
    values: torch.Tensor | None,
    gamma: float,
    lam: float,
    std_normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: the raw scores' discounted returns; the baseline is the learners' batch
    whitening. No critic."""
    return _returns_as_advantages(scores, kl, mask, beta, gamma)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": gae_advantages,
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce++": reinforce_pp_advantages,
}
NEEDS_CRITIC = frozenset({"gae"})
USUALLY_WHITENED = frozenset({"gae", "reinforce++"})


def _check_name(name: str) -> None:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r} (one of {', '.join(ADVANTAGE_ESTIMATORS)})"
        )


def needs_critic(name: str) -> bool:
    """Whether the estimator `name` reads a critic's values (then the critic role exists)."""
    _check_name(name)
    return name in NEEDS_CRITIC


def estimate_advantages(
    name: str,
    *,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    group: torch.Tensor | None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    std_normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, A) and zero on padding, not whitened.

    name: a key of ADVANTAGE_ESTIMATORS. scores: (B,) sequence scores (normalised, clipped);
    kl: (B, A) per-token KL estimate, already masked; mask: (B, A); beta: the KL coefficient in
    the rewards; group: (B,) prompt ids (read by grpo and rloo); values: (B, A) the critic's
    (gae only); lam: gae only; std_normalize: grpo only.
    """
    _check_name(name)
    return ADVANTAGE_ESTIMATORS[name](
        scores=scores,
        kl=kl,
        mask=mask,
        beta=beta,
        group=group,
        values=values,
        gamma=gamma,
        lam=lam,
        std_normalize=std_normalize,
    )
