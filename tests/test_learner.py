"""The learner group on a real local Ray cluster with real DeepSpeed ranks over gloo."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from actors.batching import MIN_SHARED_TOKENS
from actors.learner import EngineSpec, LearnerGroup, ModelSpec, OptimSpec
from cluster import PlacementError
from cluster.groups import split_evenly
from trainers.data import Limits, collate_sft, encode_demonstrations, read
from trainers.objectives import sft_objective

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fixed_batch(small_task: Path) -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_task / "base_model")
    demos = read(small_task / "sft_train.jsonl", "demonstrations")
    return encode_demonstrations(demos.select(range(8)), tok, Limits(32, 96))


def _train(
    small_task: Path,
    batch: list[dict],
    *,
    ranks: int,
    zero_stage: int,
    steps: int,
    save_to: Path | None = None,
    torch_threads: int = 1,
    inspect: Callable[[LearnerGroup], None] | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    engine = EngineSpec(
        zero_stage=zero_stage,
        backend="gloo",
        torch_threads=torch_threads,
        seed=0,
        collective_timeout_s=120,
        micro_batch=len(batch) // ranks,
    )
    with LearnerGroup(
        name=f"test-{ranks}",
        ranks=ranks,
        engine=engine,
        cpus_per_rank=1,
        placement_timeout_s=60,
        call_timeout_s=120,
    ) as group:
        if inspect is not None:
            inspect(group)
        group.build(
            ModelSpec(str(small_task / "base_model")),
            OptimSpec(lr=1e-2, total_steps=steps, grad_clip=1.0),
        )
        tokens = sum(sum(e["loss_mask"][1:]) for e in batch)
        losses = []
        for _ in range(steps):
            shards = [collate_sft(s, 0, tokens) for s in split_evenly(batch, ranks)]
            losses.append(group.train_step(sft_objective, shards)["loss"])
        state = group.state_dict()
        if save_to is not None:
            group.save(save_to)
    return losses, state


def _with_system_prompt(batch: list[dict]) -> list[dict]:
    """The demonstrations behind the same 16 tokens (a system prompt): each rank's rows share
    them, and its passes compute them once (actors.batching.target_logits)."""
    system = list(range(4, 20))
    assert len(system) >= MIN_SHARED_TOKENS
    return [
        {**e, "input_ids": system + e["input_ids"], "loss_mask": [0] * 16 + e["loss_mask"]}
        for e in batch
    ]


@pytest.mark.parametrize(
    ("zero_stage", "system_prompt"),
    [(2, False), (3, False), (3, True)],
    ids=["zero2", "zero3", "zero3-shared-prompt"],
)
def test_two_ranks_take_the_same_steps_as_one(
    ray_cluster, small_task: Path, fixed_batch, zero_stage: int, system_prompt: bool, tmp_path: Path
) -> None:
    batch = _with_system_prompt(fixed_batch) if system_prompt else fixed_batch
    one_losses, one_state = _train(small_task, batch, ranks=1, zero_stage=zero_stage, steps=3)
    saved = tmp_path / "model"
    two_losses, two_state = _train(
        small_task, batch, ranks=2, zero_stage=zero_stage, steps=3, save_to=saved
    )
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    assert one_losses[-1] < one_losses[0]  # it trains
    assert one_state.keys() == two_state.keys()
    # with a shared prompt its gradient is summed over each rank's rows, then over the ranks:
    # the same sum in another order, which Adam's first steps magnify up to about 1.1e-5 here
    atol = 3e-5 if system_prompt else 1e-5
    for name, tensor in one_state.items():
        torch.testing.assert_close(two_state[name], tensor, rtol=1e-4, atol=atol, msg=name)

    # the saved folder is a Hugging Face model that anyone can load, with its tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(saved, use_safetensors=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, two_state[name], msg=name)
    assert AutoTokenizer.from_pretrained(saved).chat_template
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not (tmp_path / "model.tmp").exists()


def test_a_rank_of_two_threads_runs_them_asleep_when_they_wait_and_takes_the_same_steps(
    ray_cluster, small_task: Path, fixed_batch
) -> None:
    """`learner.torch_threads`: the rank's matrix products run on that many threads, which wait
    asleep at the end of a parallel region (a policy that trains alone on the machine's cores
    keeps none spinning when the engine generates next), with the cluster's environment; its
    steps are those of one thread to float rounding."""
    import ray

    def threads_and_env(group: LearnerGroup) -> None:
        [actor] = group.group.actors
        threads, env = ray.get(
            actor.__ray_call__.remote(lambda _: (torch.get_num_threads(), dict(os.environ)))
        )
        seen[threads] = env

    seen: dict[int, dict[str, str]] = {}
    losses = {}
    for threads in (1, 2):
        losses[threads], _ = _train(
            small_task,
            fixed_batch,
            ranks=1,
            zero_stage=2,
            steps=2,
            torch_threads=threads,
            inspect=threads_and_env,
        )
    assert seen.keys() == {1, 2}
    assert seen[2].get("OMP_WAIT_POLICY") == "PASSIVE"
    assert seen[1].get("OMP_WAIT_POLICY") is None
    assert seen[2]["GLOO_SOCKET_IFNAME"] == "lo"  # the cluster's own variables stay
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)


def test_a_group_larger_than_the_cluster_fails_fast_and_says_why(ray_cluster) -> None:
    with pytest.raises(PlacementError) as e:
        LearnerGroup(
            name="too-big", ranks=3, engine=EngineSpec(), cpus_per_rank=1.0, placement_timeout_s=5
        )
    message = str(e.value)
    assert "too-big: needs 3 × {CPU: 1} = {CPU: 3}" in message
    assert "the whole cluster has {CPU: 2," in message


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(
    ray_cluster, small_task: Path, fixed_batch: list[dict]
) -> None:
    engine = EngineSpec(
        zero_stage=2, backend="gloo", seed=0, collective_timeout_s=120, micro_batch=4
    )
    tokens = sum(sum(e["loss_mask"][1:]) for e in fixed_batch)
    with LearnerGroup(name="nan", ranks=2, engine=engine, cpus_per_rank=0.5) as group:
        group.build(ModelSpec(str(small_task / "base_model")), OptimSpec(lr=1e-2, total_steps=4))
        before = group.state_dict()
        halves = split_evenly(fixed_batch, 2)
        shards = [collate_sft(s, 0, tokens) for s in halves]
        # rank 1's share divided by a token count of 0: an infinite loss on that rank only
        poisoned = [shards[0], collate_sft(halves[1], 0, 0)]
        metrics = group.train_step(sft_objective, poisoned)
        assert metrics["skipped"] == 1.0
        after_skip = group.state_dict()
        for name, value in before.items():
            assert torch.equal(value, after_skip[name]), name  # no rank moved
        metrics = group.train_step(sft_objective, shards)  # the next step is taken
        assert "skipped" not in metrics and metrics["loss"] > 0
        moved = group.state_dict()
        assert any(not torch.equal(before[n], moved[n]) for n in before)


def test_frozen_layers_stay_as_loaded_and_the_blocks_above_train(
    ray_cluster, small_task: Path, fixed_batch: list[dict]
) -> None:
    engine = EngineSpec(
        zero_stage=2, backend="gloo", seed=0, collective_timeout_s=120, micro_batch=4
    )
    tokens = sum(sum(e["loss_mask"][1:]) for e in fixed_batch)
    shards = [collate_sft(s, 0, tokens) for s in split_evenly(fixed_batch, 2)]
    model = str(small_task / "base_model")
    with LearnerGroup(name="frozen", ranks=2, engine=engine, cpus_per_rank=0.5) as group:
        group.build(ModelSpec(model, frozen_layers=1), OptimSpec(lr=1e-2, total_steps=2))
        before = group.state_dict()
        losses = [group.train_step(sft_objective, shards)["loss"] for _ in range(2)]
        after = group.state_dict()
    assert losses[1] < losses[0]
    frozen = [n for n in before if "embed_tokens" in n or ".layers.0." in n]
    trained = [n for n in before if ".layers.1." in n]
    assert frozen and trained
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    for name in trained:
        if name.endswith("weight") and before[name].ndim == 2:
            assert not torch.equal(before[name], after[name]), name

    too_many = r"frozen_layers=3: the model has only 2 transformer blocks"
    with (
        LearnerGroup(name="too-many", ranks=1, engine=engine, cpus_per_rank=0.5) as group,
        pytest.raises(Exception, match=too_many),
    ):
        group.build(ModelSpec(model, frozen_layers=3), OptimSpec(lr=1e-2))


# The two ranks of a ZeRO-2 learner built in fresh processes (that have not imported DeepSpeed's
# optimizers yet): AdamW with its fused kernel; the ZeRO optimizer check passes for it without
# importing DeepSpeed's Muon optimizer, whose module calls torch.compile at import (a CPU-second
# of every start; ZeRO-3 imports it for a check of its own).
_BUILD_RANK = """
import sys
from actors.learner import EngineSpec, Learner, ModelSpec, OptimSpec
learner = Learner(int(sys.argv[3]), 2)
learner.init_distributed(("127.0.0.1", int(sys.argv[2])), EngineSpec(zero_stage=2))
print(learner.build(ModelSpec(sys.argv[1]), OptimSpec(lr=1e-4)))
print(type(learner.engine.optimizer).__name__)
print(learner.engine.optimizer.optimizer.defaults["fused"])
print("deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules)
"""


def test_zero2_ranks_start_without_importing_deepspeeds_muon(small_task: Path) -> None:
    import subprocess
    import sys

    from actors.learner import _free_port

    port = str(_free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD_RANK, str(small_task / "base_model"), port, str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for rank in (0, 1)
    ]
    for rank in ranks:
        out, err = rank.communicate(timeout=300)
        assert rank.returncode == 0, err[-3000:]
        parameters, optimizer, fused, muon = out.split()[-4:]
        assert int(parameters) > 0 and optimizer == "DeepSpeedZeroOptimizer"
        assert fused == "True"  # AdamW's fused kernel under ZeRO's partitions (OptimSpec.fused)
        assert muon == "False"
