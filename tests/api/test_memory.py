"""A request's input and output are freed once it completes; RSS stays flat over many requests."""

from __future__ import annotations

import gc
import sys
import weakref
from concurrent.futures import wait
from typing import Any, Callable

import psutil
import pytest

from batched_fn import batched_fn
from helpers import MSG_TIMEOUT, Hold


class Payload:
    """An input or output whose lifetime a weakref can watch."""

    def __init__(self, n: int = 0) -> None:
        self.n = n


def _make(fail: bool = False) -> Any:
    def handler(batch: list[Any]) -> list[Any]:
        if fail and any(getattr(x, "n", 0) < 0 for x in batch):
            raise ValueError("fails the batch")
        return [Payload(getattr(x, "n", 0)) for x in batch]
    return batched_fn(handler, max_batch_size=4, max_delay=0)


def _settle(fn: Any) -> None:
    """One more request: the worker has finished the previous batch's bookkeeping."""
    fn(Payload())


def _assert_freed(refs: list[weakref.ref], what: str) -> None:
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {len(refs)} {what} still alive after completion"


WAYS: dict[str, Callable[[Any, Any, float | None], Any]] = {
    "call": lambda fn, x, t: fn(x, timeout=t),
    "submit": lambda fn, x, t: fn.submit(x, timeout=t).result(5),
}


@pytest.mark.parametrize("timeout", [None, 30.0])
@pytest.mark.parametrize("way", sorted(WAYS))
def test_inputs_and_outputs_are_freed_after_success(way: str, timeout: float | None) -> None:
    with _make() as fn:
        ins, outs = [], []
        for i in range(20):
            x = Payload(i)
            ins.append(weakref.ref(x))
            y = WAYS[way](fn, x, timeout)
            assert y.n == i
            outs.append(weakref.ref(y))
            del x, y
        _settle(fn)
        _assert_freed(ins, "inputs")
        _assert_freed(outs, "outputs")


def test_inputs_and_outputs_are_freed_after_acall(run_async: Any) -> None:
    with _make() as fn:
        ins, outs = [], []

        async def main() -> None:
            for i in range(20):
                x = Payload(i)
                ins.append(weakref.ref(x))
                y = await fn.acall(x, timeout=None if i % 2 else 30.0)
                outs.append(weakref.ref(y))
                del x, y

        run_async(main())
        _settle(fn)
        _assert_freed(ins, "inputs")
        _assert_freed(outs, "outputs")


def test_inputs_are_freed_after_failure_timeout_and_cancellation() -> None:
    hold = Hold(lambda b: list(b))
    with _make(fail=True) as fn:
        refs = []
        for i in range(10):
            x = Payload(-1)
            refs.append(weakref.ref(x))
            with pytest.raises(ValueError):
                fn(x)
            del x
        _settle(fn)
        _assert_freed(refs, "inputs of failed batches")
    with batched_fn(hold, max_batch_size=1, max_delay=0, channel_cap=4) as fn:
        pinned = hold.pin(fn)
        refs = []
        futures = []
        for i in range(4):
            x = Payload(i)
            refs.append(weakref.ref(x))
            if i < 2:
                with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
                    fn(x, timeout=0.01)
            else:
                futures.append(fn.submit(x))
            del x
        for fut in futures:
            assert fut.cancel()
        futures.clear()
        _assert_freed(refs, "inputs of timed-out and cancelled requests, still in the queue")
        hold.release()
        pinned.result(5)


def test_refcount_of_a_reused_input_is_unchanged() -> None:
    x = Payload(7)
    with batched_fn(lambda b: [None] * len(b), max_batch_size=8, max_delay=0) as fn:
        fn(x)
        _settle(fn)
        before = sys.getrefcount(x)
        for _ in range(200):
            fn(x)
        wait([fn.submit(x) for _ in range(200)], timeout=10)
        _settle(fn)
        assert sys.getrefcount(x) == before


def test_rss_stays_flat_over_many_requests() -> None:
    """A short version of benchmarks/soak.py's 1M-request RSS check."""
    proc = psutil.Process()

    def handler(batch: list[bytes]) -> list[bytes]:
        return [x[:8] + b"!" for x in batch]

    def run(n: int) -> None:
        futures = []
        for i in range(n):
            futures.append(fn.submit(b"%08d" % i + b"." * 200))
            if len(futures) >= 512:
                wait(futures, timeout=30)
                futures.clear()
        wait(futures, timeout=30)

    with batched_fn(handler, max_batch_size=32, max_delay=0.0005) as fn:
        run(20_000)         # warm-up: freelists, deques of stats, allocator arenas
        gc.collect()
        start = proc.memory_info().rss
        for _ in range(4):
            run(20_000)
        gc.collect()
        growth = proc.memory_info().rss - start
        st = fn.stats()
    assert st.completed == 100_000
    assert growth < 8 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 80k requests"


def test_soak_script_short_run_loses_nothing() -> None:
    """CI's short version of benchmarks/soak.py (make soak runs 1M requests)."""
    import os
    import subprocess

    from helpers import PACKAGE_DIR, assert_clean_exit
    script = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "benchmarks", "soak.py")
    env = dict(os.environ, PYTHONPATH=PACKAGE_DIR)
    proc = subprocess.run([sys.executable, script, "--requests", "30000"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert_clean_exit(proc)
    assert "lost 0  duplicated 0  mis-routed 0" in proc.stdout, proc.stdout
