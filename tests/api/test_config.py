"""Every invalid knob is refused at construction, naming it; odd inputs pass through untouched."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest

from batched_fn import batched_fn
from helpers import identity

NAN, INF = math.nan, math.inf

# (knob, bad value, expected exception type)
BAD_KNOBS: list[tuple[str, Any, type]] = []
for _knob in ("max_batch_size", "num_workers", "channel_cap"):
    BAD_KNOBS += [(_knob, 0, ValueError), (_knob, -1, ValueError), (_knob, True, TypeError),
                  (_knob, False, TypeError), (_knob, 2.0, TypeError), (_knob, NAN, TypeError),
                  (_knob, INF, TypeError), (_knob, "4", TypeError), (_knob, [4], TypeError)]
BAD_KNOBS += [("max_batch_size", None, TypeError), ("num_workers", None, TypeError)]
BAD_KNOBS += [("max_delay", v, ValueError) for v in (-0.001, -1, NAN, INF, -INF)]
BAD_KNOBS += [("max_delay", v, TypeError) for v in (True, False, None, [0.1], 1j)]
BAD_KNOBS += [("max_delay", v, ValueError) for v in ("0.1", "Auto", "")]   # strings: only "auto"
BAD_KNOBS += [("context", v, TypeError) for v in ([("model", dict)], "model", 3)]
BAD_KNOBS += [("context", {"not an identifier": dict}, ValueError), ("context", {1: dict}, ValueError),
              ("context", {"model": 42}, TypeError), ("context", {"model": None}, TypeError)]
BAD_KNOBS += [("on_full", v, ValueError) for v in ("", "Reject", "wait", None, 0, True)]
BAD_KNOBS += [("on_batch", v, TypeError) for v in (1, "log", True)]


@pytest.mark.parametrize(("knob", "value", "exc"), BAD_KNOBS, ids=lambda v: repr(v)[:20])
def test_invalid_knob_is_rejected_naming_it(knob: str, value: Any, exc: type) -> None:
    with pytest.raises(exc) as info:
        batched_fn(identity, **{knob: value})
    message = str(info.value)
    assert knob in message, message
    assert message[0].islower(), message
    if knob != "context":
        assert repr(value) in message, message


@pytest.mark.parametrize(("cost", "bound", "exc"), [
    (len, None, ValueError), (None, 10, ValueError), ("len", 10, TypeError),
    (len, 0, ValueError), (len, -1, ValueError), (len, NAN, ValueError), (len, INF, ValueError),
    (len, True, TypeError), (len, "10", TypeError),
])
def test_invalid_cost_knobs_are_rejected(cost: Any, bound: Any, exc: type) -> None:
    with pytest.raises(exc, match="cost"):
        batched_fn(identity, cost=cost, max_batch_cost=bound)


def test_decorator_form_validates_before_the_handler_is_seen() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        batched_fn(max_batch_size=0)
    with pytest.raises(TypeError, match="handler"):
        batched_fn(max_batch_size=1)(42)


# Values past what the core can hold: accepted and working, or refused naming the knob.
@pytest.mark.parametrize(("knob", "value"), [
    ("max_batch_size", 2 ** 64), ("max_batch_size", 10 ** 12), ("max_batch_size", 2 ** 33),
    ("num_workers", 10 ** 9), ("channel_cap", 2 ** 40),
], ids=repr)
def test_huge_knob_works_or_is_refused_naming_it(knob: str, value: int) -> None:
    try:
        fn = batched_fn(identity, **{knob: value})
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        assert knob in str(exc), f"{type(exc).__name__}: {exc}"
        return
    if knob == "num_workers":
        fn.close()   # starting 10**9 threads is the user's call; construction must not start them
        return
    try:
        assert fn(5, timeout=5) == 5
    finally:
        fn.close(timeout=5)


def test_huge_max_delay_is_refused_or_honoured() -> None:
    """max_delay=1e300 must not silently turn into max_delay=0."""
    seen: list[int] = []
    try:
        fn = batched_fn(lambda b: (seen.append(len(b)), b)[1], max_batch_size=3, max_delay=1e300)
    except ValueError as exc:
        assert "max_delay" in str(exc)
        return
    try:
        first = fn.submit(1)
        done = threading.Event()
        first.add_done_callback(lambda _: done.set())
        # A batch may not run before it is full while its first item has waited < max_delay.
        assert not done.wait(0.3), f"batch dispatched after 0.3s with max_delay=1e300: sizes {seen}"
        rest = [fn.submit(i) for i in (2, 3)]
        assert [f.result(5) for f in [first] + rest] == [1, 2, 3]
        assert seen == [3]
    finally:
        fn.close(timeout=5)


@pytest.mark.parametrize("timeout", [-1, -0.001, NAN, INF, True, "1", [1]], ids=repr)
def test_invalid_call_timeout_is_rejected_before_queueing(timeout: Any, run_async: Any) -> None:
    with batched_fn(identity, max_batch_size=2, max_delay=0) as fn:
        for call in (lambda: fn(1, timeout=timeout), lambda: fn.submit(1, timeout=timeout),
                     lambda: run_async(fn.acall(1, timeout=timeout))):
            with pytest.raises((ValueError, TypeError), match="timeout"):
                call()
        assert fn.stats().submitted == 0
        assert fn(3, timeout=0.5) == 3


def test_huge_timeout_means_wait() -> None:
    with batched_fn(identity, max_batch_size=2, max_delay=0) as fn:
        assert fn(1, timeout=1e300) == 1
        assert fn.submit(2, timeout=1e10).result(5) == 2
        assert fn.stats().timed_out == 0


class Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("inputs must never be compared")

    def __bool__(self) -> bool:
        raise RuntimeError("inputs must never be truth-tested")

    def __len__(self) -> int:
        raise RuntimeError("inputs must never be measured")


def _odd_inputs() -> list[Any]:
    def gen():
        yield 1
    return [None, NAN, [], {}, {"a": [1]}, {1, 2}, bytearray(b"x"), b"\0" * (16 << 20),
            "é" * 100_000, Unhashable(), gen(), ValueError("an input, not an error"), identity,
            type, Ellipsis, NotImplemented, 10 ** 1000, -0.0, 1j, memoryview(b"abc"), object()]


def test_odd_inputs_pass_through_untouched() -> None:
    inputs = _odd_inputs()
    received: list[Any] = []

    def handler(batch: list[Any]) -> list[Any]:
        received.extend(batch)
        return [("out", id(x)) for x in batch]

    with batched_fn(handler, max_batch_size=4, max_delay=0.001) as fn:
        futures = [fn.submit(x) for x in inputs]
        assert [f.result(5) for f in futures] == [("out", id(x)) for x in inputs]
        assert [fn(x) for x in inputs[:3]] == [("out", id(x)) for x in inputs[:3]]
    assert all(a is b for a, b in zip(received, inputs + inputs[:3]))


def test_odd_outputs_reach_their_callers_as_is() -> None:
    outputs = _odd_inputs()

    def handler(batch: list[int]) -> tuple[Any, ...]:
        return tuple(outputs[i] for i in batch)

    with batched_fn(handler, max_batch_size=5, max_delay=0.001) as fn:
        futures = [fn.submit(i) for i in range(len(outputs))]
        got = [f.result(5) for f in futures]
    assert all(a is b for a, b in zip(got, outputs))
