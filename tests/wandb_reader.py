"""Read an offline W&B run back: its `.wandb` file is a LevelDB-style log of wandb's own
protobuf records (wandb 0.31 ships the record definitions but no Python reader)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # crc32c (4), length (2, little-endian), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending, out = 7, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        if kind == 0:
            pos += left
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FIRST:
            pending = payload
            continue
        if kind == MIDDLE:
            pending += payload
            continue
        record = pb.Record()
        record.ParseFromString(pending + payload if kind == LAST else payload)
        out.append(record)
        pending = b""
    return out


def finished_records(run_file: Path, wait_s: float = 60.0) -> list[Any]:
    """The run file's records once wandb has written all of them: `run.finish()` can return
    while wandb's own writer process still holds the last records (a test saw the final history
    row and the exit record land after it returned), so wait for the exit record."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        out = records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in out):
            return out
        assert time.monotonic() < deadline, f"{run_file}: no exit record after {wait_s:.0f} s"
        time.sleep(0.5)


def history(run_folder: Path) -> list[dict[str, Any]]:
    """The logged rows, in order, as {key: value}."""
    [run_file] = run_folder.glob("run-*.wandb")
    rows = []
    for r in finished_records(run_file):
        if r.WhichOneof("record_type") == "history":
            row = {}
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
