"""Helpers shared by the fault, lifecycle, memory and overload tests.

A held handler (``Hold``) lets a test pin the worker inside a batch, so the
queue's state is known exactly; ``run_script`` runs a snippet in a fresh
interpreter for behaviour that needs one (exit, fork, signals).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from typing import Any, Callable

import batched_fn
from conftest import wait_until  # noqa: F401  (re-exported for the fault tests)

#: the first thing a held handler sees: it waits on the hold's event
HOLD = "HOLD"
#: directory holding the importable package (PYTHONPATH for subprocesses)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(batched_fn.__file__)))


class Hold:
    """Wrap a handler: a batch whose first input is HOLD waits until release().

    ``entered`` is set once the worker is inside that batch, so everything
    submitted afterwards is queued behind it and the next batch takes it all.
    """

    def __init__(self, handler: Callable[..., Any]) -> None:
        self.handler = handler
        self.entered = threading.Event()
        self.released = threading.Event()
        self.batches: list[list[Any]] = []

    def __call__(self, batch: list[Any], **context: Any) -> Any:
        self.batches.append(list(batch))
        if batch and batch[0] is HOLD:
            self.entered.set()
            if not self.released.wait(30):
                raise AssertionError("hold never released")
        return self.handler(batch, **context)

    def pin(self, fn: Any) -> Any:
        """Submit HOLD to fn and wait until the worker is stuck in its batch."""
        fut = fn.submit(HOLD)
        if not self.entered.wait(10):
            raise AssertionError("worker never took the HOLD batch")
        return fut

    def release(self) -> None:
        self.released.set()


def identity(batch: list[Any], **context: Any) -> list[Any]:
    """A handler that returns its inputs."""
    return list(batch)


def worker_threads(name: str) -> list[threading.Thread]:
    """Live worker threads of the batched functions whose handler is called name."""
    return [t for t in threading.enumerate() if t.name.startswith(f"{name}-worker-")]


def run_script(code: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter importing this tree's batched_fn."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = PACKAGE_DIR + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.pop("PYTHONASYNCIODEBUG", None)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def assert_clean_exit(proc: subprocess.CompletedProcess) -> None:
    """The script exited 0 and printed no traceback or fatal error."""
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, detail
    assert "Traceback" not in proc.stderr, detail
    assert "Fatal Python error" not in proc.stderr, detail


def stats_balance(st: batched_fn.Stats) -> int:
    """submitted minus every accounted fate; 0 when the counters add up."""
    return st.submitted - (st.completed + st.failed + st.timed_out + st.cancelled + st.queued + st.running)
