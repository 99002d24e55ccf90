"""Deadlines: timeout= fires on time in every call style and shapes batches."""

from __future__ import annotations

import time

import pytest

import batched_fn._api as api
from batched_fn import BatchInfo, batched_fn
from helpers import (
    MSG_TIMEOUT, wait_until,
)


def test_timeouts_fire_while_the_worker_is_busy_and_expired_inputs_never_run(run_async):
    seen = []
    f = batched_fn(lambda b: seen.extend(b) or time.sleep(0.5) or b, max_batch_size=8, max_delay=0)
    busy = f.submit("busy")
    wait_until(lambda: f.stats().running == 1)

    start = time.monotonic()
    with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
        f("blocking", timeout=0.05)
    blocking_s = time.monotonic() - start

    start = time.monotonic()
    with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
        f.submit("future", timeout=0.05).result(5)
    future_s = time.monotonic() - start

    async def main():
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
            await f.acall("async", timeout=0.05)
        return time.monotonic() - t0

    async_s = run_async(main())
    # long before the 0.5 s handler returns (the margin is for noisy machines)
    assert blocking_s < 0.25 and future_s < 0.25 and async_s < 0.25
    busy.result(5)
    f(0)
    assert seen == ["busy", 0]
    f.close()


def _deadline_load(aware: bool):
    infos: list[BatchInfo] = []
    api._DEADLINE_AWARE = aware
    try:
        f = batched_fn(lambda b: time.sleep(0.02) or b, max_batch_size=64, max_delay=0.2, on_batch=infos.append)
    finally:
        api._DEADLINE_AWARE = True
    for _ in range(2):          # warm up the handler-time estimate (no deadlines)
        f.submit("warm").result(5)
    outcomes = []
    futures = [f.submit(i, timeout=0.1) for i in range(8)]
    for fut in futures:
        try:
            outcomes.append(fut.result(5))
        except TimeoutError as exc:
            outcomes.append(exc)
    f.close()
    return outcomes, infos


def test_deadline_aware_close_lets_requests_meet_their_deadlines():
    outcomes, infos = _deadline_load(aware=True)
    assert outcomes == list(range(8))
    assert infos[-1].reason == "deadline"


def test_without_the_estimate_the_same_load_times_out():
    outcomes, infos = _deadline_load(aware=False)
    assert all(isinstance(o, TimeoutError) for o in outcomes)
    assert all(info.reason != "deadline" for info in infos)
