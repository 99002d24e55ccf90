# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The consumer side of a channel: form batches, dispatch them, account for them.

:class:`Channel` extends :class:`_admission.Admission`.  A worker calls
:meth:`Channel.collect` (one worker at a time), runs the handler on the
inputs, then :meth:`Channel.deliver`.  While a batch forms its requests stay
QUEUED, so their callers may still withdraw them; at dispatch each is claimed
(QUEUED -> TAKEN).

What guards what: the forming batch, the carried request and the adaptive
delay model are under ``consumer_lock`` (shared with drop_oldest's eviction
in _admission.pyx and with ``record_handler_time``), taken per collector
round, never while it sleeps or while user code runs (expiring a request
sets a future).  Batch counters and ``running`` are relaxed atomics; each
request's fate is one CAS on its state.  ``collect`` itself runs in one
thread at a time (the workers' collect lock).
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t, INT64_MAX

from atomics cimport (
    bc_atomic_u64, bc_atomic_i64, bc_fetch_add_u64_relaxed, bc_load_u64_relaxed, bc_load_u64_seq_cst,
    bc_fetch_add_i64_relaxed, bc_load_i64_relaxed, bc_load_i64_seq_cst,
    bc_load_u32_acquire, bc_load_u32_relaxed, bc_store_u32_release,
    bc_fetch_add_u32_seq_cst, bc_fetch_sub_u32_seq_cst, bc_cas_u32_acq_rel,
)
from debug cimport BATCHCORE_DEBUG
from delay cimport bc_delay, bc_delay_init, bc_delay_record, bc_delay_arrival, bc_delay_decide, bc_delay_target
from estimate cimport est_lookup, est_record
from park cimport bc_now_ns, bc_park_precise
from batched_fn._admission cimport Admission, to_ns
from batched_fn._delivery cimport deliver, finish_one
from batched_fn._errors cimport closed_error
from batched_fn._request cimport Request, QUEUED, TAKEN

from batched_fn._errors import InternalError

# Why a batch was dispatched (index into REASONS).
REASONS = ("full", "delay", "drain", "deadline", "close")
cdef enum DispatchReason:
    WAIT = -1          # not yet: sleep until woken or wake_at
    R_FULL = 0
    R_DELAY = 1
    R_DRAIN = 2
    R_DEADLINE = 3
    R_CLOSE = 4

# The collector polls (GIL released) for the last this-many ns of a timed wait
# for max_delay, instead of trusting a late timer wake-up.
cdef int64_t PRECISE_SPIN_NS = 50_000


# What the collector knows of the batch it is forming.
cdef struct Forming:
    Py_ssize_t n             # requests held
    int64_t first_arrival    # arrival of the first (-1: none yet)
    int64_t min_deadline     # earliest deadline (INT64_MAX: none)
    double cost              # summed cost
    bint waited              # slept at least once while holding requests


cdef inline void _forming_reset(Forming *f) noexcept:
    f.n = 0
    f.first_arrival = -1
    f.min_deadline = INT64_MAX
    f.cost = 0.0
    f.waited = False


cdef inline void _forming_add(Forming *f, Request req) noexcept:
    f.n += 1
    f.cost += req.cost
    if f.first_arrival < 0:
        f.first_arrival = req.arrival_ns
    if req.deadline_ns >= 0 and req.deadline_ns < f.min_deadline:
        f.min_deadline = req.deadline_ns


cdef class Channel(Admission):
    """A bounded queue of requests with a batch collector on the consumer side."""

    cdef readonly int64_t max_delay_ns   # the fixed delay; with auto_delay, auto_max_delay
    cdef readonly bint auto_delay        # max_delay="auto": `delay` picks each batch's wait
    # The adaptive delay policy (delay.h); consumer_lock guards it (collect
    # and record_handler_time touch it, from different workers).
    cdef bc_delay delay
    cdef readonly double max_cost      # 0: no cost bound
    cdef readonly bint deadline_aware  # close batches early for deadlines
    # Batches dispatched, their items, and batches by reason: relaxed atomics
    # (read through the properties batches, batched_items, reason_counts()).
    cdef bc_atomic_u64 n_batches, n_batched_items
    cdef bc_atomic_u64 reasons[5]
    # Requests claimed into a batch and not yet delivered: an atomic (one
    # worker adds at dispatch while another subtracts at delivery).
    cdef bc_atomic_i64 n_running

    def __init__(self, Py_ssize_t cap, Py_ssize_t max_items, object max_delay, double max_cost=0.0,
                 bint deadline_aware=True, *, on_full=0, double auto_max_delay=0.01):
        if isinstance(max_delay, str):
            if max_delay != "auto":
                raise ValueError(f"Channel: max_delay must be seconds or 'auto' (got {max_delay!r})")
            self.auto_delay = True
            self.max_delay_ns = to_ns(auto_max_delay)
            bc_delay_init(&self.delay, self.max_delay_ns)
        else:
            self.max_delay_ns = to_ns(<double>max_delay)
        self.max_cost = max_cost
        self.deadline_aware = deadline_aware

    @property
    def batches(self) -> int:
        """Batches dispatched."""
        return bc_load_u64_relaxed(&self.n_batches)

    @property
    def batched_items(self) -> int:
        """Requests dispatched in those batches."""
        return bc_load_u64_relaxed(&self.n_batched_items)

    @property
    def running(self) -> int:
        """Requests claimed into a batch and not yet delivered."""
        return bc_load_i64_relaxed(&self.n_running)

    # ----------------------------------------------------------- forming a batch

    def collect(self):
        """Wait for the next batch; return ``(requests, reason, cost, delay)``, or None when closed and empty.

        Takes every request already queued at once (up to max_items and
        max_cost), then sleeps, the GIL released, until the batch is full, the
        first request's ``arrival + max_delay`` passes (with max_delay="auto":
        until the policy of delay.h stops expecting waiting to pay), or waiting
        longer would make a request miss its deadline.  delay: the seconds the
        batch was allowed to wait (max_delay, or the wait "auto" chose).  One
        thread at a time: the caller serialises workers.
        """
        cdef list batch, claimed
        cdef Forming f
        cdef int64_t now, wake_at = -1
        cdef int64_t start = bc_now_ns()   # when this worker became free to dispatch
        cdef uint32_t epoch
        cdef bint refilled, rechecked = False, stop
        cdef DispatchReason reason
        cdef size_t dropped
        _forming_reset(&f)
        with self.consumer_lock:       # fail_queued may replace the list from another thread
            batch = self.forming
            self._summarize(&f)
        while True:
            dropped = 0
            # consumer_lock: drop_oldest evicts from the forming batch, and
            # record_handler_time feeds the delay model, from other threads.
            with self.consumer_lock:
                if len(batch) != f.n:
                    self._summarize(&f)    # evictions (drop_oldest) took requests out while we slept
                # Announce the sleep first, then take what is there: a producer
                # whose push we miss below sees sleepers > 0 and wakes us.  While
                # we hold part of a batch, `count` includes it, so "full" is
                # count >= max_items.
                bc_store_u32_release(&self.wake_threshold, 1 if f.n == 0 else (
                    # auto: wake once the batch is as large as waiting pays for
                    <uint32_t>bc_delay_target(&self.delay, self.max_items) if self.auto_delay
                    else <uint32_t>self.max_items))
                epoch = bc_load_u32_acquire(&self.work_epoch)
                bc_fetch_add_u32_seq_cst(&self.sleepers, 1)
                refilled = self._take_ready(batch, &f, &dropped)
                now = bc_now_ns()
                reason = self._dispatch_reason(&f, now, start, &wake_at)
                stop = reason != WAIT or (f.n == 0 and bc_load_u32_acquire(&self.closed))
                if stop and f.n > 0:
                    self.forming = []      # the batch is ours alone from here
            if dropped:
                self.release(dropped)      # withdrawn requests: their room (may wake asyncio callers)
            if stop:
                bc_fetch_sub_u32_seq_cst(&self.sleepers, 1)
                if f.n == 0:
                    # Closed and empty: a producer that passed its closed-check
                    # before close() may still be pushing.  Wait it out, then
                    # look once more, so its request is not stranded.
                    if not rechecked:
                        rechecked = True
                        self.wait_inflight()
                        continue
                    return None
                claimed = self._claim(batch)
                if claimed:
                    bc_fetch_add_u64_relaxed(&self.n_batches, 1)
                    bc_fetch_add_u64_relaxed(&self.n_batched_items, len(claimed))
                    bc_fetch_add_u64_relaxed(&self.reasons[<int>reason], 1)
                    return claimed, REASONS[<int>reason], f.cost, self._chosen_delay(&f, now, start)
                # every request was withdrawn meanwhile: start a new batch
                with self.consumer_lock:
                    batch = self.forming
                _forming_reset(&f)
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
            if f.n > 0:
                f.waited = True

    cdef void _summarize(self, Forming *f) except *:
        """Recompute f from the forming batch (it may have lost evicted requests); consumer_lock held."""
        cdef Request req
        cdef bint waited = f.waited if f.n else False
        _forming_reset(f)
        for req in self.forming:
            _forming_add(f, req)
        f.waited = waited

    cdef bint _take_ready(self, list batch, Forming *f, size_t *dropped) except -1:
        """Move requests already queued into batch, within max_items and max_cost; True if any.

        consumer_lock held.  *dropped: withdrawn requests met and dropped, for
        the caller to release() once the lock is given back.
        """
        cdef Request req
        cdef bint took = False
        while f.n < self.max_items:
            if self.carry is not None:
                req, self.carry = self.carry, None
            else:
                req = self.pop()
                if req is None:
                    break
            if bc_load_u32_relaxed(&req.state) != QUEUED:
                dropped[0] += 1       # withdrawn by its caller
                bc_fetch_add_i64_relaxed(&self.withdrawn, -1)
                continue
            if self.max_cost > 0.0 and f.n > 0 and f.cost + req.cost > self.max_cost:
                self.carry = req       # first of the next batch
                break
            batch.append(req)
            _forming_add(f, req)
            if self.auto_delay:
                bc_delay_arrival(&self.delay, req.arrival_ns)   # the arrival model
            took = True
        return took

    cdef DispatchReason _dispatch_reason(self, Forming *f, int64_t now, int64_t start,
                                         int64_t *wake_at) noexcept:
        """Why to dispatch the forming batch now, or WAIT with *wake_at (-1: until woken).

        start: when the worker became free (the auto policy measures from it).
        consumer_lock held (the delay model).
        """
        cdef int64_t deadline_wake, until
        wake_at[0] = -1
        if f.n >= self.max_items or self.carry is not None:
            return R_FULL
        if bc_load_u32_acquire(&self.closed):
            return R_CLOSE if f.n else WAIT
        if f.n == 0:
            return WAIT                 # nothing yet: sleep until woken
        if self.auto_delay:
            until = bc_delay_decide(&self.delay, now, f.n,
                                    f.first_arrival if f.first_arrival > start else start)
        elif self.max_delay_ns == 0:
            until = -1
        else:
            until = f.first_arrival + self.max_delay_ns
        if until < 0 or now >= until:
            return R_DELAY if f.waited else R_DRAIN
        wake_at[0] = until
        if self.deadline_aware and f.min_deadline != INT64_MAX:
            # Leave the handler time to finish before the earliest deadline,
            # with a quarter of margin.
            deadline_wake = f.min_deadline - est_lookup(self.est_ns, self.max_items, f.n + 1) * 5 // 4
            if deadline_wake <= now:
                return R_DEADLINE
            if deadline_wake < wake_at[0]:
                wake_at[0] = deadline_wake
        return WAIT

    cdef double _chosen_delay(self, Forming *f, int64_t now, int64_t start) noexcept:
        """Seconds the dispatched batch was allowed to wait for more inputs."""
        cdef int64_t since
        if not self.auto_delay:
            return self.max_delay_ns * 1e-9
        # the wait the policy chose: from when the batch could first have run
        since = f.first_arrival if f.first_arrival > start else start
        if not f.waited or now <= since:
            return 0.0
        # never more than auto_max_delay: past it the policy dispatches, and what a
        # busy machine adds by waking this thread late was not chosen (with callers
        # running in parallel, free-threaded, such lateness is common)
        return (now - since if now - since < self.max_delay_ns else self.max_delay_ns) * 1e-9

    cdef list _claim(self, list batch):
        """QUEUED -> TAKEN for each request; drop withdrawn ones, expire late ones."""
        cdef list claimed = []
        cdef Request req
        cdef int64_t now = bc_now_ns()
        for req in batch:
            if req.deadline_ns >= 0 and now >= req.deadline_ns:
                self.expire(req)           # withdraws it if still queued
            if not bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                bc_fetch_add_i64_relaxed(&self.withdrawn, -1)   # withdrawn: its caller was told
                continue
            claimed.append(req)
        bc_fetch_add_i64_relaxed(&self.n_running, len(claimed))
        if BATCHCORE_DEBUG and len(claimed) > self.max_items:
            raise InternalError("_claim: batch larger than max_items")
        self.release(len(batch))
        return claimed

    # ----------------------------------------------------------- after the handler

    def deliver(self, list batch, object outputs, object error) -> None:
        """Give each request of batch its outcome and wake its caller.

        outputs: a sequence as long as batch (output i to request i; a
        ``Failed`` entry fails only its own caller), or None when error is the
        exception for the whole batch.
        """
        # Not running any more before any caller wakes: stats() seen by a
        # caller that just returned already balances.
        bc_fetch_add_i64_relaxed(&self.n_running, -len(batch))
        deliver(batch, outputs, error, &self.n_completed, &self.n_failed)

    def fail_unfinished(self, list batch, object error) -> None:
        """Fail the requests of batch not finished yet (a fault while delivering)."""
        cdef Request req
        for req in batch:
            if bc_load_u32_acquire(&req.state) == TAKEN:
                bc_fetch_add_u64_relaxed(&self.n_failed, 1)
                finish_one(req, None, error, error.__traceback__)

    def record_handler_time(self, Py_ssize_t n, int64_t ns) -> None:
        """Feed the estimate of handler time by batch size (called by workers)."""
        est_record(self.est_ns, self.max_items, n, ns)
        if self.auto_delay:
            with self.consumer_lock:
                bc_delay_record(&self.delay, n, ns)     # the auto policy's handler model

    def counts(self) -> tuple:
        """``(submitted, completed, failed, rejected, timed_out, cancelled, queued, running)``, adding up.

        Callers on other threads move requests between these counters while
        they are read, so the counters are read in an order that keeps the
        sum right: outcomes first (each only grows), then ``running``, then
        ``submitted`` (counted before a request can reach any other), and
        ``queued`` is what remains: accepted, not finished, not in a batch.
        When nothing moves it equals :attr:`queued`.
        """
        cdef uint64_t rejected = bc_load_u64_seq_cst(&self.n_rejected)
        cdef uint64_t completed = bc_load_u64_seq_cst(&self.n_completed)
        cdef uint64_t failed = bc_load_u64_seq_cst(&self.n_failed)
        cdef uint64_t timed_out = bc_load_u64_seq_cst(&self.n_timed_out)
        cdef uint64_t cancelled = bc_load_u64_seq_cst(&self.n_cancelled)
        cdef int64_t running = bc_load_i64_seq_cst(&self.n_running)
        cdef uint64_t submitted = bc_load_u64_seq_cst(&self.n_submitted)
        cdef int64_t queued
        if running < 0:
            running = 0
        queued = <int64_t>(submitted - completed - failed - timed_out - cancelled) - running
        if queued < 0:     # a weakly ordered read raced a count: never report less than nothing
            running += queued
            queued = 0
            if running < 0:
                running = 0
        return (submitted, completed, failed, rejected, timed_out, cancelled, queued, running)

    def reason_counts(self) -> dict:
        """Batches dispatched so far, by reason."""
        return {REASONS[i]: bc_load_u64_relaxed(&self.reasons[i]) for i in range(5)}

    # ----------------------------------------------------------- a broken worker

    def fail_queued(self, object error) -> int:
        """Fail every request still queued with error; return how many."""
        cdef Request req
        cdef int failed = 0
        cdef list reqs
        with self.consumer_lock:
            reqs = self.forming
            self.forming = []
            if self.carry is not None:
                reqs.append(self.carry)
                self.carry = None
        while True:
            req = self.pop()
            if req is None:
                break
            reqs.append(req)
        for req in reqs:
            if bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                failed += 1
                bc_fetch_add_u64_relaxed(&self.n_failed, 1)
                finish_one(req, None, error, None)
            else:
                bc_fetch_add_i64_relaxed(&self.withdrawn, -1)
        self.release(len(reqs))
        return failed

    def break_(self, object cause) -> None:
        """A worker cannot go on (its context failed, or it died): close with
        cause and fail every queued request with Closed, so no caller waits forever."""
        self.close(cause)
        self.fail_queued(closed_error(self.close_cause))
