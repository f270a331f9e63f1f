"""PPO's math against plain references: loops over Python floats, closed forms, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.losses import token_logprobs
from trainers.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    behavior_weights,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    policy_loss,
    response_slice,
    token_rewards,
    value_loss,
)

pytestmark = pytest.mark.unit


def _ragged(seed: int, lengths: list[int]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    a = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (a - n) for n in lengths])
    return (
        torch.randn(len(lengths), a, generator=g),
        torch.randn(len(lengths), a, generator=g),
        mask,
    )


def _gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float):
    n = len(rewards)
    adv = [0.0] * n
    for t in range(n):  # the textbook sum, not the recursion
        total = 0.0
        for k in range(t, n):
            v_next = values[k + 1] if k + 1 < n else 0.0
            delta = rewards[k] + gamma * v_next - values[k]
            total += (gamma * lam) ** (k - t) * delta
        adv[t] = total
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


def test_gae_matches_the_sum_of_discounted_td_errors() -> None:
    lengths = [5, 2, 4, 1]
    rewards, values, mask = _ragged(0, lengths)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.9)
    for i, n in enumerate(lengths):
        ref_adv, ref_ret = _gae_reference(
            rewards[i, :n].tolist(), values[i, :n].tolist(), 0.99, 0.9
        )
        assert adv[i, :n].tolist() == pytest.approx(ref_adv, abs=1e-5)
        assert ret[i, :n].tolist() == pytest.approx(ref_ret, abs=1e-5)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 2.0 - 0.15], [-1.25, 0.0, 0.0]]))


def test_kl_estimators_agree_with_the_exact_kl_on_samples() -> None:
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(exact, rel=0.03)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(exact, rel=0.03)
    assert (kl_estimate(logp, logq, "k3") >= 0).all()
    k2 = kl_estimate(logp, logq, "k2")
    assert k2.tolist()[:5] == pytest.approx(
        [0.5 * (a - b) ** 2 for a, b in zip(logp.tolist()[:5], logq.tolist()[:5], strict=True)]
    )
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, logq, "k4")


def test_policy_loss_matches_a_per_token_loop() -> None:
    logp, old, mask = _ragged(1, [4, 3, 1])
    old = logp + 0.3 * old  # ratios around 1
    adv = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))
    loss, m = policy_loss(logp, old, adv, mask, clip=0.2)
    total, n, clipped, kl = 0.0, 0, 0, 0.0
    for i in range(3):
        for t in range(4):
            if mask[i, t]:
                r = math.exp(logp[i, t] - old[i, t])
                a = adv[i, t].item()
                plain, cut = -a * r, -a * min(max(r, 0.8), 1.2)
                total += max(plain, cut)
                clipped += cut > plain
                kl += (r - 1) - math.log(r)
                n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    assert m.clipfrac == pytest.approx(clipped / n)
    assert m.approx_kl == pytest.approx(kl / n, rel=1e-4)


def test_policy_loss_gradient_is_zero_where_clipped_and_favourable() -> None:
    logp = torch.tensor([[0.5]], requires_grad=True)  # ratio e^0.5 ≈ 1.65 > 1.2
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip=0.2)
    loss.backward()
    assert logp.grad.item() == 0.0


def test_decoupled_policy_loss_weights_each_token_by_its_capped_behavior_ratio() -> None:
    """ppo.old_logprobs=learner: the clip is around π_old, and each token's term (and gradient)
    is scaled by min(π_old / π_behavior, cap); with π_behavior = π_old it is plain PPO."""
    logp, old, mask = _ragged(3, [4, 2, 3])
    old = logp.detach() + 0.3 * old
    behavior = old + torch.tensor([[0.1, -0.2, 0.0, -3.0], [0.0, 0.3, 0.0, 0.0], [-0.1] * 4])
    adv = torch.randn(logp.shape, generator=torch.Generator().manual_seed(4))
    w = behavior_weights(old, behavior, cap=5.0)
    assert w[0, 3].item() == 5.0  # e^3 is capped
    assert w[1, 1].item() == pytest.approx(math.exp(-0.3))
    same = behavior_weights(old, old, cap=5.0)
    assert torch.equal(same, torch.ones_like(old))
    plain, _ = policy_loss(logp, old, adv, mask, clip=0.2)
    assert policy_loss(logp, old, adv, mask, clip=0.2, weights=same)[0].item() == plain.item()

    per_token = []
    for weights in (None, w):
        lp = logp.clone().requires_grad_(True)
        loss, _ = policy_loss(lp, old, adv, mask, clip=0.2, weights=weights)
        loss.backward()
        per_token.append(lp.grad)
    assert torch.allclose(per_token[1], per_token[0] * w, atol=1e-7)
    assert not w.requires_grad


def test_value_loss_matches_a_loop_and_clips() -> None:
    values, returns, mask = _ragged(3, [3, 2])
    old = values + 0.5
    loss, _ = value_loss(values, old, returns, mask, clip=0.2)
    total, n = 0.0, 0
    for i in range(2):
        for t in range(3):
            if mask[i, t]:
                v, o, r = values[i, t].item(), old[i, t].item(), returns[i, t].item()
                vc = o + min(max(v - o, -0.2), 0.2)
                total += 0.5 * max((v - r) ** 2, (vc - r) ** 2)
                n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    unclipped, frac = value_loss(values, old, returns, mask, clip=None)
    assert frac == 0.0
    assert unclipped.item() == pytest.approx(
        0.5 * float(((values - returns) ** 2 * mask).sum()) / n, rel=1e-5
    )


def test_logprobs_and_values_line_up_with_the_token_they_score() -> None:
    # A hand-built sequence: prompt [5, 3, 7], response [0, 1]. A "model" whose output at
    # position p is a delta on token (ids[p] + 1) % 8 and whose value at p is 10·p: it predicts
    # both response tokens (log-prob 0) and neither of the prompt's later tokens.
    ids = torch.tensor([[5, 3, 7, 0, 1]])
    # Response = tokens at positions 3 and 4 (0 then 1). Position 2 holds 7: predicts (7+1)%8 = 0.
    # Position 3 holds 0: predicts 1. So both response tokens are predicted with log-prob 0.
    logits = torch.full((1, 5, 8), -1e4)
    for p in range(5):
        logits[0, p, (ids[0, p] + 1) % 8] = 0.0
    values = 10.0 * torch.arange(5.0).unsqueeze(0)  # (1, T)
    prompt_len, response_len = 3, 2
    logits_slice = response_slice(prompt_len, response_len)
    lp = token_logprobs(logits, ids)[:, prompt_len - 1 : prompt_len - 1 + response_len]
    torch.testing.assert_close(lp, torch.zeros(1, 2), atol=1e-4, rtol=0)
    # the same positions, read straight off the logits
    direct = (
        torch.log_softmax(logits[:, logits_slice], -1)
        .gather(-1, ids[:, prompt_len:].unsqueeze(-1))
        .squeeze(-1)
    )
    torch.testing.assert_close(direct, lp)
    # the value of the first response token is the state *before* it: the last prompt position
    assert values[:, logits_slice].tolist() == [[20.0, 30.0]]
    # one position early reads the last prompt token's log-prob instead: far from 0 here
    off_by_one = token_logprobs(logits, ids)[:, prompt_len - 2 : prompt_len - 2 + response_len]
    assert off_by_one[0, 0] < -100


def test_entropy_and_explained_variance() -> None:
    uniform = torch.zeros(2, 3, 4)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(4)))
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0)


def test_kl_controllers() -> None:
    fixed = FixedKLController(0.1)
    assert fixed.update(5.0, 64) == 0.1
    adaptive = AdaptiveKLController(0.1, target=1.0, horizon=1000)
    assert adaptive.update(3.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))  # error capped
    assert adaptive.update(0.9, 100) == pytest.approx(0.102 * (1 - 0.1 * 100 / 1000))
    restored = AdaptiveKLController(0.5, target=1.0, horizon=1000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.beta == adaptive.beta


def test_running_moments_match_the_whole_stream() -> None:
    g = torch.Generator().manual_seed(4)
    chunks = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 17, 1, 40)]
    moments = RunningMoments()
    for c in chunks:
        moments.update(c)
    whole = torch.cat(chunks).double()
    assert moments.mean == pytest.approx(float(whole.mean()), rel=1e-9)
    assert moments.std == pytest.approx(float(whole.std()), rel=1e-9)


def test_running_moments_from_sums_match_the_stream() -> None:
    g = torch.Generator().manual_seed(5)
    chunks = [torch.randn(n, generator=g) * 2 - 1 for n in (4, 9, 30)]
    moments = RunningMoments()
    for c in chunks:
        moments.update_from_sums(c.numel(), float(c.sum()), float((c.double() ** 2).sum()))
    whole = torch.cat(chunks).double()
    assert moments.mean == pytest.approx(float(whole.mean()), rel=1e-6)  # float32 sums
    assert moments.std == pytest.approx(float(whole.std()), rel=1e-6)


def test_normalize_scores_scales_then_clips() -> None:
    from trainers.ppo_math import normalize_scores

    out = normalize_scores(torch.tensor([1.0, -4.0, 10.0]), scale=2.0, clip=3.0)
    torch.testing.assert_close(out, torch.tensor([0.5, -2.0, 3.0]))


def test_response_logprobs_skip_the_prompt_positions_and_match_the_full_log_softmax() -> None:
    """The LM head is applied at the response's scoring positions only (transformers'
    logits_to_keep), and the log-probs are the full vocabulary's log-softmax there, at any
    temperature; a model whose forward lacks logits_to_keep gives the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.batching import pack, response_logits, response_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
        )
    ).eval()  # fmt: skip
    samples = [
        {"prompt_ids": [5, 9, 11, 3], "response_ids": [7, 8, 2]},
        {"prompt_ids": [4, 6], "response_ids": [12, 13, 14, 15, 2]},
    ]
    batch = pack(samples, pad_id=0)
    p, a = batch["prompt_width"], batch["response_mask"].shape[1]
    with torch.no_grad():
        full = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        kept = response_logits(model, batch)

        class _Plain(torch.nn.Module):  # a causal LM without logits_to_keep
            def forward(self, input_ids, attention_mask, position_ids):  # type: ignore[no-untyped-def]
                return model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
                )

        plain = response_logits(_Plain(), batch)
    assert kept.shape == (2, a, 96)
    torch.testing.assert_close(kept, full[:, p - 1 : p - 1 + a], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, full[:, p - 1 : p - 1 + a])
    tokens = batch["input_ids"][:, p : p + a]
    for temperature in (1.0, 0.7):
        want = torch.log_softmax(full[:, p - 1 : p - 1 + a] / temperature, -1)
        want = want.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        got = response_logprobs(kept, batch, temperature)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_demonstration_loss_skips_the_prompt_positions_and_matches_the_full_pass() -> None:
    """The SFT loss, its evaluation and PPO-ptx apply the LM head from the first response
    position on (`actors.batching.target_logits`), with the same loss and gradients as the full
    pass over every position; a model without logits_to_keep gives the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.batching import target_logits
    from trainers.encoding import collate_sft
    from trainers.losses import sft_loss
    from trainers.objectives import sft_eval, sft_objective

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
        )
    )  # fmt: skip
    examples = [  # prompts of 6 and 4 tokens, responses of 3 and 5 (right-padded to 9)
        {"input_ids": [5, 9, 11, 3, 17, 21, 7, 8, 2], "loss_mask": [0] * 6 + [1] * 3},
        {"input_ids": [4, 6, 19, 23, 12, 13, 14, 15, 2], "loss_mask": [0] * 4 + [1] * 5},
    ]
    batch = collate_sft(examples, pad_id=0, normalizer=8)
    logits, c = target_logits(model, batch)
    assert c == 3 and logits.shape == (2, 6, 96)  # the first target is row 2's token 4

    class _Plain(torch.nn.Module):  # a causal LM without logits_to_keep
        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            return model(input_ids=input_ids, attention_mask=attention_mask)

    plain, c_plain = target_logits(_Plain(), batch)
    torch.testing.assert_close(plain, logits, atol=1e-5, rtol=1e-5)
    assert c_plain == c

    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = sft_loss(full, batch["input_ids"], batch["loss_mask"], 8)
    (want_grad,) = torch.autograd.grad(want, model.model.embed_tokens.weight)
    got, figures = sft_objective(model, batch)
    assert figures["loss"] == pytest.approx(float(want.detach()))
    (got_grad,) = torch.autograd.grad(got, model.model.embed_tokens.weight)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5)
    # the evaluation's rows: each example's summed NLL and its count of response tokens
    rows = sft_eval(model, batch).detach()
    assert rows[:, 1].tolist() == [3.0, 5.0]
    torch.testing.assert_close(rows[:, 0].sum() / 8, want.detach(), atol=1e-6, rtol=1e-5)
