"""Closed-loop load generators: N threads or N asyncio tasks, each calling in a loop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Awaitable, Callable


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of an already sorted list (nearest rank)."""
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


def summarize(latencies: list[float], done: int, elapsed: float) -> dict:
    """requests/s and p50/p99 latency (seconds) of one measurement."""
    lat = sorted(latencies)
    return {"rps": done / elapsed if elapsed > 0 else 0.0, "p50": percentile(lat, 0.5),
            "p99": percentile(lat, 0.99), "n": done, "latencies": lat}


def run_threads(call: Callable[[Any], Any], n: int, duration: float,
                make_input: Callable[[int], Any] = lambda i: i) -> dict:
    """n threads call `call` back to back for `duration` seconds."""
    lats: list[list[float]] = [[] for _ in range(n)]
    barrier = threading.Barrier(n + 1)
    stop_at = [0.0]
    pc = time.perf_counter

    def worker(k: int) -> None:
        mine = lats[k]
        i = k
        barrier.wait()
        end = stop_at[0]
        while True:   # at least one call each, so a slow start still measures something
            t0 = pc()
            call(make_input(i))
            t1 = pc()
            mine.append(t1 - t0)
            i += n
            if t1 >= end:
                return

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    start = pc()
    stop_at[0] = start + duration
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = pc() - start
    flat = [x for part in lats for x in part]
    return summarize(flat, len(flat), elapsed)


async def run_tasks(acall: Callable[[Any], Awaitable[Any]], n: int, duration: float,
                    make_input: Callable[[int], Any] = lambda i: i) -> dict:
    """n asyncio tasks await `acall` back to back for `duration` seconds."""
    lats: list[float] = []
    pc = time.perf_counter
    start = pc()
    end = start + duration

    async def worker(k: int) -> None:
        i = k
        while True:   # at least one call each, so a slow start still measures something
            t0 = pc()
            await acall(make_input(i))
            t1 = pc()
            lats.append(t1 - t0)
            i += n
            if t1 >= end:
                return

    await asyncio.gather(*(worker(k) for k in range(n)))
    elapsed = pc() - start
    return summarize(lats, len(lats), elapsed)
