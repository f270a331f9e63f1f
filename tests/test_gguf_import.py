"""`instructray import-gguf`: bad input gives one error naming the path and leaves nothing behind;
a tiny Llama GGUF written here round-trips; the SmolLM2 folder that `make smollm2` made loads,
keeps its tied embeddings and chat template, and writes English."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.real_model import smollm2_folder
from trainers.cli import main
from trainers.gguf_import import GGUFImportError, import_gguf

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HIDDEN, FFN, HEADS, KV_HEADS = 16, 32, 2, 1


def _leftovers(parent: Path, name: str) -> list[str]:
    """Anything at or beside `parent/name` that an import left: the folder or its temp folders."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name))


def _write_gguf(path: Path, arch: str, build: Any = None) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    if build is not None:
        build(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_llama(path: Path, *, tied: bool = True, pad: bool = True) -> tuple[Path, dict]:
    """A Llama GGUF of one layer with a byte-level BPE tokenizer and ChatML tokens, in float32;
    also returns the tensors it holds."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = sorted(set(bytes_to_unicode().values()))
    tokens = [*alphabet, "he", "ll", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = len(tokens)
    eos = tokens.index("<|im_end|>")
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    head_dim = HIDDEN // HEADS
    tensors = {
        "token_embd.weight": rand(vocab, HIDDEN),
        "output_norm.weight": np.ones(HIDDEN, np.float32),
        "blk.0.attn_norm.weight": np.ones(HIDDEN, np.float32),
        "blk.0.ffn_norm.weight": np.ones(HIDDEN, np.float32),
        "blk.0.attn_q.weight": rand(HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": rand(KV_HEADS * head_dim, HIDDEN),
        "blk.0.attn_v.weight": rand(KV_HEADS * head_dim, HIDDEN),
        "blk.0.attn_output.weight": rand(HIDDEN, HIDDEN),
        "blk.0.ffn_gate.weight": rand(FFN, HIDDEN),
        "blk.0.ffn_up.weight": rand(FFN, HIDDEN),
        "blk.0.ffn_down.weight": rand(HIDDEN, FFN),
    }
    if not tied:
        tensors["output.weight"] = rand(vocab, HIDDEN)

    def build(w: Any) -> None:
        w.add_block_count(1)
        w.add_context_length(64)
        w.add_embedding_length(HIDDEN)
        w.add_feed_forward_length(FFN)
        w.add_head_count(HEADS)
        w.add_head_count_kv(KV_HEADS)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(vocab)
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([1] * (vocab - 3) + [3, 3, 3])
        w.add_token_merges(["h e", "l l"])
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(eos)
        if pad:
            w.add_pad_token_id(eos)
        w.add_chat_template(CHAT_TEMPLATE)
        for name, value in tensors.items():
            w.add_tensor(name, value)

    return _write_gguf(path, "llama", build), tensors


# Bad input: one GGUFImportError that names the path; nothing at OUT_DIR, no temp folder.


@pytest.mark.unit
def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.gguf"
    with pytest.raises(GGUFImportError, match=rf"{missing}: no such file"):
        import_gguf(missing, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.unit
def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(GGUFImportError, match=rf"{bad}: not a GGUF file \(it starts with b'PK"):
        import_gguf(bad, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.unit
def test_truncated_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(GGUFImportError, match=rf"{bad}: cannot be read as GGUF"):
        import_gguf(bad, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.unit
def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "odd.gguf", "notanarch", lambda w: w.add_block_count(1))
    with pytest.raises(
        GGUFImportError,
        match=rf"{path}: architecture 'notanarch' cannot be read by transformers .*llama",
    ):
        import_gguf(path, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.unit
def test_existing_non_empty_out_dir(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "meta.gguf", "llama")  # a supported architecture, no tensors
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GGUFImportError, match=rf"{out}: output folder exists and is not empty"):
        import_gguf(path, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert _leftovers(tmp_path, "out") == ["out"]


@pytest.mark.unit
def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "meta.gguf", "llama")
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(GGUFImportError, match=rf"{out}: exists and is not a folder"):
        import_gguf(path, out)
    assert out.read_text() == "a file"


@pytest.mark.unit
def test_a_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    """A supported architecture whose file transformers cannot read (no tokenizer, no tensors):
    the error names the file, and the temp folder is gone."""
    path = _write_gguf(tmp_path / "meta.gguf", "llama")
    with pytest.raises(GGUFImportError, match=rf"{path}: transformers cannot"):
        import_gguf(path, tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.unit
def test_cli_prints_one_error_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.gguf"
    assert main(["import-gguf", str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"instructray: error: {missing}: no such file\n"


# A tiny Llama GGUF round-trips.


@pytest.mark.unit
def test_tiny_llama_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, tensors = _tiny_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "models" / "tiny"
    assert main(["import-gguf", str(path), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "architecture: llama (LlamaForCausalLM)" in printed
    assert "embeddings: tied" in printed
    assert _leftovers(out.parent, "tiny") == ["tiny"]
    assert (out / "model.safetensors").is_file()

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert config["pad_token_id"] == config["eos_token_id"] == 260
    generation = json.loads((out / "generation_config.json").read_text())
    assert not {"do_sample", "temperature", "top_p", "top_k"} & set(generation)
    assert generation["eos_token_id"] == 260

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    embed = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()
    assert torch.equal(embed, torch.from_numpy(tensors["token_embd.weight"]))
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32


@pytest.mark.unit
def test_untied_without_pad_token_and_an_empty_out_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, tensors = _tiny_llama(tmp_path / "tiny.gguf", tied=False, pad=False)
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is taken
    summary = import_gguf(path, out)
    assert summary.pad_was_eos and not summary.tied
    assert "the tokenizer had no pad token; pad = eos = '<|im_end|>'" in capsys.readouterr().out
    assert _leftovers(tmp_path, "out") == ["out"]
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 260
    assert AutoTokenizer.from_pretrained(out).pad_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight, torch.from_numpy(tensors["output.weight"]))


# The real model, made by `make smollm2`, loaded once.


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[Any, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    yield model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.real_model
def test_smollm2_folder(smollm2: tuple[Any, Any]) -> None:
    import torch

    from trainers.common import check_model_folder

    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == model.config.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # The recipe's own check takes it as a policy's starting point.
    assert check_model_folder(smollm2_folder(), "sft.model").eos_token == "<|im_end|>"


@pytest.mark.real_model
def test_smollm2_writes_english(smollm2: tuple[Any, Any]) -> None:
    import torch

    model, tok = smollm2
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "\ufffd" not in answer
    assert sum(c.isascii() and c.isalpha() for c in answer) >= 5, answer
    assert "Paris" in answer, answer
