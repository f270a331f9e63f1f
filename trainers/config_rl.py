"""The run config's sections of the RL stage: the rollout engines, the reward and its sources, the
reference, the KL penalty, the method (ppo), and W&B."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trainers.config_base import LearnerConfig, OptimConfig, Section


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
    torch_threads: int = Field(default=1, ge=1)
    """CPU engine: threads of its matrix products, fixed when it starts; they wait asleep at the
    end of a parallel region (OMP_WAIT_POLICY=PASSIVE). More than 1 pays where the engine
    generates alone (the synchronous mode, one request per engine): configs/smollm2.yaml gives
    it both of 2 cores, its generation about 1.4x as fast with the same samples; beside another
    role's work it runs about as fast as one thread. Colocated engines take the learner's
    torch_threads (they share its process)"""
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    """GPU engine: share of the GPU's memory it may take"""
    chunk_size: int | None = Field(default=None, ge=1)
    """prompts per generation request; each finished chunk goes on to reward, reference and
    critic at once, while the engines still generate the rest. null: each engine's share of
    the batch in one request (the demo's PPO iteration took 1.36 s so, 1.75 s in requests of 16
    prompts: those take 4 times the decoding steps of one request of 64)"""
    weight_sync: Literal["auto", "object_store", "broadcast"] = "auto"
    """how the policy's new weights reach the engines: through Ray's object store, or
    broadcast by the policy's rank 0 over a torch.distributed group with the engines (gloo on
    the CPU, NCCL when learners and engines have GPUs); auto: broadcast, the faster by
    bench/weight_sync.py (twice the object store's speed on the CPU)"""
    sync_bucket_mb: float = Field(default=64.0, gt=0)
    """broadcast sync: megabytes of weights per broadcast"""
    enforce_eager: bool = True
    """run the engine's model eagerly; false: vLLM compiles it (torch.compile, and CUDA graphs
    on a GPU) after a longer start, the compiled code cached in .cache/vllm (on 2 CPU cores the
    tiny model 6-15 s more, SmolLM2 about 100 s the first time and 30 s once cached). Compiled,
    the engine decoded the standard workload 1.28x faster and SmolLM2 1.1x (bench/rollout.py,
    2026-12-07): a long run's setting; the default suits short runs and tests"""


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
    group_minibatches: bool = False
    """minibatches of whole groups: a prompt's n_samples_per_prompt responses train in the same
    minibatch (the groups shuffled, not the responses); where prompts are at least 16 tokens
    long each is then computed once for its responses in the training passes too, as in the
    scoring ones (on SmolLM2, 4 × 4 responses of 32 + 32 tokens: see the README's GRPO figures)"""
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
    missing_eos_penalty: float = Field(default=0.0, ge=0)
    """subtracted from the reward of a response cut at max_new_tokens (no end token), as TRL's
    missing_eos_penalty: it teaches the policy to finish within the limit; 0: none"""
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
    policy_frozen_layers: int = Field(default=0, ge=0)
    """the policy's input embeddings (and so a tied output head) and this many of its lowest
    transformer blocks are not trained: a cheaper update on a real model; 0: all trained"""
    critic_frozen_layers: int = Field(default=0, ge=0)
    """the critic's input embeddings and this many of its lowest transformer blocks are not
    trained; 0: all trained"""
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
