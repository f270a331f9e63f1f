"""The run config's base and shared sections: the `Section` every section derives from (unknown
fields and coercions refused), `ConfigError`, and the sections that several stages share (Ray,
the DeepSpeed learner group, the optimizer, the token limits, the built-in task)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STAGES = ("sft", "collect", "rm", "ppo")
"""every stage, in recipe order"""
DEFAULT_STAGES = ("sft", "rm", "ppo")
"""the stages a config that names none runs: the RM trains on the task's own comparisons"""
# collect.labeler: "module.sub:function"
LABELER_FUNCTION = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


class Section(BaseModel):
    # extra="forbid": an unknown field is an error; strict: no "3" -> 3 coercions behind the user's
    # back (YAML already gives typed values, and overrides are parsed as YAML too).
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


# Resources that have their own fields (cpus, gpus, memory_gb) and may not be given as custom ones.
_BUILT_IN = {"CPU", "GPU", "memory", "object_store_memory"}


def _check_resources(field: str, resources: dict[str, float]) -> None:
    for key, value in resources.items():
        if not key or key in _BUILT_IN:
            raise ValueError(
                f"{field}: {key!r} is not a custom resource (CPUs, GPUs and memory have their "
                "own fields)"
            )
        if value <= 0:
            raise ValueError(f"{field}: {key} must be > 0 (got {value})")


class RayConfig(Section):
    address: str | None = None
    """Ray cluster to join ("auto" inside a Ray job or on a node of the cluster, or "host:6379");
    null starts a local cluster for this run and stops it at the end"""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs that a local cluster offers (null: this machine's count); only with address null"""
    include_dashboard: bool = False
    """start Ray's dashboard with a local cluster (bound to 127.0.0.1)"""
    autoscaling: bool = False
    """the cluster has an autoscaler (`ray up cluster.yaml`): a role that does not fit the nodes
    there are now waits for new nodes (up to autoscaling_timeout_s) instead of failing at once"""
    autoscaling_timeout_s: float = Field(default=900.0, gt=0)
    """how long a role waits for the autoscaler to add the nodes it needs"""

    @model_validator(mode="after")
    def _local_only(self) -> RayConfig:
        if self.address is not None and self.num_cpus is not None:
            raise ValueError(
                "ray.num_cpus sizes a local cluster; it cannot be set with ray.address"
            )
        return self


class LearnerConfig(Section):
    ranks: int = Field(default=2, ge=1)
    """DeepSpeed ranks (Ray actors) that together host one ZeRO engine"""
    zero_stage: Literal[2, 3] = 2
    """ZeRO stage: 2 shards optimizer states and gradients, 3 also the parameters (a group of
    one rank has nothing to shard: with 2 it trains without ZeRO, the same update, faster)"""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """collective backend: auto is nccl when the ranks have GPUs, else gloo"""
    cpus_per_rank: float = Field(default=1.0, gt=0)
    """Ray CPUs reserved for each rank (fractions allowed, to share cores between roles)"""
    gpus_per_rank: float = Field(default=0.0, ge=0)
    """Ray GPUs reserved for each rank (0 trains on the CPU)"""
    memory_gb_per_rank: float = Field(default=0.0, ge=0)
    """Ray memory (GiB) reserved for each rank (0: none reserved)"""
    resources_per_rank: dict[str, float] = Field(default_factory=dict)
    """custom Ray resources for each rank, e.g. {learner_node: 1} to place the ranks on the nodes
    that offer it (cluster.yaml gives each node type such a resource)"""
    torch_threads: int = Field(default=1, ge=1)
    """torch intra-op threads in each rank, waiting asleep at the end of a parallel region
    (OMP_WAIT_POLICY=PASSIVE) where more than 1; 1 avoids oversubscribing a small machine. More
    pays where a rank trains alone: a method without a critic in the separate placement's
    synchronous mode (one policy rank of 2 threads trains SmolLM2 about 1.5x as fast on 2 cores)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """training precision (bfloat16 turns on DeepSpeed's bf16 mode)"""
    placement_timeout_s: float = Field(default=120.0, gt=0)
    """how long to wait for the cluster to place the ranks before failing with what is missing"""
    collective_timeout_s: float = Field(default=600.0, gt=0)
    """deadline of a collective (a rank that hangs longer fails the step instead of hanging)"""
    bucket_mb: float = Field(default=64.0, gt=0)
    """ZeRO's gradient reduce and all-gather bucket size in MB (DeepSpeed's own default, 5e8
    elements, keeps a 2 GB fp32 buffer on every rank whatever the model's size)"""


class TinyModelConfig(Section):
    architecture: Literal["llama", "qwen2"] = "llama"
    """model family of the built-in task's tiny causal LM (both are served by vLLM)"""
    hidden_size: int = Field(default=128, ge=32)
    """width of the residual stream"""
    intermediate_size: int = Field(default=344, ge=1)
    """width of the MLP (about 8/3 of hidden_size, as Llama does)"""
    num_hidden_layers: int = Field(default=2, ge=1)
    """transformer blocks"""
    num_attention_heads: int = Field(default=4, ge=1)
    """attention heads; hidden_size / heads must be >= 32 for vLLM's CPU attention"""
    max_position_embeddings: int = Field(default=128, ge=16)
    """longest sequence the model can see"""

    @model_validator(mode="after")
    def _head_dim(self) -> TinyModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("task.model.hidden_size must be a multiple of num_attention_heads")
        if self.hidden_size // self.num_attention_heads < 32:
            raise ValueError(
                "task.model: head dimension hidden_size / num_attention_heads is "
                f"{self.hidden_size // self.num_attention_heads}; vLLM's CPU attention needs >= 32"
            )
        return self


class TaskConfig(Section):
    kind: Literal["reviews", "arithmetic"] = "reviews"
    """reviews: "write a short review of ...", judged by a hidden labeler through noisy
    rankings (InstructGPT's setting); arithmetic: sums with an exact answer, worked step by step
    (verifiable: the reward is exact match, `trainers.arithmetic:exact_match`)"""
    seed: int = 0
    """seed of everything the task generates (same seed, same files)"""
    train_prompts: int = Field(default=2000, ge=8)
    """prompts with a demonstration and a ranked comparison each, for training"""
    heldout_prompts: int = Field(default=200, ge=8)
    """held-out prompts (and their demonstrations and comparisons) for evaluation"""
    min_ranked: int = Field(default=4, ge=2)
    """fewest responses ranked per comparison (InstructGPT: 4)"""
    max_ranked: int = Field(default=6, ge=2)
    """most responses ranked per comparison (InstructGPT: 9)"""
    labeler_agreement: float = Field(default=0.73, gt=0.5, lt=1.0)
    """how often the noisy comparison labels agree with the noiseless labeler on a pair
    (InstructGPT's labelers agreed with each other about 73% of the time)"""
    model: TinyModelConfig = Field(default_factory=TinyModelConfig)
    """the tiny random-init causal LM that SFT starts from"""

    @model_validator(mode="after")
    def _ranked(self) -> TaskConfig:
        if self.min_ranked > self.max_ranked:
            raise ValueError("task.min_ranked must be <= task.max_ranked")
        return self


class DataConfig(Section):
    max_prompt_tokens: int = Field(default=32, ge=1)
    """longest prompt, in tokens with the chat template, that any stage accepts"""
    max_seq_len: int = Field(default=96, ge=2)
    """longest prompt + response, in tokens"""
    on_too_long: Literal["error", "skip"] = "error"
    """a prompt or sequence over the limits: stop with the list of offending lines ("error"),
    or leave those examples out and print the list ("skip"); never cut silently"""

    @model_validator(mode="after")
    def _lengths(self) -> DataConfig:
        if self.max_prompt_tokens >= self.max_seq_len:
            raise ValueError("data.max_prompt_tokens must be < data.max_seq_len")
        return self


class OptimConfig(Section):
    lr: float = Field(default=1e-3, gt=0)
    """peak learning rate of AdamW"""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW's decoupled weight decay"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's betas"""
    warmup_steps: int = Field(default=10, ge=0)
    """linear warm-up steps; then cosine decay to min_lr_ratio · lr"""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """final learning rate as a fraction of lr"""
    grad_clip: float = Field(default=1.0, ge=0)
    """clip the global gradient norm to this (0: no clipping)"""
    fused: bool = True
    """AdamW's fused kernel (torch's `fused=True`, as transformers' Trainer uses by default): one
    pass over each parameter's weights, gradient and moments, about 6x faster a step on the CPU
    than the per-parameter implementation (false), whose last digits differ from it"""
