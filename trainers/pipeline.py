"""`instructray run`: the stages that the config names, in recipe order, in one Ray session.

Every input (config, data files, model folders) is checked before Ray starts, so a mistake costs
seconds, not a cluster start. A stage that already finished with the same settings is not run
again; `summary.json` in the run folder gathers the figures of every stage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cluster import RayRuntime
from trainers import collect, rl, rm, sft
from trainers.common import check_model_folder
from trainers.config import RunConfig, to_dict
from trainers.data import read
from trainers.preflight import (
    Paths,
    _demand,
    check_capacity,
    check_reward_functions,
    prepare_ppo,
    prepare_rm,
    resolve_paths,
)
from trainers.stage_record import StageRecord
from trainers.task import ensure_task, task_labeler
from trainers.tracking import LibraryLog, Tracker

__all__ = [
    "Paths",
    "StageConflict",
    "_demand",
    "check_capacity",
    "check_reward_functions",
    "prepare_ppo",
    "prepare_rm",
    "resolve_paths",
    "run",
]


class StageConflict(RuntimeError):
    """A finished stage's folder holds work done with other settings."""


def _write_summary(path: Path, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary = json.loads(path.read_text()) if path.is_file() else {}
    for stage, values in figures.items():
        summary.setdefault(stage, {}).update(values)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return dict(summary)


def _stage(
    name: str, record: StageRecord, restart: bool, log: Any, train: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run a stage unless it finished before with the same settings; record what it reached."""
    if not restart:
        done = record.finished()
        if done is not None:
            log(f"{name}: finished before with the same settings, see {record.path.parent}")
            return done
        if record.differences():
            raise StageConflict(
                f"{record.path.parent} holds a finished {name} stage run with other settings "
                f"({', '.join(record.differences())} differ); pass --restart to train the run's "
                f"stages again over it (with stages=[{name}], this one only), or choose another "
                "output_dir"
            )
    figures = train()
    record.write(figures)
    return figures


def run(
    config: RunConfig, *, restart: bool = False, resume: bool = False, log: Any = print
) -> dict[str, Any]:
    """Run the config's stages; returns the summary (also written to `<run>/summary.json`)."""
    started = time.time()
    check_capacity(config)
    check_reward_functions(config)
    paths = resolve_paths(config)
    paths.run.mkdir(parents=True, exist_ok=True)
    # The console is for the run's own lines: what libraries print goes to the run's logs/.
    logs = paths.run / "logs"
    library_log = LibraryLog(logs / "driver.log")
    try:
        return _run(config, paths, logs, started, restart=restart, resume=resume, log=log)
    finally:
        library_log.close()


def _run(
    config: RunConfig,
    paths: Paths,
    logs: Path,
    started: float,
    *,
    restart: bool,
    resume: bool,
    log: Any,
) -> dict[str, Any]:
    plain = to_dict(config)
    (paths.run / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    labeler = None
    if config.task is not None:
        ensure_task(config.task, paths.task, log)
        labeler = task_labeler(config.task)

    # -- check every input before Ray starts --------------------------------------------------
    checked: set[Path] = set()

    def check(path: Path, field: str, reward: bool = False) -> Any:
        checked.add(Path(path))
        return check_model_folder(
            path, field, reward=reward, trust_remote_code=config.trust_remote_code
        )

    def check_produced(path: Path, field: str, reward: bool = False) -> None:
        """At a stage's start: a folder an earlier stage of this run wrote, not checked before."""
        if Path(path) not in checked:
            check(path, field, reward)

    shared = {"data": plain["data"], "learner": plain["learner"], "seed": config.seed}
    inputs: dict[str, Any] = {}
    # When this run trains SFT, the later stages start from its output, which does not exist
    # yet: their tokenizer is the SFT stage's input tokenizer.
    sft_tok = check(paths.sft_model, "sft.model") if "sft" in config.stages else None
    if sft_tok is not None:
        inputs["sft"] = sft.prepare(
            config, paths.sft_model, paths.sft_train, paths.sft_heldout, sft_tok, log
        )
    if "collect" in config.stages:
        tok = (
            sft_tok
            if config.collect.policy is None and sft_tok is not None
            else check(paths.collect_policy, "collect.policy")
        )
        inputs["collect"] = collect.prepare(
            config,
            paths.collect_policy,
            paths.collect_prompts,
            paths.collect_heldout_prompts,
            paths.collect_out,
            tok,
            log,
        )
    # The RM's comparisons come from this run's collect stage when it runs (they are read when
    # the RM stage starts); otherwise from files that exist now.
    rm_after_collect = "collect" in config.stages and (
        config.rm.train_data is None or config.rm.heldout_data is None
    )
    rm_tok = None
    if "rm" in config.stages:
        rm_tok = (
            sft_tok
            if config.rm.model is None and sft_tok is not None
            else check(paths.rm_model, "rm.model", reward=True)
        )
        if rm_after_collect:
            read(paths.rm_normalize, "demonstrations", "rm.normalize_data")
        else:
            inputs["rm"] = prepare_rm(config, paths, rm_tok, log)
    if "ppo" in config.stages:
        tok = (
            sft_tok
            if config.ppo.policy is None and sft_tok is not None
            else check(paths.ppo_policy, "ppo.policy")
        )
        inputs["ppo"] = prepare_ppo(config, paths, tok, log)
        # folders that exist before the run are checked now, not when the stage starts
        for given, path, field in (
            (config.ppo.reward_model if config.reward.uses_rm else None, paths.ppo_reward,
             "ppo.reward_model"),
            (config.ppo.critic_model if config.ppo.uses_critic else None, paths.ppo_critic,
             "ppo.critic_model"),
        ):  # fmt: skip
            if given is not None:
                check(path, field, reward=True)

    # -- run ------------------------------------------------------------------------------------
    tracker = Tracker(
        mode=config.wandb.mode,
        project=config.wandb.project,
        entity=config.wandb.entity,
        name=config.name,
        run_dir=paths.run,
        config=plain,
    )
    figures: dict[str, dict[str, Any]] = {}
    try:
        with RayRuntime(
            config.ray.address,
            num_cpus=config.ray.num_cpus,
            include_dashboard=config.ray.include_dashboard,
            worker_log=logs / "actors.log",
        ):
            log(f"what the libraries and actors print goes to {logs}/ (actors.log, driver.log)")
            if "sft" in config.stages:
                record = StageRecord(
                    paths.sft_out.parent,
                    {**shared, "sft": plain["sft"]},
                    {
                        "model": paths.sft_model,
                        "train_data": paths.sft_train,
                        "heldout_data": paths.sft_heldout,
                    },
                )
                figures["sft"] = _stage(
                    "sft",
                    record,
                    restart,
                    log,
                    lambda: sft.train(
                        config, inputs["sft"], paths.sft_out, tracker, log, resume, restart
                    ),
                )
            if "collect" in config.stages:
                check_produced(paths.collect_policy, "collect.policy")
                ranked = config.collect.ranked_file
                record = StageRecord(
                    paths.collect_out,
                    {
                        "data": plain["data"],
                        "seed": config.seed,
                        "collect": plain["collect"],
                        "rollout_dtype": config.rollout.dtype,
                        "labeler_agreement": config.task.labeler_agreement
                        if config.collect.labeler == "task" and config.task is not None
                        else None,
                    },
                    {
                        "policy": paths.collect_policy,
                        "prompts": paths.collect_prompts,
                        "heldout_prompts": paths.collect_heldout_prompts,
                        "ranked_file": ranked,
                    },
                )
                figures["collect"] = _stage(
                    "collect",
                    record,
                    restart,
                    log,
                    lambda: collect.train(
                        config, inputs["collect"], paths.collect_out, tracker, log, restart
                    ),
                )
            if "rm" in config.stages:
                check_produced(paths.rm_model, "rm.model", reward=True)
                if "rm" not in inputs:  # the comparisons that the collect stage just wrote
                    inputs["rm"] = prepare_rm(config, paths, rm_tok, log)
                record = StageRecord(
                    paths.rm_out.parent,
                    {**shared, "rm": plain["rm"]},
                    {
                        "model": paths.rm_model,
                        "train_data": paths.rm_train,
                        "heldout_data": paths.rm_heldout,
                        "normalize_data": paths.rm_normalize,
                    },
                )
                figures["rm"] = _stage(
                    "rm",
                    record,
                    restart,
                    log,
                    lambda: rm.train(
                        config, inputs["rm"], paths.rm_out, tracker, labeler, log, resume, restart
                    ),
                )
            if "ppo" in config.stages:
                check_produced(paths.ppo_policy, "ppo.policy")
                if config.reward.uses_rm:
                    check_produced(paths.ppo_reward, "ppo.reward_model", reward=True)
                if config.ppo.uses_critic:
                    check_produced(paths.ppo_critic, "ppo.critic_model", reward=True)
                record = StageRecord(
                    paths.ppo_out,
                    {
                        **shared,
                        **{k: plain[k] for k in ("ppo", "rollout", "reward", "reference")},
                    },
                    {
                        "policy": paths.ppo_policy,
                        "reward_model": paths.ppo_reward if config.reward.uses_rm else None,
                        "critic_model": paths.ppo_critic if config.ppo.uses_critic else None,
                        "prompts": paths.ppo_prompts,
                        "heldout_prompts": paths.ppo_heldout_prompts,
                        "ptx_data": paths.ppo_ptx,
                        "heldout_demonstrations": paths.ppo_heldout_demos,
                    },
                )
                result = _stage(
                    "ppo",
                    record,
                    restart,
                    log,
                    lambda: rl.train(
                        config,
                        inputs["ppo"],
                        paths.ppo_out,
                        tracker,
                        labeler,
                        log,
                        resume=resume,
                        restart=restart,
                    ),
                )
                for stage, values in result.items():  # PPO also measures the SFT policy
                    figures.setdefault(stage, {}).update(values)
        tracker.summary({f"{s}/{k}": v for s, vals in figures.items() for k, v in vals.items()})
    finally:
        wandb_folder = tracker.folder
        tracker.finish()
    summary = _write_summary(paths.run / "summary.json", figures)
    log(f"\ndone in {time.time() - started:.0f} s; run folder {paths.run}")
    for stage, values in figures.items():
        log(f"  {stage}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    log(f"  summary: {paths.run / 'summary.json'}")
    if wandb_folder:
        log(f"  W&B run ({config.wandb.mode}): {wandb_folder}")
    return summary
