"""Shared fixtures: one small built-in task and one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Nothing is downloaded, and caches stay inside the project (the Makefile sets the same).
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "WANDB_SILENT": "true",
    "XDG_CACHE_HOME": str(ROOT / ".cache"),
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
    "WANDB_CACHE_DIR": str(ROOT / ".cache" / "wandb"),
    "WANDB_CONFIG_DIR": str(ROOT / ".cache" / "wandb-config"),
}.items():
    os.environ.setdefault(key, value)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def small_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small built-in task (the same generator as the demo, fewer prompts)."""
    from trainers.config import TaskConfig
    from trainers.task import build_task

    folder = tmp_path_factory.mktemp("task")
    build_task(TaskConfig(train_prompts=256, heldout_prompts=64), folder)
    return folder


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session (2 CPUs, as on the CI machine); stopped at the end,
    with every process it started."""
    from cluster import RayRuntime

    with RayRuntime(None, num_cpus=2) as runtime:
        yield runtime


@pytest.fixture(autouse=True)
def no_actor_outlives_its_test(request: pytest.FixtureRequest):
    """Every actor a test starts on the session's cluster is gone when it ends (a role left
    running would hold CPUs and memory that the tests after it need); those of the longer-lived
    fixtures, up before the test, may stay. Such a fixture waits for its actors to answer before
    it yields: Ray registers an unnamed actor in the background, so one created just before the
    test may not be in the table yet when this fixture lists what was there before."""
    import ray

    from tests.chaos import actors_not_dead

    def live() -> dict[str, str]:
        return {
            key: f"{a['ActorClassName']} (pid {a['Pid']}, {a['State']})"
            for key, a in actors_not_dead().items()
        }

    watched = "ray_cluster" in request.fixturenames and ray.is_initialized()
    before = set(live()) if watched else set()
    yield
    if not watched or not ray.is_initialized():
        return
    import time

    deadline = time.time() + 20  # a killed actor is marked dead within moments
    while True:
        left = {k: v for k, v in live().items() if k not in before}
        if not left or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"actors still alive after the test: {', '.join(sorted(left.values()))}"


@pytest.fixture(scope="session")
def demo_run(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The demo's config (configs/tiny.yaml) run once through SFT, RM and PPO: its folder and
    summary. Other tests start from its SFT model and RM."""
    from trainers.config import load_config
    from trainers.pipeline import run

    out = tmp_path_factory.mktemp("tiny")
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={out}"])
    return out, run(config)


@pytest.fixture(scope="session")
def short_eval(demo_run, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides for a short PPO run from the demo: its evaluations (before and after training)
    on the first 32 held-out prompts and demonstrations instead of all 200, which saves about 5 s
    a run (the tests that use it check the run's mechanics, not what the evaluation measures)."""
    demo, _ = demo_run
    folder = tmp_path_factory.mktemp("short_eval")
    files = {
        "heldout_prompts": "prompts_heldout.jsonl",
        "heldout_demonstrations": "sft_heldout.jsonl",
    }
    for name in files.values():
        lines = (demo / "task" / name).read_text().splitlines(keepends=True)
        (folder / name).write_text("".join(lines[:32]))
    return [f"ppo.{field}={folder / name}" for field, name in files.items()]
