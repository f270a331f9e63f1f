"""Colocated placement on a real local Ray cluster: workers that each host a DeepSpeed rank and a
vLLM engine in one process (and, in a run, the reference, the reward and a critic rank)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.learner import EngineSpec, Learner, LearnerGroup, ModelSpec, OptimSpec
from actors.rollout import EngineConfig, RolloutEngine
from cluster import ActorGroup
from cluster.colocated import Host, PartGroup
from cluster.groups import split_evenly
from trainers.data import Limits, collate_sft, encode_demonstrations, read
from trainers.objectives import sft_objective

pytestmark = pytest.mark.integration


def _steps(group: LearnerGroup, model: str, batch: list[dict], steps: int) -> list[float]:
    group.build(ModelSpec(model), OptimSpec(lr=1e-2, total_steps=steps, grad_clip=1.0))
    tokens = sum(sum(e["loss_mask"][1:]) for e in batch)
    shards = [collate_sft(s, 0, tokens) for s in split_evenly(batch, group.ranks)]
    return [group.train_step(sft_objective, shards)["loss"] for _ in range(steps)]


def _logprobs(model_dir: Path, state: dict[str, torch.Tensor], sequences: list[list[int]]):
    """log p(token_t | tokens_<t) of each sequence under `state`, by transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(state)
    out = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            out.append(logp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return out


def test_colocated_ranks_take_the_same_steps_as_separate_ones_and_hand_them_to_their_engines(
    ray_cluster, small_task: Path
) -> None:
    """Two workers, each a DeepSpeed rank and a vLLM engine in one process: the same update as
    two ranks of their own for the same batch, and each engine serves the new weights once its
    worker hands them over in process."""
    from transformers import AutoTokenizer

    model = str(small_task / "base_model")
    tok = AutoTokenizer.from_pretrained(model)
    demos = read(small_task / "sft_train.jsonl", "demonstrations")
    batch = encode_demonstrations(demos.select(range(8)), tok, Limits(32, 96))
    engine = EngineSpec(
        zero_stage=2, backend="gloo", seed=0, collective_timeout_s=120, micro_batch=4
    )
    sizes = {"placement_timeout_s": 60, "call_timeout_s": 120}
    with LearnerGroup(name="separate", ranks=2, engine=engine, cpus_per_rank=0.5, **sizes) as sep:
        separate_losses = _steps(sep, model, batch, steps=2)
        separate = sep.state_dict()

    with ActorGroup(Host, 2, name="worker", num_cpus=0.5, **sizes) as hosts:
        policy = LearnerGroup(
            name="policy",
            ranks=2,
            engine=engine,
            group=PartGroup(hosts, "policy", Learner, {"torch_threads": 1}),
        )
        # built after the ranks formed their process group, which the engines join
        serving = EngineConfig(model=model, max_model_len=128)
        engines = PartGroup(hosts, "rollout", RolloutEngine, {"config": serving})
        colocated_losses = _steps(policy, model, batch, steps=2)
        colocated = policy.state_dict()
        sequences = [e["input_ids"][:24] for e in batch[:4]]
        before = engines.call("sequence_logprobs", sequences)
        versions = hosts.call("handover", "policy", "full_weights", "rollout", "load_weights", 1)
        after = engines.call("sequence_logprobs", sequences)
        assert engines.call("get_version") == [1, 1] == versions
        # a colocated part is not replaced alone: its host's other parts would go with it
        with pytest.raises(RuntimeError, match="not replaced alone"):
            engines.replace(0)

    assert colocated_losses == pytest.approx(separate_losses, rel=1e-5)
    assert separate_losses[-1] < separate_losses[0]
    for name, tensor in separate.items():
        torch.testing.assert_close(colocated[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    trained = _logprobs(small_task / "base_model", colocated, sequences)
    for rank in range(2):
        for got, want, old in zip(after[rank], trained, before[rank], strict=True):
            assert got == pytest.approx(want, abs=2e-4)
            assert old != pytest.approx(want, abs=2e-4)  # the engine did change weights


def test_a_worker_of_two_threads_has_them_wait_asleep(ray_cluster) -> None:
    """A colocated worker hosts parts of `learner.torch_threads` threads (its rank and its
    engine): its process waits asleep at the end of a parallel region, as a separate role's."""
    import os

    import ray

    from trainers.common import host_group
    from trainers.config import load_config

    for threads in (1, 2):
        config = load_config(
            Path(__file__).parents[1] / "configs" / "tiny.yaml",
            ["placement=colocated", "learner.ranks=1", "learner.cpus_per_rank=0.5",
             f"learner.torch_threads={threads}"],
        )  # fmt: skip
        with host_group(config) as hosts:
            [host] = hosts.actors
            env = ray.get(host.__ray_call__.remote(lambda _: dict(os.environ)))
        assert env.get("OMP_WAIT_POLICY") == ("PASSIVE" if threads > 1 else None)
        assert env["GLOO_SOCKET_IFNAME"] == "lo"  # the cluster's own variables stay
