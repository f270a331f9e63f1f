"""The standard benchmark workload, shared by every script in bench/: a random-init Llama
(hidden 256, MLP 688, 4 layers, 4 heads, vocabulary 512) and 32 prompts of 32 tokens that ask for
exactly 64 new tokens, fp32, seed 0. The model and its tokenizer are built here (nothing is
downloaded) into bench/results/, which git ignores."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ROLLOUTS, PROMPT_TOKENS, NEW_TOKENS, SEED = 32, 32, 64, 0
STANDARD = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
}


def logs(name: str) -> Path:
    """bench/results/logs/NAME/: where a benchmark's library chatter goes."""
    return RESULTS / "logs" / name


@contextlib.contextmanager
def quiet(name: str) -> Iterator[None]:
    """The warnings and log records of the libraries in this process (vLLM, transformers,
    DeepSpeed, torch) go to bench/results/logs/NAME/driver.log, so the console shows the
    benchmark's own lines and tables."""
    from trainers.tracking import LibraryLog

    # vLLM's own console handler off: its records go where the other libraries' go
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    library = LibraryLog(logs(name) / "driver.log")
    print(f"{name}: what the libraries and actors print goes to {logs(name)}/")
    _driver_logs.append(logs(name) / "driver.log")
    try:
        yield
    finally:
        _driver_logs.pop()
        library.close()


_driver_logs: list[Path] = []


@contextlib.contextmanager
def native_output() -> Iterator[None]:
    """What this process writes to its stdout and stderr below Python's logging (C++ warnings,
    vLLM's progress bars of an engine in this process) goes to the driver log of `quiet` for a
    while; outside `quiet`, nothing changes."""
    if not _driver_logs:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(_driver_logs[-1], "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def quiet_ray(name: str, address: str | None = None, **kwargs: Any) -> Any:
    """A Ray runtime whose actors' output goes to bench/results/logs/NAME/actors.log."""
    from cluster import RayRuntime

    return RayRuntime(address, worker_log=logs(name) / "actors.log", **kwargs)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def standard_model(folder: Path | None = None, **overrides: int) -> Path:
    """The standard model (or a resized one) with a word-level tokenizer, as a Hugging Face
    folder with safetensors weights; built once."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = {**STANDARD, **overrides}
    name = "llama-" + "-".join(str(shape[k]) for k in sorted(shape))
    folder = folder or RESULTS / "models" / name
    if (folder / "config.json").is_file():
        return folder
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2} | {
        f"w{i}": i for i in range(3, shape["vocab_size"])
    }
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(SEED)
    config = LlamaConfig(
        **shape,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return save_model(folder, LlamaForCausalLM(config), fast)


def save_model(folder: Path, model: Any, tokenizer: Any) -> Path:
    """Write a model and its tokenizer to `folder` whole or not at all (through a .tmp folder
    renamed at the end: an interrupted build leaves no half-written model behind)."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def engine_group(
    model_dir: str, n: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0, **config: Any
) -> Any:
    """`n` rollout engines (our RolloutEngine actors) on `model_dir`; use as a context manager."""
    from actors.rollout import EngineConfig, RolloutEngine, engine_env
    from cluster import ActorGroup

    engine = EngineConfig(model=model_dir, max_model_len=128, **config)
    return ActorGroup(
        RolloutEngine,
        n,
        name="rollout",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        actor_kwargs={"config": engine},
        env_vars=engine_env(engine),
    )


def standard_prompts(n: int = ROLLOUTS, vocab: int = STANDARD["vocab_size"]) -> list[list[int]]:
    """The standard workload's prompts (`n` of them: the first 32 are always the same), token
    ids drawn from a vocabulary of `vocab` (a real model's, for its workload)."""
    import random

    rng = random.Random(SEED)
    return [[rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(n)]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[f"{c:,.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, width, strict=True)) + " |"  # noqa: E731
    out = [f"\n{title}", line(cells[0]), "|" + "|".join("-" * (w + 2) for w in width) + "|"]
    return "\n".join(out + [line(r) for r in cells[1:]])


def write(name: str, figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**figures, "machine": machine()}, indent=1) + "\n")
    return path


def matmul_gflops(threads: int, seconds: float = 2.0) -> float:
    """The machine's fp32 matrix-product rate through torch (GFLOP/s), with `threads` threads:
    1024×576 by 576×1536, the real model's MLP shape; the best of three timed spans."""
    import time

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 576), torch.randn(576, 1536)
        flop = 2 * 1024 * 576 * 1536
        for _ in range(3):
            a @ b
        best = 0.0
        for _ in range(3):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 3:
                a @ b
                n += 1
            best = max(best, flop * n / (time.perf_counter() - start) / 1e9)
        return best
    finally:
        torch.set_num_threads(before)


def iteration_flops(
    policy_dir: Path, samples: int, prompt_tokens: int, new_tokens: int, critic: bool = True
) -> float:
    """The FLOPs a PPO iteration (one epoch) needs, counted from the model's linear layers:
    2 per weight and token forward, 4 backward. Every role reads every token once: generation
    (prefill and decoding), the RM, the reference, the critic's values, and the policy's and the
    critic's training (forward and backward); the LM head only where a role needs the
    vocabulary (the sampled tokens: generation, the reference, the policy). Attention scores
    and element-wise work are left out (a few percent at these lengths)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(policy_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings().weight.numel()
    body = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
    )
    tokens = samples * (prompt_tokens + new_tokens)
    responses = samples * new_tokens
    forward = 2 * body * tokens
    passes = 3 + (1 if critic else 0)  # generation, RM, reference, critic values
    trains = 1 + (1 if critic else 0)  # policy, critic: forward and backward
    lm_head = 2 * head * responses * (1 + 1 + 3)  # generation, reference, policy training
    return forward * passes + 3 * forward * trains + lm_head


PEERS = ROOT / ".venv-peers"


def run_peer(
    env: str,
    script: str,
    args: list[str],
    prompts: list[list[int]],
    log_name: str,
    threads: tuple[int, ...] = (1, 2),
) -> dict[str, Any] | None:
    """A peer (bench/peers/SCRIPT, in its own virtual environment .venv-peers/ENV, which `make
    peers` makes) on our prompts, once with each torch thread count: its seconds per iteration
    (median) at its faster count, and each count's. None, said on the console, where the
    environment is missing; a peer that fails raises with the end of what it printed. Its output
    goes to bench/results/logs/LOG_NAME/ENV-Nthreads.log."""
    import subprocess

    python = PEERS / env / "bin" / "python"
    if not python.is_file():
        print(f"{env}: not measured ({python} is missing; `make peers` makes it)")
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    prompt_file = RESULTS / f"{env}-prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    runs: dict[str, dict[str, Any]] = {}
    for n in threads:
        log = logs(log_name) / f"{env}-{n}threads.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(python), str(ROOT / "bench" / "peers" / script), *args]
        cmd += ["--prompts", str(prompt_file), "--threads", str(n)]
        env_vars = {**os.environ, "OMP_NUM_THREADS": str(n), "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env_vars, cwd=ROOT)
        log.write_text(done.stdout + done.stderr)
        last = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
        if not last or not last[0].startswith("{"):
            tail = (done.stderr or done.stdout)[-2000:]
            raise RuntimeError(f"{env} with {n} threads failed (exit {done.returncode}):\n{tail}")
        runs[str(n)] = json.loads(last[0])
    best = min(runs.values(), key=lambda r: r["seconds"])
    return {
        "seconds": best["seconds"],
        "threads": best["threads"],
        "seconds_by_threads": {n: r["seconds"] for n, r in runs.items()},
        "runs": runs,
    }


def peer_table(peer: dict[str, Any], title: str, unit: str, ours: dict[str, Any]) -> str:
    """Our modes' seconds (`ours`: name -> result with "seconds") against a `run_peer` result:
    the table's title names the peer (`title`) and its seconds per `unit` at its faster thread
    count, with each count's."""
    by = ", ".join(f"{n} threads {t:.2f} s" for n, t in peer["seconds_by_threads"].items())
    return table(
        f"against {title} on the same workload, in this run: {peer['seconds']:.2f} s per {unit} at "
        f"its faster thread count ({by})",
        ["mode", "seconds", f"× TRL's {unit}"],
        [
            [name, r["seconds"], f"{r['seconds'] / peer['seconds']:.2f}×"]
            for name, r in ours.items()
        ],
    )
