"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
# Blocks that need nothing beyond the core package (the torch, Ray and
# Prometheus ones are covered by their own tests).
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README, re.S)
          if not re.search(r"\b(torch|ray|prometheus_client|MyModel)\b", b)]


def test_the_readme_has_core_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    proc = subprocess.run([sys.executable, "-c", BLOCKS[index]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
