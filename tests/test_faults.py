"""Faults during PPO on a real local Ray cluster: actors killed at a random point of an
iteration are replaced and their work issued again; non-finite rewards skip updates and stop the
run clearly."""

from __future__ import annotations

import random
import re
import shutil
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _config(demo: Path, out: Path, *extra: str):
    from trainers.config import load_config

    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"output_dir={out}",
            "stages=[ppo]",
            "wandb.mode=disabled",
            f"ppo.policy={demo / 'sft' / 'model'}",
            f"ppo.reward_model={demo / 'rm' / 'model'}",
            *extra,
        ],
    )


@pytest.mark.integration
def test_killed_engine_reward_reference_and_joiner_actors_are_replaced_and_nothing_is_lost(
    demo_run, tmp_path: Path
) -> None:
    import ray

    from trainers.common import check_model_folder
    from trainers.pipeline import prepare_ppo, resolve_paths
    from trainers.rl.inputs import PromptStream
    from trainers.rl.iteration import iteration
    from trainers.rl.roles import Roles
    from trainers.rl.state import DriverState

    demo, _ = demo_run
    shutil.copytree(demo / "task", tmp_path / "task")
    config = _config(demo, tmp_path, "rollout.chunk_size=8", "ppo.rollout_batch=32")
    paths = resolve_paths(config)
    inputs = prepare_ppo(config, paths, check_model_folder(paths.ppo_policy, "p"), lambda _: None)
    lines: list[str] = []
    rng = random.Random()  # a random point of the iteration, different in every run
    state, twin = DriverState.start(config, inputs.prompts), PromptStream(inputs.prompts, 0)
    with Roles(config, inputs, lines.append) as roles:
        kinds = {
            "rollout": roles.engines,
            "reward": roles.reward,
            "reference": roles.reference,
            "joiner": roles.joiner,
        }
        for role, group in kinds.items():
            victim = group.actors[0]
            delay = rng.uniform(0.0, 0.6)
            timer = threading.Timer(delay, lambda v=victim: ray.kill(v, no_restart=True))
            timer.start()
            replaced = 0.0
            # a kill that lands after the victim's last call of an iteration (the joiner's work
            # can end within the delay) is found at its next call, in the next iteration
            for _ in range(2):
                it = state.iteration
                figures, experience = iteration(config, roles, state)
                timer.join()
                samples = [s for chunk in ray.get(experience) for s in chunk]
                # every prompt of the iteration once: none lost, none counted twice
                wanted = sorted(p["prompt_ids"] for p in twin.take(32))
                assert sorted(s["prompt_ids"] for s in samples) == wanted, (role, delay)
                assert {s["version"] for s in samples} == {it}  # the replacement has the weights
                replaced += figures["faults/actors_replaced"]
                if replaced:
                    break
            assert replaced == 1, (role, delay, lines)
            assert group.actors[0] is not victim and group.alive(0)
            assert any(f"{group.name} rank 0 died or hangs" in line for line in lines), lines
        # the replaced engine holds the policy's current weights
        assert ray.get(roles.engines.actors[0].get_version.remote()) == state.iteration


@pytest.mark.e2e
def test_a_reward_model_that_scores_nan_skips_updates_and_stops_the_run(
    demo_run, short_eval, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from trainers.pipeline import run
    from trainers.rl import NonFiniteError

    demo, _ = demo_run
    broken = tmp_path / "nan_rm"
    shutil.copytree(demo / "rm" / "model", broken)
    weights = load_file(broken / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(demo / "task", tmp_path / "run" / "task")
    config = _config(
        demo,
        tmp_path / "run",
        f"ppo.reward_model={broken}",
        f"ppo.critic_model={demo / 'rm' / 'model'}",
        "ppo.iterations=3",
        "ppo.checkpoint_every=1",
        "ppo.max_skipped_steps=4",
        *short_eval,
    )
    with pytest.raises(NonFiniteError) as e:
        run(config, log=lambda _: None)
    message = str(e.value)
    assert "iteration 1" in message and "4 policy updates in a row were skipped" in message
    assert "ppo.max_skipped_steps=4" in message and "last good checkpoint is none yet" in message
    # nothing was trained on NaN, and no checkpoint holds it
    assert not (tmp_path / "run" / "ppo" / "checkpoints" / "latest").exists()


@pytest.mark.e2e
def test_a_killed_learner_rank_brings_the_groups_back_from_the_last_checkpoint(
    demo_run, short_eval, tmp_path: Path
) -> None:
    """A policy or critic rank killed at a random point after the first checkpoint: the groups
    go back to the last checkpoint within the run, which ends with every iteration done and the
    phase that the kill hit redone."""
    import os
    import signal
    import time

    from ray._private.state import actors  # the GCS's actor table (no dashboard needed)

    from trainers.pipeline import run

    demo, _ = demo_run
    shutil.copytree(demo / "task", tmp_path / "run" / "task")
    config = _config(
        demo,
        tmp_path / "run",
        "ppo.iterations=4",
        "ppo.checkpoint_every=2",
        "ppo.rollout_batch=32",
        "learner.collective_timeout_s=60",
        *short_eval,
    )
    latest = tmp_path / "run" / "ppo" / "checkpoints" / "latest"
    rng = random.Random()
    killed: list[int] = []

    def kill_a_learner() -> None:
        deadline = time.time() + 900
        while not latest.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))  # somewhere in iteration 3
        # this session's cluster: the live Learner actors are this run's policy and critic ranks
        learners = [a for a in actors().values()
                    if a["ActorClassName"] == "Learner" and a["State"] == "ALIVE"]  # fmt: skip
        victim = rng.choice(learners)["Pid"]
        killed.append(victim)
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_learner)
    killer.start()
    lines: list[str] = []
    summary = run(config, log=lines.append)
    killer.join()
    assert killed
    assert summary["ppo"]["iterations"] == 4
    said = [line for line in lines if "lost a rank" in line]
    assert len(said) == 1, lines
    # killed in iteration 3 or 4 (the groups go back to iteration 2's checkpoint), or while
    # iteration 4's checkpoint, the final evaluation or the final save was under way (back to
    # the last whole checkpoint, and the phase is redone)
    assert re.search(r"bringing the groups back from \S*iter-00000[24]$", said[0]), said


@pytest.mark.e2e
def test_an_engine_killed_after_the_last_iteration_is_replaced_and_the_phase_redone(
    demo_run, short_eval, tmp_path: Path
) -> None:
    """The rollout engine killed as the final checkpoint is written, so that the evaluation
    after training (or, if it had already generated, the memory figures) meets a dead engine:
    it is replaced, the phase is redone, and the run ends with its figures."""
    import os
    import signal
    import time

    from ray._private.state import actors

    from trainers.pipeline import run

    demo, _ = demo_run
    shutil.copytree(demo / "task", tmp_path / "run" / "task")
    config = _config(
        demo, tmp_path / "run", "ppo.iterations=2", "ppo.rollout_batch=32", *short_eval
    )
    latest = tmp_path / "run" / "ppo" / "checkpoints" / "latest"
    killed: list[int] = []

    def kill_the_engine() -> None:
        deadline = time.time() + 900
        while time.time() < deadline:
            if latest.exists() and latest.read_text().strip() == "iter-000002":
                break
            time.sleep(0.02)
        alive = [a for a in actors().values() if a["State"] == "ALIVE"]
        [engine] = [a for a in alive if a["ActorClassName"] == "RolloutEngine"]
        killed.append(engine["Pid"])
        os.kill(engine["Pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_the_engine)
    killer.start()
    lines: list[str] = []
    summary = run(config, log=lines.append)
    killer.join()
    assert killed
    assert summary["ppo"]["iterations"] == 2 and summary["ppo"]["winrate_vs_sft"] >= 0.0
    redone = [line for line in lines if "replaced rollout[0]; redoing it" in line]
    assert len(redone) == 1, lines
    assert redone[0].startswith(("ppo: evaluation after training:", "ppo: memory figures:"))
    assert (tmp_path / "run" / "ppo" / "policy" / "config.json").is_file()
