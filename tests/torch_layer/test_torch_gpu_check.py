"""benchmarks/gpu_check.py (``make gpu-check``): skips cleanly without a GPU; its measurements run.

The measuring code only really runs on a GPU machine; its CPU dry run (tiny
models, no memory figures) runs here so the script cannot rot unseen.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: make gpu-check runs for real")
def test_without_a_gpu_it_says_why_and_exits_0():
    out = run()
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gpu-check: SKIPPED: no CUDA device visible (torch ")


def test_its_measurements_run_on_cpu_and_print_a_table(tmp_path):
    out = run("--device", "cpu", "--seconds", "0.1", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "gpu_check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| MLP") or line.startswith("| encoder")]
    assert [r.split(" | ")[1] for r in rows] == [
        "per-request loop, 1 caller", "batched, 64 callers", "batched, pipelined, 64 callers"] * 2
    assert all(float(r.split(" | ")[2]) > 0 for r in rows)   # items/s measured
    assert table in out.stdout
