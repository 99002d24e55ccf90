"""Bad handler output and handler faults fail only their own batch; the worker survives."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import wait
from typing import Any, Callable

import pytest

from batched_fn import BatchedFnError, Failed, batched_fn
from helpers import HOLD, Hold

RESULT_TIMEOUT = 5.0   # a hang guard: no outcome this late means a lost request


class Unprintable(Exception):
    """An exception whose __str__ and __repr__ themselves raise."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ of a handler exception raised")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ of a handler exception raised")


class CustomBase(BaseException):
    """A BaseException subclass that is not an Exception."""


class LyingLength:
    """Claims the right length, but every item access raises."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        raise RuntimeError("item access of the handler's output raised")


class BrokenLength:
    """Indexable, but len() raises."""

    def __len__(self) -> int:
        raise RuntimeError("len() of the handler's output raised")

    def __getitem__(self, i: int) -> Any:
        return i


def _gen(batch: list[Any]) -> Any:
    yield from batch


# name -> handler output for a batch (or an exception to raise)
BAD_OUTPUTS: dict[str, Callable[[list[Any]], Any]] = {
    "none": lambda b: None,
    "generator": _gen,
    "iterator": lambda b: iter(list(b)),
    "int": lambda b: len(b),
    "object": lambda b: object(),
    "dict": lambda b: {i: x for i, x in enumerate(b)},
    "str": lambda b: "x" * len(b),
    "bytes": lambda b: b"x" * len(b),
    "set": lambda b: set(range(len(b))),
    "too_short": lambda b: list(b)[:-1],
    "too_long": lambda b: list(b) + ["extra"],
    "empty": lambda b: [],
    "broken_len": lambda b: BrokenLength(),
    "lying_len": lambda b: LyingLength(len(b)),
}

RAISED: dict[str, Callable[[], BaseException]] = {
    "value_error": lambda: ValueError("bad batch"),
    "unprintable": Unprintable,
    "keyboard_interrupt": KeyboardInterrupt,
    "system_exit": lambda: SystemExit(3),
    "generator_exit": GeneratorExit,
    "custom_base": CustomBase,
}

BAD = "BAD"


def _faulty(fault: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """A handler that doubles its inputs, except for batches containing BAD."""
    def handler(batch: list[Any]) -> Any:
        if BAD in batch:
            return fault(batch)
        return [x if x is HOLD else x * 2 for x in batch]
    return handler


def _run_faulty_batch(handler: Callable[[list[Any]], Any], batch_inputs: list[Any]):
    """Run batch_inputs as one batch behind a held one, then a good batch after it.

    Returns (futures of the faulty batch, the BatchedFn, the Hold).
    """
    hold = Hold(handler)
    fn = batched_fn(hold, max_batch_size=16, max_delay=0)
    pinned = hold.pin(fn)
    futures = [fn.submit(x) for x in batch_inputs]
    hold.release()
    assert pinned.result(RESULT_TIMEOUT) == HOLD
    return futures, fn, hold


def _assert_worker_survived(fn: Any, hold: Hold) -> None:
    worker_ids = {t.ident for t in threading.enumerate() if t.name.endswith("-worker-0")}
    assert fn(21, timeout=RESULT_TIMEOUT) == 42
    assert [fn.submit(i).result(RESULT_TIMEOUT) for i in range(3)] == [0, 2, 4]
    assert fn.healthy
    assert worker_ids & {t.ident for t in threading.enumerate()}, "the worker thread was replaced or died"


def _same_error(a: BaseException, b: BaseException) -> bool:
    """The same error for two callers: one type, args and cause; distinct objects
    (each caller raises its own, so their tracebacks and contexts never mix)."""
    return (type(a) is type(b) and a.args == b.args and a.__cause__ is b.__cause__
            and (a is b or a.__traceback__ is b.__traceback__))


@pytest.mark.parametrize("kind", sorted(BAD_OUTPUTS))
def test_bad_output_fails_only_its_batch_with_a_clear_error(kind: str) -> None:
    futures, fn, hold = _run_faulty_batch(_faulty(BAD_OUTPUTS[kind]), [1, BAD, 3])
    try:
        errors = []
        for fut in futures:
            exc = fut.exception(RESULT_TIMEOUT)
            assert isinstance(exc, BatchedFnError), f"{kind}: got {exc!r}"
            assert "handler" in str(exc) or "output" in str(exc), f"{kind}: unclear message {exc}"
            errors.append(exc)
        assert all(_same_error(e, errors[0]) for e in errors), "callers of one batch got different exceptions"
        _assert_worker_survived(fn, hold)
        st = fn.stats()
        assert st.failed == 3
    finally:
        fn.close(timeout=5)


@pytest.mark.parametrize("kind", sorted(RAISED))
def test_handler_exception_reaches_every_caller_of_its_batch_only(kind: str) -> None:
    raised: list[BaseException] = []

    def fault(batch: list[Any]) -> Any:
        exc = RAISED[kind]()
        raised.append(exc)
        raise exc

    futures, fn, hold = _run_faulty_batch(_faulty(fault), [1, BAD, 3])
    try:
        got = [fut.exception(RESULT_TIMEOUT) for fut in futures]
        assert len(raised) == 1
        original = raised[0]
        if isinstance(original, Exception):
            assert got[0] is original          # the first caller gets the very object
            assert all(_same_error(e, original) for e in got)
        else:
            # BaseExceptions belong to the handler: callers get them wrapped.
            assert all(isinstance(e, BatchedFnError) for e in got), got
            assert all(_same_error(e, got[0]) for e in got)
            assert all(e.__cause__ is original for e in got)
            assert type(original).__name__ in str(got[0])
        _assert_worker_survived(fn, hold)
    finally:
        fn.close(timeout=5)


def test_blocking_callers_get_the_handler_exception_raised() -> None:
    errors: list[BaseException] = []

    def handler(batch: list[Any]) -> Any:
        if BAD in batch:
            raise Unprintable()
        return batch

    with batched_fn(handler, max_batch_size=4, max_delay=0) as fn:
        with pytest.raises(Unprintable) as info:
            fn(BAD, timeout=RESULT_TIMEOUT)
        assert info.value.__traceback__ is not None
        errors.append(info.value)
        assert fn("ok") == "ok"


@pytest.mark.parametrize("kind", ["keyboard_interrupt", "system_exit"])
def test_base_exception_in_handler_does_not_escape_to_blocking_caller(kind: str) -> None:
    def handler(batch: list[Any]) -> Any:
        if BAD in batch:
            raise RAISED[kind]()
        return batch

    with batched_fn(handler, max_batch_size=4, max_delay=0) as fn:
        with pytest.raises(BatchedFnError, match=r"^handler raised (KeyboardInterrupt|SystemExit)$") as info:
            fn(BAD, timeout=RESULT_TIMEOUT)
        assert isinstance(info.value.__cause__, (KeyboardInterrupt, SystemExit))
        assert fn(7) == 7
        assert fn.healthy


def test_failed_slot_fails_only_its_caller() -> None:
    boom = LookupError("only slot 1")

    def handler(batch: list[Any]) -> Any:
        return [Failed(boom) if x == 1 else x for x in batch]

    futures, fn, hold = _run_faulty_batch(handler, [0, 1, 2])
    try:
        assert futures[0].result(RESULT_TIMEOUT) == 0
        assert futures[1].exception(RESULT_TIMEOUT) is boom
        assert futures[2].result(RESULT_TIMEOUT) == 2
        st = fn.stats()
        assert (st.completed, st.failed) == (3, 1)   # HOLD and two good slots; one failed
    finally:
        fn.close(timeout=5)


def test_faulty_batches_interleaved_with_good_ones() -> None:
    """Many batches, some faulty: each caller's outcome matches its own batch."""
    seen: list[tuple[list[Any], str]] = []
    lock = threading.Lock()
    kinds = sorted(BAD_OUTPUTS) + sorted(RAISED)

    def handler(batch: list[Any]) -> Any:
        bad = [x[0] for x in batch if isinstance(x, tuple)]
        with lock:
            seen.append((list(batch), bad[0] if bad else ""))
        if not bad:
            return [x * 2 for x in batch]
        kind = bad[0]
        if kind in RAISED:
            raise RAISED[kind]()
        return BAD_OUTPUTS[kind](batch)

    # With a backlog, batches are taken full: [good, good, marker], [good, good, good], ...
    inputs: list[Any] = []
    for i, kind in enumerate(kinds * 2):
        inputs.extend([i * 10, i * 10 + 1, (kind, i), i * 10 + 2, i * 10 + 3, i * 10 + 4])
    hold = Hold(handler)
    with batched_fn(hold, max_batch_size=3, max_delay=0.0005) as fn:
        pinned = hold.pin(fn)
        futures = [fn.submit(x) for x in inputs]
        hold.release()
        _, not_done = wait(futures + [pinned], timeout=RESULT_TIMEOUT)
        assert not not_done, f"{len(not_done)} of {len(futures)} callers never got an outcome"
        outcomes = []
        for x, fut in zip(inputs, futures):
            exc = fut.exception(RESULT_TIMEOUT)
            outcomes.append((x, exc, None if exc else fut.result()))
    batch_of = {}
    for batch, bad in seen:
        for x in batch:
            assert x not in batch_of, f"input {x!r} ran in two batches"
            batch_of[x] = bad
    for x, exc, result in outcomes:
        if isinstance(x, tuple):
            continue   # a marker: its outcome is checked like its batch-mates'
        bad = batch_of[x]
        if bad:
            assert exc is not None, f"{x} in a faulty batch ({bad}) got a result"
        else:
            assert exc is None and result == x * 2, (x, exc, result)
    assert fn.stats().completed + fn.stats().failed == len(inputs) + 1   # and HOLD


def test_stopiteration_from_the_handler_reaches_asyncio_callers(run_async):
    # asyncio refuses StopIteration as a future's exception; the callers of that
    # batch (and of batches drained with it) must still get an outcome.
    def handler(batch):
        if "boom" in batch:
            raise StopIteration("empty iterator inside the handler")
        return batch

    f = batched_fn(handler, max_batch_size=8, max_delay=0.05)

    async def main():
        tasks = [asyncio.ensure_future(f.acall(x, timeout=0.5)) for x in ("ok1", "boom", "ok2")]
        done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending
        return [t.exception() for t in tasks]

    errors = run_async(main())
    for err in errors:
        assert isinstance(err, BatchedFnError) and isinstance(err.__cause__, StopIteration)
        assert str(err) == "handler raised StopIteration"   # the blocking callers' text (one builder)
    assert run_async(f.acall("after")) == "after"
    f.close()
