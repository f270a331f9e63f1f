"""The collect stage's JSONL files: read whole, appended chunk by chunk and made durable, a
partial file resumed after a stop (a line cut short dropped), and written whole by renaming."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _read_lines(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(raw) for raw in f if raw.strip()]


def _read_partial(path: Path) -> list[dict[str, Any]]:
    """The whole lines of a partial file; a line cut short by a stop while it was written (the
    last one) is dropped, and the file rewritten without it."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines, good = [], 0
    for raw in text.splitlines(keepends=True):
        try:
            if not raw.endswith("\n"):
                raise ValueError("cut short")
            lines.append(json.loads(raw))
            good += len(raw.encode("utf-8"))
        except ValueError:
            break
    if good != len(text.encode("utf-8")):
        with path.open("r+b") as f:
            f.truncate(good)
    return lines


def _append(path: Path, lines: list[dict[str, Any]]) -> None:
    """Append a chunk's lines in one write, and make them durable before going on."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
