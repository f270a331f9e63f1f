"""The RL stage's inputs: the models it starts from and its encoded prompts and demonstrations
(read before Ray starts), and the stream of training prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from trainers.config import RunConfig
from trainers.data import Limits, encode_demonstrations, encode_prompts, read, require_batch


@dataclass
class RLInputs:
    policy: str
    reward_model: str
    critic_model: str
    tokenizer: Any
    prompts: list[dict[str, Any]]
    heldout_prompts: list[dict[str, Any]]
    ptx: list[dict[str, Any]]
    heldout_demos: list[dict[str, Any]]


def prepare(
    config: RunConfig,
    *,
    policy: str,
    reward_model: str,
    critic_model: str,
    prompts: str,
    heldout_prompts: str,
    ptx: str,
    heldout_demos: str,
    tokenizer: Any,
    log: Any = print,
) -> RLInputs:
    """Read and encode the prompts and demonstrations (before Ray starts)."""
    limits = Limits.of(config.data)
    inputs = RLInputs(
        policy=policy,
        reward_model=reward_model,
        critic_model=critic_model,
        tokenizer=tokenizer,
        prompts=encode_prompts(read(prompts, "prompts", "ppo.prompts"), tokenizer, limits, log),
        heldout_prompts=encode_prompts(
            read(heldout_prompts, "prompts", "ppo.heldout_prompts"), tokenizer, limits, log
        ),
        ptx=encode_demonstrations(
            read(ptx, "demonstrations", "ppo.ptx_data"), tokenizer, limits, log
        ),
        heldout_demos=encode_demonstrations(
            read(heldout_demos, "demonstrations", "ppo.heldout_demonstrations"),
            tokenizer,
            limits,
            log,
        ),
    )
    require_batch("ppo.rollout_batch", config.ppo.rollout_batch, inputs.prompts, "prompts", prompts)
    return inputs


class PromptStream:
    """Prompts in a shuffled order, a new order each pass, fixed by the seed; its position is
    its whole state (for resuming)."""

    def __init__(self, prompts: list[dict[str, Any]], seed: int) -> None:
        self.prompts, self.seed = prompts, seed
        self.epoch, self.offset = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        return order

    def state(self) -> list[int]:
        """[epoch, offset]: all that a checkpoint needs to continue the stream."""
        return [self.epoch, self.offset]

    def restore(self, state: list[int]) -> None:
        self.epoch, self.offset = state
        self._order = self._shuffle()

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.prompts[self._order[self.offset]])
            self.offset += 1
        return out
