"""The public face: :func:`batched_fn` and :class:`BatchedFn`.

Thread safety (with or without a GIL): ``BatchedFn._lock`` guards the
workers list, ``_started`` and ``_closed`` (read without it on the call path:
a stale ``_started`` only sends a caller to take the lock); ``_worker_ids`` is
a set changed by single atomic operations; ``_LIVE`` is changed and copied
under ``_LIVE_LOCK``; everything a call touches after that is the core's
(see src/batchcore).
"""

from __future__ import annotations

import asyncio
import atexit
import math
import numbers
import os
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Generic, Literal, Mapping, Sequence, TypeVar, overload

from ._batchcore import Channel, OnFull
from ._config import Config, check_timeout
from ._admission import wake_room
from ._deadlines import reset_after_fork
from ._errors import no_room_error
from ._stats import BatchInfo, Recorder, Stats
from ._worker import Worker, handler_reference
from .errors import BatchedFnError, Failed

__all__ = ["BatchedFn", "batched_fn"]

In = TypeVar("In")
Out = TypeVar("Out")

#: every BatchedFn alive, so interpreter exit and fork can reach them
_LIVE: "weakref.WeakSet[BatchedFn[Any, Any]]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
#: close batches early so queued requests meet their deadlines (tests switch it off)
_DEADLINE_AWARE = True


class BatchedFn(Generic[In, Out]):
    """A function of one input that runs its handler on batches of inputs.

    Call it from any thread (``f(x)``), from asyncio (``await f.acall(x)``) or
    get a Future (``f.submit(x)``).  Workers start on the first call, or at
    :meth:`start`.  Build one with :func:`batched_fn`.
    """

    def __init__(self, handler: Callable[..., Sequence[Out | Failed]], config: Config) -> None:
        if not callable(handler):
            raise TypeError(f"invalid handler value: expected a callable (got {handler!r})")
        self.handler = handler
        self.config = config
        self.__name__ = getattr(handler, "__name__", "batched_fn")
        self.__doc__ = getattr(handler, "__doc__", None)
        self._block = config.on_full == "block"
        self._cost = config.cost
        self._max_cost = config.max_batch_cost
        self._new_channel()
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _new_channel(self) -> None:
        c = self.config
        self._chan = Channel(c.channel_cap or 0, c.max_batch_size, c.max_delay, c.max_batch_cost or 0.0,
                             _DEADLINE_AWARE, on_full=OnFull[c.on_full.upper()], auto_max_delay=c.auto_max_delay)
        self._recorder = Recorder(c.on_batch)
        self._lock = threading.Lock()      # guards _workers, _started, _closed
        self._collect_lock = threading.Lock() if c.num_workers > 1 else None
        self._workers: list[Worker] = []
        #: thread ids of the running workers (a blocking call from one of them would wait for itself)
        self._worker_ids: set[int] = set()
        self._started = False
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "BatchedFn[In, Out]":
        """Start the workers now and build their contexts (warm-up); return self.

        Waits until every context is built.  Raises Closed (with the factory's
        exception as ``__cause__``) if one failed, or if already closed.
        """
        self._ensure_started()
        for worker in self._workers:
            worker.ready.wait()
        for worker in self._workers:
            if worker.error is not None:
                raise self._chan.closed_error()   # carries the factory's exception as __cause__
        return self

    def _ensure_started(self) -> None:
        with self._lock:
            if self._closed:
                raise self._chan.closed_error()
            if self._started:
                return
            # Workers refer to a bound-method handler weakly: an object that
            # holds its own batched function stays collectable.
            handler = handler_reference(self.handler)
            # After a failed start, the workers that did start are kept and
            # only the missing ones are started.
            for i in range(len(self._workers), self.config.num_workers):
                worker = Worker(i, self._chan, handler, self.config.context, self._collect_lock,
                                self._recorder, self._worker_ids, self.__name__)
                worker.start()
                self._workers.append(worker)
            self._started = True

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting calls, finish what is queued, and join the workers.

        Idempotent; safe from any thread, from inside the handler (which is not
        joined) and concurrently with :meth:`start`.  timeout bounds the join.
        """
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        self._chan.close()
        current = threading.current_thread()
        for worker in workers:
            if worker is not current:
                worker.join(timeout)
        owner = getattr(self, "_share_owner", None)
        if owner is not None:   # withdraw the name: connected callers get Closed
            owner.withdraw()

    def share(self, name: str, *, max_item_bytes: int = 4 << 20) -> "BatchedFn[In, Out]":
        """Export this function under name to other processes of this user; return self.

        Others call it through ``batched_fn.connect(name)``; see README "Several
        processes".  Raises ValueError if name is invalid or shared by a live process.
        """
        from ._shared import share
        self._share_owner = share(self, name, max_item_bytes=max_item_bytes)
        return self

    def __enter__(self) -> "BatchedFn[In, Out]":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __copy__(self) -> "BatchedFn[In, Out]":
        raise TypeError(f"cannot copy a BatchedFn ({self.__name__}): it owns worker threads and a queue; "
                        "share the object instead")

    def __deepcopy__(self, memo: Any) -> "BatchedFn[In, Out]":
        return self.__copy__()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"cannot pickle a BatchedFn ({self.__name__}): it owns worker threads and a queue")

    def __del__(self) -> None:
        chan = getattr(self, "_chan", None)
        if chan is not None:
            chan.close()   # workers drain what is queued and exit

    @property
    def healthy(self) -> bool:
        """True while every worker runs and calls are accepted."""
        if self._closed or self._chan.is_closed:
            return False
        return all(w.is_alive() and w.error is None for w in self._workers)

    # ------------------------------------------------------------ calls

    def _cost_of(self, value: object) -> float:
        cost = self._cost(value)  # type: ignore[misc]
        number = _real(cost)
        if number is None or not math.isfinite(number) or number < 0:
            raise ValueError(f"invalid cost value: expected a finite number >= 0 (got {cost!r})")
        if number > self._max_cost:  # type: ignore[operator]
            raise ValueError(f"input cost {cost!r} exceeds max_batch_cost {self._max_cost!r}")
        return number

    def __call__(self, value: In, *, timeout: float | None = None) -> Out:
        """Run value through the handler in a batch; block until its output.

        The GIL is released while waiting.  Raises Full (queue at channel_cap),
        Closed, TimeoutError (not taken into a batch within timeout seconds),
        or the handler's exception.
        """
        if not self._started:
            self._ensure_started()
        if threading.get_ident() in self._worker_ids:
            raise BatchedFnError(
                f"re-entrant call: the handler of {self.__name__} called it from its own worker thread, "
                "where a blocking call would wait for itself forever; call the handler's logic directly")
        if timeout is not None:
            timeout = check_timeout(timeout)
        cost = 0.0 if self._cost is None else self._cost_of(value)
        return self._chan.call(value, timeout, cost)

    async def acall(self, value: In, *, timeout: float | None = None) -> Out:
        """``await`` the output for value; never blocks the event loop.

        Cancelling the task withdraws a request not yet in a batch (and
        discards the result of one already in a batch).  Raises like ``__call__``.
        """
        if not self._started:
            self._ensure_started()
        if timeout is not None:
            timeout = check_timeout(timeout)
        cost = 0.0 if self._cost is None else self._cost_of(value)
        if self._block:
            request, fut = await self._admit_when_room(value, timeout, cost)
        else:
            request, fut = self._chan.submit_here(value, timeout, cost)
        try:
            return await fut
        except asyncio.CancelledError:
            self._chan.cancel(request)
            raise

    async def _admit_when_room(self, value: Any, timeout: float | None, cost: float) -> Any:
        """on_full="block" for acall: await the core's room signal, never blocking the loop.

        One deadline covers the wait for room and the wait for a batch.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            request, fut = self._chan.submit_here(value, remaining, cost)
            if request is not None:
                return request, fut
            if deadline is not None and loop.time() >= deadline:
                raise no_room_error()
            # fut is the room signal: set when room may have come, or by the deadline
            handle = None if deadline is None else loop.call_at(deadline, wake_room, fut)
            try:
                await fut
            finally:
                if handle is not None:
                    handle.cancel()

    def submit(self, value: In, *, timeout: float | None = None) -> "Future[Out]":
        """Queue value and return a :class:`concurrent.futures.Future` of its output.

        Cancelling the future withdraws a request not yet in a batch.  With
        timeout, the future fails with TimeoutError if no batch took it in time.
        Full and Closed are raised here, at once.
        """
        if not self._started:
            self._ensure_started()
        if timeout is not None:
            timeout = check_timeout(timeout)
        cost = 0.0 if self._cost is None else self._cost_of(value)
        fut: Future[Out] = Future()
        request = self._chan.submit_future(value, fut, timeout, cost)
        fut.add_done_callback(_cancel_on_cancelled(self._chan, request))
        return fut

    # ------------------------------------------------------------ stats

    def stats(self) -> Stats:
        """A snapshot of the counters; see :class:`Stats`."""
        c = self._chan
        # read together so they add up while other threads call (see Channel.counts)
        submitted, completed, failed, rejected, timed_out, cancelled, queued, running = c.counts()
        batches = c.batches
        mean = c.batched_items / batches if batches else 0.0
        w50, w99, h50, h99 = self._recorder.percentiles()
        return Stats(
            submitted=submitted, completed=completed, failed=failed, rejected=rejected,
            timed_out=timed_out, cancelled=cancelled, batches=batches, queued=queued,
            running=running, mean_batch_size=mean,
            mean_fill=mean / self.config.max_batch_size, batches_by_reason=c.reason_counts(),
            queue_wait_p50=w50, queue_wait_p99=w99, handler_p50=h50, handler_p99=h99,
            mean_delay=self._recorder.mean_delay())

    def add_batch_listener(self, listener: Callable[[BatchInfo], Any]) -> None:
        """Also call listener(BatchInfo) after each batch, like ``on_batch`` (for exporters)."""
        self._recorder.listeners.append(listener)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._started else "new")
        return f"<BatchedFn {self.__name__} {state} max_batch_size={self.config.max_batch_size}>"


def _real(cost: object) -> float | None:
    """cost as a float if it is a real number (numpy scalars too, never a bool), else None."""
    if isinstance(cost, bool) or type(cost).__name__ in ("bool", "bool_"):   # numpy.bool too
        return None
    try:
        if isinstance(cost, numbers.Real):
            return float(cost)
        if hasattr(type(cost), "__index__"):
            return float(cost.__index__())  # type: ignore[attr-defined]
        if hasattr(type(cost), "__float__"):       # Decimal, and other numbers outside numbers.Real
            return float(cost)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        return None
    return None


def _cancel_on_cancelled(chan: Channel, request: Any) -> Callable[["Future[Any]"], None]:
    def on_done(fut: "Future[Any]") -> None:
        if fut.cancelled():
            chan.cancel(request)

    return on_done


@overload
def batched_fn(
    handler: Callable[..., Sequence[Out | Failed]], /, *, max_batch_size: int = ...,
    max_delay: float | Literal["auto"] = ..., auto_max_delay: float | None = ...,
    channel_cap: int | None = ..., num_workers: int = ..., context: Mapping[str, Callable[[], Any]] | None = ...,
    on_full: str = ..., cost: Callable[[Any], float] | None = ..., max_batch_cost: float | None = ...,
    on_batch: Callable[[BatchInfo], Any] | None = ...,
) -> BatchedFn[Any, Out]: ...
@overload
def batched_fn(
    handler: None = None, /, *, max_batch_size: int = ...,
    max_delay: float | Literal["auto"] = ..., auto_max_delay: float | None = ...,
    channel_cap: int | None = ..., num_workers: int = ..., context: Mapping[str, Callable[[], Any]] | None = ...,
    on_full: str = ..., cost: Callable[[Any], float] | None = ..., max_batch_cost: float | None = ...,
    on_batch: Callable[[BatchInfo], Any] | None = ...,
) -> Callable[[Callable[..., Sequence[Out | Failed]]], BatchedFn[Any, Out]]: ...


def batched_fn(
    handler: Callable[..., Sequence[Any]] | None = None,
    /,
    *,
    max_batch_size: int = 32,
    max_delay: float | Literal["auto"] = 0.005,
    auto_max_delay: float | None = None,
    channel_cap: int | None = None,
    num_workers: int = 1,
    context: Mapping[str, Callable[[], Any]] | None = None,
    on_full: str = "reject",
    cost: Callable[[Any], float] | None = None,
    max_batch_cost: float | None = None,
    on_batch: Callable[[BatchInfo], Any] | None = None,
) -> Any:
    """Make ``handler(batch: list, **context) -> sequence`` callable one input at a time.

    Use as ``batched_fn(handler, **knobs)`` or ``@batched_fn(**knobs)``.

    Args:
        max_batch_size: most inputs in one batch (int >= 1).
        max_delay: seconds a batch waits for more inputs after its first input
            arrived (>= 0; 0 takes what is queued without waiting), or "auto":
            the worker picks each batch's wait from the measured arrival pace
            and handler time (0 when nobody else is coming).
        auto_max_delay: with max_delay="auto", the longest wait (seconds,
            default 0.01); an error with a fixed max_delay.
        channel_cap: most requests queued and not yet in a batch; a call beyond
            it raises Full.  None: no cap of yours (the ring holds 2**20).
        num_workers: worker threads, each with its own context.
        context: name -> factory; each worker calls every factory once, in its
            own thread, and passes the objects to the handler by name.
        on_full: "reject" (Full at once), "block" (wait for room, up to the
            call's timeout) or "drop_oldest" (evict the oldest queued request).
        cost, max_batch_cost: a per-input cost function and a bound on the
            summed cost of a batch (both or neither).
        on_batch: called in the worker with a BatchInfo after each batch.

    Raises:
        TypeError, ValueError: a knob is invalid; the message names it.
    """
    config = Config.build(
        max_batch_size=max_batch_size, max_delay=max_delay, channel_cap=channel_cap, auto_max_delay=auto_max_delay,
        num_workers=num_workers, context=context, on_full=on_full, cost=cost,
        max_batch_cost=max_batch_cost, on_batch=on_batch)
    if handler is None:
        return lambda fn: BatchedFn(fn, config)
    return BatchedFn(handler, config)


# Interpreter exit: refuse new calls and let workers finish what is queued,
# without waiting long for a handler that may never return.
_EXIT_JOIN_SECONDS = 2.0


@atexit.register
def _close_all_at_exit() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for bf in live:
        if not bf._closed:   # one closed already was joined (or given up on) by its owner
            bf.close(timeout=_EXIT_JOIN_SECONDS)


def _after_fork_in_child() -> None:
    # The workers did not survive the fork and their locks may be held by
    # threads that no longer exist: start afresh; workers restart on the next
    # call.  Requests queued by the parent's threads belong to the parent.
    global _LIVE_LOCK
    _LIVE_LOCK = threading.Lock()   # a parent's thread may have held it at the fork
    for bf in list(_LIVE):
        closed = bf._closed
        bf._new_channel()
        if closed:
            bf._closed = True
            bf._chan.close()
    reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
