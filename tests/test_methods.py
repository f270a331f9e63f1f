"""The critic-free methods end to end on the demo's task: GRPO and RLOO against the demo's
reward model, from the demo's SFT policy, each beating the SFT policy by the hidden labeler as
PPO does (the demo's bar: a win rate of 0.75), with no critic started; REINFORCE++ trains
against a reward summed from several sources."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from trainers.config import load_config
from trainers.pipeline import run

ROOT = Path(__file__).resolve().parents[1]

# 32 prompts × 4 responses an iteration (twice PPO's 64 responses: a group baseline needs the
# samples that a critic would otherwise learn from), one optimizer step per 32 responses
METHOD = ["ppo.rollout_batch=32", "ppo.n_samples_per_prompt=4", "ppo.minibatch_size=32"]


@pytest.mark.e2e
@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_a_critic_free_method_beats_the_sft_policy(
    demo_run, tmp_path: Path, advantage: str
) -> None:
    from tests.wandb_reader import history

    demo, _ = demo_run
    run_dir = tmp_path / "run"
    shutil.copytree(demo / "task", run_dir / "task")
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"output_dir={run_dir}",
            "stages=[ppo]",
            f"ppo.policy={demo / 'sft' / 'model'}",
            f"ppo.reward_model={demo / 'rm' / 'model'}",
            f"ppo.advantage={advantage}",
            *METHOD,
        ],
    )
    lines: list[str] = []
    summary = run(config, log=lines.append)
    ppo, sft = summary["ppo"], summary["sft"]
    assert ppo["winrate_vs_sft"] >= 0.75, ppo
    assert ppo["labeler_score"] > sft["labeler_score"] + 0.4
    # no critic: not started, not saved, not checkpointed
    assert "memory_gb/critic" not in ppo
    assert any("no critic (" + advantage + ")" in line for line in lines), lines
    assert not (run_dir / "ppo" / "critic").exists()
    assert (run_dir / "ppo" / "policy" / "config.json").is_file()
    checkpoints = list((run_dir / "ppo" / "checkpoints").glob("iter-*"))
    assert (run_dir / "ppo" / "checkpoints" / "latest").read_text() == "iter-000060\n"
    for checkpoint in checkpoints:
        assert sorted(p.name for p in checkpoint.iterdir()) == ["driver.json", "policy"]

    [wandb_run] = list((run_dir / "wandb").glob("offline-run-*"))
    rows = [r for r in history(wandb_run) if "ppo/score" in r]
    assert len(rows) == 60
    for r in rows:
        # 4 responses to each prompt: the group figures are there, and finite
        assert 0.0 <= r["ppo/group/zero_signal_share"] <= 1.0
        assert r["ppo/group/score_std"] >= 0.0 and r["ppo/group/length_std"] >= 0.0
        assert r["ppo/tokens"] > 0 and "ppo/value_loss" not in r
        assert "ppo/explained_variance" not in r
    # the responses to a prompt differ (sampled together, not copies): few groups are flat
    assert sum(r["ppo/group/zero_signal_share"] for r in rows) / len(rows) < 0.2


class _Endpoint:
    """A real HTTP reward endpoint on loopback: the response's word count over 10."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        calls = self.calls = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                calls.append(len(body["responses"]))
                answer = json.dumps({"rewards": [len(r.split()) / 10 for r in body["responses"]]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(answer.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/reward"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _short_run(demo: Path, run_dir: Path, short_eval: list[str], *overrides: str) -> Any:
    shutil.copytree(demo / "task", run_dir / "task")
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"output_dir={run_dir}",
            "stages=[ppo]",
            f"ppo.policy={demo / 'sft' / 'model'}",
            f"ppo.reward_model={demo / 'rm' / 'model'}",
            "ppo.iterations=3",
            "ppo.advantage=grpo",
            "ppo.rollout_batch=16",
            "ppo.n_samples_per_prompt=2",
            "ppo.minibatch_size=16",
            *short_eval,
            *overrides,
        ],
    )


@pytest.mark.integration
def test_the_reward_is_a_weighted_sum_of_the_rm_a_function_and_an_endpoint(
    demo_run, short_eval, tmp_path: Path
) -> None:
    """reward.sources: the RM, a Python function in its own actor and an HTTP endpoint on
    loopback, summed with their weights; the samples the function cannot score (NaN) are left
    out of training and counted (reward.on_error: skip). The policy trains with REINFORCE++
    (returns normalised over the batch, no critic)."""
    import json

    from safetensors.torch import load_file

    from tests.wandb_reader import history

    demo, _ = demo_run
    endpoint = _Endpoint()
    try:
        sources = (
            "[{kind: rm}, {kind: function, target: 'tests.reward_fns:nan_if_terrible', "
            f"weight: 0.5}}, {{kind: http, target: '{endpoint.url}', weight: 0.1}}]"
        )
        run_dir = tmp_path / "run"
        config = _short_run(
            demo,
            run_dir,
            short_eval,
            f"reward.sources={sources}",
            "reward.on_error=skip",
            "ppo.advantage=reinforce++",
        )
        summary = run(config, log=lambda _: None)
    finally:
        endpoint.close()
    # every chunk of every iteration (16 prompts × 2 = 32 responses, chunks of 16 prompts) and
    # both evaluations (32 held-out prompts each) went to the endpoint
    assert sum(endpoint.calls) == 3 * 32 + 2 * 32, endpoint.calls
    placement = json.loads((run_dir / "ppo" / "placement.json").read_text())
    assert {"reward", "reward_function_1", "reward_http_2"} <= set(placement)
    assert "memory_gb/reward_http_2" in summary["ppo"]
    assert "memory_gb/critic" not in summary["ppo"] and not (run_dir / "ppo" / "critic").exists()
    rows = [r for r in history(next((run_dir / "wandb").glob("offline-run-*"))) if "ppo/score" in r]
    assert len(rows) == 3
    assert all(r["ppo/tokens"] > 0 and "ppo/value_loss" not in r for r in rows)
    trained = load_file(run_dir / "ppo" / "policy" / "model.safetensors")
    start = load_file(demo / "sft" / "model" / "model.safetensors")
    assert any(not (trained[n] == start[n]).all() for n in trained)  # it trained
    dropped = sum(r["ppo/dropped_samples"] for r in rows)
    nonfinite = sum(r["ppo/nonfinite_samples"] for r in rows)
    assert dropped == nonfinite > 0  # the tiny policy writes "terrible" now and then
    assert all(math.isfinite(r["ppo/score"]) for r in rows)
    # the evaluation's reward is the sources' sum: NaN exactly where the function gave NaN
    evals = [json.loads(line) for line in (run_dir / "ppo" / "eval_samples.jsonl").open()]
    for e in evals:
        for policy in ("sft", "ppo"):
            said = "terrible" in e[f"{policy}_response"].split()
            assert math.isnan(e[f"{policy}_rm_score"]) == said, e
    assert math.isfinite(summary["ppo"]["rm_score"])


@pytest.mark.integration
def test_a_reward_function_that_raises_stops_the_run_naming_it_and_the_sample(
    demo_run, short_eval, tmp_path: Path
) -> None:
    demo, _ = demo_run
    sources = "[{kind: function, target: 'tests.reward_fns:raise_if_terrible'}]"
    config = _short_run(demo, tmp_path / "run", short_eval, f"reward.sources={sources}")
    with pytest.raises(Exception, match=r"reward function tests\.reward_fns:raise_if_terrible "
                       r"raised on sample \d+ of \d+ \(prompt .*cannot score"):  # fmt: skip
        run(config, log=lambda _: None)


@pytest.mark.e2e
def test_grpo_raises_the_verifiable_tasks_accuracy_above_the_sft_policys(
    ray_cluster, tmp_path: Path
) -> None:
    """configs/arithmetic.yaml end to end: SFT on worked sums (30% with a slip), then GRPO with
    the exact-match reward in its own actor, no reward model and no critic. The held-out
    accuracy at temperature 1 (the labeler's mean: 1 for a right answer) rises clearly."""
    config = load_config(ROOT / "configs" / "arithmetic.yaml", [f"output_dir={tmp_path / 'run'}"])
    summary = run(config, log=lambda _: None)
    sft, ppo = summary["sft"], summary["ppo"]
    assert 0.2 < sft["labeler_score"] < 0.6  # the slips leave room above the SFT policy
    assert ppo["labeler_score"] >= sft["labeler_score"] + 0.1, (sft, ppo)
    assert "memory_gb/critic" not in ppo and "memory_gb/reward_function_0" in ppo
    assert not (tmp_path / "run" / "rm").exists()
