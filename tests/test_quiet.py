"""The console is for people: libraries' warnings and the actors' output go to the run's logs/,
a reward model started from a causal LM loads without transformers' load report, and the RM's
progress shows no NaN before its first evaluation."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from pathlib import Path

import pytest
import ray
import torch

from tests.real_model import tiny_tied_llama


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.unit
@pytest.mark.parametrize("tied", [True, False])
def test_a_reward_model_from_a_causal_lm_loads_without_a_load_report(
    tmp_path: Path, small_task: Path, tied: bool
) -> None:
    from transformers import AutoModelForCausalLM

    from actors.models import load_reward_model

    folder = tiny_tied_llama(tmp_path / "lm") if tied else small_task / "base_model"
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        rm = load_reward_model(str(folder), dtype=torch.float32)
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if "LOAD REPORT" in m]
    lm = AutoModelForCausalLM.from_pretrained(folder)
    body, expect = rm.model.state_dict(), lm.model.state_dict()
    assert body.keys() == expect.keys()
    assert all(torch.equal(body[k], expect[k]) for k in body)  # the body carries over
    assert rm.score.weight.shape == (1, lm.config.hidden_size)  # a new one-output head
    # saved, it is a sequence classifier, and it loads again as one (report and all)
    rm.save_pretrained(tmp_path / "rm")
    again = load_reward_model(str(tmp_path / "rm"), dtype=torch.float32)
    assert type(again).__name__ == type(rm).__name__
    assert torch.equal(again.score.weight, rm.score.weight)


@pytest.mark.unit
def test_the_rm_progress_shows_no_nan_before_the_first_evaluation() -> None:
    from trainers.rm import _postfix

    assert _postfix(0.6931, math.nan) == {"loss": "0.693"}
    assert _postfix(0.5, 0.625) == {"loss": "0.500", "heldout_acc": "0.625"}


@pytest.mark.unit
def test_library_warnings_in_the_driver_go_to_the_run_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from trainers.tracking import LibraryLog

    path = tmp_path / "logs" / "driver.log"
    quiet = LibraryLog(path)
    try:
        warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
        logging.getLogger("transformers.modeling_utils").warning("a load report")
    finally:
        quiet.close()
    out, err = capfd.readouterr()
    assert "FutureWarning" not in out + err and "load report" not in out + err
    text = path.read_text()
    assert "a library's FutureWarning" in text and "a load report" in text
    # closed, the libraries print as before
    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    logging.getLogger("transformers.modeling_utils").warning("after")
    logging.getLogger("transformers").removeHandler(records)
    assert records.messages == ["after"]


@ray.remote(num_cpus=0)
class _Chatty:
    def speak(self, n: int) -> int:
        import sys

        for i in range(n):
            print(f"engine chatter {i}")
            warnings.warn(f"library warning {i}", FutureWarning, stacklevel=1)
            sys.stderr.flush()
        sys.stdout.flush()
        return n

    def pid(self) -> int:
        import os

        return os.getpid()

    def nap(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.mark.integration
def test_what_actors_print_goes_to_the_run_log_not_the_console(
    ray_cluster, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from cluster.runtime import WorkerLog

    path = tmp_path / "logs" / "actors.log"
    route = WorkerLog(path)
    try:
        actor = _Chatty.remote()
        assert ray.get(actor.speak.remote(3)) == 3
        deadline = time.time() + 30  # Ray forwards worker output in batches
        while time.time() < deadline:
            text = path.read_text()
            if "engine chatter 2" in text and "library warning 2" in text:
                break
            time.sleep(0.5)
        # a worker killed from outside as it works: Ray's notice of it goes to the file too
        pid = ray.get(actor.pid.remote())
        napping = actor.nap.remote(60)
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(napping, timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline and "A worker died" not in path.read_text():
            time.sleep(0.5)
    finally:
        route.close()
    text = path.read_text()
    assert "engine chatter 2" in text and "library warning 2" in text
    assert "_Chatty pid=" in text
    assert "A worker died or was killed" in text
    out, err = capfd.readouterr()
    assert "engine chatter" not in out + err and "library warning" not in out + err
    assert "A worker died" not in out + err


@pytest.mark.integration
def test_a_run_stopped_with_sigterm_says_so_in_one_line_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    """`instructray stop` and `ray job stop` stop a run with SIGTERM, to which Ray's driver
    answers with a C++ stack dump: the run stops as on Ctrl-C instead, with one line that says
    how to continue, exit status 143, and no process of the cluster it started left."""
    import subprocess
    import sys
    import threading

    import psutil

    from tests.conftest import ROOT

    proc = subprocess.Popen(
        [sys.executable, "-m", "trainers.cli", "run", "configs/tiny.yaml",
         f"output_dir={tmp_path}", "task.train_prompts=64", "task.heldout_prompts=16",
         "wandb.mode=disabled"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not any(line.startswith("sft: ") for line in lines):
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.5)
        started = psutil.Process(proc.pid).children(recursive=True)  # Ray's processes among them
        assert started, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=30)
    out = "".join(lines)
    said = "instructray: stopped (SIGTERM). What the stages finished and their checkpoints stay in"
    assert f"{said} {tmp_path}/" in out
    assert "--resume" in out
    assert "SIGTERM received" not in out and "Traceback" not in out, out
    _, alive = psutil.wait_procs(started, timeout=60)
    assert not alive, [(p.pid, p.name()) for p in alive]
