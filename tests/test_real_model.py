"""The roles on a real pretrained model, SmolLM2-135M-Instruct (`make smollm2`): 30 layers, tied
embeddings, a 49,152-token BPE vocabulary, a ChatML template with a system prompt, pad = eos.

One engine, one reference, one policy rank, few prompts and short responses: a few minutes."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import ray
import torch

from actors.batching import prompt_groups, shared_prompt_length
from actors.learner import EngineSpec, LearnerGroup, ModelSpec, OptimSpec
from actors.rollout import EngineConfig, RolloutEngine, Sampling
from actors.scorers import ReferencePolicy, RewardModel
from cluster import ActorGroup
from tests.real_model import smollm2_folder
from trainers.data import (
    DataError,
    Limits,
    collate_comparisons,
    collate_sft,
    encode_prompt,
    encode_prompts,
)
from trainers.objectives import (
    learner_logprobs,
    policy_batch,
    ppo_objective,
    rm_eval,
    sft_objective,
)

pytestmark = pytest.mark.real_model

PROMPTS = [
    "Write a short review of the new movie.",
    "Write a short review of the local cafe.",
    "Write a short review of the old laptop.",
    "Write a short review of the cheap tent.",
]
TEMPERATURE = 0.8
# fp32, measured here (2026-12-02): the engine's, the learner's and the reference's log-probs of
# the same tokens under the same weights differ by at most 2.4e-5 nats (30 layers, other kernels),
# before and after either weight sync, and from the saved folder in transformers and vLLM
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_folder()


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def test_every_prompt_carries_the_system_prompt_and_limits_count_real_tokens(
    tokenizer, smollm2: Path
) -> None:
    import datasets

    ids = encode_prompt(tokenizer, PROMPTS[0])
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWrite a short review of the new movie.<|im_end|>\n"
                         "<|im_start|>assistant\n")  # fmt: skip
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case the roles must handle
    rows = datasets.Dataset.from_list(
        [{"prompt": p, "where": f"prompts.jsonl:{i + 1}"} for i, p in enumerate(PROMPTS)]
    )
    longest = max(len(encode_prompt(tokenizer, p)) for p in PROMPTS)
    encoded = encode_prompts(rows, tokenizer, Limits(longest, longest + 32))
    assert encoded[0]["prompt_ids"] == ids
    with pytest.raises(DataError) as e:
        encode_prompts(rows, tokenizer, Limits(len(ids) - 1, longest + 32))
    # counted by the real tokenizer, system prompt and all
    assert f"prompts.jsonl:1: prompt has {len(ids)} tokens" in str(e.value)


@pytest.fixture(scope="module")
def engine(ray_cluster, smollm2: Path):
    group = ActorGroup(
        RolloutEngine,
        1,
        name="rollout",
        num_cpus=0.5,
        actor_kwargs={"config": EngineConfig(model=str(smollm2), max_model_len=256)},
    )
    assert not group.any_dead(timeout_s=600)  # up before the test's leak check looks
    yield group
    group.shutdown()


def _max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def _learner_logprobs(policy: LearnerGroup, batch: list[dict], pad_id: int) -> list[list[float]]:
    """The policy rank's log-probs of the samples' responses at the sampling temperature."""
    lp = partial(learner_logprobs, pad_id=pad_id, temperature=TEMPERATURE)
    refs = policy.submit_forward_slice(ray.put(batch), lp)
    return policy.group.get(refs, "forward_slice")[0]


@pytest.mark.integration
def test_engine_learner_and_reference_agree_through_syncs_and_saves(
    engine, smollm2: Path, tokenizer, tmp_path: Path
) -> None:
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    sampling = Sampling(max_new_tokens=12, temperature=TEMPERATURE)
    [samples] = engine.call("generate", prompts, sampling)
    eos = tokenizer.eos_token_id
    for s in samples:  # an ended response ends with its eos; a cut one is marked as cut
        assert s["finished"] == (s["response_ids"][-1] == eos)
        assert s["finished"] or len(s["response_ids"]) == 12
    # a response cut at max_new_tokens: 2 tokens cannot hold a review
    [cut] = engine.call("generate", prompts[:1], Sampling(max_new_tokens=2))
    assert not cut[0]["finished"] and len(cut[0]["response_ids"]) == 2

    reference = ReferencePolicy(0, 1, str(smollm2), batch_size=8)
    spec = EngineSpec(zero_stage=2, backend="gloo", micro_batch=4, collective_timeout_s=300)
    with LearnerGroup(name="policy", ranks=1, engine=spec, cpus_per_rank=0.5) as policy:
        policy.build(ModelSpec(str(smollm2)), OptimSpec(lr=2e-4, total_steps=4))
        learner = partial(_learner_logprobs, policy, pad_id=eos)

        engine_lp = [s["logprobs"] for s in samples]
        gaps = {"reference": _max_gap(reference.logprobs(samples, TEMPERATURE), engine_lp)}
        gaps["learner"] = _max_gap(learner(samples), engine_lp)

        # demonstrations: the sampled responses themselves (any text moves the weights)
        demos = [
            {"input_ids": s["prompt_ids"] + s["response_ids"],
             "loss_mask": [0] * len(s["prompt_ids"]) + [1] * len(s["response_ids"])}
            for s in samples
        ]  # fmt: skip
        tokens = sum(sum(d["loss_mask"][1:]) for d in demos)
        state0 = policy.state_dict()
        # tied embeddings: the LM head is the embedding; it is sent under both names, as
        # vLLM's CPU engine keeps a repacked copy of its LM head that a reload of the
        # embedding alone leaves stale (measured: log-probs then off by up to 1.9 nats)
        assert torch.equal(state0["lm_head.weight"], state0["model.embed_tokens.weight"])
        for version, method in ((1, "broadcast"), (2, "object_store")):
            for _ in range(2):
                policy.train_step(sft_objective, [collate_sft(demos, eos, tokens)])
            if method == "broadcast":
                policy.open_weight_group(engine, "gloo", timeout_s=300)
                sending, receiving = policy.submit_broadcast(engine, version, 2**24)
                policy.group.get(sending, "broadcast_weights")
                assert engine.get(receiving, "receive_weights") == [version]
            else:
                assert engine.call("load_weights", policy.publish_weights(), version) == [version]
            [after] = engine.call("generate", prompts, sampling)
            assert {s["version"] for s in after} == {version}
            gaps[f"learner after {method}"] = _max_gap(
                learner(after), [s["logprobs"] for s in after]
            )
        state = policy.state_dict()
        moved = (state["model.embed_tokens.weight"] - state0["model.embed_tokens.weight"]).abs()
        assert float(moved.max()) > 1e-6  # the tied weight trained, and the engine follows it
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])

        # a checkpoint restores the tied weights exactly
        policy.save_checkpoint(tmp_path / "ckpt")
        policy.train_step(sft_objective, [collate_sft(demos, eos, tokens)])
        policy.load_checkpoint(tmp_path / "ckpt")
        restored = policy.state_dict()
        assert restored.keys() == state.keys()
        assert all(torch.equal(restored[k], state[k]) for k in state)
        final = learner(after)
        policy.save(tmp_path / "saved")

    # the saved folder reloads in transformers, tied, with the learner's log-probs
    saved = ReferencePolicy(0, 1, str(tmp_path / "saved"), batch_size=8)
    head, embedding = saved.model.lm_head.weight, saved.model.model.embed_tokens.weight
    assert head.data_ptr() == embedding.data_ptr()
    assert saved.model.config.tie_word_embeddings
    gaps["saved, transformers"] = _max_gap(saved.logprobs(after, TEMPERATURE), final)
    # and in vLLM
    with ActorGroup(
        RolloutEngine,
        1,
        name="saved",
        num_cpus=0.25,
        actor_kwargs={"config": EngineConfig(model=str(tmp_path / "saved"), max_model_len=256)},
    ) as reloaded:
        sequences = [s["prompt_ids"] + s["response_ids"] for s in after]
        [engine_seq] = reloaded.call("sequence_logprobs", sequences)
    at_1 = saved.logprobs(after, 1.0)
    gaps["saved, vLLM"] = _max_gap(
        [row[len(s["prompt_ids"]) - 1 :] for row, s in zip(engine_seq, after, strict=True)], at_1
    )
    print("largest log-prob gaps:", {k: f"{v:.1e}" for k, v in gaps.items()})
    assert all(g < TOLERANCE for g in gaps.values()), gaps


@pytest.mark.integration
def test_a_groups_prompt_computed_once_through_the_actors(engine, smollm2: Path, tokenizer) -> None:
    """GRPO's batch (n samples of each prompt) through the real roles: the engine samples the
    groups, the reference and the policy's DeepSpeed rank compute each group's prompt once
    (`prompt_groups`) and give the engine's log-probs; a step on a minibatch of whole groups
    (`ppo.group_minibatches`) starts at ratio 1 with the surrogate's loss, and moves the
    weights; after it, the grouped pass still gives each row what it gets alone."""
    questions = ["Name three colors of the rainbow.", "What is the capital of France?"]
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    eos = tokenizer.eos_token_id
    reference = ReferencePolicy(0, 1, str(smollm2), batch_size=8)
    spec = EngineSpec(zero_stage=2, backend="gloo", micro_batch=8, collective_timeout_s=300)
    with LearnerGroup(name="policy", ranks=1, engine=spec, cpus_per_rank=0.5) as policy:
        policy.build(ModelSpec(str(smollm2)), OptimSpec(lr=1e-4, total_steps=1))
        learner = partial(_learner_logprobs, policy, pad_id=eos)
        # the module's engine may hold another test's trained weights: it takes these first
        assert engine.call("load_weights", policy.publish_weights(), 10) == [10]
        sampling = Sampling(max_new_tokens=8, temperature=TEMPERATURE, n=4)
        [samples] = engine.call("generate", prompts, sampling)
        assert [s["prompt_ids"] for s in samples] == [p for p in prompts for _ in range(4)]
        grouped = prompt_groups(samples, shared_prompt_length(samples))
        assert grouped is not None and grouped[1] == [0, 0, 0, 0, 1, 1, 1, 1]  # the path tested

        engine_lp = [s["logprobs"] for s in samples]
        gaps = {"reference": _max_gap(reference.logprobs(samples, TEMPERATURE), engine_lp)}
        gaps["learner"] = _max_gap(learner(samples), engine_lp)
        advantages = [1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 1.0, -1.0]  # a group's are centred
        experience = [
            {**s, "advantages": [a] * len(s["response_ids"])}
            for s, a in zip(samples, advantages, strict=True)
        ]
        batch = policy_batch(
            [experience, []], {"samples": list(range(8)), "ptx": []}, 0, 1,
            pad_id=eos, adv_mean=0.0, adv_std=1.0,
        )  # fmt: skip
        assert batch["prefix_ids"].shape[0] == 2  # the learner's minibatch is grouped too
        objective = partial(
            ppo_objective, clip=0.2, temperature=TEMPERATURE, entropy_coef=0.0, ptx_coef=0.0
        )
        before = policy.state_dict()["model.norm.weight"].clone()
        metrics = policy.train_step(objective, [batch])
        after = policy.state_dict()["model.norm.weight"]
        assert metrics["approx_kl"] < 1e-8 and metrics["clipfrac"] == 0.0  # ratio 1
        # at ratio 1 the surrogate is minus the advantages' mean over the tokens
        tokens = [len(s["response_ids"]) for s in samples]
        mean = sum(a * n for a, n in zip(advantages, tokens, strict=True)) / sum(tokens)
        assert metrics["policy_loss"] == pytest.approx(-mean, abs=1e-4)
        assert float((after - before).abs().max()) > 1e-6
        trained = learner(samples)
        alone = [learner([s])[0] for s in samples]
        gaps["learner after a step, grouped vs alone"] = _max_gap(trained, alone)
    print("largest log-prob gaps:", {k: f"{v:.1e}" for k, v in gaps.items()})
    assert all(g < TOLERANCE for g in gaps.values()), gaps


@pytest.mark.integration
def test_reward_model_from_smollm2_loads_quietly_and_applies_its_offset(
    smollm2: Path, tokenizer, tmp_path: Path
) -> None:
    """The RM and the critic start from the tied causal LM with no load report; the reward
    actor subtracts the `reward_offset` that the RM stage writes."""
    import logging

    from actors.models import load_reward_model

    messages: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    catch = Catch()
    logging.getLogger("transformers").addHandler(catch)
    try:
        torch.manual_seed(0)
        rm = load_reward_model(str(smollm2), dtype=torch.float32)
    finally:
        logging.getLogger("transformers").removeHandler(catch)
    assert not [m for m in messages if "LOAD REPORT" in m]
    rm.config.reward_offset = 0.25
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    reward = RewardModel(0, 1, str(tmp_path / "rm"), batch_size=8)
    ids = encode_prompt(tokenizer, PROMPTS[0])
    answer = tokenizer("A fine film.", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    samples = [
        {"prompt_ids": ids, "response_ids": [*answer, eos]},
        {"prompt_ids": ids[2:], "response_ids": answer},  # cut: scored with eos after it
    ]
    with torch.no_grad():
        alone = [
            float(rm.score(rm.model(torch.tensor([seq])).last_hidden_state)[0, -1, 0]) - 0.25
            for seq in ([*ids, *answer, eos], [*ids[2:], *answer, eos])
        ]
    assert reward.score(samples) == pytest.approx(alone, abs=1e-4)

    # the RM stage computes a prompt once for its K responses: a full pass's scores
    other = tokenizer("A dull film, too long.", add_special_tokens=False)["input_ids"]
    ranked = [[*ids, *answer, eos], [*ids, *other, eos], [*ids, *answer[:2], eos]]
    batch = collate_comparisons([{"sequences": ranked}], tokenizer.pad_token_id, normalizer=1)
    assert batch["prefix_mask"].shape[1] >= len(ids)
    with torch.no_grad():
        each = [
            float(rm.score(rm.model(torch.tensor([s])).last_hidden_state)[0, -1, 0]) for s in ranked
        ]
        assert rm_eval(rm, batch)[0].tolist() == pytest.approx(each, abs=1e-4)
