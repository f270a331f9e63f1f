"""The collect stage: samples of the SFT policy ranked by a labeler into the RM's comparisons."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainers import collect
from trainers.config import ConfigError, load_config
from trainers.data import DataError, read
from trainers.tracking import Tracker

TINY = ROOT / "configs" / "tiny.yaml"


# labelers named by "module:function" in the tests below
def by_length(prompt: str, responses: list[str]) -> list[int]:
    """A ranking: the longest response first."""
    return sorted(range(len(responses)), key=lambda i: -len(responses[i]))


def word_count(prompt: str, responses: list[str]) -> list[float]:
    """Scores: the number of words (ties where two responses have as many)."""
    return [float(len(r.split())) for r in responses]


def not_a_ranking(prompt: str, responses: list[str]) -> list[int]:
    return [0] * len(responses)


def _line(index: int, samples: list[str], split: str = "train") -> dict:
    return {
        "index": index,
        "id": f"{split}-{index:05d}-abcdef12",
        "where": f"prompts.jsonl:{index + 1}",
        "prompt": f"write a short review of the new movie {index} .",
        "samples": samples,
        "generated": 4,
        "tokens": 20,
        "ranking": None,
        "scores": None,
    }


# -- labelers ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_function_labeler_returns_a_ranking_or_scores() -> None:
    assert collect.ranking_of([2, 0, 1], 3, "x") == ([2, 0, 1], None)
    # scores: higher first; a tie keeps the sampled order
    assert collect.ranking_of([0.5, 2.0, 0.5], 3, "x") == ([1, 0, 2], [0.5, 2.0, 0.5])
    import torch

    assert collect.ranking_of(torch.tensor([0.1, 0.9]), 2, "x")[0] == [1, 0]
    for bad, message in (
        ([0, 0, 1], "not a permutation"),
        ([0, 1], "of the 3 responses"),
        (["a", "b", "c"], "ints .* or of floats"),
        ([1.0, float("nan"), 0.0], "finite"),
        (None, "of the 3 responses"),
    ):
        with pytest.raises(collect.LabelerError, match=message):
            collect.ranking_of(bad, 3, "collect.labeler f on p.jsonl:1")


@pytest.mark.unit
def test_rank_chunk_with_function_labelers_and_the_task_labeler() -> None:
    lines = [_line(0, ["a b c", "a", "a b"]), _line(1, ["only one"])]
    collect.rank_chunk(by_length, "tests.test_collect:by_length", lines, 0)
    assert lines[0]["ranking"] == [0, 2, 1] and lines[0]["scores"] is None
    assert lines[1]["ranking"] is None  # one response: skipped, not ranked
    assert collect.comparison(lines[0], lines[0]["ranking"]) == {
        "prompt": lines[0]["prompt"],
        "responses": ["a b c", "a b", "a"],
    }

    lines = [_line(0, ["one two", "three four", "five"])]
    collect.rank_chunk(word_count, "tests.test_collect:word_count", lines, 0)
    assert lines[0]["ranking"] == [0, 1, 2] and lines[0]["scores"] == [2.0, 2.0, 1.0]

    with pytest.raises(collect.LabelerError, match=r"not_a_ranking on prompts.jsonl:1"):
        collect.rank_chunk(
            not_a_ranking, "tests.test_collect:not_a_ranking", [_line(0, ["a", "b"])], 0
        )

    # the task's labeler: noisy, calibrated on the chunk, seeded by the chunk
    from trainers.task import labeler_score, pairwise_agreement

    good = "the movie is really great . i would recommend it ."
    texts = [good, "the movie is okay . it is what it is .", "movie movie movie", "the book ."]
    chunk = [_line(i, list(texts)) for i in range(40)]
    collect.rank_chunk(collect.task_labeler(0.73), "task", chunk, 7)
    again = [_line(i, list(texts)) for i in range(40)]
    collect.rank_chunk(collect.task_labeler(0.73), "task", again, 7)
    assert [x["ranking"] for x in chunk] == [x["ranking"] for x in again]
    assert chunk[0]["scores"] == [labeler_score(chunk[0]["prompt"], t) for t in texts]
    agreement = pairwise_agreement([[x["scores"][i] for i in x["ranking"]] for x in chunk])
    assert 0.6 < agreement < 0.86


@pytest.mark.unit
def test_a_conversational_prompt_keeps_its_turns_and_every_response(tmp_path: Path) -> None:
    line = _line(0, ["good", "bad", "worst"])
    line["messages"] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": line["prompt"]},
    ]
    row = collect.comparison(line, [1, 0, 2])
    assert row == {"prompt": line["messages"], "responses": ["bad", "good", "worst"]}
    # and the RM's reader takes it, turns and all K responses
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(row) + "\n")
    [rec] = read(path, "comparisons")
    assert rec["messages"] == line["messages"] and rec["responses"] == ["bad", "good", "worst"]


@pytest.mark.unit
def test_a_line_cut_short_in_the_partial_file_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "comparisons_train.partial.jsonl"
    whole = json.dumps(_line(0, ["a", "b"])) + "\n"
    path.write_text(whole + json.dumps(_line(1, ["c", "d"]))[:30])
    assert [x["index"] for x in collect._read_partial(path)] == [0]
    assert path.read_text() == whole


# -- config --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_config_errors_name_the_collect_fields(tmp_path: Path) -> None:
    def refused(*overrides: str) -> str:
        with pytest.raises(ConfigError) as e:
            load_config(TINY, list(overrides))
        return str(e.value)

    assert "collect.labeler: must be" in refused("collect.labeler=my_module")
    assert "collect.labeler: must be" in refused("collect.labeler=a.b:c:d")
    assert "collect.samples_per_prompt" in refused("collect.samples_per_prompt=1")
    assert "collect.samples_per_prompt" in refused("collect.samples_per_prompt=10")
    assert "collect.ranked_file is read only with collect.labeler human" in refused(
        "collect.ranked_file=r.jsonl"
    )
    assert 'collect.labeler "task"' in refused(
        "stages=[collect]", "task=null", "collect.prompts=p", "collect.heldout_prompts=h"
    )
    assert "collect.prompts must be set when task is null" in refused(
        "stages=[collect]", "task=null", "collect.labeler=human"
    )
    assert "collect.max_new_tokens (64) must be <" in refused(
        "stages=[sft, collect, rm]", "collect.max_new_tokens=64"
    )
    assert "recipe order" in refused("stages=[rm, collect]")
    # a labeler function's module is imported before Ray starts
    with pytest.raises(ConfigError, match=r"collect\.labeler: cannot import module 'no_such_mod'"):
        collect.load_labeler("no_such_mod:f")
    with pytest.raises(ConfigError, match=r"collect\.labeler: module 'tests.test_collect' has no"):
        collect.load_labeler("tests.test_collect:nothing_here")
    loaded = collect.load_labeler("tests.test_collect:by_length")
    assert loaded.__name__ == "by_length" and loaded("p", ["a", "abc"]) == [1, 0]


@pytest.mark.unit
def test_the_rm_reads_collected_comparisons_only_when_collect_runs() -> None:
    from trainers.pipeline import _demand, resolve_paths

    demo = load_config(TINY)
    assert demo.stages == ["sft", "rm", "ppo"]
    paths = resolve_paths(demo)
    assert paths.rm_train == str(Path("runs/tiny/task/rm_train.jsonl"))
    assert paths.rm_heldout == str(Path("runs/tiny/task/rm_heldout.jsonl"))
    full = load_config(TINY, ["stages=[sft, collect, rm, ppo]"])
    with_collect = resolve_paths(full)
    assert with_collect.rm_train == str(Path("runs/tiny/collect/comparisons_train.jsonl"))
    assert with_collect.rm_heldout == str(Path("runs/tiny/collect/comparisons_heldout.jsonl"))
    assert with_collect.collect_policy == str(Path("runs/tiny/sft/model"))
    assert with_collect.collect_prompts == str(Path("runs/tiny/task/prompts_train.jsonl"))
    given = resolve_paths(load_config(TINY, ["stages=[collect, rm]", "rm.train_data=mine.jsonl"]))
    assert given.rm_train == "mine.jsonl"
    assert [c for _, c, _ in _demand(full, "collect")] == [0.5]


@pytest.mark.unit
def test_the_stage_engines_share_the_threads_that_rollout_gives_its_engines() -> None:
    from trainers.collect_sampling import engine_section

    def threads(*overrides: str) -> tuple[int, int]:
        section = engine_section(load_config(TINY, list(overrides)))
        return section.engines, section.torch_threads

    assert threads() == (1, 1)
    assert threads("rollout.torch_threads=2") == (1, 2)
    # two engines of one thread where rollout has one of two: never more threads than it gives
    assert threads("rollout.torch_threads=2", "collect.engines=2") == (2, 1)
    assert threads("rollout.engines=2", "rollout.torch_threads=2") == (2, 2)
    assert threads("collect.engines=3") == (3, 1)  # at least one each
    assert threads("rollout.engines=2", "rollout.torch_threads=3", "collect.engines=3") == (3, 2)
    smollm2 = engine_section(load_config(ROOT / "configs" / "smollm2.yaml"))
    assert (smollm2.engines, smollm2.torch_threads) == (2, 1)  # a core each, as before


# -- human labelers ------------------------------------------------------------------------------


def _human_setup(small_task: Path, tmp_path: Path, *extra: str):
    """A collect stage with labeler human whose samples exist (made up here, no engine)."""
    from trainers.common import check_model_folder

    overrides = [
        "stages=[collect]",
        f"output_dir={tmp_path / 'run'}",
        "collect.labeler=human",
        f"collect.policy={small_task / 'base_model'}",
        f"collect.prompts={small_task / 'prompts_train.jsonl'}",
        f"collect.heldout_prompts={small_task / 'prompts_heldout.jsonl'}",
        "collect.max_prompts=3",
        "collect.max_heldout_prompts=2",
        "wandb.mode=disabled",
        *extra,
    ]
    config = load_config(TINY, overrides)
    out = config.run_dir / "collect"
    tok = check_model_folder(small_task / "base_model", "collect.policy")
    policy = str(small_task / "base_model")
    files = [str(small_task / "prompts_train.jsonl"), str(small_task / "prompts_heldout.jsonl")]
    return config, out, tok, policy, files


def _tracker(tmp_path: Path) -> Tracker:
    return Tracker(mode="disabled", project="x", entity=None, name="x", run_dir=tmp_path, config={})


def _write_samples(config, out: Path, inputs) -> dict[str, list[dict]]:
    """Samples as the engines would leave them: prompt 1 of train has one distinct response."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling.json").write_text(json.dumps(collect.sampling_settings(config, inputs)))
    lines = {}
    for split, prompts in inputs.prompts.items():
        lines[split] = []
        for p in prompts:
            texts = (
                ["the only one ."]
                if (split, p.index) == ("train", 1)
                else [f"{p.index} response {k} " + "word " * k for k in range(4)]
            )
            lines[split].append(
                {
                    "index": p.index,
                    "id": collect._prompt_id(split, p, texts),
                    "where": p.where,
                    "prompt": p.text,
                    "samples": texts,
                    "generated": 4,
                    "tokens": 24,
                    "ranking": None,
                    "scores": None,
                }
            )
        collect._write_jsonl(out / f"samples_{split}.jsonl", lines[split])
    return lines


@pytest.mark.unit
def test_human_ranking_export_and_import_round_trip(small_task: Path, tmp_path: Path) -> None:
    config, out, tok, policy, files = _human_setup(small_task, tmp_path)
    inputs = collect.prepare(config, policy, *files, out, tok, log=lambda _: None)
    _write_samples(config, out, inputs)

    with pytest.raises(collect.RankingNeeded, match=r"collect\.ranked_file") as e:
        collect.train(config, inputs, out, _tracker(tmp_path), log=lambda _: None)
    assert str(out / "to_rank.jsonl") in str(e.value)
    to_rank = [json.loads(x) for x in (out / "to_rank.jsonl").open()]
    assert len(to_rank) == 4  # 3 + 2 prompts, one with a single distinct response left out
    assert len({r["id"] for r in to_rank}) == 4
    shown = [[x["text"] for x in r["responses"]] for r in to_rank]
    assert any(s != sorted(s) for s in shown)  # shuffled
    # exported again: the same file (seeded)
    before = (out / "to_rank.jsonl").read_text()
    with pytest.raises(collect.RankingNeeded):
        collect.train(config, inputs, out, _tracker(tmp_path), log=lambda _: None)
    assert (out / "to_rank.jsonl").read_text() == before

    # people rank: the longest response first
    ranked = tmp_path / "ranked.jsonl"
    with ranked.open("w") as f:
        for r in reversed(to_rank):  # any order of lines
            best = sorted(r["responses"], key=lambda x: -len(x["text"]))
            f.write(json.dumps({"id": r["id"], "ranking": [x["id"] for x in best]}) + "\n")
    config, *_ = _human_setup(small_task, tmp_path, f"collect.ranked_file={ranked}")
    inputs = collect.prepare(config, policy, *files, out, tok, log=lambda _: None)
    figures = collect.train(config, inputs, out, _tracker(tmp_path), log=lambda _: None)
    assert figures["prompts"] == 2 and figures["heldout_prompts"] == 2
    assert figures["skipped_prompts"] == 1 and figures["responses_per_prompt"] == 4
    rows = read(out / "comparisons_train.jsonl", "comparisons")
    assert len(rows) == 2
    for row in rows:
        lengths = [len(r) for r in row["responses"]]
        assert lengths == sorted(lengths, reverse=True)
    assert len(read(out / "comparisons_heldout.jsonl", "comparisons")) == 2


@pytest.mark.unit
def test_each_malformed_ranked_line_names_the_file_and_line(
    small_task: Path, tmp_path: Path
) -> None:
    config, out, tok, policy, files = _human_setup(small_task, tmp_path)
    inputs = collect.prepare(config, policy, *files, out, tok, log=lambda _: None)
    lines = _write_samples(config, out, inputs)
    every = [x for split in lines.values() for x in split]
    ranked = [x for x in every if len(x["samples"]) >= 2]
    ids = [x["id"] for x in ranked]

    def good(i: int) -> dict:
        return {"id": ids[i], "ranking": [f"{ids[i]}-{k}" for k in range(4)]}

    def check(rows: list, pattern: str) -> None:
        path = tmp_path / "ranked.jsonl"
        path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match=pattern.replace("FILE", str(path))):
            collect.read_ranked(path, every)

    rest = [good(i) for i in range(1, 4)]
    check(["{not json\n", *rest], r"FILE:1: not valid JSON")
    check([good(0), {"ranking": []}, *rest[1:]], r"FILE:2: expected \{\"id\"")
    check([good(0), {"id": "train-99999-00000000", "ranking": []}], r"FILE:2: unknown prompt id")
    check([good(0), good(0), *rest], r"FILE:2: prompt id .* is ranked twice \(first on line 1\)")
    short = {"id": ids[0], "ranking": [f"{ids[0]}-{k}" for k in range(3)]}
    check([*rest, short], r"FILE:4: the ranking .* not a permutation .*missing ids")
    twice = {"id": ids[0], "ranking": [f"{ids[0]}-{k}" for k in (0, 1, 2, 2)]}
    check([twice], r"FILE:1: the ranking .*missing ids .*repeated ids")
    other = {"id": ids[0], "ranking": [f"{ids[0]}-{k}" for k in (0, 1, 2, 7)]}
    check([other], r"FILE:1: .*unknown ids")
    check([good(0), {"id": ids[1], "ranking": "0 1 2 3"}], r"FILE:2: field \"ranking\" must be")
    check([good(0), *rest[:2]], r"FILE: no ranking for prompt id")
    # the ranked file is checked before Ray starts, against the kept samples
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[]\n")
    config, *_ = _human_setup(small_task, tmp_path, f"collect.ranked_file={bad}")
    with pytest.raises(DataError, match=f"{bad}:1"):
        collect.prepare(config, policy, *files, out, tok, log=lambda _: None)
    for split in ("train", "heldout"):
        (out / f"samples_{split}.jsonl").unlink()
    with pytest.raises(DataError, match=r"run once without collect\.ranked_file"):
        collect.prepare(config, policy, *files, out, tok, log=lambda _: None)


# -- the stage on engines --------------------------------------------------------------------------


@pytest.mark.integration
def test_collect_stage_samples_ranks_skips_when_done_and_resumes(
    small_task: Path, ray_cluster, tmp_path: Path
) -> None:
    from trainers.pipeline import run

    overrides = [
        "stages=[collect]",
        f"output_dir={tmp_path / 'run'}",
        "task.train_prompts=16",
        "task.heldout_prompts=8",
        f"collect.policy={small_task / 'base_model'}",
        f"collect.prompts={small_task / 'prompts_train.jsonl'}",
        f"collect.heldout_prompts={small_task / 'prompts_heldout.jsonl'}",
        "collect.max_prompts=8",
        "collect.max_heldout_prompts=4",
        "collect.samples_per_prompt=4",
        "collect.max_new_tokens=8",
        "collect.chunk_size=4",
        "wandb.mode=disabled",
    ]
    config = load_config(TINY, overrides)
    out = config.run_dir / "collect"
    said: list[str] = []
    summary = run(config, log=said.append)
    figures = summary["collect"]
    final = out / "comparisons_train.jsonl"
    rows = [json.loads(x) for x in final.open()]
    assert len(rows) + figures["skipped_prompts"] >= 8  # held-out skips count too
    assert figures["prompts"] == len(rows) >= 6
    for row in rows:
        assert 2 <= len(row["responses"]) <= 4
        assert len(set(row["responses"])) == len(row["responses"])
    assert len(read(final, "comparisons")) == len(rows)
    assert len(read(out / "comparisons_heldout.jsonl", "comparisons")) == figures["heldout_prompts"]
    assert 0 <= figures["labeler_agreement"] <= 1
    assert figures["tokens_per_second"] > 0 and 0 < figures["mean_response_tokens"] <= 8
    assert figures["resumed_prompts"] == 0
    assert json.loads((config.run_dir / "summary.json").read_text())["collect"] == figures
    assert not (out / "comparisons_train.partial.jsonl").exists()

    # the same settings again: finished, nothing sampled
    said.clear()
    assert run(config, log=said.append)["collect"] == figures
    assert any("collect: finished before with the same settings" in s for s in said)

    # a run stopped after its first chunk: the partial file holds that chunk's 4 prompts
    samples = (out / "samples_train.jsonl").read_text().splitlines(keepends=True)
    first = [json.loads(x) for x in samples[:4]]
    first[0]["samples"][0] = "kept from the stopped run ."  # not sampled again: it stays
    (out / "comparisons_train.partial.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in first)
    )
    first_run = final.read_text().splitlines()
    # the final line of the changed prompt, as the resumed run must write it
    expected = list(first_run)
    if len(first[0]["samples"]) >= 2:  # prompt 0's line is the first (when not skipped)
        expected[0] = json.dumps(collect.comparison(first[0], first[0]["ranking"]))
    for name in ("comparisons_train.jsonl", "samples_train.jsonl", "stage.json"):
        (out / name).unlink()
    said.clear()
    resumed = run(config, log=said.append)["collect"]
    assert any("(8 prompts kept from an earlier run)" in s for s in said)
    assert resumed["resumed_prompts"] == 4 + 4  # the first chunk, and the held-out samples kept
    # the first chunk's prompts keep their lines byte for byte (the changed one as changed);
    # the second chunk is drawn again from the same seeds, so it is the same too
    assert final.read_text().splitlines() == expected
    assert not (out / "comparisons_train.partial.jsonl").exists()

    # two engines, every chunk drawn again (--restart): the chunks are spread over both, and
    # each chunk's samples depend on its seed only, not on the engine that drew it
    two = load_config(TINY, [*overrides, "collect.engines=2"])  # the stage's own engine count
    said.clear()
    again = run(two, restart=True, log=said.append)["collect"]
    assert any(" on 2 engine(s)" in s for s in said)
    assert again["resumed_prompts"] == 0
    assert final.read_text().splitlines() == first_run

    # the engine killed (SIGKILL, from outside) as soon as it is up: it is replaced and its
    # chunks are drawn again with their seeds, so the comparisons are the same
    killed: list[int] = []

    def kill_the_engine() -> None:
        from ray._private.state import actors

        deadline = time.time() + 300
        while not killed and time.time() < deadline:
            for a in actors().values():
                if a["ActorClassName"] == "RolloutEngine" and a["State"] == "ALIVE" and a["Pid"]:
                    os.kill(a["Pid"], signal.SIGKILL)
                    killed.append(a["Pid"])
                    break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_engine, daemon=True)
    killer.start()
    said.clear()
    run(config, restart=True, log=said.append)
    killer.join()
    assert killed
    assert any("collect: rollout rank 0 died or hangs" in s for s in said), said
    assert final.read_text().splitlines() == first_run


@pytest.mark.unit
def test_samples_are_kept_when_the_run_and_inputs_move(small_task: Path, tmp_path: Path) -> None:
    """A half-done collect stage copied elsewhere (another disk, another node's mount) with its
    policy and prompts, the config pointing at the copies: its samples are the same work, and the
    people's rankings asked for are the same (no engine starts: none is needed)."""
    import shutil

    config, out, tok, policy, files = _human_setup(small_task, tmp_path / "a")
    inputs = collect.prepare(config, policy, *files, out, tok, log=lambda _: None)
    _write_samples(config, out, inputs)
    with pytest.raises(collect.RankingNeeded):
        collect.train(config, inputs, out, _tracker(tmp_path), log=lambda _: None)
    asked = (out / "to_rank.jsonl").read_text()

    task = tmp_path / "b" / "task"
    shutil.copytree(small_task, task, copy_function=shutil.copyfile)
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run", copy_function=shutil.copyfile)
    config, out, tok, policy, files = _human_setup(task, tmp_path / "b")
    inputs = collect.prepare(config, policy, *files, out, tok, log=lambda _: None)
    (out / "to_rank.jsonl").unlink()
    said: list[str] = []
    with pytest.raises(collect.RankingNeeded):
        collect.train(config, inputs, out, _tracker(tmp_path), log=said.append)
    assert (out / "to_rank.jsonl").read_text() == asked


@pytest.mark.unit
def test_samples_made_with_other_settings_are_not_used(small_task: Path, tmp_path: Path) -> None:
    config, out, tok, policy, files = _human_setup(small_task, tmp_path)
    inputs = collect.prepare(config, policy, *files, out, tok, log=lambda _: None)
    _write_samples(config, out, inputs)
    config, *_ = _human_setup(small_task, tmp_path, "collect.temperature=0.7")
    inputs = collect.prepare(config, policy, *files, out, tok, log=lambda _: None)
    with pytest.raises(collect.SamplesConflict, match=r"other settings \(collect differ\)"):
        collect.train(config, inputs, out, _tracker(tmp_path), log=lambda _: None)
