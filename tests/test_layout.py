"""The design's rules about imports: the math imports no engine, dependencies point one way."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def test_the_math_imports_no_ray_deepspeed_or_vllm() -> None:
    code = (
        "import sys, trainers.losses, trainers.ppo_math, trainers.advantages, trainers.data,"
        " trainers.config, trainers.task;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'deepspeed', 'vllm'});"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def _imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {(str(path.relative_to(ROOT)), a.name.split(".")[0]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add((str(path.relative_to(ROOT)), node.module.split(".")[0]))
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"), [("cluster", {"trainers", "actors"}), ("actors", {"trainers"})]
)
def test_dependencies_point_from_trainers_to_actors_to_cluster(
    package: str, forbidden: set[str]
) -> None:
    wrong = sorted(f"{f} imports {m}" for f, m in _imports(package) if m in forbidden)
    assert wrong == []
