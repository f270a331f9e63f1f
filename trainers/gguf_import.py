"""`instructray import-gguf`: a GGUF checkpoint made into a plain Hugging Face model folder.

transformers reads a GGUF (with the `gguf` package) and de-quantises it to float32, but the
model it gives refuses `save_pretrained` (it counts as quantized). Here its weights go into a
plain model of the same class, built from the same config without `quantization_config`, which
is saved as safetensors with the tokenizer (chat template, pad and end tokens) into a folder that
the recipe's stages and vLLM read like any other model folder.

The folder is written next to its destination (`OUT_DIR.tmp-XXXX`) and renamed into place at the
end, so nothing half-written is ever left at OUT_DIR. Bad input fails before any loading, with
one `GGUFImportError` that names the file or folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"

# `general.architecture` values that transformers stores under another name (see
# transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint, which renames them the same way).
_ARCH_RENAMES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}
# Keys of transformers' GGUF mapping that are metadata sections, not architectures.
_NOT_ARCHITECTURES = {"general", "tokenizer"}


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported, or a destination that cannot take it; names which."""


@dataclass(frozen=True)
class ImportSummary:
    architecture: str  # the GGUF's general.architecture
    model_class: str  # the transformers class saved, e.g. LlamaForCausalLM
    parameters: int  # unique parameters (tied weights counted once)
    vocab_size: int
    tied: bool
    pad_token: str
    pad_was_eos: bool  # the GGUF had no pad token, so pad = eos was set
    out_dir: Path
    bytes_written: int
    seconds: float


def supported_architectures() -> list[str]:
    """The GGUF architectures that this venv's transformers can read."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in _NOT_ARCHITECTURES)


def gguf_architecture(path: str | Path) -> str:
    """The file's `general.architecture`, after checking that it exists and is a GGUF file."""
    path = Path(path)
    if not path.exists():
        raise GGUFImportError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFImportError(f"{path}: not a file (a GGUF file is wanted)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFImportError(
            f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r})"
        )
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as e:  # a truncated or corrupt file: gguf raises whatever it hits
        raise GGUFImportError(f"{path}: cannot be read as GGUF ({type(e).__name__}: {e})") from e
    if not isinstance(arch, str) or not arch:
        raise GGUFImportError(f"{path}: the GGUF has no general.architecture field")
    return arch


def check_architecture(path: str | Path, arch: str) -> None:
    supported = supported_architectures()
    if arch in supported or _ARCH_RENAMES.get(arch) in supported:
        return
    raise GGUFImportError(
        f"{path}: architecture {arch!r} cannot be read by transformers from GGUF (it reads: "
        f"{', '.join(supported)})"
    )


def check_out_dir(out_dir: str | Path) -> None:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GGUFImportError(f"{out}: exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        raise GGUFImportError(
            f"{out}: output folder exists and is not empty; remove it or choose another"
        )


def import_gguf(
    gguf_path: str | Path, out_dir: str | Path, *, log: Callable[[str], None] = print
) -> ImportSummary:
    """Convert `gguf_path` into a float32 safetensors model folder at `out_dir`."""
    start = time.monotonic()
    src = Path(gguf_path)
    out = Path(out_dir)
    arch = gguf_architecture(src)
    check_architecture(src, arch)
    check_out_dir(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        summary = _convert(src, tmp, arch, log)
        check_out_dir(out)  # again: something may have appeared there meanwhile
        _usual_modes(tmp)
        if out.is_dir():
            out.rmdir()  # empty
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    seconds = time.monotonic() - start
    log(f"wrote {out} ({size / 1e6:.0f} MB) in {seconds:.1f} s")
    return ImportSummary(**{**summary, "out_dir": out, "bytes_written": size, "seconds": seconds})


def _usual_modes(folder: Path) -> None:
    """The modes a plain mkdir and open would give (mkdtemp makes the folder private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _convert(src: Path, tmp: Path, arch: str, log: Callable[[str], None]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(src.resolve().parent), src.name
    log(f"reading {src} (architecture {arch}), de-quantising to float32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise GGUFImportError(
            f"{src}: transformers cannot read its tokenizer ({type(e).__name__}: {e})"
        ) from e
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        raise GGUFImportError(
            f"{src}: transformers cannot load it as a causal language model "
            f"({type(e).__name__}: {e})"
        ) from e

    # The same class, built from the config without the quantization marker.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = type(loaded)(config)
    state = loaded.state_dict()
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise GGUFImportError(
            f"{src}: its weights do not match {type(model).__name__} (missing: "
            f"{result.missing_keys[:5]}, unexpected: {result.unexpected_keys[:5]})"
        )
    del loaded, state
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
            raise GGUFImportError(f"{src}: the output head could not be tied to the embedding")
    not_fp32 = sorted({str(p.dtype) for p in model.parameters()} - {"torch.float32"})
    if not_fp32:
        raise GGUFImportError(f"{src}: parameters came out as {not_fp32}, not float32")

    # Tokens: the recipe pads with pad_token and ends responses with eos_token.
    if tokenizer.eos_token_id is None:
        raise GGUFImportError(f"{src}: its tokenizer has no end token (eos_token)")
    pad_was_eos = tokenizer.pad_token_id is None
    if pad_was_eos:
        tokenizer.pad_token = tokenizer.eos_token
        log(f"note: the tokenizer had no pad token; pad = eos = {tokenizer.eos_token!r}")
    if not getattr(tokenizer, "chat_template", None):
        log("warning: the tokenizer has no chat template; the recipe's stages need one")
    eos = config.eos_token_id
    if not (isinstance(eos, list) and tokenizer.eos_token_id in eos):
        eos = tokenizer.eos_token_id
    config.eos_token_id = eos
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    # Token ids only: no sampling settings (vLLM takes generation_config.json's as its defaults).
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id
    )

    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    parameters = sum(p.numel() for p in model.parameters())  # shared tensors once
    vocab = int(getattr(config.get_text_config(), "vocab_size", 0) or len(tokenizer))
    log(f"architecture: {arch} ({type(model).__name__})")
    log(f"parameters: {parameters:,} (float32)")
    log(f"vocabulary: {vocab:,}; tokenizer {len(tokenizer):,} tokens")
    log(f"embeddings: {'tied (lm_head = embed_tokens)' if tied else 'not tied'}")
    log(
        f"tokens: eos {tokenizer.eos_token!r} ({tokenizer.eos_token_id}), pad "
        f"{tokenizer.pad_token!r} ({tokenizer.pad_token_id})"
    )
    return {
        "architecture": arch,
        "model_class": type(model).__name__,
        "parameters": parameters,
        "vocab_size": vocab,
        "tied": tied,
        "pad_token": str(tokenizer.pad_token),
        "pad_was_eos": pad_was_eos,
    }
