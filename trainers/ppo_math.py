"""The pure math of PPO for RLHF: tensors and plain numbers in, tensors out.

No ray, deepspeed or vllm, no config object (a unit test checks). Shapes: B sequences, A response
tokens (actions), right-padded; `mask` (B, A) is 1 on real response tokens.

Alignment (the easy off-by-one): for a response token a_t at sequence position p,
  logp[:, t]   = log π(a_t | prompt, a_<t)   -- from the logits at position p − 1
  values[:, t] = V(prompt, a_<t)             -- the critic's output at position p − 1, the state
                                               *before* a_t is chosen
so both come from the same hidden state, the one that chooses a_t. `response_slice` gives
those positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainers.losses import masked_mean, masked_sum, masked_var


def response_slice(prompt_len: int, response_len: int) -> slice:
    """Positions of a causal LM's outputs (logits or values) that score/choose the response
    tokens: position p − 1 for the token at position p."""
    return slice(prompt_len - 1, prompt_len - 1 + response_len)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π (Schulman, "Approximating KL").

    With log r = ref_logp − logp: k1 = −log r (unbiased, can be negative), k2 = (log r)²/2,
    k3 = (r − 1) − log r (unbiased and non-negative).
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2 or k3)")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """(B, A) per-token rewards: −β·KL on every response token, plus the sequence's RM score
    on its last token. scores: (B,); kl, mask: (B, A)."""
    rewards = -beta * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (B,) index of each row's last token
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last] += scores * (mask.sum(dim=1) > 0)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    rewards, values, mask: (B, A). The episode ends after each row's last real token (the value
    after it is 0). Returns (advantages, returns), both (B, A), zero on padding.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


@dataclass(frozen=True)
class PolicyLossMetrics:
    clipfrac: float
    approx_kl: float
    ratio_mean: float


def behavior_weights(
    old_logp: torch.Tensor, behavior_logp: torch.Tensor, cap: float
) -> torch.Tensor:
    """Decoupled PPO's per-token importance weights π_old / π_behavior (no gradient), capped at
    `cap`: the clipped surrogate is taken around π_old (the policy at the update's start) on
    tokens that π_behavior sampled (an engine one weight version behind, or with other
    numerics)."""
    return torch.exp(old_logp - behavior_logp).clamp(max=cap).detach()


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "token_sum_norm")
"""How a per-token loss becomes one number (`aggregate`):

token_mean           every token of the minibatch weighs the same (PPO, DAPO).
seq_mean_token_mean  each sequence's token mean, averaged over sequences (GRPO as published: a
                     long response's tokens weigh less).
token_sum_norm       the token sum over sequences × a constant such as max_new_tokens (Dr. GRPO:
                     no length bias in either direction).
"""


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    tokens: float,
    sequences: float,
    constant: float | None = None,
) -> torch.Tensor:
    """This rank's share of a minibatch's loss, from per-token terms (B, A) and mask (B, A).

    The ranks' gradients are summed, so the divisors are the *global* counts of the minibatch:
    `tokens` its real response tokens and `sequences` its samples, over all ranks; then the
    ranks' results add up to what one rank would compute over the whole minibatch.

      token_mean           Σ masked / tokens
      seq_mean_token_mean  Σ_rows (row's Σ masked / row's token count) / sequences
      token_sum_norm       Σ masked / (sequences · constant)      (constant required)

    A row with no real tokens adds 0.
    """
    if mode == "token_mean":
        _check_positive("tokens", tokens)
        return masked_sum(per_token, mask) / tokens
    if mode == "seq_mean_token_mean":
        _check_positive("sequences", sequences)
        row_sums = masked_sum(per_token, mask, dim=1)  # (B,)
        row_counts = mask.sum(dim=1).clamp(min=1)  # (B,)
        return (row_sums / row_counts).sum() / sequences
    if mode == "token_sum_norm":
        if constant is None:
            raise ValueError("token_sum_norm aggregation needs `constant` (e.g. max_new_tokens)")
        _check_positive("sequences", sequences)
        _check_positive("constant", constant)
        return masked_sum(per_token, mask) / (sequences * constant)
    raise ValueError(f"unknown loss aggregation {mode!r} (one of {', '.join(AGGREGATIONS)})")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"loss aggregation: `{name}` must be > 0, got {value}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    normalizer: float | None = None,
    weights: torch.Tensor | None = None,
    *,
    clip_high: float | None = None,
    aggregation: str = "token_mean",
    sequences: float | None = None,
    constant: float | None = None,
) -> tuple[torch.Tensor, PolicyLossMetrics]:
    """PPO's clipped surrogate, summed over tokens and divided by `normalizer` (default: the
    count of masked tokens here). All (B, A). `weights` (see `behavior_weights`) multiply each
    token's term.

    clip_high: DAPO's asymmetric clip ("clip-higher"): the ratio is clamped to
    [1 − clip, 1 + clip_high] (None: clip_high = clip, the symmetric PPO clip), so tokens with a
    positive advantage can gain more probability before their gradient is cut.

    aggregation: one of AGGREGATIONS (see `aggregate`); "token_mean" is the computation above.
    For the others `normalizer` is the global token count, `sequences` the global sample count
    (default: the rows here) and `constant` the divisor of token_sum_norm.

    approx_kl is k3 of the old policy against the new on the sampled tokens; clipfrac the share
    of tokens where the clipped term was the smaller one.
    """
    high = clip if clip_high is None else clip_high
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    if aggregation == "token_mean":
        denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
        loss = masked_sum(per_token, mask) / denom
    else:
        loss = aggregate(
            per_token,
            mask,
            aggregation,
            tokens=float(mask.sum().clamp(min=1)) if normalizer is None else normalizer,
            sequences=float(mask.shape[0]) if sequences is None else sequences,
            constant=constant,
        )
    with torch.no_grad():
        metrics = PolicyLossMetrics(
            clipfrac=float(masked_mean((clipped > unclipped).float(), mask)),
            approx_kl=float(masked_mean(torch.expm1(log_ratio) - log_ratio, mask)),
            ratio_mean=float(masked_mean(ratio, mask)),
        )
    return loss, metrics


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, PolicyLossMetrics]]] = {
    "ppo": policy_loss,
}
"""Policy losses by name. Each takes (logp, old_logp, advantages, mask, clip, normalizer,
weights, *, clip_high, aggregation, sequences, constant) as `policy_loss` does and returns
(loss, PolicyLossMetrics). "ppo" covers PPO, GRPO, RLOO, REINFORCE++ and DAPO's clip-higher
(the methods differ in their advantages, aggregation and clip, not in the surrogate)."""


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: str = "token_mean",
    tokens: float,
    sequences: float,
    constant: float | None = None,
) -> tuple[torch.Tensor, float]:
    """KL(π ‖ π_ref) as a loss term (GRPO's, used with β = 0 in the rewards): the k3 estimate per
    token, differentiable through `logp`, aggregated like the policy loss (see `aggregate`).

    logp, ref_logp, mask: (B, A). Returns the loss (this rank's share) and the mean k3 over the
    masked tokens here, for the metrics.
    """
    k3 = kl_estimate(logp, ref_logp, "k3")  # (B, A)
    loss = aggregate(k3, mask, aggregation, tokens=tokens, sequences=sequences, constant=constant)
    return loss, float(masked_mean(k3.detach(), mask))


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, float]:
    """½·max((V − R)², (V_clipped − R)²) with V_clipped = old + clamp(V − old, ±clip); summed and
    divided by `normalizer` (default: masked count). Returns the loss and the clipped share."""
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token, clipfrac = unclipped, 0.0
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        clipped = (v_clipped - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipfrac = float(masked_mean((clipped > unclipped).float(), mask))
    denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
    return 0.5 * masked_sum(per_token, mask) / denom, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(…, V) logits -> (…) entropy of the softmax distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over the masked tokens (1 is perfect, ≤ 0 is no better than the
    mean)."""
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


class FixedKLController:
    """β stays where it is set."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): β moves toward the value that keeps KL at `target`.

    e = clip(KL / target − 1, −0.2, 0.2);  β ← β · (1 + e · n_steps / horizon)
    """

    def __init__(self, beta: float, target: float, horizon: float) -> None:
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


class RunningMoments:
    """Running mean and standard deviation of a stream of batches (Chan et al.'s merge), for
    reward normalisation."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, xs: torch.Tensor) -> None:
        n = float(xs.numel())
        if n == 0:
            return
        batch_mean = float(xs.double().mean())
        self.merge(n, batch_mean, float(((xs.double() - batch_mean) ** 2).sum()))

    def update_from_sums(self, n: float, total: float, total_sq: float) -> None:
        """Fold in a batch known only by its count, sum and sum of squares."""
        if n == 0:
            return
        batch_mean = total / n
        self.merge(n, batch_mean, max(total_sq - n * batch_mean**2, 0.0))

    def merge(self, n: float, batch_mean: float, batch_m2: float) -> None:
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def normalize_scores(scores: torch.Tensor, scale: float, clip: float | None) -> torch.Tensor:
    """RM scores divided by `scale` (a running std; not shifted: the RM is already zero-mean on
    the demonstrations), then clipped to ±clip."""
    scores = scores / scale
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores
