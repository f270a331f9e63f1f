"""The broadcast weight sync's own logic, on real gloo groups inside this process (no Ray): the
bucket plan, exact transfer, and the deadline that names an engine that does not answer."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from actors.weightsync import Entry, WeightGroup, WeightSyncTimeout, buckets, layout

pytestmark = pytest.mark.unit


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_buckets_hold_one_dtype_and_at_most_the_bucket_size() -> None:
    entries = [
        Entry("a", (10,), "float32"),  # 40 bytes
        Entry("b", (300,), "float32"),  # 1,200 bytes: more than a bucket, alone
        Entry("c", (5,), "bfloat16"),  # another dtype starts a bucket
        Entry("d", (2, 2), "bfloat16"),
        Entry("e", (200,), "float32"),
        Entry("f", (50,), "float32"),
    ]
    assert buckets(entries, 1024) == [[0], [1], [2, 3], [4, 5]]


def _group(port: int, rank: int, world: int, timeout_s: float, out: dict) -> None:
    out[rank] = WeightGroup(("127.0.0.1", port), rank, world, "gloo", timeout_s)


def _groups(world: int, timeout_s: float) -> list[WeightGroup]:
    """Every member of one group, each built in its own thread (construction is collective)."""
    port, out = _port(), {}
    threads = [threading.Thread(target=_group, args=(port, r, world, timeout_s, out))
               for r in range(world)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return [out[r] for r in range(world)]


def test_every_engine_receives_exactly_the_senders_weights() -> None:
    torch.manual_seed(0)
    state = {
        "embed.weight": torch.randn(64, 16),
        "layer.bias": torch.randn(16),
        "head.weight": torch.randn(16, 64).to(torch.bfloat16),
        "norm.weight": torch.randn(16),
        "proj.weight": torch.randn(16, 8).t(),  # not contiguous: sent in its logical order
        "big.weight": torch.randn(40, 16),  # 2,560 bytes: a bucket of its own, sent in place
    }
    before = {k: v.clone() for k, v in state.items()}
    sender, *receivers = _groups(3, timeout_s=30)
    entries = layout(state)
    got: dict[int, list] = {}

    def receive(i: int) -> None:
        got[i] = list(receivers[i].receive(entries, bucket_bytes=1024))

    threads = [threading.Thread(target=receive, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    sent = sender.send(state, bucket_bytes=1024)
    for t in threads:
        t.join(timeout=60)
    assert sent == sum(v.numel() * v.element_size() for v in state.values())
    assert len(buckets(entries, 1024)) == 5  # more buckets than the two in flight at once
    assert all(torch.equal(state[k], before[k]) for k in state)  # read, not changed
    for i in range(2):
        received = dict(got[i])
        assert list(received) == list(state)
        for name, value in state.items():
            assert received[name].dtype == value.dtype and torch.equal(received[name], value)


def test_an_engine_that_does_not_answer_is_named_when_the_deadline_passes() -> None:
    sender, ready, silent = _groups(3, timeout_s=2)
    state = {"w": torch.ones(4)}
    gave_up: list[BaseException] = []

    def receive() -> None:
        try:
            list(ready.receive(layout(state), 1024))
        except RuntimeError as e:
            gave_up.append(e)

    t = threading.Thread(target=receive)
    t.start()
    # group rank 2 is engine 1: it joined the group but never answers this sync
    with pytest.raises(WeightSyncTimeout, match=r"rollout rank\(s\) 1 did not answer within 2 s"):
        sender.send(state, bucket_bytes=1024)
    t.join(timeout=30)
    # the engine that answered gives up on the group's own deadline, with gloo's error
    assert gave_up and "Timed out" in str(gave_up[0])
    del silent
