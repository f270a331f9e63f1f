"""What the stage drivers share: the learner group from the config, sharded evaluation and model
folder checks (the stage records are in trainers/stage_record.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from actors.learner import EngineSpec, Learner, LearnerGroup, OptimSpec
from actors.rollout import EngineConfig, RolloutEngine, engine_env
from actors.threads import thread_env
from cluster import ActorGroup
from cluster.colocated import Host, PartGroup
from cluster.groups import split_evenly
from trainers.config import LearnerConfig, OptimConfig, RayConfig, RunConfig
from trainers.data import DataError, check_tokenizer


class ModelFolderError(ValueError):
    """A model folder that the run cannot use; names the config field and the folder."""


def check_model_folder(
    path: str | Path, field: str, *, reward: bool = False, trust_remote_code: bool = False
) -> Any:
    """Check a Hugging Face model folder before any actor starts; returns its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    folder = Path(path)
    where = f"{field}: {folder}"
    if not folder.is_dir():
        raise ModelFolderError(f"{where}: model folder does not exist")
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{where}: not a Hugging Face model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ModelFolderError(
            f"{where}: no *.safetensors weights (weights are read only as safetensors, never "
            "pickle; convert .bin files with save_pretrained(safe_serialization=True))"
        )
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelFolderError(f"{where}: config.json cannot be read ({e})") from None
    if reward and config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ModelFolderError(
            f"{where}: model type {config.model_type!r} has no sequence-classification head "
            "in transformers, so it cannot become a reward model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelFolderError(f"{where}: no usable tokenizer in the folder ({e})") from None
    try:
        check_tokenizer(tokenizer, folder)
    except DataError as e:
        raise ModelFolderError(f"{field}: {e}") from None
    return tokenizer


def resolve_backend(learner: LearnerConfig) -> str:
    if learner.backend != "auto":
        return learner.backend
    return "nccl" if learner.gpus_per_rank > 0 else "gloo"


def learner_group(
    learner: LearnerConfig,
    seed: int,
    name: str,
    batch_size: int,
    cluster: RayConfig,
    log: Callable[[str], None] = print,
    hosts: ActorGroup | None = None,
) -> LearnerGroup:
    """A DeepSpeed group sized and placed by a learner section (`learner`, `ppo.critic`); with
    `hosts` (colocated), a rank on each host instead, sized by the hosts."""
    if hosts is not None:
        learner = learner.model_copy(update={"ranks": hosts.n})
    engine = EngineSpec(
        zero_stage=learner.zero_stage,
        backend=resolve_backend(learner),
        dtype=learner.dtype,
        torch_threads=learner.torch_threads,
        seed=seed,
        collective_timeout_s=learner.collective_timeout_s,
        micro_batch=batch_size // learner.ranks,
        bucket_elements=int(learner.bucket_mb * 2**20) // (2 if learner.dtype == "bfloat16" else 4),
    )
    return LearnerGroup(
        name=name,
        ranks=learner.ranks,
        engine=engine,
        cpus_per_rank=learner.cpus_per_rank,
        gpus_per_rank=learner.gpus_per_rank,
        memory_gb_per_rank=learner.memory_gb_per_rank,
        resources_per_rank=learner.resources_per_rank,
        placement_timeout_s=learner.placement_timeout_s,
        autoscaling_timeout_s=autoscaling_timeout(cluster),
        call_timeout_s=learner.collective_timeout_s,
        log=log,
        group=None
        if hosts is None
        else PartGroup(hosts, name, Learner, {"torch_threads": learner.torch_threads}),
    )


def host_group(config: RunConfig, log: Callable[[str], None] = print) -> ActorGroup:
    """The colocated placement's workers: one per learner rank, sized and placed by the learner
    section (SPREAD over nodes, as the devices they stand for)."""
    learner = config.learner
    return ActorGroup(
        Host,
        learner.ranks,
        name="worker",
        num_cpus=learner.cpus_per_rank,
        num_gpus=learner.gpus_per_rank,
        memory_gb=learner.memory_gb_per_rank,
        resources=learner.resources_per_rank,
        strategy="SPREAD",
        placement_timeout_s=learner.placement_timeout_s,
        autoscaling_timeout_s=autoscaling_timeout(config.ray),
        call_timeout_s=learner.collective_timeout_s,
        log=log,
        env_vars=thread_env(learner.torch_threads),  # its parts run that many threads
    )


def engine_group(
    config: RunConfig,
    model: str,
    max_new_tokens: int,
    log: Callable[[str], None] = print,
    hosts: ActorGroup | None = None,
) -> ActorGroup:
    """`rollout.engines` vLLM engines serving `model`, sized and placed by the rollout section
    (SPREAD over nodes), with room for the longest prompt and `max_new_tokens`; with `hosts`
    (colocated), an engine on each host instead."""
    r = config.rollout
    engine = EngineConfig(
        model=model,
        max_model_len=config.data.max_prompt_tokens + max_new_tokens,
        dtype=r.dtype,
        seed=config.seed,
        kv_cache_gb=r.kv_cache_gb,
        gpu_memory_utilization=r.gpu_memory_utilization,
        trust_remote_code=config.trust_remote_code,
        enforce_eager=r.enforce_eager,
        # colocated, in the host's process, whose threads the learner's section sets
        torch_threads=r.torch_threads if hosts is None else config.learner.torch_threads,
    )
    if hosts is not None:
        return PartGroup(hosts, "rollout", RolloutEngine, {"config": engine})
    return ActorGroup(
        RolloutEngine,
        r.engines,
        name="rollout",
        num_cpus=r.cpus_per_engine,
        num_gpus=r.gpus_per_engine,
        memory_gb=r.memory_gb_per_engine,
        resources=r.resources_per_engine,
        strategy="SPREAD",
        placement_timeout_s=config.learner.placement_timeout_s,
        autoscaling_timeout_s=autoscaling_timeout(config.ray),
        log=log,
        call_timeout_s=config.learner.collective_timeout_s,
        actor_kwargs={"config": engine},
        env_vars=engine_env(engine),
    )


def autoscaling_timeout(cluster: RayConfig) -> float | None:
    """How long a role waits for new nodes; None: the cluster does not grow, fail at once."""
    return cluster.autoscaling_timeout_s if cluster.autoscaling else None


def optim_spec(optim: OptimConfig, total_steps: int) -> OptimSpec:
    return OptimSpec(
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        betas=optim.betas,
        warmup_steps=optim.warmup_steps,
        min_lr_ratio=optim.min_lr_ratio,
        total_steps=total_steps,
        grad_clip=optim.grad_clip,
        fused=optim.fused,
    )


def evaluate(
    group: LearnerGroup,
    fn: Callable[[Any, dict[str, Any]], torch.Tensor],
    examples: list[Any],
    collate: Callable[[list[Any]], dict[str, Any]],
    batch_size: int,
) -> list[torch.Tensor]:
    """`fn` over all examples, split over the ranks; one output row per example, in order.

    Every rank gets a non-empty slice of every batch (ZeRO-3's forward pass is collective), so
    the list is padded with copies of its first example, whose rows are dropped.
    """
    padded = examples + examples[:1] * (-len(examples) % group.ranks)
    rows: list[torch.Tensor] = []
    for start in range(0, len(padded), batch_size):
        shards = split_evenly(padded[start : start + batch_size], group.ranks)
        for out in group.forward(fn, [collate(s) for s in shards]):
            rows.extend(out.unbind(0))
    return rows[: len(examples)]
