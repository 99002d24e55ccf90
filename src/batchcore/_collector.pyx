# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""The consumer side of a channel: form batches, dispatch them, account for them.

:class:`Channel` extends :class:`_admission.Admission`.  A worker calls
:meth:`Channel.collect` (one worker at a time), runs the handler on the
inputs, then :meth:`Channel.deliver`.  While a batch forms its requests stay
QUEUED, so their callers may still withdraw them; at dispatch each is claimed
(QUEUED -> TAKEN).
"""

from libc.stdint cimport int64_t, uint32_t, INT64_MAX

from atomics cimport (
    bc_load_u32_acquire, bc_load_u32_relaxed, bc_store_u32_release,
    bc_fetch_add_u32_seq_cst, bc_fetch_sub_u32_seq_cst, bc_cas_u32_acq_rel,
)
from debug cimport BATCHCORE_DEBUG
from delay cimport bc_delay, bc_delay_init, bc_delay_record, bc_delay_arrival, bc_delay_decide, bc_delay_target
from estimate cimport est_lookup, est_record
from park cimport bc_now_ns, bc_park_precise


# Why a batch was dispatched (index into REASONS).
REASONS = ("full", "delay", "drain", "deadline", "close")
cdef enum DispatchReason:
    WAIT = -1          # not yet: sleep until woken or wake_at
    R_FULL = 0
    R_DELAY = 1
    R_DRAIN = 2
    R_DEADLINE = 3
    R_CLOSE = 4
    N_REASONS = 5      # len(REASONS): the size of Channel.reasons

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
    # The adaptive delay policy (delay.h); the GIL guards it (collect and
    # record_handler_time touch it, both with the GIL held).
    cdef bc_delay delay
    cdef readonly double max_cost      # 0: no cost bound
    cdef readonly bint deadline_aware  # close batches early for deadlines
    cdef public unsigned long long batches, batched_items
    cdef unsigned long long reasons[N_REASONS]
    # Requests claimed into a batch and not yet delivered (the GIL guards it).
    cdef readonly Py_ssize_t running

    def __init__(self, Py_ssize_t cap, Py_ssize_t max_items, object max_delay, double max_cost=0.0,
                 bint deadline_aware=True, *, on_full=0, double auto_max_delay=0.01, Py_ssize_t max_keys=0):
        """max_keys > 0: a keyed channel (batch_key=), at most that many live keys."""
        if max_keys > 0:
            self.keys = KeyQueues(max_keys)
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
        cdef list batch = self.forming, claimed
        cdef Forming f
        cdef int64_t now, wake_at = -1
        cdef int64_t start = bc_now_ns()   # when this worker became free to dispatch
        cdef uint32_t epoch
        cdef bint refilled, rechecked = False
        cdef DispatchReason reason
        if self.keys is not None:
            return self._collect_keyed()
        _forming_reset(&f)
        self._summarize(&f)
        while True:
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
            refilled = self._take_ready(batch, &f)
            now = bc_now_ns()
            reason = self._dispatch_reason(&f, now, start, &wake_at)
            if reason != WAIT or (f.n == 0 and bc_load_u32_acquire(&self.closed)):
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
                self.forming = []
                claimed = self._claim(batch)
                if claimed:
                    self.batches += 1
                    self.batched_items += len(claimed)
                    self.reasons[<int>reason] += 1
                    return claimed, REASONS[<int>reason], f.cost, self._chosen_delay(&f, now, start)
                # every request was withdrawn meanwhile: start a new batch
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
        """Recompute f from the forming batch (it may have lost evicted requests)."""
        cdef Request req
        cdef bint waited = f.waited if f.n else False
        _forming_reset(f)
        for req in self.forming:
            _forming_add(f, req)
        f.waited = waited

    cdef bint _take_ready(self, list batch, Forming *f) except -1:
        """Move requests already queued into batch, within max_items and max_cost; True if any."""
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
                self.release(1)       # withdrawn by its caller
                self.withdrawn -= 1
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
        return (now - since) * 1e-9 if f.waited and now > since else 0.0

    cdef list _claim(self, list batch):
        """QUEUED -> TAKEN for each request; drop withdrawn ones, expire late ones."""
        cdef list claimed = []
        cdef Request req
        cdef int64_t now = bc_now_ns()
        for req in batch:
            if req.deadline_ns >= 0 and now >= req.deadline_ns:
                self.expire(req)           # withdraws it if still queued
            if not bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                self.withdrawn -= 1        # withdrawn: its caller was told
                continue
            claimed.append(req)
        self.running += len(claimed)
        if BATCHCORE_DEBUG and len(claimed) > self.max_items:
            raise InternalError("_claim: batch larger than max_items")
        self.release(len(batch))
        return claimed

    # ----------------------------------------------------------- keyed batches

    cdef object _collect_keyed(self):
        """collect() of a keyed channel: a batch from one key's queue (see _keys.pyx).

        The same wait as collect(), with the ring drained into the per-key
        queues each round; the key served is KeyQueues.next_queue's, or one
        whose deadline cannot wait.
        """
        cdef KeyQueues keys = self.keys
        cdef KeyQueue q, due
        cdef list batch, claimed
        cdef double cost = 0.0
        cdef int64_t now, wake_at = -1, since
        cdef int64_t start = bc_now_ns()
        cdef Py_ssize_t gap, target
        cdef uint32_t epoch
        cdef bint refilled, rechecked = False
        cdef DispatchReason reason
        while True:
            # A producer wakes us once `count` reaches the threshold: 1 with
            # nothing held, else when the fullest queue could be full.
            if keys.held == 0:
                bc_store_u32_release(&self.wake_threshold, 1)
            else:
                target = bc_delay_target(&self.delay, self.max_items) if self.auto_delay else self.max_items
                gap = target - keys.largest()
                bc_store_u32_release(&self.wake_threshold, <uint32_t>(keys.held + (gap if gap > 1 else 1)))
            epoch = bc_load_u32_acquire(&self.work_epoch)
            bc_fetch_add_u32_seq_cst(&self.sleepers, 1)
            refilled = self._drain_keyed()
            now = bc_now_ns()
            q = keys.next_queue(self.max_items, self.max_cost)
            reason = self._keyed_reason(q, now, start, &wake_at)
            if reason == WAIT and q is not None and self.deadline_aware:
                due = keys.urgent(now, self.est_ns, self.max_items, &wake_at)
                if due is not None:
                    q, reason = due, R_DEADLINE
            if reason != WAIT or (q is None and bc_load_u32_acquire(&self.closed)):
                bc_fetch_sub_u32_seq_cst(&self.sleepers, 1)
                if q is None:
                    if not rechecked:       # as in collect(): a late push may still land
                        rechecked = True
                        self.wait_inflight()
                        continue
                    return None
                since = q.first_arrival()
                batch = keys.take(q, self.max_items, self.max_cost, &cost)
                claimed = self._claim(batch)
                keys.leave(q.key, len(batch))
                if claimed:
                    self.batches += 1
                    self.batched_items += len(claimed)
                    self.reasons[<int>reason] += 1
                    keys.count_batch(q.key, len(claimed))
                    return claimed, REASONS[<int>reason], cost, self._keyed_delay(since, now, start, reason)
                continue
            if refilled:
                bc_fetch_sub_u32_seq_cst(&self.sleepers, 1)
                continue
            with nogil:
                bc_park_precise(&self.work_epoch, epoch, wake_at, 0 if self.auto_delay else PRECISE_SPIN_NS)
                bc_fetch_sub_u32_seq_cst(&self.sleepers, 1)
            keys.mark_waited()

    cdef bint _drain_keyed(self) except -1:
        """Pop every queued request into its key's queue; True if any."""
        cdef Request req
        cdef bint took = False
        while True:
            req = self.pop()
            if req is None:
                return took
            if bc_load_u32_relaxed(&req.state) != QUEUED:
                self.release(1)       # withdrawn by its caller
                self.withdrawn -= 1
                self.keys.leave(req.key, 1)
                continue
            self.keys.add(req)
            if self.auto_delay:
                bc_delay_arrival(&self.delay, req.arrival_ns)
            took = True

    cdef DispatchReason _keyed_reason(self, KeyQueue q, int64_t now, int64_t start,
                                      int64_t *wake_at) noexcept:
        """Why to dispatch q's head batch now, or WAIT with *wake_at (-1: until woken)."""
        cdef int64_t until, first
        wake_at[0] = -1
        if q is None:
            return WAIT
        if q.is_full(self.max_items, self.max_cost):
            return R_FULL
        if bc_load_u32_acquire(&self.closed):
            return R_CLOSE
        first = q.first_arrival()
        if self.auto_delay:
            until = bc_delay_decide(&self.delay, now, len(q.items), first if first > start else start)
        elif self.max_delay_ns == 0:
            until = -1
        else:
            until = first + self.max_delay_ns
        if until < 0 or now >= until:
            return R_DELAY if q.waited else R_DRAIN
        wake_at[0] = until
        return WAIT

    cdef double _keyed_delay(self, int64_t first, int64_t now, int64_t start, DispatchReason reason) noexcept:
        """Seconds the dispatched keyed batch was allowed to wait (as _chosen_delay)."""
        if not self.auto_delay:
            return self.max_delay_ns * 1e-9
        if first < start:
            first = start
        return (now - first) * 1e-9 if reason == R_DELAY and now > first else 0.0

    def key_counters(self) -> dict:
        """key -> (submitted, batches, batched items, queued now); {} for an unkeyed channel."""
        return {} if self.keys is None else self.keys.counters()

    @property
    def live_keys(self) -> int:
        """Keys with requests queued now (0 for an unkeyed channel)."""
        return 0 if self.keys is None else self.keys.live_keys

    # ----------------------------------------------------------- after the handler

    def deliver(self, list batch, object outputs, object error) -> None:
        """Give each request of batch its outcome and wake its caller.

        outputs: a sequence as long as batch (output i to request i; a
        ``Failed`` entry fails only its own caller), or None when error is the
        exception for the whole batch.
        """
        # Not running any more before any caller wakes: stats() seen by a
        # caller that just returned already balances.
        self.running -= len(batch)
        deliver(batch, outputs, error, &self.completed, &self.failed)

    def fail_unfinished(self, list batch, object error) -> None:
        """Fail the requests of batch not finished yet (a fault while delivering)."""
        cdef Request req
        for req in batch:
            if bc_load_u32_acquire(&req.state) == TAKEN:
                self.failed += 1
                finish_one(req, None, error, error.__traceback__)

    def record_handler_time(self, Py_ssize_t n, int64_t ns) -> None:
        """Feed the estimate of handler time by batch size (called by workers)."""
        est_record(self.est_ns, self.max_items, n, ns)
        if self.auto_delay:
            bc_delay_record(&self.delay, n, ns)     # the auto policy's handler model

    def reason_counts(self) -> dict:
        """Batches dispatched so far, by reason."""
        return {REASONS[i]: self.reasons[i] for i in range(<int>N_REASONS)}

    # ----------------------------------------------------------- a broken worker

    def fail_queued(self, object error) -> int:
        """Fail every request still queued with error; return how many."""
        cdef Request req
        cdef int failed = 0
        cdef list reqs = self.forming
        self.forming = []
        if self.carry is not None:
            reqs.append(self.carry)
            self.carry = None
        if self.keys is not None:
            reqs.extend(self.keys.take_all())
        while True:
            req = self.pop()
            if req is None:
                break
            reqs.append(req)
        for req in reqs:
            if self.keys is not None:
                self.keys.leave(req.key, 1)
            if bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                failed += 1
                self.failed += 1
                finish_one(req, None, error, None)
            else:
                self.withdrawn -= 1
        self.release(len(reqs))
        return failed

    def break_(self, object cause) -> None:
        """A worker cannot go on (its context failed, or it died): close with
        cause and fail every queued request with Closed, so no caller waits forever."""
        self.close(cause)
        self.fail_queued(closed_error(self.close_cause))
