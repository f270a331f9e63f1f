"""The rollout engine (real vLLM CPU engine in a Ray actor), the frozen scorers and weight sync."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
import torch

from actors.learner import EngineSpec, LearnerGroup, ModelSpec, OptimSpec
from actors.rollout import EngineConfig, RolloutEngine, Sampling
from actors.scorers import ReferencePolicy, RewardModel
from cluster import ActorGroup
from cluster.groups import split_evenly
from trainers.data import Limits, collate_sft, encode_demonstrations, encode_prompt, read
from trainers.objectives import sft_objective

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prompts(small_task: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_task / "base_model")
    rows = read(small_task / "prompts_heldout.jsonl", "prompts")
    return [encode_prompt(tok, r["prompt"]) for r in rows.select(range(6))]


def _rendezvous_files() -> set[Path]:
    """vLLM's file stores at the top of the temporary folder (see actors/rollout.py)."""
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("vllm_dist_*"))


@pytest.fixture(scope="module")
def files_before_the_engine() -> set[Path]:
    return _rendezvous_files()


@pytest.fixture(scope="module")
def engine(ray_cluster, small_task: Path, files_before_the_engine: set[Path]):
    """A compiled engine (rollout.enforce_eager=false; every PPO test runs the default eager
    one): the tests below check that it samples, scores and takes new weights like the
    learner."""
    group = ActorGroup(
        RolloutEngine,
        1,
        name="rollout",
        num_cpus=0.5,
        strategy="SPREAD",
        actor_kwargs={
            "config": EngineConfig(model=str(small_task / "base_model"), enforce_eager=False)
        },
    )
    assert not group.any_dead(timeout_s=600)  # up before the test's leak check looks
    yield group
    group.shutdown()


def test_engine_samples_with_logprobs_that_the_reference_agrees_with(engine, small_task, prompts):
    """At any sampling temperature: the engine reports the log-probs of the distribution it
    sampled from, and the reference (for the KL penalty) gives them at the same temperature."""
    [samples] = engine.call("generate", prompts, Sampling(max_new_tokens=12))
    [cooled] = engine.call("generate", prompts, Sampling(max_new_tokens=12, temperature=0.6))
    assert len(samples) == len(prompts)
    assert all(s["prompt_ids"] == p for s, p in zip(samples, prompts, strict=True))
    assert all(1 <= len(s["response_ids"]) <= 12 for s in samples)
    assert all(len(s["logprobs"]) == len(s["response_ids"]) for s in samples)
    assert {s["version"] for s in samples} == {0}
    with ActorGroup(
        ReferencePolicy,
        1,
        name="reference",
        num_cpus=0.25,
        actor_kwargs={"path": str(small_task / "base_model")},
    ) as reference:
        # the samples travel as one object ref, never through this process again
        [ref_lp] = reference.call("logprobs", ray.put(samples), 1.0)
        [ref_cooled] = reference.call("logprobs", ray.put(cooled), 0.6)
        [ref_cooled_at_1] = reference.call("logprobs", ray.put(cooled), 1.0)
    for s, lp in zip(samples, ref_lp, strict=True):
        assert lp == pytest.approx(s["logprobs"], abs=1e-4)  # same weights, same tokens
    for s, lp in zip(cooled, ref_cooled, strict=True):
        assert lp == pytest.approx(s["logprobs"], abs=1e-4)
    # and the temperature matters: at 1 the same tokens have other log-probs
    gaps = [
        abs(a - b)
        for s, r in zip(cooled, ref_cooled_at_1, strict=True)
        for a, b in zip(s["logprobs"], r, strict=True)
    ]
    assert max(gaps) > 1e-2


def test_an_engine_leaves_no_file_in_the_temporary_folder(engine, files_before_the_engine):
    assert _rendezvous_files() <= files_before_the_engine


def test_an_engine_of_two_threads_runs_them_and_samples_what_one_thread_samples(
    ray_cluster, small_task: Path, prompts: list[list[int]]
) -> None:
    """`rollout.torch_threads`: the engine's matrix products run on that many threads (vLLM
    allows no change once it has started), waiting asleep at the end of a parallel region, with
    the run's environment; the samples are the same to the last digit."""
    from trainers.common import engine_group
    from trainers.config import load_config

    def inside(actor, fn):
        return ray.get(actor.__ray_call__.remote(lambda self: fn()))

    sampled = {}
    for threads in (1, 2):
        config = load_config(
            Path(__file__).parents[1] / "configs" / "tiny.yaml",
            [f"rollout.torch_threads={threads}", "rollout.cpus_per_engine=0.5"],
        )
        with engine_group(config, str(small_task / "base_model"), 12) as engines:
            [actor] = engines.actors
            assert inside(actor, torch.get_num_threads) == threads
            env = inside(actor, lambda: dict(os.environ))
            assert env.get("OMP_WAIT_POLICY") == ("PASSIVE" if threads > 1 else None)
            assert env["GLOO_SOCKET_IFNAME"] == "lo"  # the cluster's own variables stay
            sampling = Sampling(max_new_tokens=12)
            [sampled[threads]] = engines.call("generate", prompts, sampling, reseed=7)
    for one, two in zip(sampled[1], sampled[2], strict=True):
        assert one["response_ids"] == two["response_ids"]
        assert one["logprobs"] == pytest.approx(two["logprobs"], abs=1e-5)


def test_packed_batches_score_like_single_sequences(small_task: Path) -> None:
    """Left-padded prompts with their position ids give each row what it gets alone."""
    reference = ReferencePolicy(0, 1, str(small_task / "base_model"), batch_size=8)
    samples = [
        {"prompt_ids": [3, 4, 5, 6], "response_ids": [7, 8, 2]},
        {"prompt_ids": [9, 10], "response_ids": [11, 2]},
    ]
    together = reference.logprobs(samples, 1.0)
    alone = [reference.logprobs([s], 1.0)[0] for s in samples]
    for a, b in zip(together, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize(
    ("method", "steps", "version", "zero_stage"),
    [("object_store", 3, 1, 2), ("broadcast", 4, 2, 2), ("broadcast", 5, 3, 3)],
)
def test_weights_sent_from_the_learner_are_the_engines_weights(
    engine, small_task, prompts, method: str, steps: int, version: int, zero_stage: int
) -> None:
    """Either sync method leaves the engine with exactly the learner's weights (each run trains
    a different number of steps, so the engine's weights before are not the ones sent); the
    broadcast sends them from the parameters themselves, gathered whole under ZeRO-3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.losses import token_logprobs

    tok = AutoTokenizer.from_pretrained(small_task / "base_model")
    demos = encode_demonstrations(
        read(small_task / "sft_train.jsonl", "demonstrations").select(range(8)), tok, Limits(32, 96)
    )
    spec = EngineSpec(
        zero_stage=zero_stage, backend="gloo", micro_batch=4, collective_timeout_s=120
    )
    with LearnerGroup(name="policy", ranks=2, engine=spec, cpus_per_rank=0.5) as policy:
        policy.build(ModelSpec(str(small_task / "base_model")), OptimSpec(lr=5e-2, total_steps=3))
        tokens = sum(sum(e["loss_mask"][1:]) for e in demos)
        for _ in range(steps):  # move the weights well away from the engine's
            policy.train_step(
                sft_objective, [collate_sft(s, 0, tokens) for s in split_evenly(demos, 2)]
            )
        sequences = [d["input_ids"] for d in demos[:3]]
        [before] = engine.call("sequence_logprobs", sequences)
        # the weights are owned by the policy's rank 0: sent while the group lives, as in PPO
        if method == "broadcast":
            policy.open_weight_group(engine, "gloo", timeout_s=120)
            # small buckets: the weights go in many broadcasts
            sending, receiving = policy.submit_broadcast(engine, version, bucket_bytes=2**16)
            sent = policy.group.get(sending, "broadcast_weights")
            assert engine.get(receiving, "receive_weights") == [version]
            state = policy.state_dict()
            assert sent[0] == sum(v.numel() * v.element_size() for v in state.values())
        else:
            state_ref = policy.publish_weights()
            state = ray.get(state_ref)
            assert engine.call("load_weights", state_ref, version) == [version]
        [after] = engine.call("sequence_logprobs", sequences)
    model = AutoModelForCausalLM.from_pretrained(small_task / "base_model")
    model.load_state_dict(state)
    with torch.no_grad():
        for seq, b, a in zip(sequences, before, after, strict=True):
            expect = token_logprobs(model(torch.tensor([seq])).logits, torch.tensor([seq]))[0]
            assert a == pytest.approx(expect.tolist(), abs=1e-4)
            assert max(abs(x - y) for x, y in zip(b, expect.tolist(), strict=True)) > 1e-2
    [samples] = engine.call("generate", prompts[:2], Sampling(max_new_tokens=4))
    assert {s["version"] for s in samples} == {version}


def test_reward_model_scores_minus_its_offset(small_task: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(small_task / "base_model", num_labels=1)
    rm.config.reward_offset = 0.5
    rm.save_pretrained(tmp_path / "rm")
    reward = RewardModel(0, 1, str(tmp_path / "rm"), batch_size=8)
    eos = rm.config.eos_token_id
    samples = [
        {"prompt_ids": [3, 4, 5, 6], "response_ids": [7, 8, eos]},
        {"prompt_ids": [9, 10], "response_ids": [11, eos]},
        {"prompt_ids": [9, 10], "response_ids": [11, 12]},  # cut at max_new_tokens
    ]
    # read at the end token, as the RM's training responses all end with it: a cut response
    # is scored with the end token after it (the sample itself keeps the tokens sampled)
    scored = [[3, 4, 5, 6, 7, 8, eos], [9, 10, 11, eos], [9, 10, 11, 12, eos]]
    with torch.no_grad():
        alone = [rm(torch.tensor([seq])).logits[0, 0].item() - 0.5 for seq in scored]
    assert reward.score(samples) == pytest.approx(alone, abs=1e-5)
    assert samples[2]["response_ids"] == [11, 12]


def test_a_broadcast_sync_to_an_engine_that_does_not_answer_times_out_naming_it(
    engine, small_task
) -> None:
    import os
    import signal

    from cluster import RemoteCallError

    spec = EngineSpec(zero_stage=2, backend="gloo", micro_batch=4, collective_timeout_s=120)
    with LearnerGroup(name="policy", ranks=1, engine=spec, cpus_per_rank=0.5) as policy:
        policy.build(ModelSpec(str(small_task / "base_model")), OptimSpec(lr=1e-3, total_steps=1))
        policy.open_weight_group(engine, "gloo", timeout_s=5)
        pid = ray.get(engine.actors[0].__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGSTOP)  # the engine hangs: it answers nothing
        try:
            sending, _ = policy.submit_broadcast(engine, 9, bucket_bytes=2**20)
            with pytest.raises(
                RemoteCallError, match=r"rollout rank\(s\) 0 did not answer within 5 s"
            ):
                policy.group.get(sending, "broadcast_weights")
        finally:
            os.kill(pid, signal.SIGCONT)
    # the engine got nothing: its receive gives up on the group's deadline, and it still serves
    assert engine.call("get_version") != [9]
