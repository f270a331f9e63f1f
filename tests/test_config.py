"""The run config: typed, validated, errors that name the field and the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainers.config import ConfigError, load_config, parse_overrides

pytestmark = pytest.mark.unit


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_the_demo_config_loads_with_its_defaults() -> None:
    config = load_config(ROOT / "configs" / "tiny.yaml")
    assert config.name == "tiny"
    assert config.output_dir == "runs/tiny"
    assert config.stages == ["sft", "rm", "ppo"]
    assert config.learner.ranks == 2


def test_unknown_field_names_the_field_and_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "sft:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert "sft.epoch: unknown field" in str(e.value)
    assert "did you mean 'epochs'" in str(e.value)


def test_wrong_type_is_not_coerced(tmp_path: Path) -> None:
    path = _write(tmp_path, "learner:\n  ranks: '2'\n")
    with pytest.raises(ConfigError, match=r"learner\.ranks"):
        load_config(path)


def test_negative_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sft\.epochs"):
        load_config(_write(tmp_path, "sft: {epochs: -1}\n"))


def test_inconsistent_batch_and_ranks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sft\.batch_size \(33\) must be a multiple"):
        load_config(_write(tmp_path, "sft: {batch_size: 33}\n"))


def test_a_stage_s_own_learner_settings_go_over_the_learner_section(tmp_path: Path) -> None:
    text = "learner: {ranks: 2, cpus_per_rank: 0.5, dtype: bfloat16}\nrm: {batch_size: 3, "
    config = load_config(_write(tmp_path, text + "learner: {ranks: 1, torch_threads: 2}}\n"))
    rm = config.stage_learner("rm")
    assert (rm.ranks, rm.torch_threads, rm.cpus_per_rank, rm.dtype) == (1, 2, 0.5, "bfloat16")
    assert config.stage_learner("sft") == config.learner  # SFT and PPO keep the section
    assert config.learner.ranks == 2
    # a batch that the stage's own ranks do not divide names them; the error is one line
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text + "learner: {ranks: 2}}\n"))
    assert "rm.batch_size (3) must be a multiple of rm.learner.ranks (2)" in str(e.value)
    assert "(got" not in str(e.value)
    # where the stage's own settings leave its ranks to the learner section, the error names it
    with pytest.raises(ConfigError) as e:
        load_config(
            _write(
                tmp_path, "learner: {ranks: 2}\nrm: {batch_size: 3, learner: {torch_threads: 2}}\n"
            )
        )
    assert "rm.batch_size (3) must be a multiple of learner.ranks (2)" in str(e.value)
    for bad, said in (
        ("{rank: 1}", "rm.learner: rank: not a field of the learner section"),
        ("{ranks: 0}", "rm.learner: ranks: Input should be greater than or equal to 1"),
        ("{ranks: '1'}", "rm.learner: ranks: Input should be a valid integer"),
    ):
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(_write(tmp_path, f"rm: {{learner: {bad}}}\n"))


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path: Path) -> None:
    assert parse_overrides(["sft.optim.lr=2e-3", "stages=[sft]", "task=null"]) == {
        "sft.optim.lr": 2e-3,
        "stages": ["sft"],
        "task": None,
    }
    config = load_config(
        _write(tmp_path, "seed: 1\n"), ["sft.epochs=1", "learner.ranks=1", "output_dir=/tmp/x"]
    )
    assert (config.sft.epochs, config.learner.ranks, config.output_dir) == (1, 1, "/tmp/x")
    with pytest.raises(ConfigError, match=r"the command line: learner\.zero_stage"):
        load_config(_write(tmp_path, "seed: 1\n"), ["learner.zero_stage=1"])
    with pytest.raises(ConfigError, match=r"expected key\.sub=value"):
        parse_overrides(["sft.epochs"])


def test_bring_your_own_data_needs_every_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sft\.model must be set when task is null"):
        load_config(_write(tmp_path, "task: null\n"))


def test_head_dimension_below_vllm_cpu_minimum_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="head dimension"):
        load_config(_write(tmp_path, "task:\n  model: {hidden_size: 64, num_attention_heads: 4}\n"))


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "sft: [\n"))


def test_readme_config_reference_is_current() -> None:
    from trainers.reference import config_reference

    readme = (ROOT / "README.md").read_text()
    assert config_reference() in readme, "run `instructray config-reference` into the README"


def test_ppo_batches_must_divide(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(60 × 1\) must be a multiple of ppo\.minibatch"):
        load_config(_write(tmp_path, "ppo: {rollout_batch: 60, minibatch_size: 16}\n"))
    many = "ppo: {rollout_batch: 6, n_samples_per_prompt: 4, minibatch_size: 16}\n"
    with pytest.raises(ConfigError, match=r"\(6 × 4\) must be a multiple of ppo\.minibatch"):
        load_config(_write(tmp_path, many))
    load_config(_write(tmp_path, many.replace("6,", "8,")))  # 32 responses: 2 minibatches
    for method in ("grpo", "rloo"):
        with pytest.raises(ConfigError, match=f"ppo.advantage {method} .* needs "
                           r"ppo\.n_samples_per_prompt >= 2"):  # fmt: skip
            load_config(_write(tmp_path, f"ppo: {{advantage: {method}}}\n"))
    # without a critic its ranks do not have to divide the minibatch
    load_config(
        _write(tmp_path, "ppo: {advantage: reinforce++, minibatch_size: 16, critic: {ranks: 3}}\n")
    )
    with pytest.raises(ConfigError, match=r"ppo\.minibatch_size \(9\) must be a multiple"):
        load_config(_write(tmp_path, "ppo: {rollout_batch: 18, minibatch_size: 9}\n"))


def test_a_chunk_holds_a_prompt_for_each_critic_rank(tmp_path: Path) -> None:
    """rollout.chunk_size unset: each engine's share of the batch is one chunk, which each critic
    rank must have a part of, as with a chunk size that is set."""
    ppo = "ppo: {rollout_batch: 8, minibatch_size: 8, critic: {ranks: 4}}\n"
    assert load_config(_write(tmp_path, ppo + "rollout: {engines: 2}\n")).rollout.chunk_size is None
    wanted = r"rollout\.chunk_size must be at least ppo\.critic\.ranks \(a chunk is 2 prompts"
    with pytest.raises(ConfigError, match=wanted):
        load_config(_write(tmp_path, ppo + "rollout: {engines: 4}\n"))
    with pytest.raises(ConfigError, match=r"\(a chunk is 3 prompts"):
        load_config(_write(tmp_path, ppo + "rollout: {engines: 1, chunk_size: 3}\n"))
