# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled core of batched_fn: requests, the channel and the collector.

A :class:`Request` is one call.  A :class:`Channel` moves requests from callers
to workers through the lock-free ring of ring.h and assembles batches
(:meth:`Channel.collect`) while sleeping with the GIL released.  Nothing here
knows about handlers or event loops beyond "set this future".

Ownership: the ring holds one strong reference per queued request, taken with
the GIL held by the producer (``Py_INCREF`` before the push) and given up by
the consumer that popped it.  A speculative read of a cell never touches a
reference count (STYLE rule 5).
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int64_t, uint32_t, INT64_MAX
from libc.stdlib cimport calloc, free, malloc

from atomics cimport (
    bc_atomic_size, bc_atomic_u32,
    bc_load_relaxed, bc_fetch_add_seq_cst, bc_fetch_sub_seq_cst,
    bc_load_u32_acquire, bc_load_u32_relaxed, bc_load_u32_seq_cst,
    bc_store_u32_release, bc_store_u32_seq_cst,
    bc_fetch_add_u32_seq_cst, bc_fetch_sub_u32_seq_cst, bc_cas_u32_acq_rel,
    bc_fence_seq_cst, BC_LIKELY, BC_UNLIKELY,
)
from ring cimport (
    bc_ring, bc_ring_new, bc_ring_free, bc_ring_push, bc_ring_pop,
    bc_ring_round_up, bc_ring_capacity, bc_ring_valid,
)
from park cimport (
    BC_PARK_TIMEOUT, bc_now_ns, bc_park, bc_park_precise, bc_unpark_one, bc_unpark_all,
    bc_set_timer_slack,
)
from debug cimport BATCHCORE_DEBUG, BATCHCORE_FLAVOUR
from delay cimport bc_delay, bc_delay_init, bc_delay_record, bc_delay_arrival, bc_delay_decide, bc_delay_target

import logging as _logging
from asyncio import get_running_loop as _get_running_loop
from weakref import WeakKeyDictionary as _WeakKeyDictionary, ref as _weakref

from batched_fn._outcome import Failed
from batched_fn.errors import BatchedFnError, Closed, Full, InternalError

_log = _logging.getLogger("batched_fn")

# Request.state: the one word every party agrees on.  Transitions:
#   QUEUED -> TAKEN      by the collector, when the request enters a batch
#   QUEUED -> CANCELLED  by the caller (timeout, task cancelled, Ctrl-C)
#   TAKEN  -> DONE       by the worker, after result/error are written
cdef enum:
    QUEUED = 0
    TAKEN = 1
    CANCELLED = 2
    DONE = 3

# How a caller waits for its request.
cdef enum:
    KIND_BLOCKING = 0   # parks on Request.state
    KIND_ASYNC = 1      # an asyncio future, set in its loop's thread
    KIND_FUTURE = 2     # a concurrent.futures.Future

# Why a batch was dispatched (index into REASONS).
REASONS = ("full", "delay", "drain", "deadline", "close")
cdef enum:
    R_FULL = 0
    R_DELAY = 1
    R_DRAIN = 2
    R_DEADLINE = 3
    R_CLOSE = 4

# A blocking caller wakes at least this often to run signal handlers (Ctrl-C).
cdef int64_t SIGNAL_SLICE_NS = 50_000_000
# channel_cap=None: the ring's fixed size.  Its zeroed pages are committed by
# the OS only as the ring first walks over them (16 bytes a cell).
cdef size_t UNBOUNDED_CAPACITY = 1 << 20
# The collector polls (GIL released) for the last this-many ns of a timed wait
# for max_delay, instead of trusting a late timer wake-up.
cdef int64_t PRECISE_SPIN_NS = 50_000
# Share of the handler-time estimate kept per new sample (an EWMA).
cdef double EST_KEEP = 0.8


# Durations past this many ns (~73 years) are "forever": it keeps every
# `now + duration` far from int64 overflow.
cdef int64_t FOREVER_NS = INT64_MAX // 4


cdef inline int64_t _to_ns(double seconds) noexcept:
    """Seconds (finite, >= 0) to ns, saturating at FOREVER_NS."""
    if seconds * 1e9 >= <double>FOREVER_NS:
        return FOREVER_NS
    return <int64_t>(seconds * 1e9)


#: how this extension was built: "release", "debug", "asan" or "tsan"
BUILD_FLAVOUR = (<bytes>BATCHCORE_FLAVOUR).decode("ascii")


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns, the clock of every arrival time and deadline."""
    return bc_now_ns()


def set_timer_slack(unsigned long ns) -> None:
    """Ask the kernel to wake the calling thread's timed waits within ``ns``."""
    bc_set_timer_slack(ns)


@cython.final
@cython.freelist(64)
cdef class Request:
    """One call: its input, its outcome and how its caller waits."""

    cdef bc_atomic_u32 state     # QUEUED/TAKEN/CANCELLED/DONE; the futex word
    cdef bc_atomic_u32 parked    # 1 while a blocking caller sleeps on state
    cdef readonly object value
    cdef object result
    cdef object error            # an exception for this caller, or None
    cdef object error_tb         # its traceback as the worker saw it
    cdef readonly int64_t arrival_ns
    cdef readonly int64_t deadline_ns   # -1: none
    cdef object __weakref__     # the deadline timer refers to requests weakly
    cdef readonly double cost
    cdef int kind
    cdef object waiter           # asyncio or concurrent future, or None
    cdef object loop


cdef inline Request _new_request(object value, int kind, int64_t deadline_ns, double cost):
    cdef Request req = Request.__new__(Request)
    req.value = value
    req.kind = kind
    req.arrival_ns = bc_now_ns()
    req.deadline_ns = deadline_ns
    req.cost = cost
    return req


cdef class Channel:
    """A bounded queue of requests with a batch collector on the consumer side.

    Producers (callers) never block in :meth:`put`; workers call
    :meth:`collect`, which sleeps with the GIL released until a batch is ready.
    Counters are plain C integers changed only with the GIL held.
    """

    cdef bc_ring *ring
    cdef readonly size_t cap          # most requests queued at once
    cdef readonly Py_ssize_t max_items
    cdef readonly int64_t max_delay_ns   # fixed delay; with auto_delay: auto_max_delay
    cdef readonly bint auto_delay       # max_delay="auto": `delay` picks each batch's wait
    # The adaptive delay policy (delay.h); the GIL guards it (collect and
    # record_handler_time touch it, both with the GIL held).
    cdef bc_delay delay
    cdef readonly double max_cost     # 0: no cost bound
    cdef readonly bint deadline_aware  # close batches early for deadlines

    # Queued and not yet dispatched (in the ring, or held by a forming batch);
    # producers reserve room here before pushing, so the ring itself is
    # never full (cap <= ring capacity).
    cdef bc_atomic_size count
    # Producers between their closed-check and the end of their push; close()
    # waits for it to reach zero so no push lands after the final drain.
    cdef bc_atomic_size inflight
    # 1 once close() began: producers check it after raising inflight.
    cdef bc_atomic_u32 closed
    # Workers sleep on work_epoch; a producer bumps it before waking one.
    cdef bc_atomic_u32 work_epoch
    # Workers parked (or about to park) on work_epoch.
    cdef bc_atomic_u32 sleepers
    # A parked worker is woken once `count` reaches this many (1: it holds no
    # request yet; else max_items, since count includes what it holds).
    cdef bc_atomic_u32 wake_threshold
    # Callers of on_full="block" sleep on space_epoch; bumped after pops.
    cdef bc_atomic_u32 space_epoch
    cdef bc_atomic_u32 space_sleepers

    cdef readonly object close_cause
    cdef Request carry    # popped, did not fit the last batch's cost; next first
    # The batch being formed by collect(): popped, still QUEUED, still counted.
    # A producer with on_full="drop_oldest" may evict from it while the
    # collector sleeps (the GIL guards the list).
    cdef list forming
    cdef int64_t *est_ns  # EWMA of handler ns by batch size (index 1..max_items)

    cdef public unsigned long long submitted, rejected, evicted, timed_out
    cdef public unsigned long long cancelled, completed, failed
    # Withdrawn (timed out, cancelled) but still in the ring or a forming
    # batch: they hold room until a worker drops them, but are not "queued".
    cdef long long withdrawn
    cdef public unsigned long long batches, batched_items
    cdef unsigned long long reasons[5]

    def __cinit__(self, Py_ssize_t cap, Py_ssize_t max_items, object max_delay,
                  double max_cost=0.0, bint deadline_aware=True, double auto_max_delay=0.01):
        cdef size_t capacity
        if cap < 0:
            raise ValueError(f"_batchcore.Channel: cap must be >= 0 (got {cap!r})")
        if cap == 0:
            capacity = UNBOUNDED_CAPACITY
            self.cap = UNBOUNDED_CAPACITY
        else:
            capacity = bc_ring_round_up(<size_t>cap)
            self.cap = <size_t>cap
        self.ring = bc_ring_new(capacity)
        if self.ring == NULL:
            raise MemoryError(f"cannot allocate a ring of {capacity} cells")
        if BATCHCORE_DEBUG and not bc_ring_valid(self.ring):
            raise InternalError("Channel: ring geometry invalid after bc_ring_new")
        self.est_ns = <int64_t *>calloc(<size_t>max_items + 1, sizeof(int64_t))
        if self.est_ns == NULL:
            raise MemoryError()
        self.forming = []
        self.max_items = max_items
        if isinstance(max_delay, str):
            if max_delay != "auto":
                raise ValueError(f"_batchcore.Channel: max_delay must be seconds or 'auto' (got {max_delay!r})")
            self.auto_delay = True
            self.max_delay_ns = _to_ns(auto_max_delay)
            bc_delay_init(&self.delay, self.max_delay_ns)
        else:
            self.max_delay_ns = _to_ns(<double>max_delay)
        self.max_cost = max_cost
        self.deadline_aware = deadline_aware

    def __dealloc__(self):
        cdef void *item
        if self.ring != NULL:
            # Give back the references of requests nobody will take any more.
            while bc_ring_pop(self.ring, &item):
                Py_DECREF(<object>item)
            bc_ring_free(self.ring)
            self.ring = NULL
        free(self.est_ns)

    # ----------------------------------------------------------- producers

    @property
    def queued(self) -> int:
        """Requests queued and not yet taken (approximate while calls run)."""
        cdef long long live = <long long>bc_load_relaxed(&self.count) - self.withdrawn
        return live if live > 0 else 0

    @property
    def is_closed(self) -> bool:
        return bc_load_u32_acquire(&self.closed) != 0

    cdef int _push(self, Request req, bint evict, bint count_reject=True) except -1:
        """Queue req or raise Full/Closed; on evict, fail the oldest queued instead."""
        cdef size_t n
        cdef Request old
        cdef list evicted = None
        bc_fetch_add_seq_cst(&self.inflight, 1)
        if BC_UNLIKELY(bc_load_u32_seq_cst(&self.closed)):
            bc_fetch_sub_seq_cst(&self.inflight, 1)
            raise self._closed_error()
        n = bc_fetch_add_seq_cst(&self.count, 1)
        while BC_UNLIKELY(n >= self.cap):
            bc_fetch_sub_seq_cst(&self.count, 1)
            old = self._evict_oldest() if evict else None
            if old is None:
                bc_fetch_sub_seq_cst(&self.inflight, 1)
                if count_reject:
                    self.rejected += 1
                self._fail_evicted(evicted, n)
                raise self._full_error(n)
            if evicted is None:
                evicted = []
            evicted.append(old)
            n = bc_fetch_add_seq_cst(&self.count, 1)
        Py_INCREF(req)   # the ring's reference; the consumer gives it up
        if BC_UNLIKELY(not bc_ring_push(self.ring, <void *>req)):
            Py_DECREF(req)
            bc_fetch_sub_seq_cst(&self.count, 1)
            bc_fetch_sub_seq_cst(&self.inflight, 1)
            raise InternalError("_push: ring full below its cap")
        bc_fetch_sub_seq_cst(&self.inflight, 1)
        self.submitted += 1
        # Dekker with collect(): our push above, then the fence, then the read
        # of sleepers; the worker raises sleepers, then re-reads the ring.  One
        # of the two sees the other, so a wake-up is never lost.
        bc_fence_seq_cst()
        if bc_load_u32_relaxed(&self.sleepers) and (
                n + 1 >= bc_load_u32_relaxed(&self.wake_threshold) or req.deadline_ns >= 0):
            bc_fetch_add_u32_seq_cst(&self.work_epoch, 1)
            bc_unpark_one(&self.work_epoch)
        # Only now, with inflight back down, may user code run (future
        # callbacks): it may call close(), which waits for inflight.
        self._fail_evicted(evicted, n)
        return 0

    cdef Request _evict_oldest(self):
        """Take the oldest request still QUEUED out of the queue (now TAKEN), or None.

        Oldest first: the forming batch, then the request carried over by a
        cost bound, then the ring.  Its room in the queue is released.
        """
        cdef Request req
        cdef Py_ssize_t i
        for i in range(len(self.forming)):
            req = <Request>self.forming[i]
            if bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                del self.forming[i]
                self._release(1)
                return req
        if self.carry is not None:
            req, self.carry = self.carry, None
            self._release(1)
            if bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                return req
            self.withdrawn -= 1
        while True:
            req = self._pop()
            if req is None:
                return None
            self._release(1)
            if bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                return req
            self.withdrawn -= 1        # withdrawn by its caller: just drop it

    cdef void _fail_evicted(self, list evicted, size_t n) except *:
        cdef Request old
        if evicted is None:
            return
        for old in evicted:
            self.evicted += 1
            self.failed += 1
            _finish_one(old, None, Full(
                "request evicted from a full queue by a newer one (on_full='drop_oldest')",
                n, self._retry_after(n)), None)
            _flush_async_one(old)

    def closed_error(self) -> Closed:
        """The Closed error calls get now (carrying the worker's failure, if any)."""
        return self._closed_error()

    cdef object _closed_error(self):
        err = Closed("the batched function is closed" if self.close_cause is None
                     else f"the batched function is closed: its worker failed: {_describe(self.close_cause)}")
        if self.close_cause is not None:
            err.__cause__ = self.close_cause
        return err

    cdef object _full_error(self, size_t n):
        return Full(f"queue full: {n} requests waiting (channel_cap={self.cap})",
                    n, self._retry_after(n))

    cdef double _retry_after(self, size_t n):
        """Seconds until the queue has drained n items at the recent pace."""
        cdef int64_t per_batch = self.est_ns[self.max_items]
        cdef Py_ssize_t i
        if per_batch == 0:
            for i in range(self.max_items, 0, -1):
                if self.est_ns[i]:
                    per_batch = self.est_ns[i] * self.max_items // i
                    break
        return (<double>n / <double>self.max_items) * per_batch * 1e-9

    cdef int _wait_space(self, Request req, int64_t deadline_ns) except -1:
        """on_full='block': sleep (GIL released) until a push fits or the deadline."""
        cdef uint32_t epoch
        cdef int64_t until
        while True:
            epoch = bc_load_u32_acquire(&self.space_epoch)
            bc_fetch_add_u32_seq_cst(&self.space_sleepers, 1)
            try:
                try:
                    self._push(req, False, False)
                    return 0
                except Full:
                    pass
                if deadline_ns >= 0 and bc_now_ns() >= deadline_ns:
                    raise TimeoutError("no room in the queue before the timeout (on_full='block')")
                until = bc_now_ns() + SIGNAL_SLICE_NS
                if deadline_ns >= 0 and deadline_ns < until:
                    until = deadline_ns
                with nogil:
                    bc_park(&self.space_epoch, epoch, until)
            finally:
                bc_fetch_sub_u32_seq_cst(&self.space_sleepers, 1)
            PyErr_CheckSignals()

    cdef Request _submit(self, object value, int kind, object timeout, double cost, int policy):
        cdef int64_t deadline_ns = -1
        if timeout is not None:
            deadline_ns = bc_now_ns() + _to_ns(<double>timeout)
        cdef Request req = _new_request(value, kind, deadline_ns, cost)
        if policy == 1:
            self._wait_space(req, deadline_ns)
        else:
            self._push(req, policy == 2)
        return req

    def call(self, object value, object timeout=None, double cost=0.0, int policy=0):
        """Queue value and wait for its outcome, the GIL released while waiting.

        policy: 0 reject when full, 1 wait for room, 2 evict the oldest.
        Raises Full, Closed, TimeoutError, or the handler's exception.
        """
        cdef Request req = self._submit(value, KIND_BLOCKING, timeout, cost, policy)
        return self._wait(req)

    def submit_here(self, object value, object timeout=None, double cost=0.0, int policy=0):
        """Queue value for the running event loop; return ``(request, future)``.

        The asyncio fast path: one C call makes the future, finds the loop's
        mailbox and queues the request.
        """
        loop = _get_running_loop()
        fut = loop.create_future()
        return self.submit_async(value, fut, _mailbox_for(loop), timeout, cost, policy), fut

    def submit_async(self, object value, object fut, LoopMailbox mailbox, object timeout=None,
                     double cost=0.0, int policy=0, bint count_reject=True):
        """Queue value; its outcome is set on the asyncio future fut, via mailbox's loop."""
        cdef Request req = _new_request(value, KIND_ASYNC, -1, cost)
        req.waiter = fut
        req.loop = mailbox
        if timeout is not None:
            req.deadline_ns = req.arrival_ns + _to_ns(<double>timeout)
        self._push(req, policy == 2, count_reject)
        return req

    def submit_future(self, object value, object fut, object timeout=None, double cost=0.0,
                      int policy=0):
        """Queue value; its outcome is set on the concurrent future fut."""
        cdef Request req = _new_request(value, KIND_FUTURE, -1, cost)
        req.waiter = fut
        if timeout is not None:
            req.deadline_ns = req.arrival_ns + _to_ns(<double>timeout)
        if policy == 1:
            self._wait_space(req, req.deadline_ns)
        else:
            self._push(req, policy == 2)
        return req

    def expire(self, Request req) -> bool:
        """The caller's deadline passed: withdraw req if still queued."""
        if bc_cas_u32_acq_rel(&req.state, QUEUED, CANCELLED):
            self.timed_out += 1
            self.withdrawn += 1
            req.value = None
            return True
        return False

    def cancel(self, Request req) -> bool:
        """The caller gave up (task cancelled): withdraw req if still queued."""
        if bc_cas_u32_acq_rel(&req.state, QUEUED, CANCELLED):
            self.cancelled += 1
            self.withdrawn += 1
            req.value = None
            return True
        return False

    cdef object _wait(self, Request req):
        """Park on req.state until DONE; handle timeout and signals."""
        cdef uint32_t s
        cdef int64_t until
        cdef int64_t deadline = req.deadline_ns
        while True:
            s = bc_load_u32_acquire(&req.state)
            if s == DONE:
                break
            if deadline >= 0 and s == QUEUED and bc_now_ns() >= deadline:
                if self.expire(req):
                    raise TimeoutError("request not taken into a batch before its timeout")
                continue
            until = bc_now_ns() + SIGNAL_SLICE_NS
            if deadline >= 0 and s == QUEUED and deadline < until:
                until = deadline
            # Announce the sleep before re-reading state (Dekker with _finish_one).
            bc_store_u32_seq_cst(&req.parked, 1)
            if bc_load_u32_seq_cst(&req.state) == s:
                with nogil:
                    bc_park(&req.state, s, until)
            bc_store_u32_seq_cst(&req.parked, 0)
            try:
                PyErr_CheckSignals()
            except BaseException:
                self.cancel(req)   # Ctrl-C: withdraw if still queued
                raise
        result, error, tb = req.result, req.error, req.error_tb
        req.result = req.error = req.error_tb = None
        if error is not None:
            raise error.with_traceback(tb)
        return result

    # ----------------------------------------------------------- consumers

    cdef Request _pop(self):
        """Pop one request (or None); the ring's reference becomes ours.

        The request still counts as queued (and against the cap) until
        _release: it may wait in a forming batch, where its caller can still
        withdraw it.
        """
        cdef void *item
        cdef Request req
        if not bc_ring_pop(self.ring, &item):
            return None
        req = <Request>item      # +1 for the local variable
        Py_DECREF(req)           # -1: the ring's reference is given up
        if BATCHCORE_DEBUG and req.kind not in (KIND_BLOCKING, KIND_ASYNC, KIND_FUTURE):
            raise InternalError("_pop: ring cell does not hold a Request")
        return req

    cdef void _release(self, size_t k) noexcept:
        """k popped requests left the queue: make room, wake on_full='block' callers."""
        if k == 0:
            return
        bc_fetch_sub_seq_cst(&self.count, k)
        bc_fence_seq_cst()   # the room is visible before we read space_sleepers
        if bc_load_u32_relaxed(&self.space_sleepers):
            bc_fetch_add_u32_seq_cst(&self.space_epoch, 1)
            bc_unpark_all(&self.space_epoch)

    cdef int64_t _estimate(self, Py_ssize_t n):
        """Expected handler ns for a batch of n, from batches seen so far."""
        cdef Py_ssize_t i
        if n > self.max_items:
            n = self.max_items
        for i in range(n, self.max_items + 1):   # a larger batch bounds a smaller one
            if self.est_ns[i]:
                return self.est_ns[i]
        for i in range(n - 1, 0, -1):
            if self.est_ns[i]:
                return self.est_ns[i] * n // i
        return 0

    def record_handler_time(self, Py_ssize_t n, int64_t ns) -> None:
        """Feed the estimate of handler time by batch size (called by workers)."""
        if 0 < n <= self.max_items:
            if self.est_ns[n] == 0:
                self.est_ns[n] = ns
            else:
                self.est_ns[n] = <int64_t>(EST_KEEP * self.est_ns[n] + (1.0 - EST_KEEP) * ns)
            if self.auto_delay:     # [auto-delay hook 1/4] the handler model
                bc_delay_record(&self.delay, n, ns)

    def collect(self):
        """Wait for the next batch; return ``(requests, reason, delay)`` or None when closed and empty.

        Takes every request already queued at once (up to max_items and
        max_cost), then sleeps, the GIL released, until the batch is full, the
        first request's ``arrival + max_delay`` passes, or waiting longer would
        make a request miss its deadline.  Until then the requests stay
        QUEUED: their callers may still withdraw them (timeout, cancel).  At
        dispatch each is claimed (QUEUED -> TAKEN); withdrawn ones are dropped,
        expired ones fail with TimeoutError.  One thread at a time: the caller
        serialises workers.

        delay: seconds the batch was allowed to wait for more inputs: max_delay,
        or with max_delay="auto" the wait the policy chose (0: at once).
        """
        cdef list batch = self.forming
        cdef list claimed
        cdef Request req
        cdef int64_t first_arrival = -1, min_deadline = INT64_MAX
        cdef int64_t now, wake_at, deadline_wake
        cdef int64_t start = bc_now_ns(), since = 0   # when the worker became free; see hook 4
        cdef double cost_sum = 0.0
        cdef uint32_t epoch
        cdef bint waited = False, refilled, rechecked = False
        cdef int reason
        cdef Py_ssize_t n = len(batch)
        if n:
            first_arrival, min_deadline, cost_sum = self._forming_summary()
        while True:
            if len(batch) != n:
                # evictions (drop_oldest) took requests out while we slept
                n = len(batch)
                first_arrival, min_deadline, cost_sum = self._forming_summary()
            # Announce the sleep first, then take what is there: a producer
            # whose push we miss below sees sleepers > 0 and wakes us.  While
            # we hold part of a batch, `count` includes it, so "full" is
            # count >= max_items.
            bc_store_u32_release(&self.wake_threshold, 1 if n == 0 else (
                # [auto-delay hook 2/4] wake once the batch is as large as waiting pays for
                <uint32_t>bc_delay_target(&self.delay, self.max_items) if self.auto_delay
                else <uint32_t>self.max_items))
            epoch = bc_load_u32_acquire(&self.work_epoch)
            bc_fetch_add_u32_seq_cst(&self.sleepers, 1)
            refilled = False
            now = bc_now_ns()
            while n < self.max_items:
                if self.carry is not None:
                    req, self.carry = self.carry, None
                else:
                    req = self._pop()
                    if req is None:
                        break
                if bc_load_u32_relaxed(&req.state) != QUEUED:
                    self._release(1)       # withdrawn by its caller
                    self.withdrawn -= 1
                    continue
                if self.max_cost > 0.0 and n > 0 and cost_sum + req.cost > self.max_cost:
                    self.carry = req       # first of the next batch
                    break
                batch.append(req)
                n += 1
                if self.auto_delay:     # [auto-delay hook 3/4] the arrival model
                    bc_delay_arrival(&self.delay, req.arrival_ns)
                refilled = True
                cost_sum += req.cost
                if first_arrival < 0:
                    first_arrival = req.arrival_ns
                if req.deadline_ns >= 0 and req.deadline_ns < min_deadline:
                    min_deadline = req.deadline_ns

            # Decide: dispatch now, or sleep until when.
            wake_at = -1
            if n >= self.max_items or self.carry is not None:
                reason = R_FULL
            elif bc_load_u32_acquire(&self.closed):
                reason = R_CLOSE
            elif n == 0:
                reason = -1                 # nothing yet: sleep until woken
            else:
                # [auto-delay hook 4/4] when the wait ends (-1: dispatch now)
                if self.auto_delay:
                    since = first_arrival if first_arrival > start else start
                    wake_at = bc_delay_decide(&self.delay, now, n, since)
                elif self.max_delay_ns:
                    wake_at = first_arrival + self.max_delay_ns
                if wake_at < 0 or now >= wake_at:
                    reason = R_DELAY if waited else R_DRAIN
                else:
                    reason = -1
            if reason == -1 and wake_at >= 0:
                if self.deadline_aware and min_deadline != INT64_MAX:
                    # Leave the handler time to finish before the earliest
                    # deadline, with a quarter of margin.
                    deadline_wake = min_deadline - self._estimate(n + 1) * 5 // 4
                    if deadline_wake <= now:
                        reason = R_DEADLINE
                    elif deadline_wake < wake_at:
                        wake_at = deadline_wake
            if reason >= 0 or (n == 0 and bc_load_u32_acquire(&self.closed)):
                bc_fetch_sub_u32_seq_cst(&self.sleepers, 1)
                if n == 0:
                    # Closed and empty: a producer that passed its closed-check
                    # before close() may still be pushing.  Wait it out, then
                    # look once more, so its request is not stranded.
                    if not rechecked:
                        rechecked = True
                        self._wait_inflight()
                        continue
                    return None
                self.forming = []
                claimed = self._claim(batch)
                if BATCHCORE_DEBUG and len(claimed) > self.max_items:
                    raise InternalError("collect: batch larger than max_items")
                if claimed:
                    self.batches += 1
                    self.batched_items += len(claimed)
                    self.reasons[reason] += 1
                    if not self.auto_delay:
                        return claimed, REASONS[reason], self.max_delay_ns * 1e-9
                    # the wait the policy chose: from when the batch could first run
                    if first_arrival > start:
                        since = first_arrival
                    else:
                        since = start
                    return claimed, REASONS[reason], (now - since) * 1e-9 if waited and now > since else 0.0
                # every request was withdrawn meanwhile: start a new batch
                batch = self.forming
                n = 0
                first_arrival, min_deadline, cost_sum, waited = -1, INT64_MAX, 0.0, False
                continue
            if refilled:
                # We took something this round: re-announce with the new
                # threshold before sleeping, so "full" wakes us in time.
                bc_fetch_sub_u32_seq_cst(&self.sleepers, 1)
                continue
            with nogil:
                # auto: its silence window is an estimate, not worth a spin
                # that takes a core from the callers it waits for
                bc_park_precise(&self.work_epoch, epoch, wake_at, 0 if self.auto_delay else PRECISE_SPIN_NS)
                # Leave sleepers before waiting for the GIL: while we wait for
                # it, producers must not pay a futex wake per push.
                bc_fetch_sub_u32_seq_cst(&self.sleepers, 1)
            if n > 0:
                waited = True

    cdef tuple _forming_summary(self):
        """(first arrival, earliest deadline, summed cost) of the forming batch."""
        cdef Request req
        cdef int64_t first = -1, min_deadline = INT64_MAX
        cdef double cost = 0.0
        for req in self.forming:
            if first < 0:
                first = req.arrival_ns
            if req.deadline_ns >= 0 and req.deadline_ns < min_deadline:
                min_deadline = req.deadline_ns
            cost += req.cost
        return first, min_deadline, cost

    cdef list _claim(self, list batch):
        """QUEUED -> TAKEN for each request; drop withdrawn, fail expired ones."""
        cdef list claimed = []
        cdef Request req
        cdef int64_t now = bc_now_ns()
        for req in batch:
            if not bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                self.withdrawn -= 1        # withdrawn: its caller was told
                continue
            if req.deadline_ns >= 0 and now >= req.deadline_ns:
                self.timed_out += 1
                _finish_one(req, None, TimeoutError(
                    "request not taken into a batch before its timeout"), None)
                _flush_async_one(req)
                continue
            claimed.append(req)
        self._release(len(batch))
        return claimed

    def reason_counts(self) -> dict:
        """Batches dispatched so far, by reason."""
        return {REASONS[i]: self.reasons[i] for i in range(5)}

    def close(self, object cause=None) -> None:
        """Refuse new requests and wake every sleeper; idempotent.

        cause: the exception that broke a worker, carried by later Closed errors.
        """
        if cause is not None and self.close_cause is None:
            self.close_cause = cause
        bc_store_u32_seq_cst(&self.closed, 1)
        # Producers that passed the closed-check finish their push before we
        # return (they hold no lock and never wait: this is a few ns).
        self._wait_inflight()
        bc_fetch_add_u32_seq_cst(&self.work_epoch, 1)
        bc_unpark_all(&self.work_epoch)
        bc_fetch_add_u32_seq_cst(&self.space_epoch, 1)
        bc_unpark_all(&self.space_epoch)

    cdef void _wait_inflight(self) noexcept:
        """Sleep in 10 us naps, GIL released, until no producer is mid-push."""
        cdef bc_atomic_u32 nap = 0   # a private word: parking on it is a 10 us sleep
        while bc_load_relaxed(&self.inflight):
            with nogil:
                bc_park(&nap, 0, bc_now_ns() + 10_000)

    def fail_unfinished(self, list batch, object error) -> None:
        """Fail the requests of batch not finished yet (a fault while delivering)."""
        cdef Request req
        for req in batch:
            if bc_load_u32_acquire(&req.state) == TAKEN:
                self.failed += 1
                _finish_one(req, None, error, error.__traceback__)
                _flush_async_one(req)

    def fail_queued(self, object error) -> int:
        """Fail every request still queued with error; return how many."""
        cdef Request req
        cdef int failed = 0
        cdef list reqs = self.forming
        self.forming = []
        if self.carry is not None:
            reqs.append(self.carry)
            self.carry = None
        while True:
            req = self._pop()
            if req is None:
                break
            reqs.append(req)
        for req in reqs:
            if bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                failed += 1
                self.failed += 1
                _finish_one(req, None, error, None)
                _flush_async_one(req)
            else:
                self.withdrawn -= 1
        self._release(len(reqs))
        return failed

    # ----------------------------------------------------------- delivery

    def deliver(self, list batch, object outputs, object error) -> None:
        """Give each request of batch its outcome and wake its caller.

        outputs: a sequence as long as batch (output i to request i; a
        ``Failed`` entry fails only its own caller), or None when error is the
        exception for the whole batch.  asyncio callers of one loop are woken
        with at most one ``call_soon_threadsafe`` for the batch; blocking
        callers are woken one by one, each on its own request, after every
        outcome is stored and with the GIL released.
        """
        cdef Py_ssize_t i, n = len(batch), nwake = 0
        cdef Request req
        cdef object out, err, tb = None
        cdef LoopMailbox mailbox = None
        cdef list pending = None
        cdef dict more_loops = None
        cdef bc_atomic_u32 **wake = <bc_atomic_u32 **>malloc(<size_t>n * sizeof(bc_atomic_u32 *))
        if wake == NULL:
            raise MemoryError()
        try:
            if error is not None:
                tb = error.__traceback__
            for i in range(n):
                req = <Request>batch[i]
                if error is None:
                    out = outputs[i]
                    if type(out) is Failed:
                        err = (<object>out).error
                        self.failed += 1
                        _store(req, None, err, err.__traceback__)
                    else:
                        self.completed += 1
                        _store(req, out, None, None)
                else:
                    self.failed += 1
                    _store(req, None, error, tb)
                if req.kind == KIND_BLOCKING:
                    # release: the outcome above is visible to whoever acquires DONE.
                    bc_store_u32_seq_cst(&req.state, DONE)
                    if bc_load_u32_seq_cst(&req.parked):
                        wake[nwake] = &req.state
                        nwake += 1
                elif req.kind == KIND_FUTURE:
                    _complete_future(req)
                else:
                    bc_store_u32_release(&req.state, DONE)
                    if mailbox is None or req.loop is mailbox:
                        if mailbox is None:
                            mailbox, pending = req.loop, []
                        pending.append(req)
                    else:
                        if more_loops is None:
                            more_loops = {}
                        more_loops.setdefault(req.loop, []).append(req)
            # `batch` keeps every request alive until the wakes are done.
            if nwake:
                with nogil:
                    for i in range(nwake):
                        bc_unpark_one(wake[i])
            if mailbox is not None:
                mailbox.post(pending)
            if more_loops is not None:
                for other, reqs in more_loops.items():
                    (<LoopMailbox>other).post(reqs)
        finally:
            free(wake)


cdef str _describe(object exc):
    """repr-ish text of an exception whose __str__ may itself raise."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except BaseException:
        return f"{type(exc).__name__} (unprintable)"


cdef inline void _store(Request req, object result, object error, object tb) noexcept:
    req.value = None          # the input is not needed any more
    req.result = result
    req.error = error
    req.error_tb = tb


cdef void _finish_one(Request req, object result, object error, object tb) except *:
    """Store one request's outcome and wake its caller (GIL held); asyncio
    callers still need _flush_async_one."""
    _store(req, result, error, tb)
    if req.kind == KIND_FUTURE:
        _complete_future(req)
        return
    # release: the outcome above is visible to whoever acquires DONE.
    bc_store_u32_seq_cst(&req.state, DONE)
    if req.kind == KIND_BLOCKING and bc_load_u32_seq_cst(&req.parked):
        bc_unpark_one(&req.state)


cdef void _complete_future(Request req) except *:
    """DONE, then hand the stored outcome to the request's concurrent future."""
    fut = req.waiter
    req.waiter = None
    bc_store_u32_release(&req.state, DONE)
    _set_future(fut, req.result, req.error)
    req.result = req.error = req.error_tb = None


cdef inline void _set_future(object fut, object result, object error) except *:
    # The caller may have cancelled the future; that only discards the outcome.
    if fut.cancelled():
        return
    try:
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)
    except Exception:   # InvalidStateError: cancelled in between
        pass


cdef inline void _flush_async_one(Request req) except *:
    if req.kind == KIND_ASYNC:
        (<LoopMailbox>req.loop).post([req])


# The mailbox of each event loop, and the last (loop ref, mailbox) pair looked
# up: one tuple, so a reader in another thread never sees half an update.
_MAILBOXES = _WeakKeyDictionary()
cdef tuple _last_mailbox = (None, None)


cdef LoopMailbox _mailbox_for(object loop):
    global _last_mailbox
    cdef tuple pair = _last_mailbox
    if pair[0] is not None and pair[0]() is loop:
        return <LoopMailbox>pair[1]
    mailbox = _MAILBOXES.get(loop)
    if mailbox is None:
        mailbox = _MAILBOXES.setdefault(loop, LoopMailbox(loop))
    _last_mailbox = (_weakref(loop), mailbox)
    return <LoopMailbox>mailbox


def mailbox_for(loop) -> LoopMailbox:
    """The mailbox through which workers hand results to loop (one per loop)."""
    return _mailbox_for(loop)


@cython.final
cdef class LoopMailbox:
    """Finished asyncio requests of one event loop, resolved in that loop's thread.

    A worker posts a batch's requests and wakes the loop with
    ``call_soon_threadsafe`` only if no drain is pending already: at most one
    wake-up per batch, and none while the loop has not caught up.  Both sides
    run with the GIL held.
    """

    cdef object loop_ref    # weak: a mailbox must not keep a finished loop alive
    cdef list items
    cdef bint scheduled     # a drain is queued on the loop and has not started

    def __cinit__(self, object loop):
        self.loop_ref = _weakref(loop)
        self.items = []

    @property
    def loop(self):
        return self.loop_ref()

    cdef void post(self, list reqs) except *:
        self.items.extend(reqs)
        if self.scheduled:
            return
        loop = self.loop_ref()
        self.scheduled = True
        try:
            if loop is None:
                raise RuntimeError("event loop is gone")
            loop.call_soon_threadsafe(self.drain)
        except RuntimeError:       # the loop is closed: nobody is left to wait
            self.scheduled = False
            self.items = []

    def drain(self) -> None:
        """Runs in the loop's thread: set each posted request's future."""
        # Clear the flag before taking the list: a post that lands in between
        # schedules another drain instead of being stranded.
        self.scheduled = False
        items = self.items
        self.items = []
        _resolve_async(items)


cdef void _resolve_async(list reqs) except *:
    cdef Request req
    for req in reqs:
        fut = req.waiter
        req.waiter = req.loop = None
        if fut is None or fut.done():
            continue
        try:
            if req.error is None:
                fut.set_result(req.result)
            else:
                fut.set_exception(req.error)
        except TypeError:
            # asyncio refuses StopIteration (and StopAsyncIteration) as a
            # future's exception: hand it over wrapped.
            wrapped = BatchedFnError(f"the handler raised {type(req.error).__name__}")
            wrapped.__cause__ = req.error
            fut.set_exception(wrapped)
        except Exception:
            # One broken future must not strand the rest of the list.
            _log.exception("batched_fn: resolving an asyncio future failed")
        req.result = req.error = req.error_tb = None
