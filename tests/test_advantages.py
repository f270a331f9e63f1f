"""Critic-free advantages (GRPO, RLOO, REINFORCE++), loss aggregation, DAPO's clip-higher and the
k3 KL loss, against plain references: loops over Python floats, written another way."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from trainers.advantages import (
    ADVANTAGE_ESTIMATORS,
    NEEDS_CRITIC,
    USUALLY_WHITENED,
    discounted_returns,
    estimate_advantages,
    needs_critic,
    shaped_scores,
    zero_signal,
)
from trainers.losses import masked_sum
from trainers.ppo_math import (
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    gae,
    kl_estimate,
    kl_loss,
    policy_loss,
    token_rewards,
)

pytestmark = pytest.mark.unit


def _mask(lengths: list[int]) -> torch.Tensor:
    a = max(lengths)
    return torch.tensor([[1.0] * n + [0.0] * (a - n) for n in lengths])  # (B, A)


def _groups(seed: int, sizes: list[int]) -> torch.Tensor:
    """(B,) prompt ids, `sizes[g]` members of group g, shuffled (not contiguous), ids not 0..G−1."""
    ids = [7 * g + 3 for g, n in enumerate(sizes) for _ in range(n)]
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(ids)[perm]


def _random(seed: int, lengths: list[int]) -> dict[str, torch.Tensor]:
    """Scores (B,), per-token log-probs and values (B, A) for a ragged batch."""
    g = torch.Generator().manual_seed(seed)
    b, a = len(lengths), max(lengths)
    mask = _mask(lengths)
    logp = -torch.rand(b, a, generator=g) * 3
    return {
        "scores": torch.randn(b, generator=g),
        "logp": logp,
        "ref": logp + 0.3 * torch.randn(b, a, generator=g),
        "values": torch.randn(b, a, generator=g),
        "mask": mask,
    }


# -- plain references ----------------------------------------------------------------------------


def _members(group: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, gid in enumerate(group):
        out.setdefault(gid, []).append(i)
    return out


def _grpo_reference(scores: list[float], group: list[int], std: bool, eps: float) -> list[float]:
    out = [0.0] * len(scores)
    for idx in _members(group).values():
        mine = [scores[i] for i in idx]
        if len(mine) < 2:
            continue  # a group of one gets 0
        mean, sd = statistics.fmean(mine), statistics.stdev(mine)  # unbiased
        for i in idx:
            out[i] = (scores[i] - mean) / (sd + eps) if std else scores[i] - mean
    return out


def _rloo_reference(scores: list[float], group: list[int]) -> list[float]:
    out = [0.0] * len(scores)
    for idx in _members(group).values():
        for i in idx:
            others = [scores[j] for j in idx if j != i]
            out[i] = scores[i] - sum(others) / len(others)
    return out


def _returns_reference(rewards: list[float], gamma: float) -> list[float]:
    n = len(rewards)  # the textbook sum, not the recursion
    return [sum(gamma ** (k - t) * rewards[k] for k in range(t, n)) for t in range(n)]


# -- shaped scores -------------------------------------------------------------------------------


def test_no_baseline_returns_the_scores_unchanged() -> None:
    scores = torch.randn(5)
    assert shaped_scores(scores, None, "none") is scores
    with pytest.raises(ValueError, match="grpo"):
        shaped_scores(scores, torch.zeros(5, dtype=torch.long), "mean")


@pytest.mark.parametrize("std", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_grpo_matches_a_loop_over_shuffled_groups(seed: int, std: bool) -> None:
    sizes = [4, 1, 3, 6, 2]  # one group of one member
    group = _groups(seed, sizes)
    scores = torch.randn(len(group), generator=torch.Generator().manual_seed(seed)) * 3 + 1
    got = shaped_scores(scores, group, "grpo", std_normalize=std, eps=1e-6)
    ref = _grpo_reference(scores.tolist(), group.tolist(), std, 1e-6)
    assert got.tolist() == pytest.approx(ref, abs=1e-5)
    single = group == 10  # the id of the group of one
    assert single.sum() == 1 and got[single].item() == 0.0


def test_grpo_of_two_members_is_plus_and_minus_one_over_sqrt_two() -> None:
    got = shaped_scores(torch.tensor([1.0, 3.0]), torch.tensor([5, 5]), "grpo", eps=0.0)
    half_sqrt2 = 1 / math.sqrt(2)  # unbiased std of {1, 3} is √2; deviations ±1
    assert got.tolist() == pytest.approx([-half_sqrt2, half_sqrt2])


@pytest.mark.parametrize("seed", range(4))
def test_rloo_is_the_score_minus_the_mean_of_the_others(seed: int) -> None:
    group = _groups(seed, [4, 2, 3, 5])
    scores = torch.randn(len(group), generator=torch.Generator().manual_seed(seed))
    got = shaped_scores(scores, group, "rloo")
    assert got.tolist() == pytest.approx(_rloo_reference(scores.tolist(), group.tolist()), abs=1e-6)
    # the closed form: K/(K−1) · (score − group mean)
    for gid in group.unique():
        members = group == gid
        k = int(members.sum())
        expected = k / (k - 1) * (scores[members] - scores[members].mean())
        torch.testing.assert_close(got[members], expected)


def test_rloo_refuses_a_prompt_with_one_sample() -> None:
    with pytest.raises(ValueError, match="RLOO needs at least 2 samples per prompt"):
        shaped_scores(torch.randn(3), torch.tensor([0, 0, 1]), "rloo")
    with pytest.raises(ValueError, match="group"):
        shaped_scores(torch.randn(3), None, "rloo")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        shaped_scores(torch.randn(3), torch.tensor([0, 0]), "grpo")


def test_zero_signal_marks_the_groups_whose_scores_are_all_equal() -> None:
    group = torch.tensor([2, 9, 2, 4, 9, 2, 4, 6])
    scores = torch.tensor([1.0, 0.5, 1.0, 0.0, 0.5 + 1e-7, 1.0, 1.0, -3.0])
    got = zero_signal(scores, group)
    # group 2: all 1.0; group 9: equal within tol; group 4: 0 and 1; group 6: one member
    assert got.tolist() == [True, True, True, False, True, True, False, True]
    assert zero_signal(scores, group, tol=0.0).tolist()[1] is False


@pytest.mark.parametrize("k", [3, 6, 7, 16])
@pytest.mark.parametrize("value", [0.1, 0.7, 0.9, 2.2])
def test_a_group_of_equal_scores_gets_exactly_zero(value: float, k: int) -> None:
    """K equal floats need not average to themselves (an ulp off, which GRPO's division by a
    ~0 std would blow up); the group baselines must still give them exactly 0."""
    perm = torch.randperm(k + 2, generator=torch.Generator().manual_seed(k))  # shuffled
    scores = torch.tensor([value] * k + [-1.0, 2.0])[perm]
    ids = torch.tensor([1] * k + [0, 0])[perm]
    for method in ("grpo", "rloo"):
        got = shaped_scores(scores, ids, method)
        assert got[ids == 1].abs().max() == 0.0
        assert got[ids == 0].abs().min() > 0.5


# -- returns and estimators ----------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_match_the_sum(gamma: float) -> None:
    lengths = [5, 1, 3, 6]
    mask = _mask(lengths)
    rewards = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    got = discounted_returns(rewards, mask, gamma)  # rewards on padding are not read
    for i, n in enumerate(lengths):
        ref = _returns_reference(rewards[i, :n].tolist(), gamma)
        assert got[i, :n].tolist() == pytest.approx(ref, abs=1e-5)
        assert got[i, n:].abs().sum() == 0


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_gae_estimator_is_bit_identical_to_the_experience_path(estimator: str) -> None:
    d = _random(1, [6, 2, 4, 1, 5])
    kl = kl_estimate(d["logp"], d["ref"], estimator) * d["mask"]
    # what trainers/experience.py computes
    rewards = token_rewards(d["scores"], kl, d["mask"], 0.05)
    adv, ret = gae(rewards, d["values"], d["mask"], 0.99, 0.95)
    got_adv, got_ret = estimate_advantages(
        "gae",
        scores=d["scores"],
        kl=kl,
        mask=d["mask"],
        beta=0.05,
        group=None,
        values=d["values"],
        gamma=0.99,
        lam=0.95,
    )
    assert torch.equal(got_adv, adv) and torch.equal(got_ret, ret)
    with pytest.raises(ValueError, match="values"):
        estimate_advantages("gae", scores=d["scores"], kl=kl, mask=d["mask"], beta=0.05, group=None)


@pytest.mark.parametrize(("name", "gamma"), [("grpo", 1.0), ("rloo", 0.9), ("reinforce++", 0.95)])
def test_critic_free_estimators_match_a_loop(name: str, gamma: float) -> None:
    lengths = [3, 5, 1, 4, 2, 6, 3, 2]
    d = _random(2, lengths)
    group = _groups(3, [3, 3, 2])
    kl = kl_estimate(d["logp"], d["ref"], "k1") * d["mask"]
    beta = 0.1
    adv, ret = estimate_advantages(
        name, scores=d["scores"], kl=kl, mask=d["mask"], beta=beta, group=group, gamma=gamma
    )
    s, gid = d["scores"].tolist(), group.tolist()
    shaped = {
        "grpo": _grpo_reference(s, gid, True, 1e-6),
        "rloo": _rloo_reference(s, gid),
        "reinforce++": s,
    }[name]
    for i, n in enumerate(lengths):
        rewards = [-beta * k for k in kl[i, :n].tolist()]
        rewards[-1] += shaped[i]
        ref = _returns_reference(rewards, gamma)
        assert adv[i, :n].tolist() == pytest.approx(ref, abs=1e-5)
        assert adv[i, n:].abs().sum() == 0
    assert torch.equal(adv, ret)


def test_grpo_estimator_without_std_and_with_the_kl_as_a_loss() -> None:
    d = _random(4, [2, 3, 4, 2])
    group = torch.tensor([0, 1, 0, 1])
    kl = kl_estimate(d["logp"], d["ref"], "k1") * d["mask"]
    adv, _ = estimate_advantages(
        "grpo",
        scores=d["scores"],
        kl=kl,
        mask=d["mask"],
        beta=0.0,
        group=group,
        std_normalize=False,
    )
    # β = 0, γ = 1: every real token carries its sequence's centred score
    shaped = _grpo_reference(d["scores"].tolist(), group.tolist(), False, 0.0)
    for i, n in enumerate([2, 3, 4, 2]):
        assert adv[i, :n].tolist() == pytest.approx([shaped[i]] * n, abs=1e-6)


def test_the_registry_names_its_estimators_and_which_need_a_critic() -> None:
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce++"}
    assert {"gae"} == NEEDS_CRITIC and needs_critic("gae") and not needs_critic("grpo")
    assert {"gae", "reinforce++"} == USUALLY_WHITENED
    d = _random(0, [2, 2])
    with pytest.raises(ValueError, match="gae, grpo, rloo, reinforce\\+\\+"):
        estimate_advantages(
            "ppo", scores=d["scores"], kl=d["logp"], mask=d["mask"], beta=0.0, group=None
        )
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        needs_critic("vtrace")


# -- aggregation ---------------------------------------------------------------------------------


def _aggregate_reference(
    per_token: list[list[float]],
    lengths: list[int],
    mode: str,
    tokens: float,
    seqs: float,
    c: float,
) -> float:
    rows = [row[:n] for row, n in zip(per_token, lengths, strict=True)]
    if mode == "token_mean":
        return sum(sum(r) for r in rows) / tokens
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows if r) / seqs
    return sum(sum(r) for r in rows) / (seqs * c)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_matches_a_loop_and_splits_over_ranks(mode: str) -> None:
    lengths = [5, 2, 7, 1, 4, 6, 3]
    mask = _mask(lengths)
    per_token = torch.randn(mask.shape, generator=torch.Generator().manual_seed(5))
    tokens, seqs, c = float(sum(lengths)), float(len(lengths)), 8.0
    whole = aggregate(per_token, mask, mode, tokens=tokens, sequences=seqs, constant=c)
    ref = _aggregate_reference(per_token.tolist(), lengths, mode, tokens, seqs, c)
    assert whole.item() == pytest.approx(ref, rel=1e-5)
    # two "ranks" of uneven shares, each trimmed to its own width, with the global counts
    parts = []
    for rows in ([0, 1, 2], [3, 4, 5, 6]):
        width = max(lengths[i] for i in rows)
        parts.append(
            aggregate(
                per_token[rows, :width],
                mask[rows, :width],
                mode,
                tokens=tokens,
                sequences=seqs,
                constant=c,
            )
        )
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), rel=1e-5)


def test_aggregate_refuses_what_it_cannot_divide_by() -> None:
    x, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="constant"):
        aggregate(x, mask, "token_sum_norm", tokens=6.0, sequences=2.0)
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean, token_sum_norm"):
        aggregate(x, mask, "sum", tokens=6.0, sequences=2.0)
    with pytest.raises(ValueError, match="tokens"):
        aggregate(x, mask, "token_mean", tokens=0.0, sequences=2.0)
    # a row without tokens adds nothing to the sequence mean
    mask[1] = 0.0
    got = aggregate(x, mask, "seq_mean_token_mean", tokens=3.0, sequences=2.0)
    assert got.item() == 0.5


# -- policy loss: today's path, aggregation, DAPO's clip-higher -----------------------------------


def _todays_policy_loss(logp, old_logp, advantages, mask, clip, normalizer=None, weights=None):
    """The operations of policy_loss before clip_high and aggregation, literally."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
    return masked_sum(per_token, mask) / denom


@pytest.mark.parametrize("normalizer", [None, 23.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_policy_loss_defaults_are_bit_identical_to_todays(
    normalizer: float | None, weighted: bool
) -> None:
    d = _random(6, [4, 6, 1, 3])
    old = d["logp"] + 0.4 * d["values"]  # ratios around 1, some clipped
    adv = torch.randn(d["logp"].shape, generator=torch.Generator().manual_seed(7))
    w = (
        torch.rand(d["logp"].shape, generator=torch.Generator().manual_seed(8))
        if weighted
        else None
    )
    grads = []
    for kwargs in ({}, {"aggregation": "token_mean", "clip_high": None}):
        lp = d["logp"].clone().requires_grad_(True)
        loss, _ = policy_loss(lp, old, adv, d["mask"], 0.2, normalizer, w, **kwargs)
        loss.backward()
        grads.append((loss.detach(), lp.grad))
    lp = d["logp"].clone().requires_grad_(True)
    today = _todays_policy_loss(lp, old, adv, d["mask"], 0.2, normalizer, w)
    today.backward()
    for loss, grad in grads:
        assert torch.equal(loss, today.detach()) and torch.equal(grad, lp.grad)
    assert POLICY_LOSSES["ppo"] is policy_loss


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_policy_loss_aggregates_its_per_token_terms(mode: str) -> None:
    lengths = [4, 6, 1, 3]
    d = _random(9, lengths)
    old = d["logp"] + 0.4 * d["values"]
    adv = torch.randn(d["logp"].shape, generator=torch.Generator().manual_seed(10))
    loss, _ = policy_loss(
        d["logp"], old, adv, d["mask"], 0.2, 30.0, aggregation=mode, sequences=6.0, constant=8.0
    )
    per_token = [
        [
            max(-a * math.exp(lp - o), -a * min(max(math.exp(lp - o), 0.8), 1.2))
            for lp, o, a in zip(lp_row, o_row, a_row, strict=True)
        ]
        for lp_row, o_row, a_row in zip(d["logp"].tolist(), old.tolist(), adv.tolist(), strict=True)
    ]
    ref = _aggregate_reference(per_token, lengths, mode, 30.0, 6.0, 8.0)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_clip_higher_lets_favourable_tokens_rise_further() -> None:
    # ratios 1.1 (inside both), 1.25 (between 1+clip and 1+clip_high), 1.4 (above both),
    # and 0.7 with a negative advantage (the low side is unchanged)
    ratio = torch.tensor([[1.1, 1.25, 1.4, 0.7]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    grads, fracs = {}, {}
    for high in (None, 0.28):
        lp = ratio.log().clone().requires_grad_(True)
        loss, m = policy_loss(lp, old, adv, mask, 0.2, clip_high=high)
        loss.backward()
        grads[high], fracs[high] = lp.grad[0].tolist(), m.clipfrac
        top = 1.0 + (0.2 if high is None else high)
        rs, advs = ratio[0].tolist(), adv[0].tolist()
        ref = sum(max(-a * r, -a * min(max(r, 0.8), top)) for a, r in zip(advs, rs, strict=True))
        assert loss.item() == pytest.approx(ref / 4, rel=1e-6)
    assert grads[None][1] == 0.0 and grads[0.28][1] == pytest.approx(-1.25 / 4)
    assert grads[None][2] == 0.0 and grads[0.28][2] == 0.0
    assert grads[None][3] == 0.0 and grads[0.28][3] == 0.0
    assert grads[None][0] == grads[0.28][0] == pytest.approx(-1.1 / 4)
    assert fracs[None] == 0.75 and fracs[0.28] == 0.5


# -- KL as a loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_kl_loss_is_the_k3_estimate_aggregated(mode: str) -> None:
    lengths = [3, 5, 2, 4]
    d = _random(11, lengths)
    loss, mean_kl = kl_loss(
        d["logp"], d["ref"], d["mask"], aggregation=mode, tokens=20.0, sequences=5.0, constant=6.0
    )
    k3 = [
        [math.expm1(r - lp) - (r - lp) for lp, r in zip(lp_row, r_row, strict=True)]
        for lp_row, r_row in zip(d["logp"].tolist(), d["ref"].tolist(), strict=True)
    ]
    flat = [v for row, n in zip(k3, lengths, strict=True) for v in row[:n]]
    assert mean_kl == pytest.approx(sum(flat) / len(flat), rel=1e-5)
    ref = _aggregate_reference(k3, lengths, mode, 20.0, 5.0, 6.0)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_kl_loss_gradient_pulls_logp_toward_the_reference() -> None:
    d = _random(12, [4, 2, 3])
    lp = d["logp"].clone().requires_grad_(True)
    loss, _ = kl_loss(lp, d["ref"], d["mask"], tokens=9.0, sequences=3.0)
    loss.backward()
    real = d["mask"].bool()
    # dk3/dlogp = 1 − exp(ref − logp): the sign of logp − ref; nothing on padding
    assert torch.equal(torch.sign(lp.grad[real]), torch.sign((d["logp"] - d["ref"])[real]))
    assert lp.grad[~real].abs().sum() == 0
    moved = lp.detach() - 0.5 * lp.grad  # a step of gradient descent moves logp toward ref
    assert ((moved - d["ref"]).abs()[real] < (d["logp"] - d["ref"]).abs()[real]).all()
    after, _ = kl_loss(moved, d["ref"], d["mask"], tokens=9.0, sequences=3.0)
    assert after.item() < loss.item()
