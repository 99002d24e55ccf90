"""Per-item outcomes: a handler's Failed(exc) fails only its own caller."""

from __future__ import annotations

import asyncio
import threading

import pytest

from batched_fn import Failed, batched_fn


def test_failed_fails_only_its_own_caller_with_the_same_exception_object():
    errors = {}

    def handler(batch):
        out = []
        for x in batch:
            if x % 2:
                errors[x] = ValueError(f"odd {x}")
                out.append(Failed(errors[x]))
            else:
                out.append(x * 10)
        return out

    f = batched_fn(handler, max_batch_size=64, max_delay=0.005)
    results: dict[int, object] = {}

    def caller(x):
        try:
            results[x] = f(x)
        except ValueError as exc:
            results[x] = exc

    threads = [threading.Thread(target=caller, args=(x,)) for x in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x in range(64):
        if x % 2:
            assert results[x] is errors[x]
        else:
            assert results[x] == x * 10
    s = f.stats()
    assert (s.completed, s.failed) == (32, 32)
    f.close()


def test_failed_keeps_its_traceback():
    def handler(batch):
        try:
            raise KeyError("deep")
        except KeyError as exc:
            return [Failed(exc)]

    with batched_fn(handler) as f:
        with pytest.raises(KeyError) as info:
            f(1)
    assert any(frame.name == "handler" for frame in __import__("traceback").extract_tb(info.value.__traceback__))


def test_failed_of_a_non_exception_is_a_type_error():
    with pytest.raises(TypeError, match=r"Failed\(\) expects an exception instance \(got 'oops'\)"):
        Failed("oops")  # type: ignore[arg-type]


def test_failed_reaches_asyncio_callers(run_async):
    f = batched_fn(lambda b: [Failed(RuntimeError(x)) if x == "bad" else x for x in b], max_delay=0.002)

    async def main():
        good, bad = await asyncio.gather(f.acall("good"), f.acall("bad"), return_exceptions=True)
        assert good == "good"
        assert isinstance(bad, RuntimeError) and bad.args == ("bad",)

    run_async(main())
    f.close()
