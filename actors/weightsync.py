"""The broadcast weight sync: the policy's learner rank 0 sends its full weights to every rollout
engine over a torch.distributed group of their own (gloo on the CPU, NCCL on GPUs: the same
code), in buckets of a configured size. The group is separate from the learners' DeepSpeed group:
it is built from its own TCPStore, so neither side's default process group is touched.

Rank 0 of the group is the sender; engine r is rank r + 1. Before each sync, every receiver
announces itself in the store, and the sender waits for all of them with the deadline: an engine
that does not answer is named in the error, rather than a broadcast that hangs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


class WeightSyncTimeout(TimeoutError):
    """A receiver did not join a sync within the deadline."""


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "bfloat16", ...


def layout(state: dict[str, Any]) -> list[Entry]:
    """What the receivers need to know to rebuild `state` from the flat buckets."""
    return [Entry(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


def buckets(entries: list[Entry], bucket_bytes: int) -> list[list[int]]:
    """Consecutive entries of one dtype, up to `bucket_bytes` each (a larger tensor goes alone)."""
    import torch

    out: list[list[int]] = []
    size, dtype = 0, None
    for i, e in enumerate(entries):
        nbytes = _numel(e.shape) * torch.empty((), dtype=getattr(torch, e.dtype)).element_size()
        if not out or e.dtype != dtype or size + nbytes > bucket_bytes:
            out.append([])
            size, dtype = 0, e.dtype
        out[-1].append(i)
        size += nbytes
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class WeightGroup:
    """One member of the sync group. Construction is collective: every member must join, each
    with the same address (a free port on the sender's node) and world size."""

    def __init__(
        self, address: tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        import torch.distributed as dist

        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.backend = backend
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(
            address[0],
            address[1],
            world_size,
            is_master=rank == 0,
            timeout=timeout,
            wait_for_workers=False,
        )
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group: Any = dist.ProcessGroupNCCL(self.store, rank, world_size, options)
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        self.round = 0

    @property
    def device(self) -> str:
        import torch

        return f"cuda:{torch.cuda.current_device()}" if self.backend == "nccl" else "cpu"

    def send(self, state: dict[str, Any], bucket_bytes: int) -> int:
        """Rank 0: broadcast `state` (in `layout(state)` order); returns the bytes sent. Raises
        WeightSyncTimeout naming the engines that did not join within the deadline.

        The tensors are read where they are (the learner's own parameters: no copy of the
        weights first); a bucket of one tensor is sent from it, a bucket of several is copied
        into one buffer while the bucket before it is on the wire (two buckets at most in
        flight)."""
        import torch

        self.round += 1
        keys = [f"ready/{self.round}/{r}" for r in range(1, self.world_size)]
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except Exception:  # the store raises a plain RuntimeError on its deadline
            missing = [r - 1 for r, key in enumerate(keys, start=1) if not self.store.check([key])]
            raise WeightSyncTimeout(
                "weight sync: rollout rank(s) "
                + ", ".join(str(r) for r in missing)
                + f" did not answer within {self.timeout_s:.0f} s"
            ) from None
        entries = layout(state)
        tensors = list(state.values())
        sent, in_flight = 0, []
        for bucket in buckets(entries, bucket_bytes):
            parts = [tensors[i] for i in bucket]
            if len(parts) == 1 and parts[0].is_contiguous():
                flat = parts[0].reshape(-1).to(self.device)
            else:
                flat = torch.cat([t.reshape(-1) for t in parts]).to(self.device)
            in_flight.append((flat, self.group.broadcast(flat, 0)))
            if len(in_flight) > 2:
                in_flight.pop(0)[1].wait()
            sent += flat.numel() * flat.element_size()
        for _, work in in_flight:
            work.wait()
        return sent

    def receive(self, entries: list[Entry], bucket_bytes: int) -> Iterator[tuple[str, Any]]:
        """Ranks 1..: announce this member, then receive every bucket: (name, tensor) pairs, as
        they arrive (the caller loads a bucket's tensors while the next one is received)."""
        import torch

        self.round += 1
        self.store.set(f"ready/{self.round}/{self.rank}", b"1")
        plan = buckets(entries, bucket_bytes)

        def post(bucket: list[int]) -> tuple[list[Entry], Any, Any]:
            parts = [entries[i] for i in bucket]
            dtype = getattr(torch, parts[0].dtype)
            flat = torch.empty(sum(_numel(e.shape) for e in parts), dtype=dtype, device=self.device)
            return parts, flat, self.group.broadcast(flat, 0)

        upcoming = post(plan[0]) if plan else None
        for k in range(len(plan)):
            assert upcoming is not None
            parts, flat, work = upcoming
            work.wait()
            upcoming = post(plan[k + 1]) if k + 1 < len(plan) else None
            offset = 0
            for e in parts:
                n = _numel(e.shape)
                yield e.name, flat[offset : offset + n].view(e.shape)
                offset += n


__all__ = ["Entry", "WeightGroup", "WeightSyncTimeout", "buckets", "layout"]
