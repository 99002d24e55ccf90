"""pytest-benchmark view of the no-op scenario: ``pytest benchmarks/ --benchmark-only``.

Each benchmark times one burst of 1024 requests through a fresh batcher with a
no-op handler (max_batch_size=32, max_delay=1 ms), sent by N asyncio tasks or
N threads; pytest-benchmark groups the peers side by side.  The full
comparison with every peer, interleaved rounds and percentiles is run_all.py.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers as P  # noqa: E402

BURST = 1024
LOCAL_PEERS = [p for p in ("batched_fn", "naive", "batched") if P.available(p) is None]


def noop(batch: list) -> list:
    return batch


def burst_asyncio(peer: str, tasks: int) -> int:
    async def go() -> int:
        ad = P.make(peer, noop, 32, 0.001)
        try:
            async def one(k: int) -> int:
                s = 0
                for i in range(BURST // tasks):
                    s += await ad.acall(i)
                return s
            return sum(await asyncio.gather(*(one(k) for k in range(tasks))))
        finally:
            await ad.aclose()
    return asyncio.run(go())


def burst_threads(peer: str, threads: int) -> int:
    ad = P.make(peer, noop, 32, 0.001)
    sums = [0] * threads

    def one(k: int) -> None:
        for i in range(BURST // threads):
            sums[k] += ad.call(i)

    try:
        ts = [threading.Thread(target=one, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        ad.close()
    return sum(sums)


@pytest.mark.parametrize("peer", LOCAL_PEERS)
@pytest.mark.parametrize("tasks", [64, 1024])
def test_asyncio_burst(benchmark, peer, tasks):
    """tasks asyncio tasks share a burst of 1024 calls."""
    benchmark.group = f"no-op, {tasks} asyncio tasks, 1024 requests"
    total = benchmark(burst_asyncio, peer, tasks)
    assert total == tasks * sum(range(BURST // tasks))


@pytest.mark.parametrize("peer", LOCAL_PEERS)
@pytest.mark.parametrize("threads", [8, 64])
def test_threads_burst(benchmark, peer, threads):
    """threads threads share a burst of 1024 blocking calls."""
    benchmark.group = f"no-op, {threads} threads, 1024 requests"
    total = benchmark(burst_threads, peer, threads)
    assert total == threads * sum(range(BURST // threads))
