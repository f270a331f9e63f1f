"""The `instructray` command."""

from __future__ import annotations

import argparse
import os
import sys


def _known_errors() -> tuple[type[BaseException], ...]:
    from cluster.groups import PlacementError
    from trainers.common import ModelFolderError
    from trainers.config import ConfigError
    from trainers.data import DataError
    from trainers.pipeline import StageConflict
    from trainers.ppo import CheckpointExists

    return (
        ConfigError,
        DataError,
        ModelFolderError,
        PlacementError,
        StageConflict,
        FileExistsError,
        CheckpointExists,
    )


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
        help="train stages again even where they finished with other settings",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an unfinished PPO stage from its latest checkpoint",
    )
    check = sub.add_parser("check", help="validate a config and print it, starting nothing")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*", metavar="key.sub=value")
    sub.add_parser("config-reference", help="print the config reference (Markdown)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trainers.config import load_config

    try:
        if args.command == "config-reference":
            from trainers.reference import config_reference

            print(config_reference())
            return 0
        config = load_config(args.config, args.overrides)
        if args.command == "check":
            import yaml

            from trainers.config import to_dict

            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        from trainers.pipeline import run as run_pipeline

        if args.restart and args.resume:
            parser.error("--restart and --resume exclude each other")
        run_pipeline(config, restart=args.restart, resume=args.resume)
        return 0
    except _known_errors() as e:
        print(f"instructray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
