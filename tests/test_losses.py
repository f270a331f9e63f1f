"""The pure math against plain references written another way (loops, itertools, math)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from trainers.losses import (
    masked_mean,
    masked_whiten,
    pairwise_accuracy,
    ranking_loss,
    sft_loss,
    token_logprobs,
)

pytestmark = pytest.mark.unit


def test_masked_mean_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=g)
    mask = (torch.rand(4, 7, generator=g) > 0.4).float()
    picked = [values[i, j].item() for i in range(4) for j in range(7) if mask[i, j]]
    assert masked_mean(values, mask).item() == pytest.approx(sum(picked) / len(picked), rel=1e-6)
    for i in range(4):
        row = [values[i, j].item() for j in range(7) if mask[i, j]]
        expect = sum(row) / len(row) if row else 0.0
        assert masked_mean(values, mask, dim=1)[i].item() == pytest.approx(expect, abs=1e-6)


def test_masked_whiten_matches_statistics_module() -> None:
    import statistics

    g = torch.Generator().manual_seed(1)
    values = torch.randn(3, 9, generator=g) * 3 + 2
    mask = (torch.rand(3, 9, generator=g) > 0.3).float()
    picked = [values[i, j].item() for i in range(3) for j in range(9) if mask[i, j]]
    mu, sd = statistics.fmean(picked), statistics.stdev(picked)  # Bessel-corrected
    white = masked_whiten(values, mask)
    for i in range(3):
        for j in range(9):
            if mask[i, j]:
                assert white[i, j].item() == pytest.approx(
                    (values[i, j].item() - mu) / sd, abs=1e-5
                )
    kept = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(mu, abs=1e-5)


def test_sft_loss_is_the_mean_nll_of_response_tokens() -> None:
    g = torch.Generator().manual_seed(2)
    b, t, v = 3, 6, 11
    logits = torch.randn(b, t, v, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    # prompt of 2 tokens, then response; row 2 has one padding position at the end
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    total, n = 0.0, 0
    for i in range(b):
        for pos in range(1, t):
            if mask[i, pos]:
                row = logits[i, pos - 1].tolist()  # the token at pos is predicted at pos - 1
                log_z = math.log(sum(math.exp(x) for x in row))
                total += -(row[ids[i, pos]] - log_z)
                n += 1
    assert sft_loss(logits, ids, mask).item() == pytest.approx(total / n, rel=1e-5)
    # with a global normalizer, per-rank shares add up to the whole batch's loss
    shares = sft_loss(logits[:2], ids[:2], mask[:2], n) + sft_loss(logits[2:], ids[2:], mask[2:], n)
    assert shares.item() == pytest.approx(total / n, rel=1e-5)


def test_token_logprobs_line_up_with_the_scored_token() -> None:
    # a "model" that puts all mass on token (previous + 1) mod V
    v = 5
    ids = torch.tensor([[0, 1, 2, 4]])
    logits = torch.full((1, 4, v), -1e4)
    for pos in range(4):
        logits[0, pos, (ids[0, pos] + 1) % v] = 0.0
    lp = token_logprobs(logits, ids)  # (1, 3): tokens 1, 2, 4 given their prefixes
    assert lp.shape == (1, 3)
    assert lp[0, 0].item() == pytest.approx(0.0, abs=1e-4)  # 1 follows 0: predicted
    assert lp[0, 1].item() == pytest.approx(0.0, abs=1e-4)  # 2 follows 1: predicted
    assert lp[0, 2].item() < -100  # 4 does not follow 2


def _ranking_reference(groups: list[list[float]]) -> float:
    per_prompt = []
    for scores in groups:  # best first
        pairs = list(itertools.combinations(range(len(scores)), 2))
        losses = [-math.log(1 / (1 + math.exp(-(scores[w] - scores[lo])))) for w, lo in pairs]
        per_prompt.append(sum(losses) / len(losses))
    return sum(per_prompt) / len(per_prompt)


def _pad(groups: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    k = max(map(len, groups))
    scores = torch.tensor([g + [0.0] * (k - len(g)) for g in groups])
    valid = torch.tensor([[1] * len(g) + [0] * (k - len(g)) for g in groups], dtype=torch.bool)
    return scores, valid


def test_ranking_loss_averages_all_pairs_per_prompt() -> None:
    groups = [[1.5, 0.2, -0.3, -2.0], [0.1, 0.4], [2.0, -1.0, 0.5, 0.0, 0.3, -0.2]]
    scores, valid = _pad(groups)
    assert ranking_loss(scores, valid).item() == pytest.approx(_ranking_reference(groups), rel=1e-6)
    # padding slots do not count, whatever they hold
    scores_junk = scores.clone()
    scores_junk[~valid] = 99.0
    assert ranking_loss(scores_junk, valid).item() == pytest.approx(
        _ranking_reference(groups), rel=1e-6
    )
    # shares with a global normalizer add up
    a = ranking_loss(scores[:2], valid[:2], 3) + ranking_loss(scores[2:], valid[2:], 3)
    assert a.item() == pytest.approx(_ranking_reference(groups), rel=1e-6)


def test_ranking_loss_gradient_pushes_the_better_response_up() -> None:
    scores = torch.zeros(1, 3, requires_grad=True)
    ranking_loss(scores, torch.ones(1, 3, dtype=torch.bool)).backward()
    grad = scores.grad[0]
    assert grad[0] < 0 < grad[2]  # descent raises the best and lowers the worst


def test_pairwise_accuracy_counts_pairs() -> None:
    groups = [[3.0, 1.0, 2.0], [0.0, 0.0]]
    scores, valid = _pad(groups)
    acc, n = pairwise_accuracy(scores, valid)
    # pairs: (3>1 ok) (3>2 ok) (1>2 wrong) (0=0 half) -> 2.5 / 4
    assert n == 4
    assert acc == pytest.approx(2.5 / 4)
