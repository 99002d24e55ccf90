"""The public contract of GUIDE §1, clause by clause, from threads and futures."""

from __future__ import annotations

import re

import threading
import time
import traceback
from concurrent.futures import Future

import pytest

from batched_fn import BatchedFn, BatchedFnError, BatchInfo, Closed, Full, Stats, batched_fn
from helpers import MSG_CLOSED, MSG_TIMEOUT, assert_runs_under, wait_until


def echo(batch):
    return list(batch)


class Gate:
    """A handler that records batches and blocks until released (first batch only)."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, batch):
        self.batches.append(list(batch))
        self.entered.set()
        assert self.release.wait(10), "gate never released"
        return [x * 10 for x in batch]


def start_threads(fn, args):
    out: dict = {}

    def run(a):
        try:
            out[a] = fn(a)
        except BaseException as exc:  # recorded for the test to inspect
            out[a] = exc

    threads = [threading.Thread(target=run, args=(a,)) for a in args]
    for t in threads:
        t.start()
    return threads, out


def test_plain_call_and_decorator_both_return_batchedfn():
    f = batched_fn(echo, max_batch_size=4)

    @batched_fn(max_batch_size=4)
    def g(batch):
        return [x + 1 for x in batch]

    with f, g:
        assert isinstance(f, BatchedFn) and isinstance(g, BatchedFn)
        assert f(3) == 3
        assert g(3) == 4
        assert g.__name__ == "g"


def test_batch_runs_as_soon_as_full_without_waiting_for_the_delay():
    seen = []
    f = batched_fn(lambda b: seen.append(len(b)) or b, max_batch_size=4, max_delay=30.0)
    with assert_runs_under(10):   # a 30 s delay would hang here
        threads, out = start_threads(f, range(8))
        for t in threads:
            t.join()
    assert sorted(out.values()) == list(range(8))
    assert seen == [4, 4]
    assert f.stats().batches_by_reason["full"] == 2
    f.close()


def test_lone_request_waits_for_max_delay_then_runs_alone():
    infos: list[BatchInfo] = []
    f = batched_fn(echo, max_batch_size=8, max_delay=0.05, on_batch=infos.append)
    with f:
        start = time.monotonic()
        assert f(1) == 1
        assert time.monotonic() - start >= 0.05   # it did wait for company
    assert [(i.size, i.reason) for i in infos] == [(1, "delay")]


def test_backlog_is_taken_at_once_and_delay_runs_from_arrival():
    # While the worker is busy, requests queue up; when it is free it takes all
    # of them at once: their delay ran while they were queued (reason "drain").
    gate = Gate()
    infos: list[BatchInfo] = []
    f = batched_fn(gate, max_batch_size=32, max_delay=0.2, on_batch=infos.append)
    first, out1 = start_threads(f, [0])
    assert gate.entered.wait(5)
    threads, out = start_threads(f, range(1, 11))
    wait_until(lambda: f.stats().queued == 10)
    time.sleep(0.25)                       # past their max_delay while queued
    gate.release.set()
    for t in first + threads:
        t.join()
    assert gate.batches == [[0], list(range(1, 11))]
    # on_batch runs after the batch's callers have their outputs: wait for it
    wait_until(lambda: len(infos) == 2, what="on_batch for the second batch")
    assert infos[1].reason == "drain" and infos[1].size == 10
    assert out == {i: i * 10 for i in range(1, 11)}
    f.close()


def test_max_delay_zero_still_batches_the_backlog():
    gate = Gate()
    f = batched_fn(gate, max_batch_size=32, max_delay=0)
    first, _ = start_threads(f, [0])
    assert gate.entered.wait(5)
    threads, out = start_threads(f, range(1, 21))
    wait_until(lambda: f.stats().queued == 20)
    gate.release.set()
    for t in first + threads:
        t.join()
    assert [len(b) for b in gate.batches] == [1, 20]
    assert f.stats().batches_by_reason["drain"] >= 1
    f.close()


def test_handler_gets_inputs_in_arrival_order_and_outputs_go_back_by_position():
    gate = Gate()
    f = batched_fn(gate, max_batch_size=32, max_delay=0)
    first, _ = start_threads(f, [-1])
    assert gate.entered.wait(5)
    futures = [f.submit(i) for i in range(10)]     # queued in this order
    gate.release.set()
    assert [fut.result(5) for fut in futures] == [i * 10 for i in range(10)]
    assert gate.batches[1] == list(range(10))
    for t in first:
        t.join()
    f.close()


def test_channel_cap_full_raises_at_once_and_queues_nothing():
    gate = Gate()
    f = batched_fn(gate, max_batch_size=1, max_delay=0, channel_cap=2)
    first, _ = start_threads(f, [0])
    assert gate.entered.wait(5)
    queued = [f.submit(1), f.submit(2)]
    with assert_runs_under(2):    # the handler is blocked: any wait would hang
        with pytest.raises(Full, match=r"queue full: 2 requests waiting \(channel_cap=2\)") as info:
            f(3)
    assert info.value.queued == 2 and info.value.retry_after >= 0
    s = f.stats()
    assert (s.rejected, s.queued, s.submitted) == (1, 2, 3)
    gate.release.set()
    assert [q.result(5) for q in queued] == [10, 20]
    for t in first:
        t.join()
    assert 3 not in [x for b in gate.batches for x in b]
    f.close()


def test_each_worker_builds_its_own_context_in_its_own_thread():
    built: list[str] = []
    lock = threading.Lock()

    def factory():
        with lock:
            built.append(threading.current_thread().name)
        return threading.current_thread().name

    def handler(batch, model):
        assert model == threading.current_thread().name   # passed by keyword, own thread
        time.sleep(0.01)
        return [model] * len(batch)

    f = batched_fn(handler, max_batch_size=2, max_delay=0, num_workers=2, context={"model": factory})
    f.start()
    assert len(built) == 2 and len(set(built)) == 2
    assert all("worker" in name for name in built)
    threads, out = start_threads(f, range(40))
    for t in threads:
        t.join()
    assert set(out.values()) == set(built)     # both workers ran batches
    f.close()


def test_handler_error_reaches_every_caller_of_its_batch_and_the_worker_goes_on():
    gate = Gate()
    calls = {"n": 0}

    def handler(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            return gate(batch)
        if calls["n"] == 2:
            raise ValueError(f"bad batch {batch}")
        return batch

    f = batched_fn(handler, max_batch_size=8, max_delay=0)
    first, _ = start_threads(f, [0])
    assert gate.entered.wait(5)
    futures = [f.submit(i) for i in range(1, 4)]
    gate.release.set()
    errors = [fut.exception(5) for fut in futures]
    assert all(type(e) is ValueError and str(e) == "bad batch [1, 2, 3]" for e in errors)
    # each caller its own exception object, so raising it in one caller's
    # thread never shows another caller's context or traceback
    assert len({id(e) for e in errors}) == 3
    assert all(e.__traceback__ is not None and e.__traceback__.tb_frame.f_code is handler.__code__
               or any(tb.tb_frame.f_code is handler.__code__ for tb in _walk(e.__traceback__)) for e in errors)
    with pytest.raises(ValueError, match=r"bad batch \[1, 2, 3\]"):
        futures[0].result()
    assert f(99) == 99    # the worker survived
    for t in first:
        t.join()
    assert f.stats().failed == 3
    f.close()


def _walk(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_blocking_caller_sees_the_handlers_traceback():
    def handler(batch):
        raise KeyError("inside-handler")

    with batched_fn(handler) as f:
        with pytest.raises(KeyError) as info:
            f(1)
    text = "".join(traceback.format_exception(info.value))
    assert "in handler" in text and "inside-handler" in text


def test_wrong_number_of_outputs_fails_every_caller_with_batchedfnerror():
    f = batched_fn(lambda b: b[:-1], max_batch_size=4, max_delay=0.01)
    with f:
        futures = [f.submit(i) for i in range(3)]
        for fut in futures:
            with pytest.raises(BatchedFnError, match=r"handler returned \d outputs for a batch of \d inputs"):
                fut.result(5)
        assert f.stats().failed == 3


def test_context_failure_fails_queued_and_later_calls_with_closed_and_cause():
    def factory():
        raise OSError("no such model")

    f = batched_fn(echo, context={"model": factory})
    message = "the batched function is closed: its worker failed: OSError: no such model"
    with pytest.raises(Closed, match=re.escape(message)) as info:
        f(1)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(Closed, match=re.escape(message)) as later:
        f(2)
    assert isinstance(later.value.__cause__, OSError)
    assert not f.healthy
    g = batched_fn(echo, context={"model": factory})
    with pytest.raises(Closed, match=re.escape(message)) as started:   # the same text as a call's
        g.start()
    assert isinstance(started.value.__cause__, OSError)
    f.close()
    g.close()


def test_timeout_drops_a_request_not_taken_in_time_and_it_never_reaches_the_handler():
    gate = Gate()
    f = batched_fn(gate, max_batch_size=8, max_delay=0)
    first, _ = start_threads(f, [0])
    assert gate.entered.wait(5)
    with assert_runs_under(3):
        with pytest.raises(TimeoutError, match="not taken into a batch before its timeout"):
            f(1, timeout=0.05)
    fut = f.submit(2, timeout=0.05)
    with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
        fut.result(3)
    gate.release.set()
    assert f(3) == 30
    for t in first:
        t.join()
    assert all(1 not in b and 2 not in b for b in gate.batches)
    assert f.stats().timed_out == 2
    f.close()


def test_timeout_bounds_the_whole_call_even_inside_a_running_batch():
    f = batched_fn(lambda b: time.sleep(1.0) or b, max_delay=0)
    with f:
        with assert_runs_under(0.9):      # taken at once, but the handler runs 1 s
            with pytest.raises(TimeoutError, match="did not finish before its timeout"):
                f(5, timeout=0.05)
        wait_until(lambda: f.stats().completed + f.stats().late >= 1 and f.stats().running == 0)
        s = f.stats()
        assert (s.late, s.timed_out, s.completed) == (1, 1, 0)    # its output was dropped


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1", True])
def test_invalid_timeout_is_rejected(bad):
    with batched_fn(echo) as f:
        with pytest.raises((ValueError, TypeError), match="invalid timeout value"):
            f(1, timeout=bad)


def test_cancelled_future_is_withdrawn():
    gate = Gate()
    f = batched_fn(gate, max_batch_size=8, max_delay=0)
    first, _ = start_threads(f, [0])
    assert gate.entered.wait(5)
    fut = f.submit(7)
    assert fut.cancel()
    gate.release.set()
    assert f(8) == 80
    for t in first:
        t.join()
    assert all(7 not in b for b in gate.batches)
    assert f.stats().cancelled == 1
    f.close()


def test_submit_returns_a_concurrent_future():
    with batched_fn(echo) as f:
        fut = f.submit("x")
        assert isinstance(fut, Future)
        assert fut.result(5) == "x"


def test_start_builds_the_context_before_any_call():
    built = threading.Event()
    f = batched_fn(lambda b, m: b, context={"m": lambda: built.set() or "model"})
    assert not built.is_set()
    assert f.start() is f
    assert built.is_set() and f.healthy
    f.close()


def test_close_finishes_what_is_queued_then_refuses_calls():
    gate = Gate()
    f = batched_fn(gate, max_batch_size=4, max_delay=0)
    first, _ = start_threads(f, [0])
    assert gate.entered.wait(5)
    futures = [f.submit(i) for i in range(1, 10)]
    closer = threading.Thread(target=f.close)
    closer.start()
    wait_until(lambda: f._chan.is_closed)
    with pytest.raises(Closed, match="the batched function is closed"):
        f(100)
    gate.release.set()
    closer.join(5)
    assert not closer.is_alive()
    assert [fut.result(0) for fut in futures] == [i * 10 for i in range(1, 10)]
    assert f.stats().batches_by_reason["close"] >= 1
    f.close()   # idempotent
    assert not f.healthy
    for t in first:
        t.join()


def test_context_manager_closes_on_exit():
    with batched_fn(echo) as f:
        assert f(1) == 1
    with pytest.raises(Closed, match=MSG_CLOSED):
        f(2)
    with pytest.raises(Closed, match=MSG_CLOSED):
        f.start()


def test_stats_add_up():
    f = batched_fn(lambda b: [x if x % 5 else None for x in b] if 13 not in b else 1 / 0,
                   max_batch_size=4, max_delay=0.002)
    with f:
        futures = [f.submit(i) for i in range(40)]
        for fut in futures:
            fut.exception(5)
        s = f.stats()
    assert isinstance(s, Stats)
    assert s.submitted == 40 and s.rejected == 0
    assert s.completed + s.failed + s.timed_out + s.cancelled == 40
    assert s.failed >= 1                 # the batch holding 13 failed
    assert s.queued == 0 and s.running == 0
    assert s.batches >= 10
    assert s.mean_batch_size == pytest.approx(40 / s.batches)
    assert sum(s.batches_by_reason.values()) == s.batches
    with pytest.raises(AttributeError):
        s.completed = 0  # type: ignore[misc]


def test_callers_get_their_own_outputs_under_64_threads():
    f = batched_fn(lambda b: [(x, len(b)) for x in b], max_batch_size=16, max_delay=0.001)
    results: dict[int, list] = {}

    def caller(k):
        results[k] = [f(k * 1000 + i) for i in range(100)]

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, outs in results.items():
        assert [o[0] for o in outs] == [k * 1000 + i for i in range(100)]
    assert max(o[1] for outs in results.values() for o in outs) > 1   # batching happened
    s = f.stats()
    assert s.completed == 6400 and s.mean_batch_size > 1
    f.close()


def test_a_cpu_bound_thread_progresses_while_many_callers_wait():
    # 32 callers block on a handler that waits 0.5 s; the GIL is free meanwhile.
    release = threading.Event()
    f = batched_fn(lambda b: release.wait(10) and b, max_batch_size=64, max_delay=0)
    threads, _ = start_threads(f, range(32))
    wait_until(lambda: f.stats().running + f.stats().queued == 32)
    counter = 0
    end = time.monotonic() + 0.3
    while time.monotonic() < end:     # pure-Python CPU work in this thread
        counter += 1
    release.set()
    for t in threads:
        t.join()
    # With the GIL held by a waiting caller this loop would barely run; the bound
    # is loose (a few % of an idle run) so it is about progress, not speed.
    assert counter > 10_000
    f.close()


def test_a_reentrant_blocking_call_from_the_handler_raises_instead_of_deadlocking():
    holder: list = []
    seen: list = []

    def handler(batch):
        if batch == ["outer"]:
            try:
                holder[0]("inner")          # no timeout: would wait for itself forever
            except BatchedFnError as exc:
                seen.append(str(exc))
        return batch

    f = batched_fn(handler, max_batch_size=4, max_delay=0)
    holder.append(f)
    with assert_runs_under(5):
        assert f("outer", timeout=10) == "outer"
    assert seen == ["re-entrant call: the handler of handler called it from its own worker thread, "
                    "where a blocking call would wait for itself forever; call the handler's logic directly"]
    assert f("after") == "after"             # the worker goes on
    f.close()


def test_a_timeout_too_large_for_a_float_is_a_value_error():
    with batched_fn(echo) as f:
        with pytest.raises(ValueError, match=re.escape(
                "invalid timeout value: expected a finite float >= 0 (got 1000000000")):
            f(1, timeout=10**400)


def test_stats_add_up_as_soon_as_a_caller_returns():
    f = batched_fn(lambda b: b, max_batch_size=8, max_delay=0)
    errors: list = []

    def caller(k: int) -> None:
        for i in range(300):
            f(i)
            s = f.stats()
            # this caller's own request is finished: never counted as running or queued
            if s.submitted != s.completed + s.failed + s.timed_out + s.cancelled + s.queued + s.running:
                errors.append(s)
            if s.completed < i + 1:
                errors.append(("completed lags", s))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.close()
    assert not errors, errors[:3]
    s = f.stats()
    assert (s.running, s.queued, s.completed) == (0, 0, 1200)


def test_a_done_callback_raising_systemexit_leaves_the_other_callers_alone():
    go = threading.Event()
    f = batched_fn(lambda b: go.wait(5) and [x * 2 for x in b], max_batch_size=8, max_delay=0.05)
    futures = [f.submit(i) for i in range(4)]

    def exits(fut):
        raise SystemExit("from a callback")

    futures[0].add_done_callback(exits)      # before the batch can finish
    go.set()
    assert [fut.result(5) for fut in futures] == [0, 2, 4, 6]
    assert f.stats().failed == 0 and f(5) == 10
    f.close()
