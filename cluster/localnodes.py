"""Real Ray nodes on this one machine, for the multi-node tests and benchmarks: each node is a
`ray start` process tree with its own resources, on loopback, with token authentication on.

Everything these nodes start carries a marker in its environment (the cluster's temporary
folder), inherited by every process below them: raylets, workers, job drivers, nodes that a fake
autoscaler adds. `stop()` ends exactly the processes that carry the marker, never another Ray
cluster on the machine (`ray stop` would end them all).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "INSTRUCTRAY_LOCAL_NODES"
BIN = Path(sys.executable).parent  # the project's environment: ray, python


def free_port() -> int:
    """A free TCP port outside Ray's worker range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


class LocalNodes:
    """A head and worker nodes started by this process; `stop()` ends them all."""

    def __init__(self) -> None:
        # short: Ray puts Unix sockets under it (at most 107 characters a path)
        self.temp_dir = tempfile.mkdtemp(prefix="irn-", dir="/tmp")
        self.token = secrets.token_hex(32)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.env = {
            **os.environ,
            MARKER: self.temp_dir,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        """The GCS address that drivers join (`ray.address`)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The job server's address (`instructray submit --address`)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_args(self, num_cpus: float, resources: dict[str, float]) -> list[str]:
        return [
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            "--object-store-memory=300000000",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--disable-usage-stats",
        ]

    def start_head(
        self,
        num_cpus: float,
        resources: dict[str, float] | None = None,
        autoscaling_config: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        args = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            *self._node_args(num_cpus, resources or {}),
        ]
        if autoscaling_config is not None:
            args.append(f"--autoscaling-config={autoscaling_config}")
        self._run(args, {**self.env, **(extra_env or {})})

    def add_worker(self, num_cpus: float, resources: dict[str, float] | None = None) -> None:
        args = [
            str(BIN / "ray"),
            "start",
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            *self._node_args(num_cpus, resources or {}),
        ]
        self._run(args, self.env)

    def _run(self, args: list[str], env: dict[str, str]) -> None:
        try:
            subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as e:
            self.stop()
            raise RuntimeError(f"{' '.join(args)} failed:\n{e.stdout}\n{e.stderr}") from None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command against this cluster, with its token in the environment."""
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def processes(self) -> list[int]:
        """PIDs of every live process that these nodes started."""
        mark = f"{MARKER}={self.temp_dir}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if mark in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def stop(self, grace_s: float = 10.0) -> None:
        """End every process these nodes started (SIGTERM, then SIGKILL), and nothing else."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            pids = self.processes()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        subprocess.run(["rm", "-rf", self.temp_dir], check=False)

    def __enter__(self) -> LocalNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
