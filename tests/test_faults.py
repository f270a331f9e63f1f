"""Faults during PPO on a real local Ray cluster: actors killed at a random point of an
iteration are replaced and their work issued again; non-finite rewards skip updates and stop the
run clearly."""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import Chaos, live_pids
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
def test_chaos_a_role_killed_in_every_phase_and_the_run_still_reaches_the_demo_bar(
    demo_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run of the demo's PPO stage, in overlapped mode (the engines generate the next batch
    while the learners train), in which role processes are killed at random moments of each
    phase: the engine as the roles start and during the evaluation before training, the reward
    actor, a learner rank and the reference during iterations, the engine during a weight sync,
    and the engine again as the final checkpoint is written, so that the evaluation after
    training (or, if it had already generated, the memory figures) meets it dead and is redone.
    The run ends, with every iteration done, the prompts taken exactly once (the stream's
    position), each batch generated by the weights of one version before those it trains, and
    the demo's win-rate bar."""
    import json

    from tests.wandb_reader import history
    from trainers.pipeline import run
    from trainers.rl.checkpoints import Checkpoints
    from trainers.rl.inputs import PromptStream
    from trainers.rl.roles import Roles

    demo, _ = demo_run
    shutil.copytree(demo / "task", tmp_path / "run" / "task")
    config = _config(
        demo,
        tmp_path / "run",
        "ppo.overlap=true",
        "wandb.mode=offline",
        "ppo.checkpoint_every=10",
        "learner.collective_timeout_s=60",
    )
    chaos = Chaos(tmp_path / "run" / "ppo" / "checkpoints" / "latest")
    chaos.kill("RolloutEngine", lambda: True)  # as the roles start
    chaos.kill("RolloutEngine", chaos.said("ppo: 1 engine(s), policy on"))  # the first evaluation
    chaos.kill("RewardModel", chaos.at_checkpoint(10))
    chaos.kill("Learner", chaos.at_checkpoint(20))
    chaos.kill("ReferencePolicy", chaos.at_checkpoint(30))
    submit_sync, save = Roles.submit_sync, Checkpoints.save

    def sync_under_fire(self: Roles, version: int) -> list[Any]:
        receiving = submit_sync(self, version)
        if version == 45 and "RolloutEngine during sync" not in chaos.killed:
            # the engine dies while the weights are on their way to it
            chaos.kill_now("RolloutEngine", "RolloutEngine during sync")
        return receiving

    def save_then_kill(self: Checkpoints, iteration: int, roles: Roles, driver: Any) -> Path:
        folder = save(self, iteration, roles, driver)
        if iteration == 60:
            # the engine dies as the final checkpoint is written, so that the evaluation after
            # training always meets it dead
            chaos.kill_now("RolloutEngine", "RolloutEngine at the last checkpoint")
        return folder

    monkeypatch.setattr(Roles, "submit_sync", sync_under_fire)
    monkeypatch.setattr(Checkpoints, "save", save_then_kill)
    summary = run(config, log=chaos.log)
    chaos.join()
    lines = chaos.lines
    assert sorted(chaos.killed) == sorted(
        ["RolloutEngine", "RolloutEngine", "RewardModel", "Learner", "ReferencePolicy",
         "RolloutEngine during sync", "RolloutEngine at the last checkpoint"]
    ), lines  # fmt: skip
    ppo = summary["ppo"]
    assert ppo["iterations"] == 60
    assert ppo["winrate_vs_sft"] >= 0.75, ppo
    assert ppo["labeler_score"] > summary["sft"]["labeler_score"]
    # every iteration ran once in the trained history: the stream stands where 60 batches of
    # prompts from the start leave it (none skipped, none taken twice)
    driver = json.loads((tmp_path / "run" / "ppo" / "checkpoints" / "iter-000060" / "driver.json")
                        .read_text())  # fmt: skip
    stream = PromptStream(list(range(2000)), config.seed)
    stream.take(60 * config.ppo.rollout_batch)
    assert driver["stream"] == stream.state()
    said = "\n".join(lines)
    assert "lost a rank" in said and "bringing the groups back from" in said, said
    assert "reward rank 0 died or hangs" in said and "reference rank 0 died or hangs" in said
    after = ("ppo: evaluation after training:", "ppo: memory figures:")
    final = [line for line in lines if line.startswith(after) and "replaced rollout[0]" in line]
    assert len(final) == 1 and "redoing it" in final[0], lines
    assert (
        ppo.get("faults/evaluation_after_training/redone", 0)
        + ppo.get("faults/memory_figures/redone", 0)
        == 1
    ), ppo
    assert ppo["faults/iteration/redone"] == 1 and ppo["faults/iteration/seconds"] > 0
    assert (tmp_path / "run" / "ppo" / "policy" / "config.json").is_file()

    # overlapped: the first batch comes from the starting weights, every later one from the
    # weights of one version before those it trains (the checkpoint keeps the batch generated
    # while its iteration trained, so the groups come back from it with that batch), except a
    # batch made again from the current weights: one whose chunk was issued again after an
    # actor working on it died (the engine's whole share is one chunk), or the batch after a
    # redone iteration (the one being generated then is dropped); each sample carries the
    # version that generated it
    [wandb_run] = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    rows = history(wandb_run)
    last = {r["ppo/iteration"]: r for r in rows if "ppo/score" in r}  # a redone one's last row
    assert sorted(last) == list(range(1, 61))
    lag = {k: last[k]["ppo/weight_version_lag"] for k in last}
    assert lag[1] == 0 and set(lag.values()) <= {0, 1}
    reissued = {k for k in last if last[k]["ppo/faults/chunks_reissued"] > 0}
    fresh = {k for k in range(2, 61) if lag[k] == 0}
    assert len(fresh - reissued) <= ppo["faults/iteration/redone"], (lag, reissued)
    tables = [r for r in rows if r.get("ppo/samples/_type") == "table-file"]
    assert {t["ppo/iteration"] for t in tables} == {1, *range(5, 61, 5)}
    for t in tables:
        table = json.loads((wandb_run / "files" / t["ppo/samples/path"]).read_text())
        k = t["ppo/iteration"]
        assert table["columns"][-1] == "version"
        assert {row[-1] for row in table["data"]} == {k - 1 - lag[k]}, k


@pytest.mark.e2e
def test_a_hung_reference_in_the_final_evaluation_is_found_at_its_deadline_and_replaced(
    demo_run, short_eval, tmp_path: Path
) -> None:
    """SIGSTOP (hung, not dead): the reference stopped as the last checkpoint is written does not
    answer the evaluation after training; at learner.collective_timeout_s it counts as dead, is
    replaced, and the evaluation is done again."""
    from trainers.pipeline import run

    demo, _ = demo_run
    shutil.copytree(demo / "task", tmp_path / "run" / "task")
    config = _config(
        demo,
        tmp_path / "run",
        "ppo.iterations=2",
        "ppo.rollout_batch=32",
        "learner.collective_timeout_s=15",
        *short_eval,
    )
    chaos = Chaos(tmp_path / "run" / "ppo" / "checkpoints" / "latest")
    stopped: list[int] = []
    ended = threading.Event()  # the run returned or failed: the thread stops looking

    def stop_the_reference() -> None:
        while not chaos.at_checkpoint(2)():
            if ended.wait(0.02):
                return
        [pid] = live_pids("ReferencePolicy")
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    thread = threading.Thread(target=stop_the_reference, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        summary = run(config, log=chaos.log)
    finally:
        ended.set()
        thread.join()
    assert stopped
    said = "\n".join(chaos.lines)
    assert "reference rank 0 died or hangs" in said, said
    assert "ppo: evaluation after training: replaced reference[0]; redoing it" in said, said
    assert summary["ppo"]["faults/evaluation_after_training/redone"] == 1
    assert time.perf_counter() - t0 > 15  # it waited for the deadline, no longer than needed
    with pytest.raises(ProcessLookupError):  # the stopped process was ended, not left behind
        for _ in range(100):
            os.kill(stopped[0], 0)
            time.sleep(0.1)


@pytest.mark.e2e
def test_learner_ranks_killed_in_sft_and_rm_come_back_from_the_stages_checkpoints(
    demo_run, tmp_path: Path
) -> None:
    """The demo's SFT and RM stages, a learner rank killed in each after its first checkpoint:
    each group comes back from it and does the steps after it again, in the same order, so the
    stages end where the demo's uninterrupted ones did."""
    from trainers.config import load_config
    from trainers.pipeline import run

    demo, demo_summary = demo_run
    shutil.copytree(demo / "task", tmp_path / "run" / "task")
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"output_dir={tmp_path / 'run'}", "stages=[sft, rm]", "wandb.mode=disabled"],
    )
    chaos = Chaos(tmp_path / "run" / "ppo" / "checkpoints" / "latest")
    sft_first = f"step-{2000 // config.sft.batch_size:06d}"  # the first epoch's end
    chaos.kill("Learner", chaos.at(tmp_path / "run" / "sft" / "checkpoints" / "latest", sft_first))
    chaos.kill("Learner", chaos.at(tmp_path / "run" / "rm" / "checkpoints" / "latest"))
    summary = run(config, log=chaos.log)
    chaos.join()
    assert chaos.killed == ["Learner", "Learner"]
    said = "\n".join(chaos.lines)
    for stage in ("sft", "rm"):
        assert f"a rank of the {stage}-learner group died or hangs" in said, said
        assert summary[stage]["faults/learner_restarts"] == 1
        assert not (tmp_path / "run" / stage / "checkpoints").exists()  # removed once saved
    assert f"bringing it back from {tmp_path / 'run' / 'sft' / 'checkpoints' / sft_first}" in said
    # the same steps in the same order: the demo's figures
    for stage, key in (("sft", "heldout_loss"), ("sft", "untrained_loss"),
                       ("rm", "heldout_accuracy"), ("rm", "reward_offset")):  # fmt: skip
        assert summary[stage][key] == pytest.approx(demo_summary[stage][key], rel=1e-4), key
