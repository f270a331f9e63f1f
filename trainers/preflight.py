"""What a run needs before Ray starts: where each stage reads and writes (`resolve_paths`), the
encoded inputs of the RM and RL stages, and whether a local cluster has the CPUs and GPUs that
each stage's roles reserve (`check_capacity`)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.runtime import gpu_count
from trainers import collect, rl, rm
from trainers.config import ConfigError, LearnerConfig, RunConfig


@dataclass
class Paths:
    run: Path
    task: Path
    sft_model: str
    sft_train: str
    sft_heldout: str
    sft_out: Path
    collect_policy: str
    collect_prompts: str
    collect_heldout_prompts: str
    collect_out: Path
    rm_model: str
    rm_train: str
    rm_heldout: str
    rm_normalize: str
    rm_out: Path
    ppo_policy: str
    ppo_reward: str
    ppo_critic: str
    ppo_prompts: str
    ppo_heldout_prompts: str
    ppo_ptx: str
    ppo_heldout_demos: str
    ppo_out: Path


def prepare_rm(config: RunConfig, paths: Paths, tokenizer: Any, log: Any = print) -> rm.RMInputs:
    """The RM stage's encoded comparisons and demonstrations, from the run's resolved paths."""
    return rm.prepare(
        config,
        paths.rm_model,
        paths.rm_train,
        paths.rm_heldout,
        paths.rm_normalize,
        tokenizer,
        log,
    )


def prepare_ppo(config: RunConfig, paths: Paths, tokenizer: Any, log: Any = print) -> rl.RLInputs:
    """The PPO stage's models and encoded data, from the run's resolved paths."""
    return rl.prepare(
        config,
        policy=paths.ppo_policy,
        reward_model=paths.ppo_reward,
        critic_model=paths.ppo_critic,
        prompts=paths.ppo_prompts,
        heldout_prompts=paths.ppo_heldout_prompts,
        ptx=paths.ppo_ptx,
        heldout_demos=paths.ppo_heldout_demos,
        tokenizer=tokenizer,
        log=log,
    )


def resolve_paths(config: RunConfig) -> Paths:
    run = config.run_dir
    task = run / "task"
    sft_out = run / "sft" / "model"

    def pick(value: str | None, default: Path) -> str:
        return value if value is not None else str(default)

    sft_train = pick(config.sft.train_data, task / "sft_train.jsonl")
    sft_heldout = pick(config.sft.heldout_data, task / "sft_heldout.jsonl")
    rm_out = run / "rm" / "model"
    ppo_reward = pick(config.ppo.reward_model, rm_out)
    collect_out = run / "collect"
    # with the collect stage, the RM trains on its comparisons; else on the task's
    comparisons = (
        collect.comparisons_files(collect_out)
        if "collect" in config.stages
        else {"train": task / "rm_train.jsonl", "heldout": task / "rm_heldout.jsonl"}
    )
    return Paths(
        run=run,
        task=task,
        sft_model=pick(config.sft.model, task / "base_model"),
        sft_train=sft_train,
        sft_heldout=sft_heldout,
        sft_out=sft_out,
        collect_policy=pick(config.collect.policy, sft_out),
        collect_prompts=pick(config.collect.prompts, task / "prompts_train.jsonl"),
        collect_heldout_prompts=pick(
            config.collect.heldout_prompts, task / "prompts_heldout.jsonl"
        ),
        collect_out=collect_out,
        rm_model=pick(config.rm.model, sft_out),
        rm_train=pick(config.rm.train_data, comparisons["train"]),
        rm_heldout=pick(config.rm.heldout_data, comparisons["heldout"]),
        rm_normalize=pick(config.rm.normalize_data, Path(sft_train)),
        rm_out=rm_out,
        ppo_policy=pick(config.ppo.policy, sft_out),
        ppo_reward=ppo_reward,
        ppo_critic=pick(config.ppo.critic_model, Path(ppo_reward)),
        ppo_prompts=pick(config.ppo.prompts, task / "prompts_train.jsonl"),
        ppo_heldout_prompts=pick(config.ppo.heldout_prompts, task / "prompts_heldout.jsonl"),
        ppo_ptx=pick(config.ppo.ptx_data, Path(sft_train)),
        ppo_heldout_demos=pick(config.ppo.heldout_demonstrations, Path(sft_heldout)),
        ppo_out=run / "ppo",
    )


def _demand(config: RunConfig, stage: str) -> list[tuple[str, float, float]]:
    """What a stage's roles reserve at once: [(what, CPUs, GPUs)]."""

    def learners(name: str, section: LearnerConfig) -> tuple[str, float, float]:
        return (
            f"{name}.ranks {section.ranks} × {section.cpus_per_rank:g} CPUs",
            section.ranks * section.cpus_per_rank,
            section.ranks * section.gpus_per_rank,
        )

    r = config.rollout
    engines = (
        f"rollout.engines {r.engines} × {r.cpus_per_engine:g} CPUs",
        r.engines * r.cpus_per_engine,
        r.engines * r.gpus_per_engine,
    )
    if stage == "collect":
        return [engines]
    if stage == "sft" or stage == "rm":
        section = config.stage_learner_section(stage, "ranks")
        return [learners(section, config.stage_learner(stage))]
    critic = [learners("ppo.critic", config.ppo.critic)] if config.ppo.uses_critic else []
    return [
        learners("learner", config.learner),
        *critic,
        engines,
        (f"reward.cpus {config.reward.cpus:g}", config.reward.cpus, config.reward.gpus),
        (f"reference.cpus {config.reference.cpus:g}", config.reference.cpus, config.reference.gpus),
    ]


def check_reward_functions(config: RunConfig) -> None:
    """A reward function's module must be importable where its actor runs: Ray's workers have
    this driver's Python path, so a module this process cannot find is a ConfigError now, not an
    actor's failure after the earlier stages have run."""
    if "ppo" not in config.stages:
        return
    for i, source in enumerate(config.reward.sources):
        if source.kind != "function" or source.target is None:
            continue
        module = source.target.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that is missing or not a package
            found = False
        if not found:
            raise ConfigError(
                f"reward.sources[{i}].target: no module {module!r} (of {source.target!r}) on this "
                "Python's path; run from the folder that holds it or add that folder to PYTHONPATH"
            )


def check_capacity(config: RunConfig) -> None:
    """A local cluster's size is known before it starts: a stage whose roles reserve more CPUs
    or GPUs than it has is a ConfigError that lists them (on a remote cluster, placement says
    the same with the cluster's nodes)."""
    if config.ray.address is not None:
        return
    cpus = config.ray.num_cpus or os.cpu_count() or 1
    source = "ray.num_cpus" if config.ray.num_cpus else "this machine's CPU count"
    gpus = gpu_count()
    for stage in config.stages:
        parts = _demand(config, stage)
        need_cpu = sum(c for _, c, _ in parts)
        need_gpu = sum(g for _, _, g in parts)
        if need_cpu > cpus + 1e-9:
            raise ConfigError(
                f"the {stage} stage reserves {need_cpu:g} CPUs at once ("
                + " + ".join(what for what, _, _ in parts)
                + f") but the local cluster has {cpus} ({source}); lower the ranks or the CPUs "
                "per rank (fractions share a core), or set ray.num_cpus"
            )
        if need_gpu > gpus + 1e-9:
            raise ConfigError(
                f"the {stage} stage asks for {need_gpu:g} GPUs but this machine has {gpus}; set "
                "the roles' gpus to 0 to run on the CPU"
            )
