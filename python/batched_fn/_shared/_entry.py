"""How a remote request enters the model process's BatchedFn.

The fast way hands the core's ``Channel.submit_future`` a small waiter
object instead of a ``concurrent.futures.Future`` (the core only calls its
``cancelled``, ``done``, ``set_result`` and ``set_exception``); the core arms
the request's deadline and delivers its TimeoutError like any other outcome.
If the BatchedFn lacks the attributes that needs, the public
``BatchedFn.submit`` is used instead: same outcomes, slower.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable

__all__ = ["Waiter", "Entry"]


class Waiter:
    """One remote request in the model process; the core reports its outcome here."""

    __slots__ = ("conn", "rid", "request", "future", "withdrawn", "finished", "on_result", "on_error")

    def __init__(self, conn: Any, rid: int, on_result: Callable[["Waiter", Any], None],
                 on_error: Callable[["Waiter", BaseException], None]) -> None:
        self.conn = conn
        self.rid = rid
        self.request: Any = None            # the core's Request (fast way)
        self.future: Future[Any] | None = None   # the public way's future
        self.withdrawn = False
        self.finished = False
        self.on_result = on_result
        self.on_error = on_error

    # the part of the concurrent Future interface the core uses
    def cancelled(self) -> bool:
        return self.withdrawn

    def done(self) -> bool:
        return self.withdrawn or self.finished

    def set_result(self, value: Any) -> None:
        self.finished = True
        self.on_result(self, value)

    def set_exception(self, exc: BaseException) -> None:
        self.finished = True
        self.on_error(self, exc)


class Entry:
    """Submits waiters into one BatchedFn, and withdraws them."""

    def __init__(self, bf: Any) -> None:
        self.bf = bf
        self.fast = all(hasattr(bf, a) for a in ("_chan", "_cost", "_cost_of", "_started", "_ensure_started"))

    def submit(self, waiter: Waiter, value: Any, timeout: float | None, priority: int = 0) -> None:
        """Queue value for waiter; raise Full, Closed or a cost error at once."""
        bf = self.bf
        if not self.fast:
            fut = bf.submit(value, timeout=timeout, priority=priority) if priority else bf.submit(
                value, timeout=timeout)
            waiter.future = fut
            fut.add_done_callback(lambda f: _forward(waiter, f))
            return
        if not bf._started:
            bf._ensure_started()
        cost = 0.0 if bf._cost is None else bf._cost_of(value)
        waiter.request = bf._chan.submit_future(value, waiter, timeout, cost, priority)

    def withdraw(self, waiter: Waiter) -> None:
        """The caller gave up: withdraw the request if still queued, discard its outcome."""
        waiter.withdrawn = True
        if waiter.future is not None:
            waiter.future.cancel()
        elif waiter.request is not None:
            self.bf._chan.cancel(waiter.request)


def _forward(waiter: Waiter, fut: "Future[Any]") -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        waiter.on_error(waiter, exc)
    else:
        waiter.on_result(waiter, fut.result())
