"""mypy accepts the package's own modules and a typical user program."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USER_PROGRAM = '''
import asyncio
from concurrent.futures import Future
from batched_fn import BatchedFn, Failed, Full, Stats, batched_fn

@batched_fn(max_batch_size=8, max_delay=0.001)
def lengths(batch: list[str]) -> list[int]:
    return [len(s) for s in batch]

def shout(batch: list[str]) -> list[str]:
    return [s.upper() for s in batch]

upper: BatchedFn[str, str] = batched_fn(shout, channel_cap=16)

def checked(batch: list[str]) -> list[int | Failed]:   # per-item failures type-check too
    return [len(s) if s else Failed(ValueError("empty")) for s in batch]

sizes: BatchedFn[str, int] = batched_fn(checked)
adaptive: BatchedFn[str, str] = batched_fn(shout, max_delay="auto", auto_max_delay=0.002)
chosen: float = adaptive.stats().mean_delay
n: int = lengths("abc", timeout=1.0)
fut: Future[int] = lengths.submit("abc")
stats: Stats = lengths.stats()

async def main() -> str:
    try:
        return await upper.acall("x")
    except Full as exc:
        return str(exc.retry_after)

asyncio.run(main())

reveal_type(lengths)
reveal_type(lengths("abc"))
reveal_type(lengths.submit("abc"))
async def revealed() -> None:
    reveal_type(await upper.acall("x"))
reveal_type(lengths.stats().mean_batch_size)
'''

#: what mypy must reveal for the reveal_type lines above, in order
REVEALED = [
    "batched_fn._api.BatchedFn[Any, int]",
    "int",
    "concurrent.futures._base.Future[int]",
    "str",
    "float",
]


def _mypy() -> str:
    exe = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")
    if exe is None:
        pytest.skip("mypy is not installed (it is in the [test] extra)")
    return exe


def test_mypy_accepts_the_core_modules_and_a_user_program(tmp_path):
    program = tmp_path / "user_program.py"
    program.write_text(USER_PROGRAM)
    core = [str(ROOT / "python" / "batched_fn" / name) for name in (
        "__init__.py", "_api.py", "_config.py", "_stats.py", "_worker.py", "errors.py", "prometheus.py")]
    proc = subprocess.run(
        [_mypy(), "--ignore-missing-imports", "--follow-imports=silent", "--no-incremental",
         "--cache-dir", str(tmp_path / "cache"), *core, str(program)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert not errors, proc.stdout + proc.stderr
    revealed = re.findall(r'Revealed type is "([^"]+)"', proc.stdout)
    assert revealed == REVEALED, proc.stdout
