"""Checks on the source tree itself: lint, and the core's atomics discipline."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "src" / "batchcore"


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(__import__("sys").executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the [test] extra)")
    proc = subprocess.run([ruff, "check", "python", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_atomic_names_its_memory_order():
    # Outside atomics.h, C code goes through the bc_* wrappers, whose names say
    # the order; inside it, only the *_explicit forms are used.
    implicit = re.compile(r"\batomic_(load|store|exchange|fetch_[a-z]+|compare_exchange_(weak|strong))\s*\(")
    wrapper = re.compile(r"\bbc_(load|store|fetch_\w+|cas)\w*\s*\(")
    orders = ("relaxed", "acquire", "release", "acq_rel", "seq_cst")
    for path in sorted(CORE.glob("*.h")) + sorted(CORE.glob("*.pyx")):
        text = path.read_text()
        assert not implicit.search(text), \
            f"{path.name}: an atomic without an explicit memory order"
        for match in wrapper.finditer(text):
            name = match.group(0)
            assert any(order in name for order in orders), f"{path.name}: {name} hides its order"



def test_every_cimported_name_is_used():
    # Cython does not warn about unused cimports; leftovers hide which floor
    # of the core a module really depends on.
    cimport = re.compile(r"^from\s+\S+\s+cimport\s+(\([^)]*\)|[^\n]+)", re.M)
    for path in sorted(CORE.glob("*.pyx")) + sorted(CORE.glob("*.pxd")):
        text = path.read_text()
        for match in cimport.finditer(text):
            names = [n.strip().split(" as ")[-1] for n in match.group(1).strip("()").replace("\n", " ").split(",")]
            rest = text[:match.start()] + text[match.end():]
            for name in filter(None, names):
                assert re.search(rf"\b{re.escape(name)}\b", rest), f"{path.name}: {name} is cimported but unused"
