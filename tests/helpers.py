"""Helpers the tests import (one module; conftest.py holds only fixtures and hooks).

A held handler (``Hold``, or ``Blocker`` with ``occupy``) lets a test pin the
worker inside a batch, so the queue's state is known exactly; ``run_script``
runs a snippet in a fresh interpreter for behaviour that needs one (exit,
fork, signals); ``wait_until`` and ``assert_runs_under`` bound every wait; the
``MSG_*`` patterns pin the library's messages.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Iterator

import batched_fn

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


# The library's messages, written out here (not imported from the package), so
# a changed text fails the tests that pin it.
MSG_TIMEOUT = re.escape("request not taken into a batch before its timeout")
MSG_NO_ROOM = re.escape("no room in the queue before the timeout (on_full='block')")
MSG_CLOSED = "^" + re.escape("the batched function is closed")
MSG_FULL = r"^queue full: \d+ requests waiting \(channel_cap=\d+\)$"


def wait_until(predicate: Callable[[], bool], seconds: float = 5.0, what: str = "condition") -> None:
    """Poll predicate until true; fail the test after seconds (a hang guard)."""
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {seconds}s")
        time.sleep(0.001)


@contextlib.contextmanager
def assert_runs_under(seconds: float) -> Iterator[None]:
    """Fail if the block takes longer than seconds (a generous bound, not a speed test)."""
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"took {elapsed:.3f}s, bound {seconds}s"


class Blocker:
    """Handler whose first batch blocks until release; records every batch."""

    def __init__(self, fn=lambda b: list(b)):
        self.fn = fn
        self.batches: list[list] = []
        self.release = threading.Event()
        self.first = True

    def __call__(self, batch):
        self.batches.append(list(batch))
        if self.first:
            self.first = False
            assert self.release.wait(10)
        return self.fn(batch)


def occupy(f):
    """Put the worker into its first (blocking) batch; return that call's future."""
    fut = f.submit("occupier")
    wait_until(lambda: f.stats().running == 1)
    return fut


class Rand(random.Random):
    """A seeded random source whose repr shows the seed, to replay a failure."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.seed_value = seed

    def __repr__(self) -> str:
        return f"Rand(seed={self.seed_value})"


def mixed_priority_load(f: Any, rand: "Rand", callers: int, calls: int) -> dict[int, object]:
    """callers threads each make calls blocking calls of f with random priorities and timeouts;
    returns each input's outcome: its output, or the type of the TimeoutError or Full it raised."""
    outcomes: dict[int, object] = {}
    lock = threading.Lock()

    def caller(k: int) -> None:
        r = type(rand)(rand.seed_value + k)
        for i in range(calls):
            x = k * 1000 + i
            try:
                out: object = f(x, priority=r.randrange(-2, 3), timeout=r.choice([None, 0.002, 0.05, 1.0]))
            except (TimeoutError, batched_fn.Full) as exc:
                out = type(exc)
            with lock:
                outcomes[x] = out

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outcomes
