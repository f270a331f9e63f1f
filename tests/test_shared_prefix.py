"""A batch whose prompts start with the same tokens (a chat template's system prompt) computes
them once (`actors.batching.pack`), and so does a batch whose rows repeat prompts (a group's n
samples of each, GRPO's): the policy's log-probs, the critic's values, the reward and their
gradients are the full pass's over every row."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from actors.batching import (
    MIN_SHARED_TOKENS,
    pack,
    packed_scores,
    prompt_groups,
    response_logits,
    response_logprobs,
    shared_prompt_length,
)
from trainers.objectives import critic_values

pytestmark = pytest.mark.unit

PAD = 0
SYSTEM = list(range(10, 10 + MIN_SHARED_TOKENS + 4))  # 20 tokens every prompt starts with


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, num_labels=1,
    )  # fmt: skip


SAMPLES = [  # prompts of 23, 21 and 25 tokens, responses of 3, 5 and 1
    {"prompt_ids": [*SYSTEM, 40, 41, 42], "response_ids": [7, 8, 2]},
    {"prompt_ids": [*SYSTEM, 43], "response_ids": [12, 13, 14, 15, 2]},
    {"prompt_ids": [*SYSTEM, 44, 45, 46, 47, 48], "response_ids": [9]},
]
A, B = [*SYSTEM, *range(40, 50)], [*SYSTEM, *range(50, 58)]  # prompts of 30 and 28 tokens
GROUPS = [  # 3 samples of A, 2 of B, in the order a batch may hold them
    {"prompt_ids": A, "response_ids": [7, 8, 2]},
    {"prompt_ids": B, "response_ids": [12, 13, 14, 15, 2]},
    {"prompt_ids": A, "response_ids": [9]},
    {"prompt_ids": A, "response_ids": [20, 21, 22, 23]},
    {"prompt_ids": B, "response_ids": [5, 2]},
]
LAYOUTS = pytest.mark.parametrize("samples", [SAMPLES, GROUPS], ids=["system-prompt", "groups"])


def _alone_logprobs(model: torch.nn.Module, temperature: float, samples: list) -> torch.Tensor:
    """(B, A) each row's response log-probs from a pass over that row alone, unpadded."""
    rows = []
    for s in samples:
        p, r = len(s["prompt_ids"]), s["response_ids"]
        logits = model(input_ids=torch.tensor([s["prompt_ids"] + r])).logits[0] / temperature
        logp = torch.log_softmax(logits[p - 1 : p - 1 + len(r)], -1)
        rows.append(logp.gather(-1, torch.tensor(r)[:, None])[:, 0])
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def _alone_values(model: torch.nn.Module, samples: list) -> torch.Tensor:
    """(B, A) each row's values (the state before each response token) from a pass alone."""
    rows = []
    for s in samples:
        p, n = len(s["prompt_ids"]), len(s["response_ids"])
        hidden = model.model(input_ids=torch.tensor([s["prompt_ids"] + s["response_ids"]]))
        rows.append(model.score(hidden.last_hidden_state)[0, p - 1 : p - 1 + n, 0])
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def _grads(value: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    weights = torch.arange(1.0, value.numel() + 1).reshape(value.shape)
    return list(torch.autograd.grad((value * weights).sum(), list(model.parameters())))


def _close_grads(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_the_shared_prefix_is_taken_out_only_where_it_is_long_enough() -> None:
    batch = pack(SAMPLES, PAD)
    assert batch["prefix_ids"].tolist() == [SYSTEM]
    assert batch["prompt_width"] == 5  # the widest prompt's own tokens
    assert batch["response_mask"].sum(dim=1).tolist() == [3, 5, 1]
    # each row's positions continue the prefix's: its first own token is at position 20
    firsts = batch["attention_mask"].argmax(dim=1)
    assert batch["position_ids"][torch.arange(3), firsts].tolist() == [len(SYSTEM)] * 3
    # a prompt keeps its last token; a shorter shared run, one row, or no shared start: no prefix
    assert shared_prompt_length([*SAMPLES, {"prompt_ids": SYSTEM, "response_ids": [3]}]) == 19
    short = [{**s, "prompt_ids": s["prompt_ids"][5:]} for s in SAMPLES]
    assert shared_prompt_length(short) == 0 and "prefix_ids" not in pack(short, PAD)
    assert shared_prompt_length(SAMPLES[:1]) == 0


def test_a_groups_prompt_is_taken_out_once_where_that_saves_more_than_the_system_prompt() -> None:
    batch = pack(GROUPS, PAD)
    assert batch["prefix_ids"].tolist() == [A[:-1], [*B[:-1], PAD, PAD]]
    assert batch["prefix_mask"].sum(dim=1).tolist() == [29, 27]
    assert batch["prefix_owner"].tolist() == [0, 1, 0, 0, 1]
    assert batch["prompt_width"] == 1  # each row keeps its prompt's last token
    assert batch["input_ids"][:, 0].tolist() == [A[-1], B[-1], A[-1], A[-1], B[-1]]
    assert batch["position_ids"][:, 0].tolist() == [29, 27, 29, 29, 27]
    assert batch["response_mask"].sum(dim=1).tolist() == [3, 5, 1, 4, 2]
    # no prompt repeated, prompts too short, or the batch-wide system prompt saves as much: no
    assert prompt_groups(SAMPLES, shared_prompt_length(SAMPLES)) is None
    short = [{**s, "prompt_ids": s["prompt_ids"][-MIN_SHARED_TOKENS:]} for s in GROUPS]
    assert prompt_groups(short, shared_prompt_length(short)) is None
    assert "prefix_ids" not in pack(short, PAD)
    once = [GROUPS[0], GROUPS[1], GROUPS[2]]  # saves 29 tokens; the system prompt, 2 × 20
    assert prompt_groups(once, shared_prompt_length(once)) is None
    assert pack(once, PAD)["prefix_ids"].shape == (1, 20)


@LAYOUTS
def test_the_policy_log_probs_and_gradients_are_the_full_pass(samples: list) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config())
    shared = pack(samples, PAD)
    mask = shared["response_mask"]
    got = response_logprobs(response_logits(model, shared), shared, 0.7) * mask
    want = _alone_logprobs(model, 0.7, samples)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _close_grads(_grads(got, model), _grads(want, model))

    class _NoCache(torch.nn.Module):  # a causal LM whose forward takes no past_key_values
        def forward(self, input_ids, attention_mask, position_ids):  # type: ignore[no-untyped-def]
            return model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            )

    with torch.no_grad():
        fallback = response_logprobs(response_logits(_NoCache(), shared), shared, 0.7) * mask
    torch.testing.assert_close(fallback, want.detach(), rtol=1e-5, atol=1e-5)


@LAYOUTS
def test_the_critic_values_the_reward_and_their_gradients_are_the_full_pass(samples: list) -> None:
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(_config())
    shared = pack(samples, PAD)
    values = critic_values(model, shared) * shared["response_mask"]
    want = _alone_values(model, samples)
    torch.testing.assert_close(values, want, rtol=1e-5, atol=1e-5)
    _close_grads(_grads(values, model), _grads(want, model))
    scores = packed_scores(model, shared)
    alone = torch.stack(  # each row by itself, unpadded, read at its last token
        [model(input_ids=torch.tensor([s["prompt_ids"] + s["response_ids"]])).logits[0, 0]
         for s in samples]
    )  # fmt: skip
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-5)
    _close_grads(_grads(scores, model), _grads(alone, model))


def test_the_demonstration_loss_and_its_gradients_are_the_full_pass() -> None:
    """SFT, its evaluation (the alignment tax) and PPO-ptx read right-padded demonstrations: the
    system prompt they share is computed once there too."""
    from trainers.encoding import collate_sft
    from trainers.objectives import sft_eval, sft_objective

    torch.manual_seed(2)
    model = LlamaForCausalLM(_config())
    examples = [  # demonstrations of 24 and 27 tokens whose first 21 are the same
        {"input_ids": [*SYSTEM, 40, 41, 42, 7, 2], "loss_mask": [0] * 23 + [1] * 2},
        {"input_ids": [*SYSTEM, 43, 12, 13, 14, 15, 16, 2], "loss_mask": [0] * 21 + [1] * 6},
    ]
    batch = collate_sft(examples, pad_id=PAD, normalizer=8)
    loss, _ = sft_objective(model, batch)
    rows = sft_eval(model, batch)
    want = []
    for e in examples:  # each demonstration alone, unpadded
        ids, targets = torch.tensor([e["input_ids"]]), torch.tensor(e["loss_mask"][1:]).bool()
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        want.append(-logp.gather(-1, ids[0, 1:, None])[:, 0][targets].sum())
    torch.testing.assert_close(rows[:, 0], torch.stack(want), rtol=1e-5, atol=1e-5)
    assert rows[:, 1].tolist() == [2, 6]
    want_loss = sum(want) / 8
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    _close_grads(_grads(loss, model), _grads(want_loss, model))
