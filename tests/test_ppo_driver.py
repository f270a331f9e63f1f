"""The PPO driver's pieces that need no cluster: the prompt stream and the experience join."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.experience import make_experience, summarize
from trainers.ppo_math import gae, token_rewards
from trainers.rl.inputs import PromptStream
from trainers.rl.iteration import NonFiniteError, SkipGuard

pytestmark = pytest.mark.unit


def test_prompt_stream_visits_every_prompt_once_per_pass_and_resumes_exactly() -> None:
    prompts = [{"i": i} for i in range(10)]
    stream = PromptStream(prompts, seed=3)
    first = [p["i"] for p in stream.take(10)]
    assert sorted(first) == list(range(10))
    taken = [p["i"] for p in stream.take(7)]
    restored = PromptStream(prompts, seed=3)
    restored.restore(stream.state())
    assert [p["i"] for p in stream.take(9)] == [p["i"] for p in restored.take(9)]
    assert taken != first[:7]  # a new order each pass


def test_experience_joins_a_chunk_and_its_figures() -> None:
    samples = [
        {
            "prompt_ids": [1, 2],
            "response_ids": [5, 6, 7],
            "logprobs": [-1.0, -0.5, -0.2],
            "finished": True,
            "version": 3,
            "engine": 0,
        },
        {
            "prompt_ids": [1],
            "response_ids": [8],
            "logprobs": [-2.0],
            "finished": False,
            "version": 3,
            "engine": 1,
        },
    ]
    ref = [[-1.5, -0.5, -0.1], [-1.0]]
    values = [[0.1, 0.2, 0.3], [0.5]]
    # the critic's two ranks each return their contiguous share
    chunk, stats = make_experience(
        samples,
        [1.0, -9.0],
        ref,
        values[:1],
        values[1:],
        beta=0.1,
        estimator="k1",
        gamma=1.0,
        lam=0.95,
        reward_clip=5.0,
    )
    assert [s["score"] for s in chunk] == [1.0, -5.0]  # clipped to ±5
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kl = torch.tensor([[0.5, 0.0, -0.1], [-1.0, 0.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, -5.0]), kl, mask, 0.1)
    adv, ret = gae(rewards, torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]]), mask, 1.0, 0.95)
    assert chunk[0]["advantages"] == pytest.approx(adv[0].tolist(), abs=1e-6)
    assert chunk[1]["returns"] == pytest.approx(ret[1, :1].tolist(), abs=1e-6)
    assert chunk[0]["values"] == values[0] and chunk[0]["ref_logprobs"] == ref[0]
    figures = summarize([stats])
    assert figures["score"] == pytest.approx((1.0 - 9.0) / 2)  # logged before clipping
    assert figures["kl"] == pytest.approx((0.5 + 0.0 - 0.1 - 1.0) / 2)
    assert figures["response_length"] == 2.0
    assert figures["finished_share"] == 0.5
    assert figures["oldest_version"] == 3
    assert figures["rollout/samples_engine_0"] == figures["rollout/samples_engine_1"] == 1


def test_experience_carries_the_learners_logprobs_and_their_distance_to_the_engines() -> None:
    """ppo.old_logprobs=learner: the policy ranks' log-probs follow the critic's values as
    parts of their own; each sample keeps them, and the chunk reports the engine-to-learner KL."""
    from trainers.objectives import policy_batch
    from trainers.ppo_math import kl_estimate

    samples = [
        {"prompt_ids": [1, 2], "response_ids": [5, 6], "logprobs": [-1.0, -0.5], "finished": True,
         "version": 1, "engine": 0},
        {"prompt_ids": [3, 4], "response_ids": [7], "logprobs": [-2.0], "finished": False,
         "version": 1, "engine": 0},
    ]  # fmt: skip
    learner = [[-1.25, -0.5], [-1.5]]
    chunk, stats = make_experience(
        samples,
        [1.0, 0.0],
        [[-1.0, -0.5], [-2.0]],
        [[0.0, 0.0], [0.0]],  # the critic's one rank
        learner[:1],  # the policy's two ranks
        learner[1:],
        beta=0.1,
        estimator="k1",
        gamma=1.0,
        lam=0.95,
        reward_clip=5.0,
        policy_parts=2,
    )
    assert [s["learner_logprobs"] for s in chunk] == learner
    assert [s["values"] for s in chunk] == [[0.0, 0.0], [0.0]]
    k3 = kl_estimate(torch.tensor([-1.0, -0.5, -2.0]), torch.tensor([-1.25, -0.5, -1.5]), "k3")
    assert summarize([stats])["behavior_kl"] == pytest.approx(float(k3.sum()) / 3)
    # the learners' minibatch: the ratio is taken against the learner's, the engine's weigh it
    for s in chunk:
        s["advantages"] = [0.0] * len(s["response_ids"])
    batch = policy_batch([chunk, []], {"samples": [0, 1], "ptx": []}, 0, 1, pad_id=0,
                         adv_mean=0.0, adv_std=1.0)  # fmt: skip
    assert batch["old_logprobs"].tolist() == [[-1.25, -0.5], [-1.5, 0.0]]
    assert batch["behavior_logprobs"].tolist() == [[-1.0, -0.5], [-2.0, 0.0]]
    # without them, the engine's log-probs are the old ones and nothing is weighted
    plain, plain_stats = make_experience(samples, [1.0, 0.0], [[-1.0, -0.5], [-2.0]],
                                         [[0.0, 0.0], [0.0]], beta=0.1, estimator="k1",
                                         gamma=1.0, lam=0.95, reward_clip=5.0)  # fmt: skip
    assert "behavior_kl" not in summarize([plain_stats])
    for s in plain:
        s["advantages"] = [0.0] * len(s["response_ids"])
    batch = policy_batch([plain, []], {"samples": [0, 1], "ptx": []}, 0, 1, pad_id=0,
                         adv_mean=0.0, adv_std=1.0)  # fmt: skip
    assert "behavior_logprobs" not in batch
    assert batch["old_logprobs"].tolist() == [[-1.0, -0.5], [-2.0, 0.0]]


def test_a_sample_with_a_nan_score_is_left_out_of_the_figures() -> None:
    samples = [
        {"prompt_ids": [1], "response_ids": [5, 6], "logprobs": [-1.0, -0.5], "finished": True,
         "version": 0, "engine": 0},
        {"prompt_ids": [1], "response_ids": [7], "logprobs": [-2.0], "finished": False,
         "version": 0, "engine": 0},
    ]  # fmt: skip
    chunk, stats = make_experience(
        samples,
        [1.0, float("nan")],
        [[-1.0, -0.5], [-2.0]],
        [[0.0, 0.0], [0.0]],
        beta=0.1,
        estimator="k1",
        gamma=1.0,
        lam=0.95,
        reward_clip=5.0,
    )
    figures = summarize([stats])
    assert figures["nonfinite_samples"] == 1
    assert figures["score"] == 1.0 and figures["response_length"] == 2.0
    assert all(math.isfinite(v) for k, v in figures.items() if k != "explained_variance")
    assert any(math.isnan(a) for a in chunk[1]["advantages"])  # its update will be skipped
    nothing = summarize([make_experience(samples[1:], [float("nan")], [[-2.0]], [[0.0]],
                                         beta=0.1, estimator="k1", gamma=1.0, lam=0.95,
                                         reward_clip=5.0)[1]])  # fmt: skip
    assert nothing["nonfinite_samples"] == 1 and math.isnan(nothing["score"])


def test_the_skip_guard_stops_after_the_configured_updates_in_a_row() -> None:
    guard = SkipGuard(limit=3)
    guard.update("policy", [{"skipped": 1.0}, {"skipped": 1.0}, {"loss": 0.1}])
    guard.update("critic", [{"skipped": 1.0}, {"skipped": 1.0}])
    guard.update("policy", [{"skipped": 1.0}, {"skipped": 1.0}])
    assert guard.total == {"policy": 4, "critic": 2}
    with pytest.raises(NonFiniteError, match=r"3 policy updates in a row .*max_skipped_steps=3"):
        guard.update("policy", [{"skipped": 1.0}])


def _group_samples(lengths: list[int]) -> list[dict]:
    return [
        {
            "prompt_ids": [1 + i // 2],
            "response_ids": [5] * n,
            "logprobs": [-1.0] * n,
            "finished": True,
            "version": 0,
            "engine": 0,
        }
        for i, n in enumerate(lengths)
    ]


def test_grouped_experience_uses_the_group_baseline_and_counts_zero_signal_groups() -> None:
    from trainers.advantages import estimate_advantages

    samples = _group_samples([2, 3, 1, 2, 2, 1])  # three prompts × 2 responses, a group each
    scores = [1.0, 0.0, 0.5, 0.5, float("nan"), 2.0]
    ref = [[-1.0] * len(s["response_ids"]) for s in samples]
    common = dict(beta=0.0, estimator="k1", gamma=1.0, lam=0.95, reward_clip=5.0)
    chunk, stats = make_experience(
        samples, scores, ref, advantage="rloo", group_size=2, value_parts=0, **common
    )
    # RLOO: each minus the other's score; a group with one finite member has no baseline
    assert chunk[0]["advantages"] == pytest.approx([1.0, 1.0])
    assert chunk[1]["advantages"] == pytest.approx([-1.0, -1.0, -1.0])
    assert chunk[2]["advantages"] + chunk[3]["advantages"] == [0.0] * 3  # equal scores
    assert all(math.isnan(a) for a in chunk[4]["advantages"] + chunk[5]["advantages"])
    assert chunk[0]["values"] == [0.0, 0.0]  # no critic
    assert stats["drop"] == []  # nothing dropped unless asked
    figures = summarize([stats])
    # group 2 scored alike; group 3's only finite member has no RLOO baseline: left out too
    assert figures["group/zero_signal_share"] == pytest.approx(1 / 3)
    assert figures["group/score_std"] == pytest.approx(0.5 / 3)
    assert figures["nonfinite_samples"] == 2
    # GRPO over the same batch equals the estimator on its finite samples
    chunk, stats = make_experience(
        samples,
        scores,
        ref,
        advantage="grpo",
        group_size=2,
        value_parts=0,
        drop_zero_signal=True,
        drop_nonfinite=True,
        **common,
    )
    keep = [0, 1, 2, 3, 5]
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]])
    adv, _ = estimate_advantages(
        "grpo",
        scores=torch.tensor([scores[i] for i in keep]),
        kl=torch.zeros(5, 3),
        mask=mask,
        beta=0.0,
        group=torch.tensor([0, 0, 1, 1, 2]),
    )
    for row, i in enumerate(keep):
        n = len(samples[i]["response_ids"])
        assert chunk[i]["advantages"] == pytest.approx(adv[row, :n].tolist(), abs=1e-6)
    assert stats["drop"] == [2, 3, 4, 5]  # two zero-signal groups and the NaN sample


def test_the_reward_is_the_weighted_sum_of_its_sources() -> None:
    samples = _group_samples([1, 1])
    common = dict(beta=0.0, estimator="k1", gamma=1.0, lam=0.95, reward_clip=None)
    ref = [[-1.0], [-1.0]]
    chunk, stats = make_experience(
        samples,
        [1.0, 2.0],
        ref,
        [10.0, float("nan")],  # a second source, e.g. a function that skipped sample 1
        extra_scores=1,
        score_weights=(0.5, 0.25),
        value_parts=0,
        advantage="reinforce++",
        drop_nonfinite=True,
        **common,
    )
    assert chunk[0]["score"] == pytest.approx(0.5 * 1.0 + 0.25 * 10.0)
    assert math.isnan(chunk[1]["score"])
    assert stats["drop"] == [1]
    assert summarize([stats])["dropped_samples"] == 1


def test_the_evaluation_and_the_experience_sum_the_sources_alike() -> None:
    from trainers.experience import combine_scores, weighted_sum

    parts = [[0.1, -2.0, 3.3], [1.0, float("nan"), 0.7], [-0.3, 0.2, 5.0]]
    weights = (0.5, 0.25, 2.0)
    summed = weighted_sum(parts, weights)
    assert summed[0] == 0.5 * 0.1 + 0.25 * 1.0 + 2.0 * -0.3
    assert math.isnan(summed[1])
    as_learned = combine_scores(parts, weights)
    assert as_learned.dtype == torch.float32
    assert as_learned[[0, 2]].tolist() == torch.tensor([summed[0], summed[2]]).tolist()
    one = [[0.123456789, -1.5]]
    assert weighted_sum(one, (1.0,)) == one[0]  # a single source's scores are kept as they are
    with pytest.raises(ValueError, match="2 reward sources but 1 weights"):
        weighted_sum(parts[:2], (1.0,))


def test_the_train_plan_leaves_out_dropped_samples_and_keeps_every_rank_busy() -> None:
    from trainers.config import RunConfig
    from trainers.rl.iteration import dropped_samples, train_plan

    config = RunConfig.model_validate(
        {
            "name": "t",
            "output_dir": "/tmp/t",
            "ppo": {"rollout_batch": 4, "n_samples_per_prompt": 4, "minibatch_size": 8},
            "learner": {"ranks": 2},
        }
    )
    whole = train_plan(config, it=0, ptx_size=0)
    assert [len(s["samples"]) for s in whole] == [8, 8]
    assert sorted(i for s in whole for i in s["samples"]) == list(range(16))
    stats = [{"drop": [0, 1, 2], "size": 8}, {"drop": [1, 2, 3, 4, 5, 6], "size": 8}]
    dropped = dropped_samples(stats)
    assert dropped == {0, 1, 2, 9, 10, 11, 12, 13, 14}
    plan = train_plan(config, it=0, ptx_size=0, dropped=dropped)
    kept = [i for s in plan for i in s["samples"]]
    assert sorted(kept) == sorted(set(range(16)) - dropped)
    # 7 samples left: a minibatch of 7 (the last one, of fewer than 2, joined the one before)
    assert all(len(s["samples"]) >= 2 for s in plan)


def test_group_minibatches_hold_whole_groups_in_a_shuffled_order() -> None:
    from trainers.config import RunConfig
    from trainers.rl.iteration import train_plan

    ppo = {"rollout_batch": 6, "n_samples_per_prompt": 4, "minibatch_size": 8, "epochs": 2}
    config = RunConfig.model_validate(
        {"name": "t", "output_dir": "/tmp/t", "ppo": {**ppo, "group_minibatches": True}}
    )
    plans = [train_plan(config, it=it, ptx_size=0) for it in range(3)]
    for plan in plans:
        assert len(plan) == 6  # 2 epochs of 3 minibatches of 2 groups
        for epoch in (plan[:3], plan[3:]):
            assert sorted(i for s in epoch for i in s["samples"]) == list(range(24))
        for step in plan:  # each minibatch: two groups of a prompt's 4 consecutive samples
            groups = sorted({i // 4 for i in step["samples"]})
            assert len(groups) == 2
            assert sorted(step["samples"]) == [g * 4 + k for g in groups for k in range(4)]
    firsts = {tuple(p[0]["samples"]) for p in plans}
    assert len(firsts) > 1  # the groups' order is shuffled, iteration by iteration

    with pytest.raises(ValueError, match=r"ppo.minibatch_size \(6\) must be a multiple of ppo"):
        RunConfig.model_validate(
            {
                "name": "t",
                "output_dir": "/tmp/t",
                "ppo": {**ppo, "minibatch_size": 6, "group_minibatches": True},
            }
        )


def test_the_driver_state_goes_back_to_the_start_keeping_the_starting_evaluation() -> None:
    """A learner group that loses a rank before the first checkpoint restarts the run from its
    start: the driver's state goes back to its first one, but the starting policy's evaluation,
    done before, is kept (the final figures compare against it)."""
    from trainers.config import RunConfig
    from trainers.rl.state import DriverState

    config = RunConfig.model_validate({"name": "t", "output_dir": "/tmp/t"})
    prompts = [{"prompt_ids": [i]} for i in range(8)]
    state = DriverState.start(config, prompts)
    initial = state.saved(0.0, 0.0)
    state.before, state.sft_demo_loss = {"scores": [1.0]}, 0.5
    state.stream.take(5)
    state.iteration, state.tokens = 3, 99.0
    state.kl.beta = 0.2
    state.restore(initial, config, roles=None)  # type: ignore[arg-type]
    assert (state.iteration, state.tokens, state.kl.beta) == (0, 0.0, config.ppo.kl.beta)
    assert state.stream.state() == [0, 0]
    assert state.before == {"scores": [1.0]} and state.sft_demo_loss == 0.5


def test_a_response_cut_at_the_token_limit_pays_the_missing_eos_penalty() -> None:
    """ppo.missing_eos_penalty comes off the reward of a response without its end token, before
    the reward is scaled and clipped; the logged score stays the sources' own."""
    samples = [
        {"prompt_ids": [1], "response_ids": [5, 2], "logprobs": [-1.0, -0.5], "finished": True,
         "version": 0, "engine": 0},
        {"prompt_ids": [1], "response_ids": [7, 7], "logprobs": [-2.0, -1.0], "finished": False,
         "version": 0, "engine": 0},
    ]  # fmt: skip
    common = {"beta": 0.0, "estimator": "k1", "gamma": 1.0, "lam": 1.0, "reward_scale": 2.0}
    args = (samples, [1.0, 1.0], [[-1.0, -0.5], [-2.0, -1.0]], [[0.0, 0.0], [0.0, 0.0]])
    plain, _ = make_experience(*args, reward_clip=5.0, **common)
    assert [s["score"] for s in plain] == [0.5, 0.5]
    chunk, stats = make_experience(*args, reward_clip=5.0, missing_eos_penalty=3.0, **common)
    assert [s["score"] for s in chunk] == [0.5, -1.0]  # (1 - 3) / 2
    assert chunk[1]["returns"] == [-1.0, -1.0] and chunk[0]["returns"] == [0.5, 0.5]
    assert summarize([stats])["score"] == 1.0
    clipped, _ = make_experience(*args, reward_clip=0.75, missing_eos_penalty=3.0, **common)
    assert [s["score"] for s in clipped] == [0.5, -0.75]
