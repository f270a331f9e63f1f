"""Data: demonstrations, ranked comparisons and prompts, from JSONL or Parquet.

Records are validated one by one, and a bad one is a `DataError` naming the file and the line
(JSONL) or row (Parquet), and the field. They become a `datasets.Dataset` with a `where` column
that keeps each record's place, so every later message can point at it. Extra fields are ignored.

This module reads the files (`read`); the formats accepted, ours and Hugging Face TRL's, and the
validation of a record are in trainers/formats.py, the encoding of records into token ids and
batches in trainers/encoding.py. The names of both that the stages use are imported from here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainers.encoding import Limits as Limits
from trainers.encoding import check_tokenizer as check_tokenizer
from trainers.encoding import collate_comparisons as collate_comparisons
from trainers.encoding import collate_sft as collate_sft
from trainers.encoding import encode_comparisons as encode_comparisons
from trainers.encoding import encode_demonstrations as encode_demonstrations
from trainers.encoding import encode_prompt as encode_prompt
from trainers.encoding import encode_prompts as encode_prompts
from trainers.encoding import encode_response as encode_response
from trainers.encoding import require_batch as require_batch
from trainers.encoding import shuffled_batches as shuffled_batches
from trainers.formats import FORMATS as FORMATS
from trainers.formats import ROLES as ROLES
from trainers.formats import DataError as DataError
from trainers.formats import Kind as Kind
from trainers.formats import Message as Message
from trainers.formats import validate as validate

# -- reading -----------------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(place, parsed record) for each record of a JSONL or Parquet file."""
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines (a trailing newline) hold nothing
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    elif path.suffix == ".parquet":
        import datasets

        try:
            table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        except Exception as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        for i, row in enumerate(table):
            yield f"{path}: row {i}", row
    else:
        raise DataError(f"{path}: unknown format (expected .jsonl or .parquet)")


def read(path: str | Path, kind: Kind, field: str = "") -> Any:
    """A validated `datasets.Dataset` of `kind` records with a `where` column (and, for prompts,
    a `fields` column: the line's other fields as JSON).

    `field` is the config field that named the file, for the message when it is missing.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        named = f" (named by {field})" if field else ""
        raise DataError(f"{path}: data file not found{named}")
    records = []
    for where, rec in _rows(path):
        out = validate(rec, kind, where)
        if kind == "prompts":  # the line's other fields go to reward functions (e.g. an answer)
            extra = {k: v for k, v in rec.items() if k not in ("prompt", "messages")}
            out["fields"] = json.dumps(extra, default=str)
        records.append(out)
    if not records:
        raise DataError(f"{path}: holds no records")
    return datasets.Dataset.from_list(records)
