"""The run config: one YAML file per run, validated into typed objects.

Every setting is a documented field (the docstring under it is its documentation, and the
README's config reference is generated from these classes). An unknown field, a wrong type or an
inconsistent pair of settings is a `ConfigError` that names the field and the file; nothing is
silently changed. Command-line overrides (`key.sub=value`, the value read as YAML) are applied to
the file's contents before validation, so they are checked the same way.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

STAGES = ("sft", "collect", "rm", "ppo")
"""every stage, in recipe order"""
DEFAULT_STAGES = ("sft", "rm", "ppo")
"""the stages a config that names none runs: the RM trains on the task's own comparisons"""
# collect.labeler: "module.sub:function"
LABELER_FUNCTION = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (it wants `1.0e-3`); read it as the number it is."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


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
    """torch intra-op threads in each rank; 1 avoids oversubscribing a small machine"""
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


class SFTConfig(Section):
    model: str | None = None
    """folder of the pretrained causal LM (with its tokenizer); null: the built-in task's base"""
    train_data: str | None = None
    """demonstrations (JSONL or Parquet with "prompt" and "response"); null: the task's"""
    heldout_data: str | None = None
    """held-out demonstrations for the loss that the stage reports; null: the task's"""
    epochs: int = Field(default=3, ge=1)
    """passes over the demonstrations"""
    batch_size: int = Field(default=32, ge=1)
    """demonstrations per optimizer step, over all ranks (a multiple of learner.ranks)"""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """optimizer and schedule"""


class RMConfig(Section):
    model: str | None = None
    """folder that the reward model starts from (a causal LM); null: this run's SFT model, as
    InstructGPT initialised its RM from the SFT model"""
    train_data: str | None = None
    """comparisons (JSONL or Parquet with "prompt" and "responses" ranked best first, K >= 2);
    null: the task's"""
    heldout_data: str | None = None
    """held-out comparisons for the pairwise accuracy; null: the task's"""
    normalize_data: str | None = None
    """demonstrations whose mean score becomes the RM's zero; null: the SFT stage's train data"""
    epochs: int = Field(default=2, ge=1)
    """passes over the comparisons"""
    batch_size: int = Field(default=16, ge=1)
    """prompts (each with all its K ranked responses) per step, over all ranks (a multiple of
    learner.ranks)"""
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=5e-4))
    """optimizer and schedule"""


class CollectConfig(Section):
    policy: str | None = None
    """folder of the policy whose samples are ranked; null: this run's SFT model (as for
    ppo.policy)"""
    prompts: str | None = None
    """prompts to sample for (JSONL or Parquet with "prompt"); null: the task's training
    prompts"""
    heldout_prompts: str | None = None
    """prompts whose comparisons are collected the same way for the RM's held-out accuracy;
    null: the task's held-out prompts"""
    max_prompts: int | None = Field(default=None, ge=1)
    """use the first this many prompts (null: all)"""
    max_heldout_prompts: int | None = Field(default=None, ge=1)
    """use the first this many held-out prompts (null: all)"""
    samples_per_prompt: int = Field(default=4, ge=2, le=9)
    """K: responses sampled per prompt and ranked together (InstructGPT: 4 to 9); exact
    duplicates and empty responses are dropped, and a prompt left with fewer than 2 is skipped
    (and counted)"""
    max_new_tokens: int = Field(default=48, ge=1)
    """longest response; the prompt and the response with its end token must fit in
    data.max_seq_len, for the RM to read them"""
    temperature: float = Field(default=1.0, gt=0)
    """sampling temperature"""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """nucleus sampling"""
    labeler: str = "task"
    """who ranks the K responses: "task", the built-in task's hidden labeler through the
    task's noise, calibrated to task.labeler_agreement; "module:function", a Python function
    called as f(prompt: str, responses: list[str]) that returns a ranking (a list of ints, the
    indices best first) or scores (a list of floats, higher better); "human": the stage writes
    <run>/collect/to_rank.jsonl and stops the run until collect.ranked_file holds the
    rankings"""
    chunk_size: int = Field(default=16, ge=1)
    """prompts per engine request (each prompt K times); finished chunks are kept, so a
    stopped stage resumes after the last one"""
    ranked_file: str | None = None
    """labeler human: the JSONL of rankings, one line {"id": ..., "ranking": [response ids,
    best first]} per line of to_rank.jsonl"""

    @field_validator("labeler")
    @classmethod
    def _labeler_form(cls, value: str) -> str:
        if value not in ("task", "human") and not LABELER_FUNCTION.match(value):
            raise ValueError(
                'must be "task", "human" or "module:function" (a Python function named by its '
                "module's dotted path, e.g. mypackage.labels:rank)"
            )
        return value

    @model_validator(mode="after")
    def _ranked(self) -> CollectConfig:
        if self.ranked_file is not None and self.labeler != "human":
            raise ValueError("collect.ranked_file is read only with collect.labeler human")
        return self


class RolloutConfig(Section):
    engines: int = Field(default=1, ge=1)
    """vLLM engines (Ray actors, spread over nodes); prompts are dealt to them in chunks"""
    cpus_per_engine: float = Field(default=1.0, gt=0)
    """Ray CPUs reserved for each engine"""
    gpus_per_engine: float = Field(default=0.0, ge=0)
    """Ray GPUs for each engine (0: vLLM's CPU engine)"""
    memory_gb_per_engine: float = Field(default=0.0, ge=0)
    """Ray memory (GiB) reserved for each engine (0: none reserved)"""
    resources_per_engine: dict[str, float] = Field(default_factory=dict)
    """custom Ray resources for each engine, e.g. {rollout_node: 1}"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """engine precision; float32 keeps its log-probs equal to the learner's"""
    kv_cache_gb: int = Field(default=1, ge=1)
    """CPU engine: KV cache size in GiB"""
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    """GPU engine: share of the GPU's memory it may take"""
    chunk_size: int = Field(default=16, ge=1)
    """prompts per generation request; each finished chunk goes on to reward, reference and
    critic at once, while the engines still generate the rest"""
    weight_sync: Literal["auto", "object_store", "broadcast"] = "auto"
    """how the policy's new weights reach the engines: through Ray's object store, or
    broadcast by the policy's rank 0 over a torch.distributed group with the engines (gloo on
    the CPU, NCCL when learners and engines have GPUs); auto: broadcast, the faster by
    bench/weight_sync.py (twice the object store's speed on the CPU)"""
    sync_bucket_mb: float = Field(default=64.0, gt=0)
    """broadcast sync: megabytes of weights per broadcast"""
    enforce_eager: bool = True
    """run the engine's model eagerly; false: vLLM compiles it (torch.compile, and CUDA graphs
    on a GPU) after a longer start (on 2 CPU cores about 20-35 s, the compiled code cached in
    .cache/vllm). On the 2-core CPU, bench/rollout.py measured no faster decoding; on GPUs the
    CUDA graphs are what it is for"""


class ScorerConfig(Section):
    cpus: float = Field(default=0.25, gt=0)
    """Ray CPUs reserved for the actor"""
    gpus: float = Field(default=0.0, ge=0)
    """Ray GPUs for the actor"""
    memory_gb: float = Field(default=0.0, ge=0)
    """Ray memory (GiB) reserved for the actor (0: none reserved)"""
    resources: dict[str, float] = Field(default_factory=dict)
    """custom Ray resources for the actor, e.g. {cpu_node: 1}"""
    batch_size: int = Field(default=64, ge=1)
    """sequences per forward pass"""


class RewardSource(Section):
    kind: Literal["rm", "function", "http"] = "rm"
    """rm: the reward model (ppo.reward_model); function: a Python function, run in its own
    actor; http: a remote endpoint"""
    target: str | None = None
    """function: "module:function", called with the batch as lists (prompts, responses and
    every other field of the prompt records, e.g. answer) and returning a number per response;
    http: the endpoint's URL, sent the same lists as a JSON object by POST and answering a list
    or {"rewards": [...]}; rm: null"""
    weight: float = 1.0
    """its weight in the reward, the sources' weighted sum"""
    timeout_s: float = Field(default=30.0, gt=0)
    """http: each request's timeout"""
    retries: int = Field(default=3, ge=0)
    """http: retries after a failed request (connection error, timeout or 5xx), with
    exponential backoff"""
    backoff_s: float = Field(default=0.5, ge=0)
    """http: the wait before the first retry, doubled at each one"""

    @model_validator(mode="after")
    def _target(self) -> RewardSource:
        t = self.target
        if self.kind == "rm" and t is not None:
            raise ValueError("a reward source of kind rm takes no target (see ppo.reward_model)")
        if self.kind == "function" and (t is None or t.count(":") != 1 or t.startswith(":")):
            raise ValueError(f'a function reward needs target "module:function", not {t!r}')
        if self.kind == "http" and (t is None or not t.startswith(("http://", "https://"))):
            raise ValueError(f"an http reward needs target http://... or https://..., not {t!r}")
        return self


class RewardConfig(ScorerConfig):
    sources: list[RewardSource] = Field(default_factory=lambda: [RewardSource()], min_length=1)
    """what the reward is: the weighted sum of these sources' scores (default: the reward model
    alone); each function or endpoint gets its own actor, sized as this section says"""
    on_error: Literal["raise", "skip"] = "raise"
    """a function or endpoint that raises or returns a non-finite reward for a response: stop
    with an error naming it and the response (raise), or leave that response out of training
    and count it in ppo/dropped_samples (skip)"""

    @model_validator(mode="after")
    def _one_rm(self) -> RewardConfig:
        if sum(s.kind == "rm" for s in self.sources) > 1:
            raise ValueError("reward.sources holds the reward model twice")
        return self

    @property
    def uses_rm(self) -> bool:
        return any(s.kind == "rm" for s in self.sources)


class KLConfig(Section):
    beta: float = Field(default=0.05, ge=0)
    """β: weight of the per-token KL penalty to the SFT policy (the initial β when adaptive)"""
    adaptive: bool = False
    """move β toward the value that keeps the KL at `target` (Ziegler et al. 2019)"""
    target: float = Field(default=4.0, gt=0)
    """target KL per sequence (nats) of the adaptive controller"""
    horizon: int = Field(default=10000, ge=1)
    """samples over which the adaptive controller closes a 20% error"""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimator in the reward (k1: log π − log π_ref)"""
    mode: Literal["reward", "loss"] = "reward"
    """where the KL to the reference acts: reward (−β·KL on every token of the reward, as
    InstructGPT's PPO) or loss (β · the k3 estimate of KL(π ‖ π_ref) added to the policy's
    loss, as GRPO does; the reward is then the score alone)"""


class PPOConfig(Section):
    policy: str | None = None
    """folder of the policy to start from; null: this run's SFT model"""
    reward_model: str | None = None
    """folder of the reward model; null: this run's RM"""
    critic_model: str | None = None
    """folder the critic starts from (a sequence classifier); null: the reward model, as
    InstructGPT initialised its value function from the RM"""
    prompts: str | None = None
    """training prompts (JSONL or Parquet with "prompt"); null: the task's"""
    heldout_prompts: str | None = None
    """prompts of the final evaluation; null: the task's held-out prompts"""
    ptx_data: str | None = None
    """demonstrations for the pretraining-mix term; null: the SFT stage's train data"""
    heldout_demonstrations: str | None = None
    """demonstrations whose loss measures the alignment tax; null: the SFT stage's held-out"""
    iterations: int = Field(default=30, ge=1)
    """rollout-then-train iterations"""
    rollout_batch: int = Field(default=64, ge=1)
    """prompts sampled per iteration (ppo.n_samples_per_prompt responses each)"""
    n_samples_per_prompt: int = Field(default=1, ge=1)
    """responses sampled per prompt, generated together by one engine (a group: never split
    across chunks or engines)"""
    advantage: Literal["gae", "grpo", "rloo", "reinforce++"] = "gae"
    """the advantage estimator: gae (PPO: GAE(γ, λ) with a learned critic, the only one that
    starts a critic), grpo (the score minus its group's mean, divided by the group's std:
    DeepSeekMath's GRPO), rloo (minus the mean of the other responses to its prompt: REINFORCE
    leave-one-out), reinforce++ (the return, whitened over the batch); grpo and rloo need
    ppo.n_samples_per_prompt ≥ 2"""
    group_std: bool = True
    """grpo: divide by the group's standard deviation (false: Dr. GRPO's unbiased variant)"""
    max_new_tokens: int = Field(default=48, ge=1)
    """longest response"""
    temperature: float = Field(default=1.0, gt=0)
    """sampling temperature (the policy's log-probs use the same)"""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """nucleus sampling"""
    ignore_eos: bool = False
    """generate exactly max_new_tokens per response, past the end-of-sequence token (for
    benchmarks on a fixed workload)"""
    epochs: int = Field(default=1, ge=1)
    """PPO epochs over each iteration's experience"""
    minibatch_size: int = Field(default=16, ge=1)
    """samples (responses) per optimizer step, over all ranks"""
    clip: float = Field(default=0.2, gt=0)
    """PPO's ratio clip ε"""
    clip_high: float | None = Field(default=None, gt=0)
    """the ratio's upper clip, 1 + clip_high (DAPO's clip-higher, e.g. 0.28); null: ppo.clip"""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "token_sum_norm"] = "token_mean"
    """how the per-token losses of a minibatch add up: token_mean (the mean over its tokens),
    seq_mean_token_mean (each response's token mean, then the mean over responses: GRPO's
    paper) or token_sum_norm (the token sum over responses × max_new_tokens: Dr. GRPO)"""
    drop_zero_signal_groups: bool = False
    """leave out of training the groups whose responses all scored the same (they carry no
    signal for a group baseline); counted in ppo/group/zero_signal_share either way"""
    value_clip: float | None = Field(default=0.2, gt=0)
    """clip of the value update around the old values; null: no clipping"""
    old_logprobs: Literal["engine", "learner"] = "engine"
    """the log-probs that PPO's ratio is taken against: the engine's, from the weights that
    sampled the tokens; or learner: the policy learners' own at the iteration's start (one more
    forward pass over the batch, during generation in synchronous mode), each token then
    weighted by its learner/engine probability ratio, capped at ppo.behavior_weight_cap
    (decoupled PPO: the clip is around the policy being trained, and the weight corrects for a
    batch sampled one version behind in overlapped mode, or by an engine whose numerics differ,
    e.g. in bfloat16)"""
    behavior_weight_cap: float = Field(default=5.0, gt=1)
    """old_logprobs=learner: the largest learner/engine probability ratio a token is weighted by"""
    gamma: float = Field(default=1.0, ge=0, le=1)
    """discount of GAE"""
    lam: float = Field(default=0.95, ge=0, le=1)
    """λ of GAE"""
    kl: KLConfig = Field(default_factory=KLConfig)
    """the KL penalty to the SFT policy"""
    whiten_advantages: bool | None = None
    """normalise advantages over the iteration's tokens to mean 0 and std 1; null: the
    estimator's usual choice (gae and reinforce++ yes, grpo and rloo no)"""
    reward_clip: float | None = Field(default=5.0, gt=0)
    """clip RM scores to ±this; null: no clipping"""
    normalize_reward: bool = False
    """divide RM scores by their running standard deviation over the earlier iterations"""
    ptx_coef: float = Field(default=0.0, ge=0)
    """γ of PPO-ptx: weight of the LM loss on demonstrations mixed into each policy step
    (0 is plain PPO)"""
    ptx_batch_size: int = Field(default=8, ge=1)
    """demonstrations per policy step for the ptx term"""
    entropy_coef: float = Field(default=0.0, ge=0)
    """weight of an entropy bonus in the policy loss"""
    overlap: bool = False
    """overlapped mode: the engines generate the next iteration's batch (with the weights of one
    version before) while the learners train on this one; each sample carries the weight version
    that generated it and the PPO ratio is taken against that version's log-probs (or see
    ppo.old_logprobs)"""
    learner_restarts: int = Field(default=3, ge=0)
    """times the policy and critic groups are brought back from the last checkpoint (or the
    start) within the run after one of their ranks died or hung; then the run stops"""
    chunk_retries: int = Field(default=3, ge=0)
    """times a chunk of prompts is issued again after the engine, reward or reference actor that
    worked on it died or hung (the actor is replaced first); then the run stops"""
    max_skipped_steps: int = Field(default=8, ge=1)
    """an update whose loss is not finite (a NaN or infinite reward, value, advantage or loss) is
    skipped and counted; this many in a row (policy or critic) stop the run, keeping the last
    good checkpoint"""
    policy_optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0))
    """the policy's optimizer"""
    critic_optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=0))
    """the critic's optimizer"""
    critic: LearnerConfig = Field(default_factory=lambda: LearnerConfig(ranks=1))
    """the critic's DeepSpeed group"""
    checkpoint_every: int = Field(default=20, ge=1)
    """save a checkpoint (policy, critic, optimizers, KL controller, data position) every this
    many iterations and at the end; `instructray run --resume` continues from the latest"""
    keep_checkpoints: int = Field(default=2, ge=1)
    """checkpoints kept (the oldest are removed once a newer one is complete)"""
    sample_table_every: int = Field(default=5, ge=1)
    """log a W&B table of sample prompts and responses every this many iterations"""

    @property
    def samples(self) -> int:
        """responses per iteration"""
        return self.rollout_batch * self.n_samples_per_prompt

    @property
    def uses_critic(self) -> bool:
        """only GAE learns a value function"""
        return self.advantage == "gae"

    @property
    def whiten(self) -> bool:
        """ppo.whiten_advantages, with null resolved for the estimator"""
        if self.whiten_advantages is not None:
            return self.whiten_advantages
        return self.advantage in ("gae", "reinforce++")


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline writes the run under the run folder (upload later with `wandb sync`); online needs
    WANDB_API_KEY in the environment"""
    project: str = "instructray"
    """W&B project"""
    entity: str | None = None
    """W&B entity (team or user); null: the account's default"""


class RunConfig(Section):
    name: str
    """run name (default: the config file's name without .yaml)"""
    output_dir: str
    """the run's folder (default: runs/NAME); one subfolder a stage"""
    seed: int = 0
    """seed of training (shuffling, initialisation of new heads)"""
    trust_remote_code: bool = False
    """run Python code shipped inside model folders (Hugging Face's trust_remote_code) in every
    role; off: only architectures that transformers and vLLM know, and nothing from the folder
    runs"""
    stages: list[Literal["sft", "collect", "rm", "ppo"]] = Field(
        default_factory=lambda: list(DEFAULT_STAGES)
    )
    """stages to run, in recipe order sft, collect, rm, ppo (collect: rank samples of the SFT
    policy into the RM's comparisons, instead of the task's own)"""
    task: TaskConfig | None = Field(default_factory=TaskConfig)
    """the built-in task; null when every stage names its own model and data"""
    data: DataConfig = Field(default_factory=DataConfig)
    """token limits shared by every stage"""
    ray: RayConfig = Field(default_factory=RayConfig)
    """where the run's actors live"""
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    """the DeepSpeed learner group that trains SFT and the RM"""
    sft: SFTConfig = Field(default_factory=SFTConfig)
    """stage 1: supervised fine-tuning on demonstrations"""
    collect: CollectConfig = Field(default_factory=CollectConfig)
    """stage 2a (optional): sample K responses per prompt from the SFT policy and have a labeler
    rank them, InstructGPT's comparisons; with it, rm.train_data and rm.heldout_data default to
    its comparisons"""
    rm: RMConfig = Field(default_factory=RMConfig)
    """stage 2: reward model on ranked comparisons"""
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    """stage 3: PPO (and PPO-ptx) against the reward model"""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """the vLLM rollout engines"""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """the reward: its sources, and the actor of each"""
    reference: ScorerConfig = Field(default_factory=ScorerConfig)
    """the reference (frozen SFT) policy actor"""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """Weights & Biases logging"""

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        order = [s for s in STAGES if s in self.stages]
        if self.stages != order:
            raise ValueError(f"stages must be in recipe order {list(STAGES)} without repeats")
        for stage in ("sft", "rm"):
            batch = getattr(self, stage).batch_size
            if batch % self.learner.ranks:
                raise ValueError(
                    f"{stage}.batch_size ({batch}) must be a multiple of learner.ranks "
                    f"({self.learner.ranks}) so that every rank gets the same share"
                )
        for name, batch, ranks in (
            ("ppo.minibatch_size", self.ppo.minibatch_size, self.learner.ranks),
            ("ppo.minibatch_size", self.ppo.minibatch_size, self.ppo.critic.ranks)
            if self.ppo.advantage == "gae"
            else ("", 0, 1),
        ):
            if batch % ranks:
                raise ValueError(f"{name} ({batch}) must be a multiple of the ranks ({ranks})")
        ppo = self.ppo
        if ppo.rollout_batch * ppo.n_samples_per_prompt % ppo.minibatch_size:
            raise ValueError(
                f"ppo.rollout_batch × ppo.n_samples_per_prompt ({ppo.rollout_batch} × "
                f"{ppo.n_samples_per_prompt}) must be a multiple of ppo.minibatch_size "
                f"({ppo.minibatch_size})"
            )
        if ppo.advantage in ("grpo", "rloo") and ppo.n_samples_per_prompt < 2:
            raise ValueError(
                f"ppo.advantage {ppo.advantage} compares the responses to a prompt: it needs "
                f"ppo.n_samples_per_prompt >= 2 (it is {ppo.n_samples_per_prompt})"
            )
        if ppo.advantage == "gae" and not self.reward.uses_rm and ppo.critic_model is None:
            raise ValueError(
                "ppo.critic_model must be set: the critic starts from the reward model by "
                "default, and reward.sources holds none (or choose a critic-free ppo.advantage)"
            )
        if ppo.advantage == "gae" and self.rollout.chunk_size < ppo.critic.ranks:
            raise ValueError("rollout.chunk_size must be at least ppo.critic.ranks")
        for field, resources in (
            ("learner.resources_per_rank", self.learner.resources_per_rank),
            ("ppo.critic.resources_per_rank", self.ppo.critic.resources_per_rank),
            ("rollout.resources_per_engine", self.rollout.resources_per_engine),
            ("reward.resources", self.reward.resources),
            ("reference.resources", self.reference.resources),
        ):
            _check_resources(field, resources)
        if "collect" in self.stages:
            room = self.data.max_seq_len - self.data.max_prompt_tokens
            if self.collect.max_new_tokens >= room:
                raise ValueError(
                    f"collect.max_new_tokens ({self.collect.max_new_tokens}) must be < "
                    f"data.max_seq_len - data.max_prompt_tokens ({room}), so that a prompt, a "
                    "response and its end token fit the RM's sequences"
                )
            if self.collect.labeler == "task" and self.task is None:
                raise ValueError(
                    'collect.labeler "task" is the built-in task\'s labeler, but task is null; '
                    'name a "module:function" labeler or "human"'
                )
        if self.task is None:
            needs = {
                "sft": ["model", "train_data", "heldout_data"],
                "collect": ["prompts", "heldout_prompts"],
                # with collect in stages the RM reads its comparisons
                "rm": [] if "collect" in self.stages else ["train_data", "heldout_data"],
                "ppo": ["prompts", "heldout_prompts"],
            }
            for stage in self.stages:
                for name in needs[stage]:
                    if getattr(getattr(self, stage), name) is None:
                        raise ValueError(f"{stage}.{name} must be set when task is null")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["sft.lr=1e-3", "stages=[sft]"]` -> {"sft.lr": 0.001, "stages": ["sft"]}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            out[key] = _yaml(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from None
    return out


def _apply(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {dotted}: {'.'.join(parts[: i + 1])} is not a section "
                f"(it holds {child!r})"
            )
        node = child
    node[parts[-1]] = value


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    """The names allowed next to the field at `loc` (for "did you mean")."""
    model: Any = RunConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        model = next((a for a in args if issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _describe(err: Any, source: str, overridden: set[str]) -> str:
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    where = "the command line" if field in overridden else source
    if err["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(str(loc[-1]), _field_names(loc), n=1)
        tip = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{where}: {field}: unknown field{tip}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {field}: {msg} (got {err.get('input')!r})"


def _check_unicode(node: Any, source: str, overridden: set[str], at: str = "") -> None:
    """YAML's escapes can make text that is not Unicode (an unpaired surrogate such as \\ud800):
    refuse it here, naming the field, before anything tries to print or store it."""
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    for key, value in items:
        field = f"{at}.{key}" if at else str(key)
        for text in (key, value):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    where = "the command line" if field in overridden else source
                    shown = field.encode("utf-8", "backslashreplace").decode()
                    raise ConfigError(
                        f"invalid config:\n  {where}: {shown}: text that is not valid Unicode "
                        "(an unpaired surrogate escape)"
                    ) from None
        _check_unicode(value, source, overridden, field)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config from YAML, apply `key.sub=value` overrides, validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    over = parse_overrides(overrides or [])
    for key, value in over.items():
        _apply(raw, key, value)
    _check_unicode(raw, str(path), set(over))
    raw.setdefault("name", path.name.removesuffix(".yaml").removesuffix(".yml"))
    if isinstance(raw["name"], str):
        raw.setdefault("output_dir", str(Path("runs") / raw["name"]))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        problems = [_describe(err, str(path), set(over)) for err in e.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems)) from None


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain data (for logging and for the stage records)."""
    return config.model_dump(mode="json")
