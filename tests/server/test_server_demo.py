"""The demo end to end on the toy model: every mode (2 workers too) measured, closed and open loop; table, PNG.

The demo exits non-zero if a server it started did not stop cleanly (exit code 0).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("matplotlib")
pytest.importorskip("numpy")


@pytest.mark.timeout(180)
def test_demo_prints_every_mode_and_writes_a_png(tmp_path: Path) -> None:
    import batched_fn
    from batched_fn.examples.demo import server_accepts_auto, server_accepts_buckets

    out = tmp_path / "demo.png"
    # run from tmp_path, importing the same batched_fn as this test does
    root = str(Path(batched_fn.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "batched_fn.examples.demo", "--model", "toy", "--concurrency", "1,16",
         "--rate", "40", "--duration", "0.7", "--workers", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=170, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(auto|auto, length buckets|fixed-5ms|one-at-a-time"
                     r"|2 workers, one shared model|2 workers, a model each)"
                     r"\s+(\d+|[\d.]+/s)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+|n/a)$", line)
        if m:
            rows[(m.group(1), m.group(2))] = (float(m.group(3)), float(m.group(6)), int(m.group(7)), m.group(8))
    # "auto" needs an example server that takes --max-delay auto
    assert server_accepts_buckets()                       # the example server takes --length-buckets
    modes = ((["auto"] if server_accepts_auto() else []) + ["fixed-5ms", "one-at-a-time", "auto, length buckets"]
             + ["2 workers, one shared model", "2 workers, a model each"])
    assert set(rows) == {(m, load) for m in modes for load in ("1", "16", "40/s")}, proc.stdout
    for (mode, load), (rps, mean_batch, errors, rss) in rows.items():
        assert rps > 0 and errors == 0, (mode, load, proc.stdout)
        if sys.platform == "linux":
            assert rss != "n/a" and int(rss) > 0, (mode, load, proc.stdout)
    assert rows[("one-at-a-time", "16")][1] == 1.0        # max_batch_size=1: never batched
    for mode in [m for m in modes if m != "one-at-a-time"]:
        assert rows[(mode, "16")][1] > 1.0                # 16 clients share batches
    # four processes (supervisor, model process, 2 HTTP workers) hold more memory than one
    assert int(rows[("2 workers, one shared model", "16")][3]) > int(rows[("fixed-5ms", "16")][3])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {out}" in proc.stdout


def test_without_matplotlib_the_demo_says_so_and_writes_no_plot(tmp_path: Path, monkeypatch, capsys) -> None:
    from batched_fn.examples import demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` raises ImportError
    assert demo.plot([], str(tmp_path / "demo.png"), "title") is False
    assert "no plot: matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "demo.png").exists()
