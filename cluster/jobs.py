"""Runs as Ray jobs: submit, list, follow and stop them through Ray's Jobs API.

The cluster's job server is its dashboard address (`http://127.0.0.1:8265` through an SSH tunnel,
or `RAY_ADDRESS`). With token authentication on (every cluster this project starts or documents),
the client takes the token from `RAY_AUTH_TOKEN` (or `RAY_AUTH_TOKEN_PATH`, or
`~/.ray/auth_token`) and sends it as a header; it is never printed.

Secrets for the job (the W&B API key) come from the submitting user's environment and go to the
job's environment through its runtime env; nothing here prints a runtime env or an environment.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

# Variables handed from the submitting user's environment to the job when they are set.
SECRETS = ("WANDB_API_KEY",)
FORWARDED = (*SECRETS, "WANDB_BASE_URL", "WANDB_ENTITY")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(RuntimeError):
    """The job server could not be reached or refused a request; says how to fix it."""


def _auth_env() -> None:
    """A token in the environment means token authentication (the client then sends it)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def resolve_address(address: str | None) -> str:
    """The job server's URL: `address`, else RAY_ADDRESS, with http:// added to host:port."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobError(
            "no cluster address: pass --address http://HOST:8265 (the dashboard port; through an "
            "SSH tunnel that is http://127.0.0.1:8265) or set RAY_ADDRESS"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address


def client(address: str | None) -> Any:
    """A JobSubmissionClient for the cluster; a JobError that names the address if it fails."""
    _auth_env()
    import logging

    from ray.job_submission import JobSubmissionClient

    # not a line for every file of the working directory that stays behind
    logging.getLogger("ray").setLevel(logging.WARNING)

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # connection refused, 401, wrong URL: say which and what to do
        hint = ""
        if "401" in str(e) or "uthenticat" in str(e):
            hint = (
                "; the cluster wants a token: set RAY_AUTH_TOKEN to the head node's "
                "`ray get-auth-token` (or RAY_AUTH_TOKEN_PATH to a file holding it)"
            )
        raise JobError(f"cannot reach the job server at {url}: {_first_line(e)}{hint}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def submit(
    address: str | None,
    entrypoint: str,
    *,
    working_dir: Path,
    env: dict[str, str] | None = None,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    """Submit `entrypoint` with `working_dir` shipped to the cluster (files that .gitignore
    names stay behind); `env` plus the set FORWARDED variables of this environment go to the
    job's environment. Returns the submission id."""
    job_env = {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
    job_env.update(env or {})
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir)}
    if job_env:
        runtime_env["env_vars"] = job_env
    jobs = client(address)
    try:
        return str(
            jobs.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                metadata=metadata,
            )
        )
    except Exception as e:
        raise JobError(f"the job server refused the job: {_first_line(e)}") from None


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    """Every job of the cluster, newest first: [{id, status, start, end, entrypoint, name}]."""
    rows = []
    for job in client(address).list_jobs():
        rows.append(
            {
                "id": job.submission_id or job.job_id,
                "status": str(getattr(job.status, "value", job.status)),
                "start": _time(job.start_time),
                "end": _time(job.end_time),
                "name": (job.metadata or {}).get("run", ""),
                "entrypoint": job.entrypoint,
            }
        )
    return sorted(rows, key=lambda r: r["start"], reverse=True)


def _time(ms: int | None) -> str:
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def format_jobs(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    if not rows:
        return "no jobs"
    cols = ("id", "status", "name", "start", "end", "entrypoint")
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols[:-1]}
    lines = ["  ".join(c.upper().ljust(width.get(c, 0)) for c in cols).rstrip()]
    for r in rows:
        lines.append("  ".join(str(r[c]).ljust(width.get(c, 0)) for c in cols).rstrip())
    return "\n".join(lines)


def status(address: str | None, job_id: str) -> str:
    try:
        return str(client(address).get_job_status(job_id).value)
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"job {job_id}: {_first_line(e)}") from None


def logs(address: str | None, job_id: str, follow: bool = False, out: TextIO = sys.stdout) -> str:
    """Print the job's logs (with `follow`, until it ends); returns its status."""
    jobs = client(address)
    try:
        if not follow:
            out.write(jobs.get_job_logs(job_id))
        else:

            async def tail() -> None:
                async for chunk in jobs.tail_job_logs(job_id):
                    out.write(chunk)
                    out.flush()

            asyncio.run(tail())
        return str(jobs.get_job_status(job_id).value)
    except Exception as e:
        raise JobError(f"job {job_id}: {_first_line(e)}") from None


def stop(address: str | None, job_id: str) -> bool:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period)."""
    try:
        return bool(client(address).stop_job(job_id))
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"job {job_id}: {_first_line(e)}") from None
