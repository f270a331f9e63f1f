"""The pure math of the recipe: tensors and plain numbers in, tensors out.

Nothing here imports ray, deepspeed or vllm, or reads the config (a unit test checks). Each
function is checked by a unit test against a plain reference written another way.

Conventions: B is the batch, T the sequence length, V the vocabulary, P prompts, K the most
ranked responses of one prompt. Masks are 1 (or True) where a position counts.

Losses that are split over data-parallel ranks take a `normalizer`: the count over the *global*
batch (tokens, or prompts), so that the ranks' sums add up to the same loss as one rank computing
over the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is set."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is set (0 where nothing is set)."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the masked positions (Bessel-corrected when `unbiased`)."""
    mean = masked_mean(values, mask)
    sq = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            return torch.zeros((), dtype=values.dtype)
        sq = sq * n / (n - 1)
    return sq


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(values − mean) / std over the masked positions; the mean is kept when not `shift_mean`.

    Unmasked positions come back unchanged in scale but are not to be read.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t = 1 .. T−1.

    logits: (B, T, V) from a causal LM over input_ids (B, T). Returns (B, T−1): entry [b, t−1]
    is the log-prob of input_ids[b, t] given its prefix, so it lines up with input_ids[:, 1:].
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)


def sft_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Token-level negative log-likelihood of the response tokens.

    logits: (B, T, V); input_ids: (B, T); loss_mask: (B, T), set on the tokens to be predicted
    (the response and its end token, never the prompt or padding). Returns the summed NLL divided
    by `normalizer` (default: the number of masked tokens here).
    """
    nll = -token_logprobs(logits, input_ids)  # (B, T-1)
    target_mask = loss_mask[:, 1:].to(nll.dtype)  # (B, T-1): the token at t is predicted at t-1
    total = masked_sum(nll, target_mask)
    denom = target_mask.sum().clamp(min=1) if normalizer is None else normalizer
    return total / denom


def ranking_loss(
    scores: torch.Tensor, valid: torch.Tensor, normalizer: float | None = None
) -> torch.Tensor:
    """InstructGPT's reward-model loss over ranked responses.

    scores: (P, K), the reward of each prompt's responses, ranked best first; valid: (P, K), set
    for the K_p responses that prompt p has (K_p >= 2, the first K_p slots). For each prompt all
    K_p·(K_p−1)/2 pairs (w ranked above l) contribute −log σ(r_w − r_l); they are averaged per
    prompt (so a prompt is one batch element whatever its K), then summed over prompts and divided
    by `normalizer` (default: P).
    """
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (P, K, K): r_i - r_j
    k = scores.shape[1]
    above = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(diagonal=1)  # i < j
    both = valid.bool().unsqueeze(2) & valid.bool().unsqueeze(1)  # (P, K, K)
    pairs = (above & both).to(scores.dtype)  # (P, K, K): i ranked above j, both present
    per_pair = F.softplus(-diff)  # -log σ(r_i - r_j)
    per_prompt = (per_pair * pairs).sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).clamp(min=1)  # (P,)
    denom = scores.shape[0] if normalizer is None else normalizer
    return per_prompt.sum() / denom


def pairwise_accuracy(scores: torch.Tensor, valid: torch.Tensor) -> tuple[float, int]:
    """Fraction of ranked pairs (w above l) with r_w > r_l (ties count half), and the pair count.

    scores, valid: (P, K) as in `ranking_loss`. Pairs are counted, not averaged per prompt: this is
    the accuracy over all held-out comparisons' pairs.
    """
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # (P, K, K)
    k = scores.shape[1]
    above = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(diagonal=1)
    pairs = above & valid.bool().unsqueeze(2) & valid.bool().unsqueeze(1)
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    n = int(pairs.sum().item())
    return (float((wins * pairs).sum().item()) / max(n, 1), n)
