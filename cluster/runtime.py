"""Start a local Ray cluster for a run, or join an existing one."""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import ray

# Set by Ray in a job's driver: the job's config, with the runtime env it was submitted with.
JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# Variables that a local cluster's workers take from the driver: caches of compiled kernels and
# tools (kept inside the project by the Makefile), offline switches and thread settings.
PASS_THROUGH = (
    "XDG_CACHE_HOME",
    "TORCH_EXTENSIONS_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "VLLM_CACHE_ROOT",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "WANDB_CACHE_DIR",
    "WANDB_CONFIG_DIR",
    "MPLCONFIGDIR",
    "TMPDIR",
    "PYTHONPATH",
)


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a CPU-only torch without CUDA runtime
        return 0


def local_token_auth() -> None:
    """Token authentication for a local cluster that this process starts: on, with a fresh
    random token held in this process's environment (inherited by the cluster's processes and by
    the clients this process starts), unless the user set RAY_AUTH_MODE or a token already. Ray
    would otherwise write a token file into the home folder."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    # ray.init turns token mode on by itself for a new local cluster (its config is read when ray
    # is imported, so setting RAY_AUTH_MODE here would come too late); it needs only the token.
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


class WorkerLog:
    """Sends what the run's actors and tasks print (library warnings, load reports, engine
    logs) to a file instead of the driver's console, where Ray would print every line.

    Ray's driver hands each batch of worker output to the handlers of its stream dispatcher;
    this swaps the one that prints for one that writes `[HH:MM:SS] (actor pid=N) line` to the
    file, and swaps it back on `close`. The autoscaler's lines (nodes being added) stay on the
    console: they are the cluster's progress, not a library's chatter. Actors' failures still
    reach the driver as exceptions, and the run's own lines are printed by the driver; so
    Ray's own notices of a worker's death (the raylet's "A worker died or was killed...", which
    its driver prints outside the dispatcher) go to the file too: the run says on the console
    which role died and what it redid.
    """

    NAME = "instructray_worker_log"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = self.path.open("a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()
        self._saved: list[Any] | None = None
        try:
            from ray._private import worker
            from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # another Ray: its printing stays as it is
            return
        self._worker, self._print_notice = worker, getattr(worker, "print_to_stdstream", None)
        if self._print_notice is not None:
            worker.print_to_stdstream = self._notice
        self._dispatcher = dispatcher
        with dispatcher._lock:
            self._saved = list(dispatcher.handlers)
            printers = [h for name, h in self._saved if name == "ray_print_logs"]
            kept = [(n, h) for n, h in self._saved if n != "ray_print_logs"]
            self._print = printers[0] if printers else None
            dispatcher.handlers = [*kept, (self.NAME, self._handle)]

    def _handle(self, data: dict[str, Any]) -> None:
        if data.get("pid") == "autoscaler" and self._print is not None:
            self._print(data)
            return
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"[{time.strftime('%H:%M:%S')}] ({who + ' ' if who else ''}pid={data.get('pid')})"
        with self._lock:
            if self._file is not None:
                self._file.writelines(f"{prefix} {line}\n" for line in data.get("lines", []))

    def _notice(self, data: dict[str, Any], ignore_prefix: bool) -> None:
        """Ray's driver prints the raylet's notices (a worker died) with this: to the file."""
        if data.get("pid") == "raylet":
            self._handle(data)
        elif self._print_notice is not None:
            self._print_notice(data, ignore_prefix)

    def close(self) -> None:
        if getattr(self, "_print_notice", None) is not None:
            self._worker.print_to_stdstream = self._print_notice
            self._print_notice = None
        if self._saved is not None:
            with self._dispatcher._lock:
                self._dispatcher.handlers = self._saved
            self._saved = None
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


_stop_signal: list[int] = []  # the signal that stopped the driver, if one did


def _interrupt(signum: int, frame: Any) -> None:
    _stop_signal.append(signum)
    raise KeyboardInterrupt


def stop_signal() -> int | None:
    """The signal (SIGTERM) that interrupted the driver while a RayRuntime was open, if any."""
    return _stop_signal[-1] if _stop_signal else None


class RayRuntime:
    """Context manager: a Ray session for one run.

    With `address=None` it starts a local cluster (stopped on exit, with every process it
    started), with token authentication on and its dashboard, if any, on 127.0.0.1; otherwise it
    joins the cluster at `address` (its token from RAY_AUTH_TOKEN) and only disconnects on exit.
    With `worker_log`, what the actors print goes to that file while the session is open (see
    `WorkerLog`), not to the console.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        include_dashboard: bool = False,
        env: dict[str, str] | None = None,
        worker_log: Path | None = None,
    ) -> None:
        self.address = address
        self.worker_log = worker_log
        self._log: WorkerLog | None = None
        self.num_cpus = num_cpus
        self.include_dashboard = include_dashboard
        self.env = dict(env or {})
        self._owned = False
        self._sigterm: Any = None

    def __enter__(self) -> RayRuntime:
        self._start()
        if self.worker_log is not None:
            self._log = WorkerLog(self.worker_log)
        return self

    def _start(self) -> None:
        if ray.is_initialized():  # e.g. a test session's shared cluster: use it, leave it up
            return
        env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address is None:
            # one machine: collectives go over loopback
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        else:
            # other nodes have their own paths; a Ray job's working_dir is on theirs already
            env.pop("PYTHONPATH", None)
        env.update(self.env)
        # Inside a Ray job, the job's own runtime env already sets some variables (Ray refuses
        # to merge two values of one variable): the job's win.
        job_env = json.loads(os.environ.get(JOB_CONFIG_VAR, "{}")).get("runtime_env") or {}
        for key in job_env.get("env_vars") or {}:
            env.pop(key, None)
        kwargs: dict[str, Any] = {
            "runtime_env": {"env_vars": env},
            "log_to_driver": True,
            "logging_level": "WARNING",
        }
        if self.address is None:
            local_token_auth()
            kwargs.update(
                num_cpus=self.num_cpus,
                include_dashboard=self.include_dashboard,
                dashboard_host="127.0.0.1",
            )
        else:
            kwargs["address"] = self.address
        ray.init(**kwargs)
        self._owned = True
        self._stop_on_sigterm()

    def _stop_on_sigterm(self) -> None:
        """Ray's driver answers SIGTERM with a C++ stack dump on the console. A run stopped so
        (`instructray stop`, `ray job stop`, `kill`) stops as on Ctrl-C instead: a
        KeyboardInterrupt in the driver, whose cleanup stops the roles and the session (what
        `stop_signal` tells apart). Ray installs its handler in `ray.init`, so this comes after."""
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _interrupt)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # the session goes first: the actors' last lines (a model's save, the engines' exit)
        # reach the driver up to a second late, and still go to the file
        if self._owned:
            ray.shutdown()
            self._owned = False
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
