"""Overload: with channel_cap set, refused calls fail at once with Full; accepted ones all complete.

No wall-clock speed is asserted here.  "Fails without waiting" is shown by
holding the worker inside a batch for the whole test: a refused call that
waited for room would never return (the hang guards are generous bounds).
The microsecond cost of a refusal is printed by benchmarks/soak.py.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import wait
from typing import Any

import pytest

from batched_fn import Full, batched_fn
from helpers import HOLD, MSG_NO_ROOM, Hold, assert_runs_under, identity, wait_until

CAP = 8


def _held(**knobs: Any):
    hold = Hold(identity)
    fn = batched_fn(hold, max_batch_size=4, max_delay=0, channel_cap=CAP, **knobs)
    pinned = hold.pin(fn)
    return fn, hold, pinned


def test_refused_calls_fail_fast_with_full_and_accepted_ones_complete() -> None:
    fn, hold, pinned = _held()
    try:
        accepted, refused = [], []
        with assert_runs_under(2.0):   # the worker is held: any waiting call would hang here
            for i in range(10 * CAP):
                try:
                    accepted.append((i, fn.submit(i)))
                except Full as exc:
                    refused.append(exc)
        assert len(accepted) == CAP and len(refused) == 9 * CAP
        for exc in refused:
            assert exc.queued >= CAP and exc.retry_after >= 0.0
            assert "channel_cap=8" in str(exc)
        # Blocking callers from threads are refused the same way, without waiting.
        errors: list[BaseException] = []
        threads = [threading.Thread(target=lambda: errors.append(_expect_full(fn))) for _ in range(8)]
        with assert_runs_under(2.0):
            for t in threads:
                t.start()
            for t in threads:
                t.join(2.0)
        assert len(errors) == 8 and all(isinstance(e, Full) for e in errors)
        assert fn.stats().queued == CAP
        hold.release()
        assert pinned.result(5) == HOLD
        assert [f.result(5) for _, f in accepted] == [i for i, _ in accepted]
        st = fn.stats()
        assert st.rejected == 9 * CAP + 8
        assert st.submitted == CAP + 1 == st.completed
    finally:
        hold.release()
        fn.close(timeout=5)


def _expect_full(fn: Any) -> BaseException | None:
    try:
        fn(1)
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


def test_asyncio_callers_are_refused_without_blocking_the_loop(run_async: Any) -> None:
    fn, hold, pinned = _held()

    async def main() -> tuple[int, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.ensure_future(ticker())
        tasks = [asyncio.ensure_future(fn.acall(i)) for i in range(10 * CAP)]
        for _ in range(200):   # a hang guard of ~2 s: refusals need a single loop turn
            await asyncio.sleep(0.01)
            done = {t for t in tasks if t.done()}
            if len(done) >= 9 * CAP:
                break
        full = [t for t in done if isinstance(t.exception(), Full)]
        assert len(done) == 9 * CAP and len(full) == 9 * CAP, "refused acalls must fail at once"
        hold.release()
        results = await asyncio.wait_for(asyncio.gather(*[t for t in tasks if t not in done]), 5)
        tick_task.cancel()
        return len(results), ticks

    try:
        n, ticks = run_async(main())
        assert n == CAP and ticks > 0
        assert fn.stats().rejected == 9 * CAP
    finally:
        hold.release()
        fn.close(timeout=5)


def test_sustained_overload_keeps_the_queue_bounded_and_loses_nothing() -> None:
    """Bursts far above the handler's capacity: the queue never exceeds the cap."""
    gate = threading.Event()

    def slow(batch: list[int]) -> list[int]:
        gate.wait(0.002)        # ~2 ms a batch of <= 4: far below the offered load
        return [x + 1 for x in batch]

    peak = [0]
    fn = batched_fn(slow, max_batch_size=4, max_delay=0, channel_cap=CAP)
    stop = threading.Event()
    outcomes: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def sampler() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], fn.stats().queued)
            stop.wait(0.0005)

    def client(base: int) -> None:
        local = []
        for burst in range(5):
            futures = []
            for i in range(base + burst * 20, base + burst * 20 + 20):
                try:
                    futures.append((i, fn.submit(i, timeout=10)))
                except Full:
                    local.append((i, Full))
            local.extend((i, f.result(10)) for i, f in futures)
        with lock:
            outcomes.extend(local)

    threads = [threading.Thread(target=client, args=(k * 1000,)) for k in range(4)]
    watcher = threading.Thread(target=sampler)
    watcher.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a caller hung under overload"
    finally:
        stop.set()
        watcher.join()
        fn.close(timeout=5)
    ok = [(i, r) for i, r in outcomes if r is not Full]
    assert all(r == i + 1 for i, r in ok), "a result reached the wrong caller"
    assert len(outcomes) == 400
    st = fn.stats()
    assert peak[0] <= CAP
    assert st.rejected == 400 - len(ok) and st.completed == len(ok) == st.submitted
    assert st.rejected > 0, "the load never exceeded the cap; the test proves nothing"


def test_drop_oldest_under_overload_fails_the_evicted_with_full() -> None:
    fn, hold, pinned = _held(on_full="drop_oldest")
    try:
        with assert_runs_under(2.0):
            futures = [fn.submit(i) for i in range(10 * CAP)]
        assert fn.stats().queued == CAP
        hold.release()
        _, not_done = wait(futures, timeout=5)
        assert not not_done
        evicted = [f for f in futures[:-CAP] if isinstance(f.exception(), Full)]
        assert len(evicted) == 9 * CAP
        assert [f.result() for f in futures[-CAP:]] == list(range(9 * CAP, 10 * CAP))
        st = fn.stats()
        assert st.failed == 9 * CAP and st.rejected == 0 and st.completed == CAP + 1
    finally:
        hold.release()
        fn.close(timeout=5)


def test_block_policy_times_out_instead_of_refusing() -> None:
    fn, hold, pinned = _held(on_full="block")
    try:
        futures = [fn.submit(i) for i in range(CAP)]
        with assert_runs_under(5.0):
            with pytest.raises(TimeoutError, match=MSG_NO_ROOM):
                fn(99, timeout=0.05)
        waiter = threading.Thread(target=lambda: futures.append(fn.submit(100, timeout=10)))
        waiter.start()
        wait_until(lambda: fn.stats().queued == CAP)
        hold.release()
        waiter.join(5)
        assert [f.result(5) for f in futures] == list(range(CAP)) + [100]
        assert fn.stats().rejected == 0
    finally:
        hold.release()
        fn.close(timeout=5)
