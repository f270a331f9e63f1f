"""The policy's PPO objective (`trainers.objectives.ppo_objective`) on a small Llama: the
entropy it reports, and the entropy bonus in its gradient only when `ppo.entropy_coef` asks for
it (with a coefficient of 0 the vocabulary-wide backward of the entropy is not run)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainers.objectives import policy_batch, ppo_objective

pytestmark = pytest.mark.unit

TEMPERATURE = 0.7
SAMPLES = [  # prompts of 3, 1 and 5 tokens, responses of 3, 5 and 1
    {"prompt_ids": [40, 41, 42], "response_ids": [7, 8, 2]},
    {"prompt_ids": [43], "response_ids": [12, 13, 14, 15, 2]},
    {"prompt_ids": [44, 45, 46, 47, 48], "response_ids": [9]},
]


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _batch() -> dict:
    samples = [
        {
            **s,
            "logprobs": [-4.0 - 0.1 * i for i in range(len(s["response_ids"]))],
            "advantages": [(-1.0) ** i * (0.5 + i) for i in range(len(s["response_ids"]))],
        }
        for s in SAMPLES
    ]
    step = {"samples": [0, 1, 2], "ptx": []}
    return policy_batch([samples, []], step, 0, 1, pad_id=0, adv_mean=0.0, adv_std=1.0)


def _entropy(model: LlamaForCausalLM) -> torch.Tensor:
    """The token mean of the sampling distribution's entropy over the response tokens, each
    row's pass over that row alone."""
    values = []
    for s in SAMPLES:
        p, r = len(s["prompt_ids"]), s["response_ids"]
        logits = model(input_ids=torch.tensor([s["prompt_ids"] + r])).logits[0] / TEMPERATURE
        logp = torch.log_softmax(logits[p - 1 : p - 1 + len(r)], -1)
        values.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(values).mean()


def _objective(model: LlamaForCausalLM, coef: float) -> tuple[torch.Tensor, dict, list]:
    model.zero_grad(set_to_none=True)
    total, metrics = ppo_objective(
        model, _batch(), clip=0.2, temperature=TEMPERATURE, entropy_coef=coef, ptx_coef=0.0
    )
    total.backward()
    return total.detach(), metrics, [p.grad.clone() for p in model.parameters()]


def test_the_entropy_bonus_is_in_the_gradient_only_with_a_coefficient() -> None:
    model = _model()
    plain, metrics, plain_grads = _objective(model, 0.0)
    expected = float(_entropy(model).detach())
    assert metrics["entropy"] == pytest.approx(expected, rel=1e-5)
    assert float(plain) == pytest.approx(metrics["policy_loss"], rel=1e-6)

    coef = 0.3
    bonus, with_bonus, bonus_grads = _objective(model, coef)
    assert with_bonus["entropy"] == pytest.approx(metrics["entropy"], rel=1e-6)
    assert float(bonus) == pytest.approx(float(plain) - coef * expected, rel=1e-5)
    model.zero_grad(set_to_none=True)
    _entropy(model).backward()
    for p, g0, g1 in zip(model.parameters(), plain_grads, bonus_grads, strict=True):
        # the bonus adds −coef · ∇entropy to the surrogate's gradient, and nothing without it
        torch.testing.assert_close(g1, g0 - coef * p.grad, rtol=1e-4, atol=1e-6)
    assert any(float(p.grad.abs().max()) > 1e-4 for p in model.parameters())
