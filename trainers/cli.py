"""The `instructray` command."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any


def _known_errors() -> tuple[type[BaseException], ...]:
    from cluster.groups import PlacementError
    from cluster.jobs import JobError
    from trainers.checkpoints import CheckpointSpaceError
    from trainers.common import ModelFolderError
    from trainers.config import ConfigError
    from trainers.data import DataError
    from trainers.gguf_import import GGUFImportError
    from trainers.pipeline import StageConflict
    from trainers.rl import CheckpointExists, NonFiniteError
    from trainers.rl.recovery import PhaseFailed
    from trainers.steps import StageFailed

    return (
        ConfigError,
        DataError,
        GGUFImportError,
        ModelFolderError,
        PlacementError,
        StageConflict,
        FileExistsError,
        CheckpointExists,
        CheckpointSpaceError,
        JobError,
        NonFiniteError,
        PhaseFailed,
        StageFailed,
    )


def _ranking_needed() -> type[BaseException]:
    from trainers.collect import RankingNeeded

    return RankingNeeded


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="the cluster's job server, http://HOST:8265 (default: $RAY_ADDRESS); the token, if "
        "the cluster wants one, comes from $RAY_AUTH_TOKEN",
    )


def _submit(args: argparse.Namespace, config: Any) -> int:
    """Submit `instructray run` on the config as a Ray job; the config is checked here first."""
    from cluster import jobs

    if config.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise jobs.JobError(
            "wandb.mode is online but WANDB_API_KEY is not set here; set it in this shell (it "
            "goes to the job's environment, never to a file or a log) or use wandb.mode=offline"
        )
    working_dir = Path(args.working_dir).resolve()
    config_path = Path(args.config).resolve()
    if not config_path.is_relative_to(working_dir):
        raise jobs.JobError(
            f"{args.config}: the config must lie inside the working directory that is shipped "
            f"to the cluster ({working_dir}); move it there or pass --working-dir"
        )
    # Join the job's cluster: Ray tells the job's driver where it is (ray.address=auto).
    run_args = [
        "python",
        "-m",
        "trainers.cli",
        "run",
        str(config_path.relative_to(working_dir)),
        *args.overrides,
        "ray.address=auto",
        "ray.num_cpus=null",
    ]
    if args.restart:
        run_args.append("--restart")
    if args.resume:
        run_args.append("--resume")
    entrypoint = " ".join(shlex.quote(a) for a in run_args)
    job_id = jobs.submit(
        args.address,
        entrypoint,
        working_dir=working_dir,
        submission_id=args.job_id,
        metadata={"run": config.name},
    )
    url = jobs.resolve_address(args.address)
    out = Path(config.output_dir)
    print(f"submitted job {job_id} to {url}: run {config.name!r}")
    print(f"  run folder: {out} on the node that runs the job's driver (the head node)")
    if not out.is_absolute():
        print(
            "  note: output_dir is relative, so it lies inside the job's working directory on "
            "the head node; set output_dir to a folder every node shares to keep the run"
        )
    wb = config.wandb
    if wb.mode == "online":
        print(f"  W&B: project {wb.project!r}, run {config.name!r} (its URL is in the job's log)")
    elif wb.mode == "offline":
        print(f"  W&B (offline): {out / 'wandb'}; upload it with `wandb sync` from there")
    print(f"  follow: instructray logs {job_id} --follow --address {url}")
    print(f"  stop:   instructray stop {job_id} --address {url}")
    if not args.follow:
        return 0
    final = jobs.logs(args.address, job_id, follow=True)
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="instructray",
        description="The InstructGPT recipe (SFT, reward model, PPO) on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the stages that a config names")
    run.add_argument("config", help="the run's YAML config, e.g. configs/tiny.yaml")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="override config fields, e.g. sft.epochs=1 learner.ranks=1",
    )
    run.add_argument(
        "--restart",
        action="store_true",
        help="train the config's stages again from the start, finished or checkpointed ones "
        "too (a stage that finished with other settings is refused without it)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an unfinished SFT, RM or PPO stage from its latest checkpoint",
    )
    check = sub.add_parser("check", help="validate a config and print it, starting nothing")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*", metavar="key.sub=value")
    sub.add_parser("config-reference", help="print the config reference (Markdown)")
    submit = sub.add_parser("submit", help="run a config as a Ray job on a cluster")
    submit.add_argument("config", help="the run's YAML config, inside the working directory")
    submit.add_argument("overrides", nargs="*", metavar="key.sub=value")
    _address(submit)
    submit.add_argument(
        "--working-dir",
        default=".",
        help="folder shipped to the cluster as the job's working directory (default: .; what "
        ".gitignore names stays behind)",
    )
    submit.add_argument("--job-id", help="the job's submission id (default: Ray picks one)")
    submit.add_argument("--follow", action="store_true", help="print the job's log until it ends")
    submit.add_argument("--restart", action="store_true", help="as for run")
    submit.add_argument("--resume", action="store_true", help="as for run")
    _address(sub.add_parser("jobs", help="list the cluster's jobs"))
    logs = sub.add_parser("logs", help="print a job's log")
    logs.add_argument("job", help="the job's submission id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    _address(logs)
    stop = sub.add_parser("stop", help="stop a job")
    stop.add_argument("job", help="the job's submission id")
    _address(stop)
    gguf = sub.add_parser(
        "import-gguf",
        help="make a GGUF checkpoint into a float32 safetensors model folder",
        description="De-quantise a GGUF checkpoint (of an architecture transformers reads from "
        "GGUF) to float32 and save it with its tokenizer as a Hugging Face model folder.",
    )
    gguf.add_argument("gguf_file", metavar="FILE.gguf", help="the GGUF checkpoint")
    gguf.add_argument("out_dir", metavar="OUT_DIR", help="the model folder to make (new or empty)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        # what DeepSpeed would detect, said up front: it warns on the console at import when
        # it has to guess the CPU (the actors choose their own: a GPU node's finds its GPU)
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    from trainers.config import load_config

    try:
        if args.command == "import-gguf":
            from trainers.gguf_import import import_gguf

            import_gguf(args.gguf_file, args.out_dir)
            return 0
        if args.command == "config-reference":
            from trainers.reference import config_reference

            print(config_reference())
            return 0
        if args.command in ("jobs", "logs", "stop"):
            from cluster import jobs

            if args.command == "jobs":
                print(jobs.format_jobs(jobs.list_jobs(args.address)))
            elif args.command == "logs":
                final = jobs.logs(args.address, args.job, follow=args.follow)
                if args.follow:
                    print(f"job {args.job}: {final}")
            else:
                stopped = jobs.stop(args.address, args.job)
                print(f"job {args.job}: " + ("stopping" if stopped else "had already ended"))
            return 0
        config = load_config(args.config, args.overrides)
        if args.command == "submit":
            if args.restart and args.resume:
                parser.error("--restart and --resume exclude each other")
            return _submit(args, config)
        if args.command == "check":
            import yaml

            from trainers.config import to_dict

            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        from trainers.pipeline import run as run_pipeline

        if args.restart and args.resume:
            parser.error("--restart and --resume exclude each other")
        try:
            run_pipeline(config, restart=args.restart, resume=args.resume)
        except KeyboardInterrupt:
            return _stopped(config.run_dir)
        return 0
    except _ranking_needed() as e:  # labeler human: people rank the samples, then run again
        print(f"instructray: {e}", file=sys.stderr)
        return 3
    except _known_errors() as e:
        print(f"instructray: error: {e}", file=sys.stderr)
        return 2


def _stopped(run_dir: Path) -> int:
    """A run stopped by Ctrl-C or SIGTERM: one line, no traceback; 128 + the signal's number."""
    import signal

    from cluster.runtime import stop_signal

    sig = stop_signal() or signal.SIGINT
    how = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    print(
        f"\ninstructray: stopped ({how}). What the stages finished and their checkpoints stay in "
        f"{run_dir}/: the same command with --resume continues from them",
        file=sys.stderr,
    )
    return 128 + int(sig)


if __name__ == "__main__":
    sys.exit(main())
