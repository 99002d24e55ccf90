"""Where a request's time goes: :class:`Timings` (the recent requests, by part) and :class:`GcPauses`.

Both feed ``/stats`` (``latency`` and ``gc``), which ``benchmarks/bench_servers.py``
reads after each run, so that a tail has a name.
"""

from __future__ import annotations

import gc
import sys
import time
from collections import deque
from typing import Any

__all__ = ["Timings", "GcPauses"]


class Timings:
    """The recent requests' latency, by part, in seconds (the last ``window`` requests of this process).

    ``queue``: from the call until its batch's handler started (the wait for
    more inputs, for a free worker, and with ``--workers`` the trip to the
    model process); ``batch``: the handler's run; ``deliver``: from the
    handler's end until the awaiting request resumed; ``http``: the rest of
    the time this process spent on the request (reading, parsing, checking,
    writing the answer).  The time before the server read the request (in
    the kernel's and the HTTP parser's hands) is in none of them.
    """

    PARTS = ("queue", "batch", "deliver", "http", "server")

    def __init__(self, window: int = 4096) -> None:
        self.parts: dict[str, deque[float]] = {part: deque(maxlen=window) for part in self.PARTS}

    def model(self, called: float, started: float, finished: float, returned: float) -> None:
        """Record the model's side of one call (``time.perf_counter`` readings, one clock in every process)."""
        parts = self.parts
        parts["queue"].append(started - called)
        parts["batch"].append(finished - started)
        parts["deliver"].append(returned - finished)

    def http(self, total: float, in_call: float) -> None:
        """Record one answered request: total seconds in this process, in_call of them in the model call."""
        self.parts["server"].append(total)
        self.parts["http"].append(total - in_call)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per part: ``count``, ``mean_ms``, ``p50_ms``, ``p99_ms``."""
        out: dict[str, dict[str, float]] = {}
        for part, values in self.parts.items():
            ordered = sorted(values)
            n = len(ordered)
            out[part] = {
                "count": n,
                "mean_ms": 1000.0 * sum(ordered) / n if n else 0.0,
                "p50_ms": 1000.0 * ordered[min(n - 1, n // 2)] if n else 0.0,
                "p99_ms": 1000.0 * ordered[min(n - 1, int(0.99 * n))] if n else 0.0,
            }
        return out



class GcPauses:
    """The garbage collector's passes in this process since ``start()``: count, total and longest pause, per generation.

    A callback in ``gc.callbacks`` reads the clock at the start and the end
    of each pass (two clock reads per pass, nothing per request).
    """

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._began = 0.0

    def start(self) -> None:
        """Begin counting (idempotent)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        """Stop counting."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        took = time.perf_counter() - self._began
        generation = info["generation"]
        self.count[generation] += 1
        self.total[generation] += took
        if took > self.longest[generation]:
            self.longest[generation] = took

    def summary(self) -> dict[str, Any]:
        """``collections``, ``total_ms`` and ``longest_ms`` per generation, what is frozen, the thresholds,
        and the GIL's switch interval (the other knob of this process's tail, ``--switch-interval``)."""
        return {"collections": list(self.count),
                "total_ms": [round(1000.0 * t, 3) for t in self.total],
                "longest_ms": [round(1000.0 * t, 3) for t in self.longest],
                "frozen_objects": gc.get_freeze_count(),
                "thresholds": list(gc.get_threshold()),
                "switch_interval": sys.getswitchinterval()}
