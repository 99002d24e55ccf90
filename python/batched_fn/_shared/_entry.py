"""How a remote request enters the model process's BatchedFn.

The fast way hands the core's ``Channel.submit_future`` a small waiter
object instead of a ``concurrent.futures.Future`` (the core only calls its
``cancelled``, ``set_result`` and ``set_exception``), and keeps deadlines in
the owner's I/O thread.  If the BatchedFn lacks the attributes that needs,
the public ``BatchedFn.submit`` is used instead: same outcomes, slower.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import Future
from typing import Any, Callable

from .._batchcore import monotonic_ns

__all__ = ["Waiter", "Entry"]

_TIMEOUT_MESSAGE = "request not taken into a batch before its timeout"


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
    """Submits waiters into one BatchedFn; withdraws and expires them."""

    def __init__(self, bf: Any) -> None:
        self.bf = bf
        self.fast = all(hasattr(bf, a) for a in ("_chan", "_cost", "_cost_of", "_started", "_ensure_started"))
        # A core that takes the on_full policy per call leaves the deadlines of
        # future-kind requests to the caller (kept here); one that holds the
        # policy itself also arms and enforces their deadlines.
        self.policy_per_call = hasattr(bf, "_policy")
        self._lock = threading.Lock()   # guards _heap (the I/O and the on_full='block' threads add)
        self._heap: list[tuple[int, int, Waiter]] = []
        self._seq = itertools.count()

    def submit(self, waiter: Waiter, value: Any, timeout: float | None, policy: int | None = None) -> bool:
        """Queue value for waiter; raise Full, Closed or a cost error at once.

        Returns True when a deadline was added that may be the earliest.
        """
        bf = self.bf
        if not self.fast:
            fut = bf.submit(value, timeout=timeout)
            waiter.future = fut
            fut.add_done_callback(lambda f: _forward(waiter, f))
            return False
        if not bf._started:
            bf._ensure_started()
        cost = 0.0 if bf._cost is None else bf._cost_of(value)
        if not self.policy_per_call:
            waiter.request = bf._chan.submit_future(value, waiter, timeout, cost)
            return False
        waiter.request = bf._chan.submit_future(value, waiter, timeout, cost,
                                                bf._policy if policy is None else policy)
        if timeout is None:
            return False
        with self._lock:
            heapq.heappush(self._heap, (waiter.request.deadline_ns, next(self._seq), waiter))
            return self._heap[0][2] is waiter

    def withdraw(self, waiter: Waiter) -> None:
        """The caller gave up: withdraw the request if still queued, discard its outcome."""
        waiter.withdrawn = True
        if waiter.future is not None:
            waiter.future.cancel()
        elif waiter.request is not None:
            self.bf._chan.cancel(waiter.request)

    def expire_due(self) -> float | None:
        """Fail the requests whose deadline passed; seconds until the next one (None: none)."""
        if not self._heap:
            return None
        now = monotonic_ns()
        due = []
        with self._lock:
            heap = self._heap
            while heap and heap[0][0] <= now:
                due.append(heapq.heappop(heap)[2])
            nxt = heap[0][0] if heap else None
        chan = self.bf._chan
        for waiter in due:
            if not waiter.withdrawn and chan.expire(waiter.request):
                waiter.on_error(waiter, TimeoutError(_TIMEOUT_MESSAGE))
        return None if nxt is None else max(0.0, (nxt - now) * 1e-9)


def _forward(waiter: Waiter, fut: "Future[Any]") -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None:
        waiter.on_error(waiter, exc)
    else:
        waiter.on_result(waiter, fut.result())
