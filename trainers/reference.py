"""The config reference, generated from the config classes' documented fields (the README's
table is this text; a test keeps the two the same)."""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel

from trainers.config import RunConfig


def _type(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    for name in ("trainers.config.", "<class '", "'>"):
        text = text.replace(name, "")
    return text.replace("|", "\\|")  # a bare | would end the Markdown table's cell


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    instance_defaults: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        doc = " ".join((field.description or "").split())
        if sub is not None:
            rows.append(f"| **`{key}`** | section | | {doc} |")
            rows.extend(_rows(sub, key + "."))
            continue
        if field.is_required():
            default = "—"
        else:
            value = field.get_default(call_default_factory=True)
            instance_defaults[name] = value
            default = f"`{json.dumps(value if not isinstance(value, tuple) else list(value))}`"
        rows.append(f"| `{key}` | `{_type(field.annotation)}` | {default} | {doc} |")
    return rows


def config_reference() -> str:
    head = "| field | type | default | meaning |\n| --- | --- | --- | --- |"
    return head + "\n" + "\n".join(_rows(RunConfig, ""))
