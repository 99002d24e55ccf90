"""The compiled core on its own: a Channel driven by hand, without BatchedFn or worker threads.

Each test plays both sides (callers and worker) in one thread where it can, so
the order of events is exact.
"""

from __future__ import annotations

import pickle
import re
import threading
from concurrent.futures import Future

import pytest

from batched_fn import BatchedFnError, Closed, Failed, Full
from batched_fn._batchcore import REASONS, Channel, OnFull, Request
from batched_fn._batchcore import pending
from helpers import MSG_CLOSED, MSG_FULL, MSG_TIMEOUT


def queue(chan: Channel, *values: object, timeout: float | None = None) -> list[Future]:
    """Submit each value with a concurrent future; return the futures."""
    futures = []
    for v in values:
        fut: Future = Future()
        chan.submit_future(v, fut, timeout)
        futures.append(fut)
    return futures


def values(batch: list) -> list:
    return [r.value for r in batch]


def test_collect_takes_what_is_queued_in_order_and_says_why():
    chan = Channel(0, 3, 0.0)
    futures = queue(chan, "a", "b", "c", "d")
    batch, reason, cost, _ = chan.collect()
    assert (values(batch), reason, cost) == (["a", "b", "c"], "full", 0.0)
    assert chan.running == 3 and chan.queued == 1
    chan.deliver(batch, ["A", "B", "C"], None)
    assert [f.result(0) for f in futures[:3]] == ["A", "B", "C"]
    batch, reason, _, _ = chan.collect()
    assert (values(batch), reason) == (["d"], "drain")
    chan.deliver(batch, ["D"], None)
    assert futures[3].result(0) == "D"
    assert (chan.submitted, chan.completed, chan.failed, chan.running, chan.batches) == (4, 4, 0, 0, 2)
    assert chan.reason_counts() == {"full": 1, "delay": 0, "drain": 1, "deadline": 0, "close": 0}
    assert REASONS == ("full", "delay", "drain", "deadline", "close")


def test_cost_bound_carries_the_item_that_does_not_fit_into_the_next_batch():
    chan = Channel(0, 8, 0.0, 5.0)
    for v, c in (("a", 2.0), ("b", 2.0), ("c", 2.0)):
        chan.submit_future(v, Future(), None, c)
    batch, reason, cost, _ = chan.collect()
    assert (values(batch), reason, cost) == (["a", "b"], "full", 4.0)
    chan.deliver(batch, [1, 2], None)
    batch, _, cost, _ = chan.collect()
    assert (values(batch), cost) == (["c"], 2.0)
    chan.deliver(batch, [3], None)


def test_a_full_queue_rejects_with_the_count_and_cap():
    chan = Channel(2, 4, 0.0)
    queue(chan, 1, 2)
    with pytest.raises(Full, match=MSG_FULL) as info:
        queue(chan, 3)
    assert str(info.value) == "queue full: 2 requests waiting (channel_cap=2)"
    assert (info.value.queued, info.value.retry_after) == (2, 0.0)   # no batch timed yet
    assert (chan.rejected, chan.submitted, chan.queued) == (1, 2, 2)
    chan.record_handler_time(4, 8_000_000)    # 8 ms for a full batch of 4
    with pytest.raises(Full) as info:
        queue(chan, 3)
    assert info.value.retry_after == pytest.approx(0.004)   # 2 of 4 items at 8 ms a batch


def test_drop_oldest_fails_the_oldest_queued_request():
    chan = Channel(2, 4, 0.0, on_full=OnFull.DROP_OLDEST)
    assert chan.on_full is OnFull.DROP_OLDEST
    old, _ = queue(chan, "old", "mid")
    queue(chan, "new")
    err = old.exception(0)
    assert type(err) is Full
    assert str(err) == "request evicted from a full queue by a newer one (on_full='drop_oldest')"
    batch, _, _, _ = chan.collect()
    assert values(batch) == ["mid", "new"]
    chan.deliver(batch, [0, 0], None)
    assert (chan.evicted, chan.failed, chan.rejected) == (1, 1, 0)


def test_expire_withdraws_a_queued_request_and_delivers_the_timeout():
    chan = Channel(0, 4, 0.0)
    fut: Future = Future()
    req = chan.submit_future("x", fut, None)
    assert chan.expire(req) is True
    with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
        fut.result(0)
    assert chan.expire(req) is False      # once only
    assert (chan.timed_out, chan.queued) == (1, 0)
    queue(chan, "y")
    batch, _, _, _ = chan.collect()          # the withdrawn request is dropped, not run
    assert values(batch) == ["y"]
    chan.deliver(batch, [1], None)


def test_a_request_in_a_batch_of_a_classic_channel_no_longer_expires():
    chan = Channel(0, 4, 0.0, classic=True)
    fut: Future = Future()
    req = chan.submit_future("x", fut, None)
    batch, _, _, _ = chan.collect()
    assert chan.expire(req) is False and chan.cancel(req) is False
    chan.deliver(batch, ["X"], None)
    assert fut.result(0) == "X"


def test_a_request_in_a_running_batch_expires_late_and_its_output_is_dropped():
    chan = Channel(0, 4, 0.0)
    late_fut: Future = Future()
    other_fut: Future = Future()
    late = chan.submit_future("x", late_fut, None)
    chan.submit_future("y", other_fut, None)
    batch, _, _, _ = chan.collect()
    assert chan.cancel(late) is False           # a caller cannot withdraw it any more
    assert chan.expire(late) is True            # but its deadline fails it at once
    assert chan.expire(late) is False           # once only
    with pytest.raises(TimeoutError, match="did not finish before its timeout"):
        late_fut.result(0)
    assert (chan.running, chan.late, chan.timed_out) == (1, 1, 1)
    chan.deliver(batch, ["X", "Y"], None)        # "X" is dropped, "Y" goes to its caller
    assert other_fut.result(0) == "Y"
    assert (chan.running, chan.completed, chan.late) == (0, 1, 1)


def test_the_deadline_timer_fires_without_a_worker():
    chan = Channel(0, 4, 0.0)
    fut: Future = Future()
    chan.submit_future("x", fut, 0.01)
    with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
        fut.result(5)
    assert chan.timed_out == 1


def test_a_request_already_late_at_dispatch_times_out_and_never_runs():
    chan = Channel(0, 4, 0.0)
    late: Future = Future()
    req = chan.submit_future("late", late, 0.0)   # its deadline is now
    ok = queue(chan, "ok")[0]
    got = chan.collect()
    if got is not None:                        # the timer may have beaten the collector
        batch, _, _, _ = got
        assert values(batch) == ["ok"]
        chan.deliver(batch, ["OK"], None)
    assert ok.result(5) == "OK"
    with pytest.raises(TimeoutError, match=MSG_TIMEOUT):
        late.result(5)
    assert req.value is None                   # the input was let go


def test_cancel_withdraws_without_an_outcome():
    chan = Channel(0, 4, 0.0)
    fut: Future = Future()
    req = chan.submit_future("x", fut, None)
    assert chan.cancel(req) is True
    assert not fut.done() and chan.cancelled == 1 and chan.queued == 0


def test_failed_and_its_subclasses_fail_only_their_own_caller():
    class Refused(Failed):
        pass

    chan = Channel(0, 4, 0.0)
    futures = queue(chan, 1, 2, 3)
    batch, _, _, _ = chan.collect()
    boom, nope = ValueError("boom"), KeyError("nope")
    chan.deliver(batch, [Failed(boom), "two", Refused(nope)], None)
    assert futures[0].exception(0) is boom
    assert futures[1].result(0) == "two"
    assert futures[2].exception(0) is nope
    assert (chan.completed, chan.failed) == (1, 2)
    assert repr(Refused(nope)) == "Refused(KeyError('nope'))"


def test_failed_needs_an_exception():
    with pytest.raises(TypeError, match=re.escape("Failed() expects an exception instance (got 'oops')")):
        Failed("oops")  # type: ignore[arg-type]


def test_a_batch_error_gives_each_caller_its_own_copy():
    chan = Channel(0, 4, 0.0)
    futures = queue(chan, 1, 2)
    batch, _, _, _ = chan.collect()
    try:
        raise ValueError("bad batch")
    except ValueError as exc:
        error = exc
    chan.deliver(batch, None, error)
    first, second = (f.exception(0) for f in futures)
    assert first is error and second is not error
    assert type(second) is ValueError and second.args == ("bad batch",)
    assert second.__traceback__ is error.__traceback__


def test_a_done_callback_raising_base_exception_does_not_touch_the_other_callers(caplog):
    chan = Channel(0, 4, 0.0)
    futures = queue(chan, 1, 2, 3)

    def exits(fut: Future) -> None:
        raise SystemExit("from a callback")

    futures[0].add_done_callback(exits)
    batch, _, _, _ = chan.collect()
    chan.deliver(batch, ["a", "b", "c"], None)     # does not raise
    assert [f.result(0) for f in futures] == ["a", "b", "c"]
    assert "a done-callback of a Future raised SystemExit; ignored" in caplog.text


def test_close_refuses_new_requests_and_collect_ends_when_empty():
    chan = Channel(0, 4, 0.0)
    queued = queue(chan, "last")
    chan.close()
    chan.close()          # idempotent
    assert chan.is_closed
    with pytest.raises(Closed, match=MSG_CLOSED) as info:
        queue(chan, "late")
    assert str(info.value) == "the batched function is closed"
    batch, reason, _, _ = chan.collect()
    assert (values(batch), reason) == (["last"], "close")
    chan.deliver(batch, ["done"], None)
    assert queued[0].result(0) == "done"
    assert chan.collect() is None


def test_a_broken_worker_fails_everything_queued_with_its_cause():
    chan = Channel(0, 4, 0.0)
    futures = queue(chan, 1, 2)
    cause = OSError("no such model")
    chan.break_(cause)
    message = "the batched function is closed: its worker failed: OSError: no such model"
    for fut in futures:
        err = fut.exception(0)
        assert type(err) is Closed and str(err) == message and err.__cause__ is cause
    assert str(chan.closed_error()) == message
    assert chan.collect() is None


def test_a_blocking_call_waits_with_the_gil_released_for_a_worker():
    chan = Channel(0, 4, 0.0)
    result: list = []
    caller = threading.Thread(target=lambda: result.append(chan.call("x")))
    caller.start()
    got = chan.collect()
    assert got is not None
    batch, _, _, _ = got
    chan.deliver(batch, ["X"], None)
    caller.join(5)
    assert result == ["X"]


def test_close_drops_its_finished_deadline_entries():
    chan = Channel(0, 4, 0.0)
    before = pending()
    futures = queue(chan, 1, 2, timeout=60.0)
    assert pending() == before + 2
    batch, _, _, _ = chan.collect()
    chan.deliver(batch, [1, 2], None)
    assert [f.result(0) for f in futures] == [1, 2]
    chan.close()
    assert pending() == before


def test_bad_construction_and_python_instantiation_are_refused():
    with pytest.raises(ValueError, match=re.escape("Channel: cap must be >= 0 (got -1)")):
        Channel(-1, 4, 0.0)
    with pytest.raises(ValueError, match=re.escape("Channel: max_items must be >= 1 (got 0)")):
        Channel(0, 0, 0.0)
    with pytest.raises(TypeError, match=re.escape("Request is not supposed to be instantiated from Python")):
        Request()
    with pytest.raises(TypeError, match=re.escape("cannot pickle 'Channel' object")):
        pickle.dumps(Channel(0, 1, 0.0))


def test_on_full_block_room_signal_for_asyncio(run_async):
    chan = Channel(1, 4, 0.0, on_full=OnFull.BLOCK)

    async def main() -> list:
        first, fut1 = chan.submit_here("first")
        assert first is not None
        none, room = chan.submit_here("second")      # full: nothing queued, a room signal
        assert none is None and not room.done()
        assert chan.rejected == 0                    # waiting for room is not a refusal
        batch, _, _, _ = chan.collect()                 # takes "first": room comes
        await room
        second, fut2 = chan.submit_here("second")
        assert second is not None
        chan.deliver(batch, ["F"], None)
        batch, _, _, _ = chan.collect()
        chan.deliver(batch, ["S"], None)
        return [await fut1, await fut2]

    assert run_async(main()) == ["F", "S"]


def test_the_package_reexports_the_cores_errors():
    import batched_fn
    import batched_fn.errors
    from batched_fn import _batchcore
    for name in ("BatchedFnError", "Full", "Closed", "InternalError", "Failed"):
        assert getattr(batched_fn, name) is getattr(batched_fn.errors, name) is getattr(_batchcore, name)
    assert issubclass(Full, BatchedFnError) and issubclass(Closed, BatchedFnError)
