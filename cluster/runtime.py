"""Start a local Ray cluster for a run, or join an existing one."""

from __future__ import annotations

import json
import os
import secrets
from types import TracebackType
from typing import Any

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


class RayRuntime:
    """Context manager: a Ray session for one run.

    With `address=None` it starts a local cluster (stopped on exit, with every process it
    started), with token authentication on and its dashboard, if any, on 127.0.0.1; otherwise it
    joins the cluster at `address` (its token from RAY_AUTH_TOKEN) and only disconnects on exit.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        include_dashboard: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.include_dashboard = include_dashboard
        self.env = dict(env or {})
        self._owned = False

    def __enter__(self) -> RayRuntime:
        if ray.is_initialized():  # e.g. a test session's shared cluster: use it, leave it up
            return self
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
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owned:
            ray.shutdown()
            self._owned = False
