"""The run config's sections of the SFT, collect and RM stages."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from trainers.config_base import LABELER_FUNCTION, LearnerConfig, OptimConfig, Section


def _learner_settings(value: dict[str, Any]) -> dict[str, Any]:
    """A stage's `learner` settings: fields of the learner section with values it accepts."""
    try:
        LearnerConfig.model_validate(value)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ValueError(f"{field}: not a field of the learner section") from None
        raise ValueError(f"{field}: {err['msg']}") from None
    return value


_LEARNER_DOC = """this stage's own settings of the learner section, over it (e.g. {ranks: 1,
    torch_threads: 2}: on 2 cores one rank of two threads trains the real model's RM about 1.45×
    as fast as two ranks of one, which all-reduce its gradients every step); empty: the learner
    section as it is"""


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
    """demonstrations per optimizer step, over all ranks (a multiple of the ranks:
    sft.learner.ranks where set, else learner.ranks)"""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """optimizer and schedule"""
    learner: dict[str, Any] = Field(default_factory=dict, description=_LEARNER_DOC)
    checkpoint_every: int | None = Field(default=None, ge=1)
    """optimizer steps between the stage's checkpoints (null: at each epoch's end but the
    last); a rank that dies brings the group back from the last one, and --resume continues
    from it; they are removed once the model is saved"""
    learner_restarts: int = Field(default=3, ge=0)
    """times the learner group is brought back from the last checkpoint within the stage after
    one of its ranks died or hung; then the stage stops"""

    _learner = field_validator("learner")(_learner_settings)


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
    """prompts (each with all its K ranked responses) per step, over all ranks (a multiple of the
    ranks: rm.learner.ranks where set, else learner.ranks)"""
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=5e-4))
    """optimizer and schedule"""
    learner: dict[str, Any] = Field(default_factory=dict, description=_LEARNER_DOC)
    frozen_layers: int = Field(default=0, ge=0)
    """the input embeddings and this many of the lowest transformer blocks stay as the starting
    model has them: a step then costs the forward pass and the backward pass of the blocks above
    (on a real model, a cheaper RM per ranked comparison); 0: all trained"""
    checkpoint_every: int | None = Field(default=None, ge=1)
    """optimizer steps between the stage's checkpoints (null: at each epoch's end but the
    last); a rank that dies brings the group back from the last one, and --resume continues
    from it; they are removed once the model is saved"""
    learner_restarts: int = Field(default=3, ge=0)
    """times the learner group is brought back from the last checkpoint within the stage after
    one of its ranks died or hung; then the stage stops"""

    _learner = field_validator("learner")(_learner_settings)


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
    chunk_retries: int = Field(default=3, ge=0)
    """times an engine that died or hung is replaced and its chunks of prompts sampled again
    (with the same seeds: the same responses) within the stage; then the stage stops, keeping
    the prompts collected so far"""
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
    engines: int | None = Field(default=None, ge=1)
    """vLLM engines of this stage, placed as rollout places them; null: rollout.engines. The
    stage runs alone, so on a small machine an engine a core keeps every core busy; the
    threads that rollout gives its engines (engines × torch_threads) are shared among this
    stage's (at least one each). A chunk's samples do not depend on the engine that draws them"""
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
