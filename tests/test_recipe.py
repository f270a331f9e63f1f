"""End to end: the demo's config through SFT and the RM on real Ray + DeepSpeed actors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos import Chaos
from tests.conftest import ROOT
from trainers.config import load_config
from trainers.pipeline import StageConflict, run


@pytest.mark.e2e
def test_sft_learns_the_demonstrations(demo_run) -> None:
    out, summary = demo_run
    assert summary["sft"]["heldout_loss"] < 0.5 * summary["sft"]["untrained_loss"]
    assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.e2e
def test_rm_comes_within_five_points_of_the_labeler_ceiling(demo_run) -> None:
    _, summary = demo_run
    rm = summary["rm"]
    assert 0.68 < rm["labeler_ceiling"] < 0.78
    assert rm["heldout_accuracy"] >= rm["labeler_ceiling"] - 0.05


@pytest.mark.e2e
def test_the_rm_stage_trains_with_its_own_learner_settings(demo_run, tmp_path: Path) -> None:
    """`rm.learner` over the learner section: the demo's RM on one rank of two threads instead
    of two ranks of one. One rank's plain step and two ZeRO-2 ranks take the same updates up to
    rounding, so it ends where the demo's RM did."""
    import shutil

    demo, demo_summary = demo_run
    for stage in ("task", "sft"):
        shutil.copytree(demo / stage, tmp_path / "run" / stage)
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"output_dir={tmp_path / 'run'}", "stages=[rm]", "wandb.mode=disabled",
         "rm.learner={ranks: 1, torch_threads: 2}"],
    )  # fmt: skip
    lines: list[str] = []
    summary = run(config, log=lines.append)
    said = "\n".join(lines)
    assert "parameters on 1 rank(s)" in said, said
    assert summary["rm"]["heldout_accuracy"] == pytest.approx(
        demo_summary["rm"]["heldout_accuracy"], abs=0.01
    )
    assert summary["rm"]["reward_offset"] == pytest.approx(
        demo_summary["rm"]["reward_offset"], rel=1e-3
    )


@pytest.mark.e2e
def test_rm_is_a_loadable_classifier_that_puts_demonstrations_at_zero(demo_run) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainers.data import Limits, collate_sft, encode_demonstrations, read

    out, _ = demo_run
    folder = out / "rm" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(folder)
    demos = encode_demonstrations(
        read(out / "task" / "sft_train.jsonl", "demonstrations"), tok, Limits(32, 96)
    )
    scores = []
    with torch.no_grad():
        for i in range(0, len(demos), 250):
            batch = collate_sft(demos[i : i + 250], tok.pad_token_id, 1)
            scores.append(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
                    :, 0
                ]
            )
    normalized = torch.cat(scores) - model.config.reward_offset
    assert abs(normalized.mean().item()) < 1e-3


@pytest.mark.e2e
def test_ppo_beats_the_sft_policy_by_the_hidden_labeler(demo_run) -> None:
    out, summary = demo_run
    ppo, sft = summary["ppo"], summary["sft"]
    assert ppo["winrate_vs_sft"] >= 0.75
    assert ppo["labeler_score"] > sft["labeler_score"]
    assert ppo["rm_score"] > sft["rm_score"]
    assert 0 < ppo["kl_to_sft"] < 20
    assert ppo["iterations"] == 60
    for key in ("seconds", "tokens_per_second", "heldout_demo_loss"):
        assert ppo[key] > 0
    # what a run reports of itself: each role's peak memory, each stage's time, the phases
    for role in ("rollout", "reward", "reference", "policy", "critic", "joiner"):
        assert 0.1 < ppo[f"memory_gb/{role}"] < 24, role
    for stage in ("sft", "rm"):
        assert 0.1 < summary[stage]["memory_gb/learner"] < 24
        assert summary[stage]["seconds"] > 0
    phases = {k.split("/")[1]: v for k, v in ppo.items() if k.startswith("seconds_per_iteration/")}
    for phase in ("generate", "train"):
        assert 0 < phases[phase] < phases["iteration"]
    # and the parts of the stage's time outside the iterations: each spent, none over the whole
    parts = {k.split("/")[1]: v for k, v in ppo.items() if k.startswith("stage_seconds/")}
    assert set(parts) == {
        "start_roles",
        "evaluation_before",
        "iterations",
        "checkpoints",
        "evaluation_after",
        "final_save",
    }
    assert all(v > 0 for v in parts.values()), parts
    assert parts["iterations"] >= 60 * phases["iteration"] * 0.5
    assert sum(parts.values()) <= ppo["seconds"]
    # and what the actors printed went to the run's log, not to the console
    assert "pid=" in (out / "logs" / "actors.log").read_text()
    # the final policy is a Hugging Face folder with its tokenizer, and the evaluation's
    # samples lie beside it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "ppo" / "policy", use_safetensors=True)
    assert AutoTokenizer.from_pretrained(out / "ppo" / "policy").chat_template
    rows = [json.loads(line) for line in (out / "ppo" / "eval_samples.jsonl").open()]
    assert len(rows) == 200 and {"sft_response", "ppo_response"} <= rows[0].keys()
    # before training the engines hold the reference's weights: that KL is 0, not measured
    assert all(r["sft_kl"] == 0.0 for r in rows) and any(r["ppo_kl"] != 0.0 for r in rows)


@pytest.mark.e2e
def test_stage_folders_and_wandb_run(demo_run) -> None:
    from tests.wandb_reader import finite, history

    out, _ = demo_run
    for stage in ("sft", "rm"):
        assert (out / stage / "model" / "model.safetensors").is_file()
        assert (out / stage / "model" / "tokenizer.json").is_file()
        assert (out / stage / "stage.json").is_file()
    assert (out / "task" / "base_model" / "config.json").is_file()
    [run] = list((out / "wandb").glob("offline-run-*"))
    rows = history(run)
    ppo_rows = [r for r in rows if "ppo/score" in r]
    assert len(ppo_rows) == 60
    keys = [
        "ppo/score",
        "ppo/kl",
        "ppo/beta",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/approx_kl",
        "ppo/clipfrac",
        "ppo/entropy",
        "ppo/explained_variance",
        "ppo/advantage_mean",
        "ppo/return_mean",
        "ppo/response_length",
        "ppo/time/generate",
        "ppo/time/train",
        "ppo/time/weight_sync",
        "ppo/tokens_per_second",
        "ppo/weight_version_lag",
        "ppo/time/rollout_busy",
        "ppo/time/reward_busy",
        "ppo/time/reference_busy",
        "ppo/time/critic_forward_busy",
    ]
    for row in ppo_rows:
        for key in keys:
            assert finite(row[key]), (key, row.get(key))
    assert {r["ppo/weight_version_lag"] for r in ppo_rows} == {0}
    first = sum(r["ppo/score"] for r in ppo_rows[:5]) / 5
    last = sum(r["ppo/score"] for r in ppo_rows[-5:]) / 5
    assert last > first + 0.2  # the RM score rises
    tables = [r for r in rows if r.get("ppo/samples/_type") == "table-file"]
    assert len(tables) == 13  # the first iteration and every 5th
    table = json.loads((run / "files" / tables[-1]["ppo/samples/path"]).read_text())
    assert table["columns"][:3] == ["prompt", "response", "rm_score"]
    assert len(table["data"]) == 8
    assert any("sft/loss" in r for r in rows) and any("rm/heldout_accuracy" in r for r in rows)


@pytest.mark.e2e
def test_a_finished_stage_is_reused_and_never_overwritten_silently(demo_run) -> None:
    out, summary = demo_run
    weights = (out / "sft" / "model" / "model.safetensors").read_bytes()
    config = load_config(
        ROOT / "configs" / "tiny.yaml", [f"output_dir={out}", "wandb.mode=disabled"]
    )
    said: list[str] = []
    assert run(config, log=said.append) == summary
    assert any("sft: finished before with the same settings" in s for s in said)
    # how a stage survives faults is not what it computed: other such settings reuse it too
    recovery = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"output_dir={out}", "wandb.mode=disabled", "sft.checkpoint_every=3",
         "rm.learner_restarts=1", "ppo.chunk_retries=5", "learner.collective_timeout_s=90"],
    )  # fmt: skip
    said.clear()
    assert run(recovery, log=said.append) == summary
    assert sum("finished before with the same settings" in s for s in said) == 3
    # the run folder copied elsewhere (new files, new times), run there: the same finished work
    moved = out.parent / "moved" / out.name
    shutil.copytree(
        out, moved, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns("wandb")
    )
    there = load_config(
        ROOT / "configs" / "tiny.yaml", [f"output_dir={moved}", "wandb.mode=disabled"]
    )
    said.clear()
    assert run(there, log=said.append) == summary
    assert sum("finished before with the same settings" in s for s in said) == 3
    shutil.rmtree(moved.parent)
    changed = load_config(
        ROOT / "configs" / "tiny.yaml", [f"output_dir={out}", "wandb.mode=disabled", "sft.epochs=1"]
    )
    with pytest.raises(StageConflict, match=r"sft stage run with other settings \(sft differ"):
        run(changed)
    assert (out / "sft" / "model" / "model.safetensors").read_bytes() == weights


@pytest.mark.unit
def test_a_stage_record_ignores_only_the_settings_of_fault_recovery(tmp_path: Path) -> None:
    """A record written before a recovery setting existed, or with another value of one, is the
    same finished work; any other setting that differs is not."""
    from trainers.stage_record import StageRecord

    old = {"sft": {"lr": 1e-3, "epochs": 2}, "learner": {"ranks": 2}, "seed": 0}
    StageRecord(tmp_path, old, {}).write({"sft/loss": 1.5})
    now = {
        "sft": {"lr": 1e-3, "epochs": 2, "checkpoint_every": 7, "learner_restarts": 1},
        "learner": {"ranks": 2, "collective_timeout_s": 60.0},
        "seed": 0,
    }
    assert StageRecord(tmp_path, now, {}).finished() == {"sft/loss": 1.5}
    assert StageRecord(tmp_path, now, {}).differences() == []
    other = {**now, "sft": {**now["sft"], "epochs": 3}}
    assert StageRecord(tmp_path, other, {}).finished() is None
    assert StageRecord(tmp_path, other, {}).differences() == ["sft"]


@pytest.mark.unit
def test_a_stage_record_knows_its_inputs_by_content_not_by_place(tmp_path: Path) -> None:
    """A run folder copied elsewhere without its files' times, its config's paths pointing at
    the copy, is the same finished work; a byte changed in an input, or a file added to an input
    folder, is not. A record of the earlier form ({path: [size, mtime]}) still matches its files
    unchanged in place."""
    import json
    import os
    import shutil

    from trainers.stage_record import StageRecord

    def stage(run: Path) -> tuple[dict, dict]:
        settings = {"sft": {"lr": 1e-3, "model": str(run / "base")}, "seed": 0}
        return settings, {"model": run / "base", "train_data": run / "train.jsonl"}

    first = tmp_path / "first"
    (first / "base").mkdir(parents=True)
    (first / "base" / "model.safetensors").write_bytes(b"weights" * 1000)
    (first / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    StageRecord(first / "sft", *stage(first)).write({"sft/loss": 1.5})
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(first, moved, copy_function=shutil.copyfile)  # new files, new times
    assert StageRecord(moved / "sft", *stage(moved)).finished() == {"sft/loss": 1.5}

    weights = moved / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"X")  # one byte, the same size
    assert StageRecord(moved / "sft", *stage(moved)).finished() is None
    assert StageRecord(moved / "sft", *stage(moved)).differences() == ["inputs"]
    shutil.copyfile(first / "base" / "model.safetensors", weights)
    (moved / "base" / "extra.json").write_text("{}")
    assert StageRecord(moved / "sft", *stage(moved)).differences() == ["inputs"]

    # a record that knew its files by path, size and modification time
    settings, inputs = stage(first)
    files = [first / "base" / "model.safetensors", first / "train.jsonl"]
    located = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    record = first / "sft" / "stage.json"
    record.write_text(
        json.dumps({"settings": {**settings, "inputs": located}, "metrics": {"sft/loss": 2.5}})
    )
    assert StageRecord(first / "sft", settings, inputs).finished() == {"sft/loss": 2.5}
    os.utime(files[1], ns=(0, 0))
    assert StageRecord(first / "sft", settings, inputs).differences() == ["inputs"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainers.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.unit
def test_cli_refuses_an_unknown_field_naming_it() -> None:
    result = _cli("run", "configs/tiny.yaml", "sft.epoch=2")
    assert result.returncode == 2
    assert "the command line: sft.epoch: unknown field (did you mean 'epochs'?)" in result.stderr


@pytest.mark.integration
def test_cli_refuses_a_missing_model_folder_before_starting_ray(tmp_path: Path) -> None:
    result = _cli(
        "run",
        "configs/tiny.yaml",
        f"output_dir={tmp_path}",
        "sft.model=/no/such/model",
        "task.train_prompts=64",
        "task.heldout_prompts=16",
        "wandb.mode=disabled",
    )
    assert result.returncode == 2, result.stderr
    assert "sft.model: /no/such/model: model folder does not exist" in result.stderr
    assert "Ray" not in result.stderr  # nothing was started
    assert (tmp_path / "task" / "task.json").is_file()  # what was written stays


@pytest.mark.integration
def test_cli_refuses_a_malformed_data_line(tmp_path: Path) -> None:
    bad = tmp_path / "demos.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p" "response": "r"}\n')
    result = _cli(
        "run",
        "configs/tiny.yaml",
        f"output_dir={tmp_path / 'run'}",
        f"sft.train_data={bad}",
        "task.train_prompts=64",
        "task.heldout_prompts=16",
        "wandb.mode=disabled",
    )
    assert result.returncode == 2, result.stderr
    assert f"{bad}:2: not valid JSON" in result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("overlap", "placement"),
    # the two placements, each in one of the two modes (the chaos test in test_faults.py runs
    # separate roles in overlapped mode through a learner's loss and its checkpoint)
    [(False, "separate"), (True, "colocated")],
    ids=["synchronous-separate", "overlapped-colocated"],
)
def test_a_run_killed_while_writing_a_checkpoint_resumes_exactly(
    demo_run, short_eval, tmp_path: Path, overlap: bool, placement: str
) -> None:
    """A run killed (its driver, SIGKILL) while it writes its final checkpoint refuses to start
    again without --resume, and resumed ends with the weights of a run that never stopped.
    Colocated, the killed run first loses a worker (a rank of every role) after its first
    checkpoint and brings the groups back from it within the run."""
    import os
    import shutil
    import signal
    import time

    import ray

    demo, _ = demo_run
    run_dir = tmp_path / "run"
    shutil.copytree(demo / "task", run_dir / "task")  # the same task: not built again
    args = [
        "configs/tiny.yaml",
        f"output_dir={run_dir}",
        "stages=[ppo]",
        "wandb.mode=disabled",
        f"ppo.policy={demo / 'sft' / 'model'}",
        f"ppo.reward_model={demo / 'rm' / 'model'}",
        "ppo.iterations=4",
        "ppo.checkpoint_every=2",
        "ppo.rollout_batch=32",
        # overlapped: the checkpoint keeps the batch generated while its iteration trained
        f"ppo.overlap={str(overlap).lower()}",
        # colocated: a worker per learner rank hosts a part of every role
        f"placement={placement}",
        "learner.collective_timeout_s=60",  # a rank left in a collective with a dead one
        *short_eval,
        # a second driver on this session's cluster: killing it leaves no Ray process behind
        f"ray.address={ray.get_runtime_context().gcs_address}",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "trainers.cli", "run", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    # killed while it writes its second checkpoint (the final one, after iteration 4)
    latest = run_dir / "ppo" / "checkpoints" / "latest"
    writing = run_dir / "ppo" / "checkpoints" / "iter-000004.tmp"
    chaos = Chaos(latest)
    if placement == "colocated":  # a worker, early in iteration 3 (overlapped on the tiny
        # model, iterations 3 and 4 together may take under two seconds)
        chaos.kill("Host", chaos.at_checkpoint(2), jitter=0.3)
    deadline = time.time() + 600
    while not writing.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    chaos.join()
    said = first.stdout.read()
    assert writing.exists(), said[-3000:]
    assert latest.read_text().strip() == "iter-000002"  # the pointer had not moved
    if placement == "colocated":
        assert chaos.killed == ["Host"]
        lost = [line for line in said.splitlines() if "lost a rank" in line]
        assert len(lost) == 1 and lost[0].endswith("iter-000002"), said[-3000:]

    refused = _cli("run", *args)
    assert refused.returncode == 2
    assert "pass --resume to continue it" in refused.stderr

    resumed = _cli("run", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "after iteration 2" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ppo"]["iterations"] == 4
    assert latest.read_text().strip() == "iter-000004"
    assert sorted(p.name for p in latest.parent.glob("iter-*")) == ["iter-000002", "iter-000004"]

    # exactly where a run that never stopped ends: same samples, same updates, same weights
    import torch
    from safetensors.torch import load_file

    straight_dir = tmp_path / "straight"
    shutil.copytree(demo / "task", straight_dir / "task")
    straight = _cli("run", *args, f"output_dir={straight_dir}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = load_file(run_dir / "ppo" / "policy" / "model.safetensors")
    b = load_file(straight_dir / "ppo" / "policy" / "model.safetensors")
    start = load_file(demo / "sft" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), name
    assert any(not torch.equal(a[n], start[n]) for n in a)  # and it did train
    straight_summary = json.loads((straight_dir / "summary.json").read_text())["ppo"]
    for figure in ("rm_score", "kl_to_sft", "labeler_score"):
        assert straight_summary[figure] == pytest.approx(summary["ppo"][figure], abs=1e-4)


@pytest.mark.integration
def test_cli_refuses_a_batch_larger_than_the_data(tmp_path: Path) -> None:
    result = _cli(
        "run",
        "configs/tiny.yaml",
        f"output_dir={tmp_path}",
        "sft.batch_size=400",
        "task.train_prompts=64",
        "task.heldout_prompts=16",
        "wandb.mode=disabled",
    )
    assert result.returncode == 2, result.stderr
    assert "sft.batch_size (400) is larger than the 64 usable demonstrations" in result.stderr
