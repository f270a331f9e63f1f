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
from pydantic import BaseModel, Field, ValidationError, model_validator

from trainers.config_base import (
    DEFAULT_STAGES,
    LABELER_FUNCTION,
    STAGES,
    ConfigError,
    DataConfig,
    LearnerConfig,
    OptimConfig,
    RayConfig,
    Section,
    TaskConfig,
    TinyModelConfig,
    _check_resources,
)
from trainers.config_rl import (
    KLConfig,
    PPOConfig,
    RewardConfig,
    RewardSource,
    RolloutConfig,
    ScorerConfig,
    WandbConfig,
)
from trainers.config_stages import CollectConfig, RMConfig, SFTConfig

__all__ = [
    "DEFAULT_STAGES",
    "LABELER_FUNCTION",
    "STAGES",
    "CollectConfig",
    "ConfigError",
    "DataConfig",
    "KLConfig",
    "LearnerConfig",
    "OptimConfig",
    "PPOConfig",
    "RMConfig",
    "RayConfig",
    "RewardConfig",
    "RewardSource",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "ScorerConfig",
    "Section",
    "TaskConfig",
    "TinyModelConfig",
    "WandbConfig",
    "load_config",
    "parse_overrides",
    "to_dict",
]


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
    """the DeepSpeed learner group that trains SFT, the RM and the PPO policy (sft.learner and
    rm.learner change it for their stage)"""
    placement: Literal["separate", "colocated"] = "separate"
    """the RL stage's roles. separate: each role its own actors, sized by its section.
    colocated: one worker per learner rank (sized by the learner section) hosts the policy's
    rank, a rollout engine, the reference, the reward and a critic rank, which take turns on
    its device; the batch is split over the workers and each engine takes the new weights from
    its own process (rollout.engines, ppo.critic's size and the scorers' cpus do not apply)"""
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
            batch, ranks = getattr(self, stage).batch_size, self.stage_learner(stage).ranks
            if batch % ranks:
                field = f"{self.stage_learner_section(stage, 'ranks')}.ranks"
                raise ValueError(
                    f"{stage}.batch_size ({batch}) must be a multiple of {field} ({ranks}) so "
                    "that every rank gets the same share"
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
        if ppo.group_minibatches and ppo.minibatch_size % ppo.n_samples_per_prompt:
            raise ValueError(
                f"ppo.group_minibatches: ppo.minibatch_size ({ppo.minibatch_size}) must be a "
                f"multiple of ppo.n_samples_per_prompt ({ppo.n_samples_per_prompt}) to hold "
                "whole groups"
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
        chunk = self.chunk_size(ppo.rollout_batch)
        if ppo.advantage == "gae" and chunk < ppo.critic.ranks:
            raise ValueError(
                f"rollout.chunk_size must be at least ppo.critic.ranks (a chunk is {chunk} "
                "prompts: each critic rank values a part of it)"
            )
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
        if self.task is not None and self.task.kind == "arithmetic":
            if "collect" in self.stages and self.collect.labeler == "task":
                raise ValueError(
                    'collect.labeler "task" ranks reviews; the arithmetic task has no ranking '
                    '(name a "module:function" labeler)'
                )
            if "rm" in self.stages and "collect" not in self.stages and self.rm.train_data is None:
                raise ValueError(
                    "the arithmetic task has no comparisons for the rm stage: its reward is "
                    "exact match (reward.sources: [{kind: function, target: "
                    "'trainers.arithmetic:exact_match'}]); leave rm out of the stages or set "
                    "rm.train_data"
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

    def stage_learner(self, stage: Literal["sft", "rm"]) -> LearnerConfig:
        """The learner group that trains `stage`: the learner section with the stage's own
        `learner` settings over it."""
        own = getattr(self, stage).learner
        return (
            LearnerConfig.model_validate({**self.learner.model_dump(), **own})
            if own
            else self.learner
        )

    def stage_learner_section(self, stage: Literal["sft", "rm"], field: str | None = None) -> str:
        """The section a user edits to size `stage`'s learners (to change their `field`): the
        stage's own, where it is set (where it sets that field)."""
        own = getattr(self, stage).learner
        return f"{stage}.learner" if (field in own if field else own) else "learner"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    @property
    def engine_count(self) -> int:
        """The rollout engines: rollout.engines, or one in each colocated learner worker."""
        return self.learner.ranks if self.placement == "colocated" else self.rollout.engines

    def chunk_size(self, prompts: int) -> int:
        """How many of `prompts` an engine takes at once: rollout.chunk_size, or less where that
        would leave a colocated worker without a share; unset, each engine's share at once."""
        size, share = self.rollout.chunk_size, -(-prompts // self.engine_count)
        if size is None:
            return share
        return min(size, share) if self.placement == "colocated" else size


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
    if not loc:  # a check of several fields: its message names them; the input is the whole file
        return f"{where}: {msg}"
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
