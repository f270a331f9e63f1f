"""Bad input, through the `instructray run` command: each case is one clear error (exit code 2)
that names the file and line, or the field, found before any actor starts.

Every case points the run at a Ray address where no cluster listens: a case whose mistake were
not caught before Ray would fail there with a connection error instead of the expected message.
Property-based tests then feed the config loader and the data reader arbitrary input: they must
answer with their own error, never another exception.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT
from trainers.cli import main

pytestmark = pytest.mark.unit

DEMO = {"prompt": "write a short review of the new phone .", "response": "the phone is good ."}
COMPARISON = {"prompt": DEMO["prompt"], "responses": ["the phone is good .", "bad phone ."]}
TRL_PREFERENCE = {  # Hugging Face TRL's conversational preference format
    "prompt": [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "a"}],
    "chosen": [{"role": "assistant", "content": "the phone is good ."}],
    "rejected": [{"role": "assistant", "content": "bad phone ."}],
}
LONG = " ".join(["phone"] * 200)


@pytest.fixture(scope="module")
def byo(small_task: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bring-your-own-data folder: the small task's model and files under plain names."""
    folder = tmp_path_factory.mktemp("byo")
    shutil.copytree(small_task / "base_model", folder / "model")
    for name in (
        "sft_train.jsonl",
        "sft_heldout.jsonl",
        "rm_train.jsonl",
        "rm_heldout.jsonl",
        "prompts_train.jsonl",
        "prompts_heldout.jsonl",
    ):
        shutil.copy(small_task / name, folder / name)
    return folder


def _base(byo: Path, out: Path) -> list[str]:
    return [
        "task=null",
        f"output_dir={out}",
        f"sft.model={byo / 'model'}",
        f"sft.train_data={byo / 'sft_train.jsonl'}",
        f"sft.heldout_data={byo / 'sft_heldout.jsonl'}",
        f"rm.train_data={byo / 'rm_train.jsonl'}",
        f"rm.heldout_data={byo / 'rm_heldout.jsonl'}",
        f"ppo.prompts={byo / 'prompts_train.jsonl'}",
        f"ppo.heldout_prompts={byo / 'prompts_heldout.jsonl'}",
        "ray.address=127.0.0.1:1",  # nothing listens there
    ]


def _lines(*records: object) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"


def _model(byo: Path, tmp: Path, change: str) -> Path:
    """A copy of the good model folder with one thing wrong."""
    folder = tmp / "bad_model"
    shutil.copytree(byo / "model", folder)
    if change == "no_tokenizer":
        for f in folder.glob("tokenizer*"):
            f.unlink()
    elif change == "no_chat_template":
        for f in folder.glob("*.jinja"):
            f.unlink()
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    elif change == "pickle_only":
        for f in folder.glob("*.safetensors"):
            f.rename(folder / "pytorch_model.bin")
    elif change == "no_config":
        (folder / "config.json").unlink()
    elif change == "not_a_classifier":
        (folder / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    elif change == "broken_config":
        (folder / "config.json").write_text("{ not json")
    return folder


# (case, files to write {name: text}, overrides ({d}: the case's folder),
#  model change or None, substrings the error must contain)
CASES = [
    # -- data files --------------------------------------------------------------------------
    ("demo broken JSON", {"d.jsonl": _lines(DEMO, '{"prompt": "a", "response": ')},
     ["sft.train_data={d}/d.jsonl"], None, ["d.jsonl:2", "not valid JSON"]),
    ("demo not an object", {"d.jsonl": _lines(DEMO, DEMO, '["a", "b"]')},
     ["sft.train_data={d}/d.jsonl"], None, ["d.jsonl:3", "expected a JSON object"]),
    ("demo missing prompt", {"d.jsonl": _lines({"response": "x"})},
     ["sft.train_data={d}/d.jsonl"], None, ["d.jsonl:1", 'missing field "prompt"']),
    ("demo response not a string", {"d.jsonl": _lines(DEMO, {"prompt": "a", "response": 3})},
     ["sft.train_data={d}/d.jsonl"], None, ["d.jsonl:2", '"response" must be a string']),
    ("demo empty response", {"d.jsonl": _lines({"prompt": "a", "response": " "})},
     ["sft.heldout_data={d}/d.jsonl"], None, ["d.jsonl:1", '"response" is empty']),
    ("demo response not Unicode",
     {"d.jsonl": _lines(DEMO, '{"prompt": "a", "response": "\\ud800"}')},
     ["sft.train_data={d}/d.jsonl"], None, ["d.jsonl:2", "not valid Unicode"]),
    ("demo file missing", {}, ["sft.train_data={d}/nowhere.jsonl"], None,
     ["sft.train_data", "nowhere.jsonl"]),
    ("demo file empty", {"d.jsonl": ""}, ["sft.train_data={d}/d.jsonl"], None, ["d.jsonl"]),
    ("demo prompt over the context", {"d.jsonl": _lines(DEMO, {"prompt": LONG, "response": "x"})},
     ["sft.train_data={d}/d.jsonl"], None, ["d.jsonl:2", "data.max_prompt_tokens"]),
    ("demo response over the context",
     {"d.jsonl": _lines({"prompt": "a", "response": LONG})},
     ["sft.heldout_data={d}/d.jsonl"], None, ["d.jsonl:1", "data.max_seq_len"]),
    ("comparison missing responses", {"c.jsonl": _lines({"prompt": "a"})},
     ["rm.train_data={d}/c.jsonl"], None, ["c.jsonl:1", 'missing field "responses"']),
    ("comparison responses not a list", {"c.jsonl": _lines({"prompt": "a", "responses": "x"})},
     ["rm.train_data={d}/c.jsonl"], None, ["c.jsonl:1", "must be a list"]),
    ("comparison with one response", {"c.jsonl": _lines(COMPARISON, {"prompt": "a",
                                                                       "responses": ["x"]})},
     ["rm.train_data={d}/c.jsonl"], None, ["c.jsonl:2", "at least 2 ranked responses"]),
    ("comparison with two identical",
     {"c.jsonl": _lines({"prompt": "a", "responses": ["x", "x"]})},
     ["rm.heldout_data={d}/c.jsonl"], None, ["c.jsonl:1", "the same response twice"]),
    ("comparison with an empty response",
     {"c.jsonl": _lines({"prompt": "a", "responses": ["x", ""]})},
     ["rm.train_data={d}/c.jsonl"], None, ["c.jsonl:1", '"responses"[1]']),
    ("comparison over the context",
     {"c.jsonl": _lines({"prompt": "a", "responses": ["x", LONG]})},
     ["rm.train_data={d}/c.jsonl"], None, ["c.jsonl:1", "data.max_seq_len"]),
    ("TRL conversation with a tool turn",
     {"c.jsonl": _lines(TRL_PREFERENCE, {**TRL_PREFERENCE, "prompt": [{"role": "tool",
                                                                        "content": "a"}]})},
     ["rm.train_data={d}/c.jsonl"], None, ["c.jsonl:2", "\"prompt\"[0] has role 'tool'"]),
    ("prompt missing", {"p.jsonl": _lines({"text": "a"})},
     ["ppo.prompts={d}/p.jsonl"], None, ["p.jsonl:1", 'missing field "prompt"']),
    ("prompt over the context", {"p.jsonl": _lines({"prompt": "a"}, {"prompt": LONG})},
     ["ppo.heldout_prompts={d}/p.jsonl"], None, ["p.jsonl:2", "data.max_prompt_tokens"]),
    ("fewer prompts than a rollout batch", {"p.jsonl": _lines(*[{"prompt": "a"}] * 3)},
     ["ppo.prompts={d}/p.jsonl"], None, ["ppo.rollout_batch", "p.jsonl"]),
    # -- configs -----------------------------------------------------------------------------
    ("unknown field", {}, ["sft.epoch=2"], None, ["sft.epoch: unknown field", "'epochs'"]),
    ("wrong type", {}, ["sft.epochs=three"], None, ["sft.epochs", "integer"]),
    ("negative count", {}, ["learner.ranks=-1"], None, ["learner.ranks", "greater than"]),
    ("zero epochs", {}, ["rm.epochs=0"], None, ["rm.epochs"]),
    ("negative learning rate", {}, ["sft.optim.lr=-0.1"], None, ["sft.optim.lr"]),
    ("batch not a multiple of the ranks", {}, ["sft.batch_size=33"], None,
     ["sft.batch_size (33)", "learner.ranks"]),
    ("stages out of order", {}, ["stages=[ppo, sft]"], None, ["stages", "recipe order"]),
    ("more ranks than CPUs", {}, ["ray.address=null", "ray.num_cpus=2", "learner.ranks=8"],
     None, ["the sft stage reserves 4 CPUs", "learner.ranks 8", "ray.num_cpus"]),
    ("a stage's own learners over the CPUs", {},
     ["ray.address=null", "ray.num_cpus=2", "rm.learner={ranks: 2, cpus_per_rank: 2}"],
     None, ["the rm stage reserves 4 CPUs", "rm.learner.ranks 2 × 2 CPUs", "ray.num_cpus"]),
    ("num_cpus with an address", {}, ["ray.num_cpus=4"], None, ["ray.num_cpus"]),
    ("malformed override", {}, ["sft.epochs"], None, ["override 'sft.epochs'", "key.sub=value"]),
    ("override into a value", {}, ["seed.x=1"], None, ["seed is not a section"]),
    ("built-in name as a custom resource", {}, ["learner.resources_per_rank={GPU: 1}"], None,
     ["learner.resources_per_rank: 'GPU'"]),
    ("head dimension too small", {}, ["task={model: {hidden_size: 64, num_attention_heads: 4}}"],
     None, ["task.model", "head dimension"]),
    ("data paths missing without a task", {}, ["ppo.prompts=null"], None,
     ["ppo.prompts must be set when task is null"]),
    # found by the property-based test below: YAML's escapes can make text that is not Unicode
    ("an unpaired surrogate in a key", {}, ['learner.resources_per_rank={"\\ud800": 1}'], None,
     ["learner.resources_per_rank.\\ud800", "not valid Unicode"]),
    # -- model folders -----------------------------------------------------------------------
    ("model folder missing", {}, ["sft.model={d}/nowhere"], None,
     ["sft.model", "nowhere", "does not exist"]),
    ("no config.json", {}, ["sft.model={d}/bad_model"], "no_config",
     ["sft.model", "no config.json"]),
    ("unreadable config.json", {}, ["sft.model={d}/bad_model"], "broken_config",
     ["sft.model", "config.json cannot be read"]),
    ("pickle weights only", {}, ["sft.model={d}/bad_model"], "pickle_only",
     ["sft.model", "no *.safetensors"]),
    ("no tokenizer", {}, ["sft.model={d}/bad_model"], "no_tokenizer", ["sft.model", "tokenizer"]),
    ("no chat template", {}, ["sft.model={d}/bad_model"], "no_chat_template",
     ["sft.model", "chat template"]),
    ("reward model of a type without a score head", {},
     ["rm.model={d}/bad_model"], "not_a_classifier", ["rm.model", "clip_vision_model"]),
    ("PPO reward model folder missing", {}, ["ppo.reward_model={d}/nowhere"], None,
     ["ppo.reward_model", "does not exist"]),
    ("reward function's module missing", {},
     ['reward.sources=[{kind: rm}, {kind: function, target: "no_such_rewards:score"}]'], None,
     ["reward.sources[1].target", "no_such_rewards", "PYTHONPATH"]),
]  # fmt: skip


def test_the_table_has_thirty_distinct_cases() -> None:
    assert len({case[0] for case in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize(("case", "files", "overrides", "model", "expected"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_one_clear_error_before_any_actor_starts(
    byo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    files: dict[str, str],
    overrides: list[str],
    model: str | None,
    expected: list[str],
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if model is not None:
        _model(byo, tmp_path, model)
    args = [o.replace("{d}", str(tmp_path)) for o in overrides]
    code = main(["run", str(ROOT / "configs" / "tiny.yaml"), *_base(byo, tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("instructray: error: "), err
    for part in expected:
        assert part in err, f"{case}: {part!r} not in {err!r}"


# -- property-based: arbitrary input ends in our own error, never another exception ---------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
_fields = st.sampled_from(
    ["seed", "stages", "task", "task.seed", "task.model.hidden_size", "data.max_seq_len",
     "learner.ranks", "learner.zero_stage", "learner.resources_per_rank", "sft.optim.betas",
     "ppo.kl.estimator", "ppo.value_clip", "rollout.engines", "reward", "ray.address", "wandb",
     "name", "output_dir", "ppo.critic", "nonsense.field"]
)  # fmt: skip


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fields=st.dictionaries(_fields, _values, max_size=4))
def test_the_config_loader_answers_any_config_with_a_config_error(
    tmp_path: Path, fields: dict
) -> None:
    from trainers.config import ConfigError, load_config

    raw: dict = {}
    for dotted, value in fields.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    with contextlib.suppress(ConfigError):
        load_config(path)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200), overrides=st.lists(st.text(max_size=20), max_size=3))
def test_the_config_loader_answers_any_text_with_a_config_error(
    tmp_path: Path, text: str, overrides: list[str]
) -> None:
    from trainers.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with contextlib.suppress(ConfigError):
        load_config(path, overrides)


_records = st.one_of(
    _values,
    st.fixed_dictionaries({"prompt": _values, "response": _values}),
    st.fixed_dictionaries({"prompt": _values, "responses": _values}),
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=20), "responses": st.lists(st.text(max_size=5))}
    ),
)  # fmt: skip


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["demonstrations", "comparisons", "prompts"]),
    records=st.lists(_records, max_size=4),
    raw_line=st.one_of(st.none(), st.text(max_size=30)),
)
def test_the_data_reader_answers_any_file_with_a_data_error(
    tmp_path: Path, kind: str, records: list, raw_line: str | None
) -> None:
    from trainers.data import DataError, read

    lines = [json.dumps(r) for r in records]
    if raw_line is not None:
        lines.append(raw_line.replace("\n", " "))
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    try:
        rows = read(path, kind, "field")
    except DataError:
        return
    assert len(rows) <= len(lines)  # every record it gives back was in the file
