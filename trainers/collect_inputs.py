"""The collect stage's inputs: each split's prompts, read and encoded, and the labeler, made
ready by `prepare` before Ray starts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.collect_files import _read_lines
from trainers.config import RunConfig
from trainers.data import DataError, Limits, encode_prompts, read
from trainers.labelers import load_labeler, read_ranked, task_labeler

SPLITS = ("train", "heldout")


@dataclass
class Prompt:
    index: int  # place in the (capped) prompt list of its split
    where: str
    text: str  # the readable prompt (its last user turn): what a labeler reads
    messages: list[dict[str, str]]  # the prompt's turns, for the chat template
    prompt_ids: list[int]

    @property
    def conversational(self) -> bool:
        return len(self.messages) != 1 or self.messages[0]["role"] != "user"


@dataclass
class CollectInputs:
    policy: str
    tokenizer: Any
    prompts: dict[str, list[Prompt]]  # split -> prompts
    files: dict[str, str]  # split -> prompts file
    labeler: Callable[[str, list[str]], Any] | None  # None: human
    ranked: dict[str, list[int]] | None = None  # human with ranked_file: id -> ranking


def prepare(
    config: RunConfig,
    policy: str,
    prompts: str,
    heldout_prompts: str,
    out: Path,
    tokenizer: Any,
    log: Any = print,
) -> CollectInputs:
    """Read and encode the prompts, import the labeler and, for labeler human with
    collect.ranked_file, check the rankings against the samples (all before Ray starts)."""
    cfg = config.collect
    limits = Limits.of(config.data)
    caps = {"train": cfg.max_prompts, "heldout": cfg.max_heldout_prompts}
    files = {"train": prompts, "heldout": heldout_prompts}
    fields = {"train": "collect.prompts", "heldout": "collect.heldout_prompts"}
    split_prompts: dict[str, list[Prompt]] = {}
    for split in SPLITS:
        dataset = read(files[split], "prompts", fields[split])
        if caps[split] is not None:
            dataset = dataset.select(range(min(caps[split], len(dataset))))
        turns = {rec["where"]: rec["messages"] for rec in dataset}
        encoded = encode_prompts(dataset, tokenizer, limits, log)
        split_prompts[split] = [
            Prompt(i, e["where"], e["text"], turns[e["where"]], e["prompt_ids"])
            for i, e in enumerate(encoded)
        ]
    if cfg.labeler == "human":
        labeler = None
    elif cfg.labeler == "task":
        assert config.task is not None  # the config checks it
        labeler = task_labeler(config.task.labeler_agreement)
    else:
        labeler = load_labeler(cfg.labeler)
    inputs = CollectInputs(policy, tokenizer, split_prompts, files, labeler)
    if cfg.labeler == "human" and cfg.ranked_file is not None:
        samples = {split: out / f"samples_{split}.jsonl" for split in SPLITS}
        missing = [str(p) for p in samples.values() if not p.is_file()]
        if missing:
            raise DataError(
                f"collect.ranked_file is set ({cfg.ranked_file}), but {' and '.join(missing)} "
                "do not exist: run once without collect.ranked_file to sample the responses and "
                "export them to rank"
            )
        lines = [line for split in SPLITS for line in _read_lines(samples[split])]
        inputs.ranked = read_ranked(Path(cfg.ranked_file), lines, out / "to_rank.jsonl")
    return inputs
