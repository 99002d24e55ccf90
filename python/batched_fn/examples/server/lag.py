"""How far behind its own timers an event loop runs: the age a request has when the app first sees it.

Past its capacity a single HTTP process falls behind: requests wait in the
kernel's socket buffers until the busy event loop reads them, and their
answers wait again for the same loop to write them.  Neither wait is seen by
``timeout=``, which starts when the app reads the request, so the server would
spend its time on requests whose clients have given up.  :class:`LoopLag`
measures that backlog with a timer that is due every ``interval`` seconds:
how late it fires is how long the loop took to come back to it.  A request
read while the loop runs ``lag`` behind has waited about ``lag`` already, will
wait about ``lag`` more for its answer to be written, and the lag moves between
two readings of the timer; so the server takes ``factor * lag`` (4 by default,
``--loop-lag-factor``) off the request's timeout and answers 503 at once when
nothing is left (``embed_response``, and before any app code runs in
``reading``): the requests it sheds cost the loop a third of what an answer
does, so the backlog drains and more of the ones it keeps finish on time.

Thread safety: one timer per event loop, kept per thread (an event loop runs in
one thread), so no state is shared between the threads of the threaded server.
"""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

__all__ = ["LoopLag", "overloaded_message"]


def overloaded_message(lag: float) -> str:
    """The error of a request shed because the event loop runs lag seconds behind (answered 503)."""
    return f"server overloaded: its event loop runs {1000.0 * lag:.0f} ms behind; retry in 1s"


class _Timer:
    """The lag timer of one event loop (used in that loop's thread only)."""

    __slots__ = ("loop", "interval", "lag", "due", "shed", "handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.lag = 0.0
        self.due = 0.0
        self.shed = 0
        self.handle: Any = None
        self._schedule()

    def _schedule(self) -> None:
        self.due = self.loop.time() + self.interval
        self.handle = self.loop.call_at(self.due, self._tick)

    def _tick(self) -> None:
        self.lag = max(0.0, self.loop.time() - self.due)
        self._schedule()

    def now(self) -> float:
        # the last reading, or how overdue the timer is now if more: after a stall the requests
        # read first come before the timer's callback in the loop's turn
        return max(self.lag, self.loop.time() - self.due)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class LoopLag:
    """The running event loop's lag in seconds, measured by a timer started on first use in each loop."""

    def __init__(self, factor: float = 4.0, interval: float = 0.002) -> None:
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"invalid factor value: expected a number > 0 (got {factor!r})")
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"invalid interval value: expected seconds > 0 (got {interval!r})")
        self.factor = factor
        self.interval = interval
        self._local = threading.local()
        self._timers: list[_Timer] = []          # every loop's timer, for stats
        self._timers_lock = threading.Lock()     # guards _timers (threads start their timers at once)

    def _timer(self) -> _Timer:
        loop = asyncio.get_running_loop()
        timer: _Timer | None = getattr(self._local, "timer", None)
        if timer is None or timer.loop is not loop:
            if timer is not None:
                timer.cancel()
            timer = _Timer(loop, self.interval)
            self._local.timer = timer
            with self._timers_lock:
                self._timers = [t for t in self._timers if not t.loop.is_closed()] + [timer]
        return timer

    def behind(self) -> float:
        """factor times the lag: what the loop's backlog takes off the budget of a request read now."""
        return self.factor * self._timer().now()

    def seconds(self) -> float:
        """How late this loop's timer last fired, or is now (0 when the loop keeps up); call on the loop."""
        return self._timer().now()

    def count_shed(self) -> None:
        """Count one request answered 503 because the loop ran too far behind; call on the loop."""
        self._timer().shed += 1

    def summary(self) -> dict[str, Any]:
        """``lag_ms`` of the loop that asks, the worst over this process's loops, and ``shed`` in all."""
        with self._timers_lock:
            timers = list(self._timers)
        try:
            mine = self.seconds()
        except RuntimeError:                     # no running loop
            mine = 0.0
        return {"lag_ms": round(1000.0 * mine, 3),
                "max_lag_ms": round(1000.0 * max((t.now() for t in timers), default=0.0), 3),
                "shed": sum(t.shed for t in timers)}
