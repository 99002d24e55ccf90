"""The portable park.h (mutex + condition variable, the build used off Linux), built and run on Linux.

``make test-portable`` also runs the core tests on an extension built with it
(``BATCHCORE_PARK=portable``); here its native tests run, and the build switch is checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batched_fn import _batchcore

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "src" / "batchcore"
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None or not CORE.is_dir(),
                              reason="needs a C compiler and the source tree (src/batchcore)")


def _build(tmp_path: Path, test: str) -> Path:
    exe = tmp_path / f"{test}_portable"
    subprocess.run([CC, "-std=c11", "-O1", "-DBATCHCORE_PORTABLE_PARK", "-pthread", f"-I{CORE}",
                    str(ROOT / "tests" / "c" / f"{test}.c"), "-o", str(exe)], check=True, timeout=120)
    return exe


@needs_cc
def test_the_fallback_loses_no_wake_up(tmp_path):
    out = subprocess.run([_build(tmp_path, "test_park")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "without a lost wake-up" in out.stdout


@needs_cc
@pytest.mark.parametrize("mode", ["threads", "procs"])
def test_the_shared_memory_ring_polls_without_futexes(tmp_path, mode):
    out = subprocess.run([_build(tmp_path, "test_shm_ring"), mode, "50000"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok: 50000 messages")


def test_the_extension_says_how_it_parks():
    # futex on Linux unless built with BATCHCORE_PARK=portable (make test-portable builds it so,
    # and runs the tests with the same variable set)
    portable = os.environ.get("BATCHCORE_PARK") == "portable" or sys.platform != "linux"
    assert _batchcore.PARK_IMPL == ("pthread" if portable else "futex")


@pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="needs the source tree (setup.py)")
def test_an_unknown_park_switch_is_refused_by_the_build():
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "BATCHCORE_PARK": "spin"})
    assert out.returncode != 0
    assert "invalid BATCHCORE_PARK value: expected 'portable' or unset (got 'spin')" in out.stderr
