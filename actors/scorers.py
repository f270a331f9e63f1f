"""The frozen scorers: the reward model and the reference policy (plain transformers, no
gradients). One class a role, sharing how a model is loaded and how samples are batched."""

from __future__ import annotations

from typing import Any

from actors.batching import pack, packed_scores, sample_logprobs, with_end_token
from actors.busy import BusyClock


class _Frozen(BusyClock):
    kind = "causal_lm"  # or "reward": which transformers head to load

    def __init__(
        self,
        rank: int,
        world_size: int,
        path: str,
        torch_threads: int = 1,
        batch_size: int = 64,
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from actors.models import load_reward_model

        torch.set_num_threads(torch_threads)
        if self.kind == "reward":
            self.model = load_reward_model(
                path, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
            self.eos_id = end_token_id(path, self.model.config, trust_remote_code)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
            )
        if torch.cuda.is_available():
            self.model = self.model.to("cuda")
        self.model.eval()
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            raise ValueError(f"{path}: config.json has no pad_token_id")
        self.batch_size = batch_size

    def _batches(self, samples: list[dict[str, Any]]) -> Any:
        device = self.model.device
        for i in range(0, len(samples), self.batch_size):
            batch = pack(samples[i : i + self.batch_size], self.pad_id)
            yield {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def end_token_id(path: str, config: Any, trust_remote_code: bool) -> int:
    """The end token that the RM's training data put after every response: its tokenizer's
    (saved with the model), else the config's."""
    from transformers import AutoTokenizer

    try:
        eos = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).eos_token_id
    except (OSError, ValueError):
        eos = None
    if eos is None:
        eos = config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise ValueError(f"{path}: neither a tokenizer nor config.json names an end token")
    return int(eos)


class RewardModel(_Frozen):
    """Scores responses: the RM's output minus its `reward_offset` (the demonstrations' mean, so
    that they score 0 on average), read at the end token after each response as in the RM's
    training, where every response ends with it (one cut at max_new_tokens gets it added here,
    for the RM only: the policy's tokens stay as sampled)."""

    kind = "reward"

    def score(self, samples: list[dict[str, Any]]) -> list[float]:
        import torch

        scores: list[float] = []
        with torch.no_grad(), self.busy():
            offset = float(getattr(self.model.config, "reward_offset", 0.0))
            for b in self._batches([with_end_token(s, self.eos_id) for s in samples]):
                raw = packed_scores(self.model, b)
                scores.extend((raw - offset).tolist())
        return scores


class ReferencePolicy(_Frozen):
    """Per-token log-probs of the sampled responses under the frozen SFT policy."""

    def logprobs(self, samples: list[dict[str, Any]], temperature: float) -> list[list[float]]:
        """At the sampling temperature, as the engine's and the learner's log-probs are: the
        KL penalty compares the same two distributions."""
        import torch

        rows: list[list[float]] = []
        with torch.no_grad(), self.busy():
            for b in self._batches(samples):
                rows.extend(sample_logprobs(self.model, b, temperature))
        return rows
