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
from typing import Any, Callable, Generic, Hashable, Literal, Mapping, Sequence, TypeVar, overload

from ._batchcore import Channel, OnFull, no_room_error, reset_after_fork, wake_room
from ._buckets import LengthBuckets
from ._config import DEFAULT_MAX_ITEM_BYTES, PRIORITY_AGING, Config, check_priority, check_timeout
from ._stats import BatchInfo, KeyStats, PriorityStats, Recorder, Stats
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
#: the behaviour before deadlines and priorities (arrival order, timeout= bounds
#: only the queue wait, no shedding): functions built while it is set keep it;
#: the goodput benchmark's baseline
_CLASSIC = False


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
        self._share_owner: Any = None   # the _shared.Owner while shared under a name
        self._batch_key = config.batch_key
        #: length_buckets() without a length function: the bucket of each input's cost
        self._bucket_cost = (config.batch_key if isinstance(config.batch_key, LengthBuckets)
                             and config.batch_key.length is None else None)
        self._new_channel()
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _new_channel(self) -> None:
        c = self.config
        if not hasattr(self, "_classic"):
            self._classic = _CLASSIC      # kept across a fork's new channel
        self._chan = Channel(c.channel_cap or 0, c.max_batch_size, c.max_delay, c.max_batch_cost or 0.0,
                             _DEADLINE_AWARE, on_full=OnFull[c.on_full.upper()], auto_max_delay=c.auto_max_delay,
                             priority_aging=c.priority_aging or 0.0, classic=self._classic, workers=c.num_workers,
                             max_keys=0 if c.batch_key is None else c.max_keys)
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
        owner = self._share_owner
        if owner is not None:   # withdraw the name: connected callers get Closed
            # From inside the handler the running batch is not over: the name
            # is withdrawn once its replies and the queued remote calls' are out.
            owner.withdraw(wait=threading.get_ident() not in self._worker_ids)

    def share(self, name: str, *, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> "BatchedFn[In, Out]":
        """Export this function under name to other processes of this user; return self.

        Others call it through ``batched_fn.connect(name)``; see README "Several
        processes".  Raises ValueError if name is invalid or shared by a live process.
        """
        from ._shared import share
        owner = self._share_owner
        if owner is not None and not owner.withdrawn:
            raise ValueError(f"this function is already shared as {owner.name!r}")
        self._share_owner = share(self._remote_entry(), name, max_item_bytes=max_item_bytes)
        return self

    def _remote_entry(self) -> "RemoteEntry":
        """The one internal entry through which cross-process sharing uses this function."""
        return RemoteEntry(self)

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

    def _key_of(self, value: object, cost: float = 0.0) -> object:
        """value's batch key; the key function's own exception propagates (this call fails)."""
        if self._bucket_cost is not None:
            return self._bucket_cost.bucket(cost)
        return check_key(self._batch_key(value))  # type: ignore[misc]

    def __call__(self, value: In, *, timeout: float | None = None, priority: int = 0) -> Out:
        """Run value through the handler in a batch; block until its output.

        The GIL is released while waiting.  timeout bounds the whole wait,
        queued and inside a running batch (seconds; None: no bound).
        priority: an int, higher served first (see README "Deadlines and
        priorities").  Raises Full (queue at channel_cap, or shed because by
        the estimate it could not finish in time; ``retry_after`` says when to
        retry), Closed, TimeoutError (no output within timeout seconds), the
        handler's exception, TypeError/ValueError for a bad timeout or priority.
        """
        if not self._started:
            self._ensure_started()
        if threading.get_ident() in self._worker_ids:
            raise BatchedFnError(
                f"re-entrant call: the handler of {self.__name__} called it from its own worker thread, "
                "where a blocking call would wait for itself forever; call the handler's logic directly")
        if timeout is not None:
            timeout = check_timeout(timeout)
        if priority.__class__ is not int or priority:
            priority = check_priority(priority)
        cost = 0.0 if self._cost is None else self._cost_of(value)
        key = None if self._batch_key is None else self._key_of(value, cost)
        return self._chan.call(value, timeout, cost, priority, key)

    async def acall(self, value: In, *, timeout: float | None = None, priority: int = 0) -> Out:
        """``await`` the output for value; never blocks the event loop.

        timeout and priority as for ``__call__``.  Cancelling the task
        withdraws a request not yet in a batch (and discards the result of one
        already in a batch).  Raises like ``__call__``.
        """
        if not self._started:
            self._ensure_started()
        if timeout is not None:
            timeout = check_timeout(timeout)
        if priority.__class__ is not int or priority:
            priority = check_priority(priority)
        cost = 0.0 if self._cost is None else self._cost_of(value)
        key = None if self._batch_key is None else self._key_of(value, cost)
        if self._block:
            request, fut = await self._admit_when_room(value, timeout, cost, priority, key)
        else:
            request, fut = self._chan.submit_here(value, timeout, cost, priority, key)
        try:
            return await fut
        except asyncio.CancelledError:
            self._chan.cancel(request)
            raise
        finally:
            # A failed call's exception carries this frame in its traceback, and
            # fut holds the exception: dropping fut here leaves no reference cycle.
            del fut, request

    async def _admit_when_room(self, value: Any, timeout: float | None, cost: float, priority: int,
                               key: Any = None) -> Any:
        """on_full="block" for acall: await the core's room signal, never blocking the loop.

        One deadline covers the wait for room and the wait for a batch.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            request, fut = self._chan.submit_here(value, remaining, cost, priority, key)
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

    def submit(self, value: In, *, timeout: float | None = None, priority: int = 0) -> "Future[Out]":
        """Queue value and return a :class:`concurrent.futures.Future` of its output.

        Cancelling the future withdraws a request not yet in a batch.  With
        timeout, the future fails with TimeoutError if no output came within
        timeout seconds (queued or inside a running batch).  priority as for
        ``__call__``.  Full and Closed are raised here, at once.
        """
        if not self._started:
            self._ensure_started()
        if timeout is not None:
            timeout = check_timeout(timeout)
        if priority.__class__ is not int or priority:
            priority = check_priority(priority)
        cost = 0.0 if self._cost is None else self._cost_of(value)
        key = None if self._batch_key is None else self._key_of(value, cost)
        fut: Future[Out] = Future()
        request = self._chan.submit_future(value, fut, timeout, cost, priority, key)
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
            mean_delay=self._recorder.mean_delay(), late=c.late, expired=c.expired, shed=c.shed,
            by_priority={p: PriorityStats(*counts) for p, counts in c.outcomes_by_priority().items()},
            by_key=_key_stats(c.key_counters()))

    def add_batch_listener(self, listener: Callable[[BatchInfo], Any]) -> None:
        """Also call listener(BatchInfo) after each batch, like ``on_batch`` (for exporters)."""
        self._recorder.listeners.append(listener)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._started else "new")
        return f"<BatchedFn {self.__name__} {state} max_batch_size={self.config.max_batch_size}>"


class RemoteEntry:
    """What cross-process sharing (``_shared``) may do with one BatchedFn, and nothing more.

    The model process's owner submits remote calls with a waiter object of
    its own (the core calls its ``cancelled``, ``done``, ``set_result`` and
    ``set_exception``), withdraws them, listens for batches and reads stats;
    it never touches the BatchedFn's attributes.
    """

    __slots__ = ("_bf",)

    def __init__(self, bf: BatchedFn[Any, Any]) -> None:
        self._bf = bf

    @property
    def name(self) -> str:
        """The handler's name, for log lines and thread names."""
        return self._bf.__name__

    @property
    def waits_for_room(self) -> bool:
        """True with on_full="block": :meth:`submit` raises Full and the caller waits for room itself."""
        return self._bf._block

    def submit(self, value: Any, waiter: Any, timeout: float | None, priority: int = 0) -> Any:
        """Queue value at priority; its outcome goes to waiter.  Return the request (for :meth:`cancel`).

        Raises Full (also when shed), Closed or a cost error at once; never waits for room.
        """
        bf = self._bf
        if not bf._started:
            bf._ensure_started()
        cost = 0.0 if bf._cost is None else bf._cost_of(value)
        key = None if bf._batch_key is None else bf._key_of(value, cost)   # computed in the model process
        return bf._chan.submit_future(value, waiter, timeout, cost, priority, key, False)

    def cancel(self, request: Any) -> None:
        """Withdraw request if still queued (counted as cancelled); a result in a batch is discarded."""
        self._bf._chan.cancel(request)

    def add_batch_listener(self, listener: Callable[[BatchInfo], Any]) -> None:
        """Call listener(BatchInfo) in the worker after each batch."""
        self._bf.add_batch_listener(listener)

    def stats(self) -> Stats:
        """The function's :meth:`BatchedFn.stats`."""
        return self._bf.stats()

    @property
    def healthy(self) -> bool:
        """The function's :attr:`BatchedFn.healthy`."""
        return self._bf.healthy


def check_key(key: object) -> object:
    """key itself if it is hashable, else TypeError naming its type."""
    try:
        hash(key)
    except TypeError:
        raise TypeError(f"invalid batch key: batch_key returned an unhashable {type(key).__name__!r} "
                        f"(got {key!r:.60}); return a hashable value such as a str, int or tuple") from None
    return key


def _key_stats(counters: Mapping[Any, tuple[int, int, int, int]]) -> dict[Any, KeyStats]:
    return {key: KeyStats(submitted=s, batches=b, batched_items=n, queued=q,
                          mean_batch_size=n / b if b else 0.0)
            for key, (s, b, n, q) in counters.items()}


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
    batch_key: Callable[[Any], Hashable] | None = ..., max_keys: int | None = ...,
    priority_aging: float | None = ...,
) -> BatchedFn[Any, Out]: ...
@overload
def batched_fn(
    handler: None = None, /, *, max_batch_size: int = ...,
    max_delay: float | Literal["auto"] = ..., auto_max_delay: float | None = ...,
    channel_cap: int | None = ..., num_workers: int = ..., context: Mapping[str, Callable[[], Any]] | None = ...,
    on_full: str = ..., cost: Callable[[Any], float] | None = ..., max_batch_cost: float | None = ...,
    on_batch: Callable[[BatchInfo], Any] | None = ...,
    batch_key: Callable[[Any], Hashable] | None = ..., max_keys: int | None = ...,
    priority_aging: float | None = ...,
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
    batch_key: Callable[[Any], Hashable] | None = None,
    max_keys: int | None = None,
    priority_aging: float | None = PRIORITY_AGING,
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
        batch_key: a function of one input returning a hashable key; inputs
            with different keys never share a batch.  Each key forms its own
            batches (max_batch_size, max_batch_cost, and max_delay from its
            first waiting input); the worker serves the key whose oldest input
            is oldest, and a key with a full batch at once.  Computed in the
            caller at submit: its exception fails that call only; an
            unhashable key raises TypeError.  See :func:`length_buckets`.
        max_keys: with batch_key, the most keys with inputs queued at once
            (default 1024); a call with a new key beyond it raises Full.  A
            key with nothing queued is forgotten.
        priority_aging: seconds of waiting that count as one priority level
            (> 0, default 1.0), so a call of lower priority waits at most
            about (difference in priority) x priority_aging behind a steady
            stream of higher ones; None: strict priority (it may starve).

    Raises:
        TypeError, ValueError: a knob is invalid; the message names it.
    """
    config = Config.build(
        max_batch_size=max_batch_size, max_delay=max_delay, channel_cap=channel_cap, auto_max_delay=auto_max_delay,
        num_workers=num_workers, context=context, on_full=on_full, cost=cost,
        max_batch_cost=max_batch_cost, on_batch=on_batch, batch_key=batch_key, max_keys=max_keys,
        priority_aging=priority_aging)
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
