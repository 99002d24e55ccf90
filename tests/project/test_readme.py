"""The README's Python code blocks, each handled as its marker says.

A block runs as written, in a fresh interpreter started in an empty directory, unless the line
before it is one of these HTML comments (invisible on GitHub):

``<!-- readme-test: needs MODULE -->``
    runs as written where MODULE imports, and says so when it does not (a skip naming MODULE).
``<!-- readme-test: compile -- REASON -->``
    a fragment that stands for code the test cannot have (your own model, a second process, a
    GPU): it must compile (top-level ``await`` allowed) and every name it imports from
    batched_fn must exist.  REASON says why it cannot run.

Any other marker is an error, so no block is left out without saying why.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import batched_fn

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
BLOCKS = [(m.group("marker") or "run", m.group("code"), README.count("\n", 0, m.start()) + 1)
          for m in BLOCK.finditer(README)]
PACKAGE_DIR = str(Path(batched_fn.__file__).resolve().parent.parent)


def _ids() -> list[str]:
    return [f"line{line}-{marker.split(' --')[0].replace(' ', '-')}" for marker, _, line in BLOCKS]


def test_every_block_is_run_or_says_why_not():
    assert len(BLOCKS) >= 8, "the README lost its examples"
    for marker, _, line in BLOCKS:
        assert re.fullmatch(r"run|needs [\w.]+|compile -- \S.*", marker), f"README line {line}: bad marker {marker!r}"
    runs = [b for b in BLOCKS if b[0] == "run"]
    assert len(runs) >= len(BLOCKS) // 2, "most blocks should run as written"


def _imports_from_batched_fn(tree: ast.AST) -> list[tuple[str, str]]:
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "batched_fn"
            for alias in node.names]


@pytest.mark.parametrize("marker,code,line", BLOCKS, ids=_ids())
def test_readme_block(marker, code, line, tmp_path):
    if marker.startswith("compile"):
        tree = compile(code, f"README.md:{line}", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        for module, name in _imports_from_batched_fn(tree):
            if module == "batched_fn.torch":
                pytest.importorskip("torch")
            assert hasattr(importlib.import_module(module), name), f"README line {line}: {module}.{name}"
        return
    if marker.startswith("needs "):
        needed = marker.split()[1]
        if importlib.util.find_spec(needed) is None:
            pytest.skip(f"README line {line} needs {needed}, which is not installed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_DIR, os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTHONASYNCIODEBUG", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"README line {line}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, f"README line {line}:\n{proc.stderr}"
