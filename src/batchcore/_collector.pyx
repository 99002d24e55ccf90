# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""The consumer side of a channel: form batches, dispatch them, account for them.

:class:`Channel` extends :class:`_admission.Admission`.  A worker calls
:meth:`Channel.collect` (one worker at a time), runs the handler on the
inputs, then :meth:`Channel.deliver`.  While a batch forms its requests stay
QUEUED, so their callers may still withdraw them; at dispatch each is claimed
(QUEUED -> TAKEN).

Batches form from the channel's scheduler queues (_scheduler.RequestQueue),
into which the collector drains the ring: one queue for an unkeyed channel,
one per key with batch_key= (_keys.pyx).  A batch takes the highest priority
first, then the earliest deadline, then arrival; the handler gets its inputs
in arrival order.  A request the handler estimate says cannot
finish before its deadline is not put into a batch: it fails with
TimeoutError (counted expired).  A request whose deadline passes while its
batch runs fails at once with TimeoutError (counted late); the batch's output
for it is dropped.

What guards what (no state here relies on a GIL): the scheduler queues
(``sched``, ``keys``), the forming batch, the handler model (est_ns aside:
relaxed atomics), ``batches_running``/``busy_until``/``overhead_ns`` and the
adaptive delay model are under ``consumer_lock`` (shared with the producers'
eviction, shedding and withdrawal in _admission.pyx and with
``record_handler_time``), taken per collector round, never while it sleeps
or while user code runs: requests failed while it is held (predicted late)
are finished after it is given back.  Batch counters, ``running`` and every
outcome counter are relaxed atomics; each request's fate is one CAS on its
state.  ``collect`` itself runs in one thread at a time (the workers'
collect lock).
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t, INT64_MAX

from atomics cimport (
    bc_atomic_u64, bc_atomic_i64, bc_fetch_add_u64_relaxed, bc_load_u64_relaxed, bc_load_u64_seq_cst,
    bc_fetch_add_i64_relaxed, bc_load_i64_relaxed, bc_load_i64_seq_cst,
    bc_load_u32_acquire, bc_store_u32_release,
    bc_fetch_add_u32_seq_cst, bc_fetch_sub_u32_seq_cst, bc_cas_u32_acq_rel,
)
from debug cimport BATCHCORE_DEBUG
from delay cimport bc_delay, bc_delay_init, bc_delay_record, bc_delay_arrival, bc_delay_decide, bc_delay_target
from estimate cimport est_lookup, est_record
from park cimport bc_now_ns, bc_park_precise

from operator import attrgetter as _attrgetter

_by_arrival = _attrgetter("arrival_ns")

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
    bint cost_full           # the next request would not fit max_cost


cdef inline void _forming_reset(Forming *f) noexcept:
    f.n = 0
    f.first_arrival = -1
    f.min_deadline = INT64_MAX
    f.cost = 0.0
    f.waited = False
    f.cost_full = False


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
    cdef bc_atomic_u64 reasons[N_REASONS]
    # Requests claimed into a batch and not yet delivered: an atomic (one
    # worker adds at dispatch while another subtracts at delivery).
    cdef bc_atomic_i64 n_running
    # When the last full batch was dispatched (0: the last one was not full);
    # consumer_lock guards it.
    cdef int64_t last_full_dispatch

    def __init__(self, Py_ssize_t cap, Py_ssize_t max_items, object max_delay, double max_cost=0.0,
                 bint deadline_aware=True, *, on_full=0, double auto_max_delay=0.01,
                 double priority_aging=0.0, bint classic=False, Py_ssize_t workers=1, Py_ssize_t max_keys=0):
        """priority_aging: seconds of waiting worth one priority level (0: none).
        classic: arrival order, timeout= bounds only the queue wait, no
        shedding (the behaviour before priorities, kept as a baseline).
        max_keys > 0: a keyed channel (batch_key=), at most that many live
        keys, each with its own scheduler queue."""
        if max_keys > 0:
            self.keys = KeyQueues(max_keys, priority_aging, classic)
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
        cdef list late
        if self.keys is not None:
            return self._collect_keyed()
        _forming_reset(&f)
        with self.consumer_lock:       # fail_queued may replace the list from another thread
            batch = self.forming
            self._summarize(&f)
        while True:
            dropped = 0
            late = []
            # consumer_lock: producers evict from the queues and the forming
            # batch, withdrawals take requests out of the queues, and
            # record_handler_time feeds the models, from other threads.
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
                refilled = self._take_ready(batch, &f, &dropped, late)
                now = bc_now_ns()
                reason = self._dispatch_reason(&f, now, start, &wake_at)
                stop = reason != WAIT or (f.n == 0 and bc_load_u32_acquire(&self.closed))
                if stop and f.n > 0:
                    self.forming = []      # the batch is ours alone from here
                    self._measure_overhead(reason == R_FULL, now)
            if dropped:
                self.release(dropped)      # withdrawn requests: their room (may wake asyncio callers)
            if late:
                _finish_predicted(late)
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

    cdef void _measure_overhead(self, bint full, int64_t now) noexcept:
        """Learn overhead_ns from two full batches dispatched back to back by
        one worker: the time between them less the handler's time.  consumer_lock held."""
        cdef int64_t gap
        if full and self.last_full_dispatch > 0 and self.workers == 1 and self.last_batch_ns > 0:
            gap = now - self.last_full_dispatch - self.last_batch_ns
            if gap < 0:
                gap = 0
            self.overhead_ns = gap if self.overhead_ns == 0 else (4 * self.overhead_ns + gap) // 5
            self.overhead_last_ns = gap
        self.last_full_dispatch = now if full else 0

    cdef void _summarize(self, Forming *f) except *:
        """Recompute f from the forming batch (it may have lost evicted requests); consumer_lock held."""
        cdef Request req
        cdef bint waited = f.waited if f.n else False
        _forming_reset(f)
        for req in self.forming:
            _forming_add(f, req)
        f.waited = waited

    cdef bint _take_ready(self, list batch, Forming *f, size_t *dropped, list late) except -1:
        """Move the best requests queued into batch, within max_items and max_cost; True if any.

        The ring is drained into the scheduler first, so the batch takes the
        best of everything queued, not the oldest.  consumer_lock held:
        *dropped (room to release) and late (requests to fail) are for the caller once the lock is given back.
        """
        cdef Request req
        cdef bint took = False
        cdef int64_t now
        self.drain_ring(dropped)
        if self.sched.n == 0:
            return False
        now = bc_now_ns()
        self.sched.age(now)
        while f.n < self.max_items:
            req = self.sched.peek_best()
            if req is None:
                break
            if self.max_cost > 0.0 and f.n > 0 and f.cost + req.cost > self.max_cost:
                f.cost_full = True     # it goes first in the next batch
                break
            self.sched.take(req)
            if self._cannot_finish(req, f.n + 1, now):
                self._expire_predicted(req, dropped, late)
                continue
            batch.append(req)
            _forming_add(f, req)
            if self.auto_delay:
                bc_delay_arrival(&self.delay, req.arrival_ns)   # the arrival model
            took = True
        return took

    cdef bint _cannot_finish(self, Request req, Py_ssize_t n, int64_t now) noexcept:
        """True if a batch of n dispatched now would, by the handler estimate,
        end after req's deadline.

        An estimate longer than req's whole timeout is not trusted: it would
        have failed req even had it been dispatched on arrival, and dropping
        every such request would keep a stale estimate (a slow burst) from
        ever being measured again.  consumer_lock held (the handler model).
        """
        cdef int64_t h
        if self.classic or req.deadline_ns < 0:
            return False
        h = self.predict_ns(n)
        return h > 0 and now + h > req.deadline_ns and h <= req.deadline_ns - req.arrival_ns

    cdef bint _predicts_late(self, Request req, Py_ssize_t n, int64_t now) except -1:
        """_cannot_finish, taking consumer_lock for the handler model."""
        if self.classic or req.deadline_ns < 0:
            return False
        with self.consumer_lock:
            return self._cannot_finish(req, n, now)

    cdef void _expire_predicted(self, Request req, size_t *dropped, list late) except *:
        """req, just taken out of its queue, cannot finish in time: claim it
        for a TimeoutError.  consumer_lock held: its room (*dropped) and its
        outcome (late, see _finish_predicted) are given once it is released."""
        dropped[0] += 1
        if self.keys is not None:
            self.keys.leave(req.key, 1)
        if bc_cas_u32_acq_rel(&req.state, QUEUED, CANCELLED):
            bc_fetch_add_u64_relaxed(&self.n_timed_out, 1)
            bc_fetch_add_u64_relaxed(&self.n_expired, 1)
            self.count_outcome(req.priority, OUTCOME_EXPIRED)
            late.append(req)
        else:
            bc_fetch_add_i64_relaxed(&self.withdrawn, -1)   # withdrawn meanwhile: its leave() counted it

    cdef DispatchReason _dispatch_reason(self, Forming *f, int64_t now, int64_t start,
                                         int64_t *wake_at) noexcept:
        """Why to dispatch the forming batch now, or WAIT with *wake_at (-1: until woken).

        start: when the worker became free (the auto policy measures from it).
        consumer_lock held (the delay model).
        """
        cdef int64_t deadline_wake, until
        wake_at[0] = -1
        if f.n >= self.max_items or f.cost_full:
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
        """QUEUED -> TAKEN for each request; drop withdrawn ones, expire late
        ones and those the estimate says cannot finish in time."""
        cdef list claimed = []
        cdef Request req
        cdef int64_t now = bc_now_ns(), last_arrival = -1
        cdef Py_ssize_t n = len(batch)
        cdef bint in_order = True
        for req in batch:
            if req.deadline_ns >= 0 and now >= req.deadline_ns:
                self.expire(req)           # withdraws it if still queued
            elif self._predicts_late(req, n, now) and bc_cas_u32_acq_rel(&req.state, QUEUED, CANCELLED):
                bc_fetch_add_u64_relaxed(&self.n_timed_out, 1)
                bc_fetch_add_u64_relaxed(&self.n_expired, 1)
                self.count_outcome(req.priority, OUTCOME_EXPIRED)
                bc_fetch_add_i64_relaxed(&self.withdrawn, 1)        # given back just below
                finish_one(req, None, predicted_error(), None)
            req.in_batch = True            # before the claim: the deadline reads it after
            if not bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                bc_fetch_add_i64_relaxed(&self.withdrawn, -1)   # withdrawn: its caller was told
                continue
            claimed.append(req)
            if req.arrival_ns < last_arrival:
                in_order = False
            last_arrival = req.arrival_ns
        if not in_order:
            # The scheduler chose who is in the batch; the handler still gets
            # them in arrival order (a stable sort keeps ties as chosen).
            claimed.sort(key=_by_arrival)
        bc_fetch_add_i64_relaxed(&self.n_running, len(claimed))
        if claimed:
            with self.consumer_lock:
                self.batches_running += 1
                self.busy_until = now + self.predict_ns(len(claimed))
        if BATCHCORE_DEBUG and len(claimed) > self.max_items:
            raise InternalError("_claim: batch larger than max_items")
        self.release(len(batch))
        return claimed

    # ----------------------------------------------------------- keyed batches

    cdef object _collect_keyed(self):
        """collect() of a keyed channel: a batch from one key's queue (see _keys.pyx).

        The same wait as collect(), with the ring drained into the per-key
        scheduler queues each round; the key served is KeyQueues.next_queue's,
        or one whose deadline cannot wait, and its batch is the best of that
        key's queue (_take_keyed), as an unkeyed batch is the best of its one.
        Each round's look at the queues is under consumer_lock, released
        before sleeping, claiming and failing requests.
        """
        cdef KeyQueues keys = self.keys
        cdef KeyQueue q, due
        cdef list batch = None, claimed, late
        cdef double cost = 0.0
        cdef int64_t now, wake_at = -1, since = 0
        cdef int64_t start = bc_now_ns()
        cdef Py_ssize_t gap, target, held
        cdef uint32_t epoch
        cdef size_t dropped
        cdef bint refilled, rechecked = False, stop
        cdef DispatchReason reason
        while True:
            dropped = 0
            late = []
            with self.consumer_lock:
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
                held = keys.held
                self.drain_ring(&dropped)
                refilled = keys.held > held
                now = bc_now_ns()
                q = keys.next_queue(self.max_items, self.max_cost)
                reason = self._keyed_reason(q, now, start, &wake_at)
                if reason == WAIT and q is not None and self.deadline_aware:
                    due = keys.urgent(now, self.est_ns, self.max_items, &wake_at)
                    if due is not None:
                        q, reason = due, R_DEADLINE
                stop = reason != WAIT or (q is None and bc_load_u32_acquire(&self.closed))
                if stop and q is not None:
                    since = q.first_arrival()
                    batch = self._take_keyed(q, &cost, &dropped, late)
                    self._measure_overhead(reason == R_FULL, now)
            if dropped:
                self.release(dropped)
            if late:
                _finish_predicted(late)
            if stop:
                bc_fetch_sub_u32_seq_cst(&self.sleepers, 1)
                if q is None:
                    if not rechecked:       # as in collect(): a late push may still land
                        rechecked = True
                        self.wait_inflight()
                        continue
                    return None
                claimed = self._claim(batch)
                with self.consumer_lock:
                    keys.leave(q.key, len(batch))
                    if claimed:
                        keys.count_batch(q.key, len(claimed))
                batch = None
                if claimed:
                    bc_fetch_add_u64_relaxed(&self.n_batches, 1)
                    bc_fetch_add_u64_relaxed(&self.n_batched_items, len(claimed))
                    bc_fetch_add_u64_relaxed(&self.reasons[<int>reason], 1)
                    return claimed, REASONS[<int>reason], cost, self._keyed_delay(since, now, start, reason)
                continue
            if refilled:
                bc_fetch_sub_u32_seq_cst(&self.sleepers, 1)
                continue
            with nogil:
                bc_park_precise(&self.work_epoch, epoch, wake_at, 0 if self.auto_delay else PRECISE_SPIN_NS)
                bc_fetch_sub_u32_seq_cst(&self.sleepers, 1)
            with self.consumer_lock:
                keys.mark_waited()

    cdef list _take_keyed(self, KeyQueue q, double *cost, size_t *dropped, list late):
        """Take q's next batch: its best requests (priority with aging, then
        deadline, then arrival) within max_items and max_cost; one the
        estimate says cannot finish in time fails instead.  *cost: its summed
        cost.  consumer_lock held (*dropped, late: as in _take_ready)."""
        cdef list batch = []
        cdef Request req
        cdef double summed = 0.0
        cdef int64_t now = bc_now_ns()
        q.sched.age(now)
        q.waited = False
        while len(batch) < self.max_items:
            req = q.sched.peek_best()
            if req is None:
                break
            if self.max_cost > 0.0 and batch and summed + req.cost > self.max_cost:
                break                  # it goes first in the key's next batch
            self.keys.remove(q, req)
            if self._cannot_finish(req, len(batch) + 1, now):
                self._expire_predicted(req, dropped, late)
                continue
            batch.append(req)
            summed += req.cost
            if self.auto_delay:
                bc_delay_arrival(&self.delay, req.arrival_ns)   # the arrival model
        cost[0] = summed
        return batch

    cdef DispatchReason _keyed_reason(self, KeyQueue q, int64_t now, int64_t start,
                                      int64_t *wake_at) noexcept:
        """Why to dispatch q's head batch now, or WAIT with *wake_at (-1: until woken); consumer_lock held."""
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
            until = bc_delay_decide(&self.delay, now, q.sched.n, first if first > start else start)
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
        if self.keys is None:
            return {}
        with self.consumer_lock:
            return self.keys.counters()

    @property
    def live_keys(self) -> int:
        """Keys with requests queued now (0 for an unkeyed channel)."""
        if self.keys is None:
            return 0
        with self.consumer_lock:
            return self.keys.live_keys

    # ----------------------------------------------------------- after the handler

    def deliver(self, list batch, object outputs, object error) -> None:
        """Give each request of batch its outcome and wake its caller.

        outputs: a sequence as long as batch (output i to request i; a
        ``Failed`` entry fails only its own caller), or None when error is the
        exception for the whole batch.
        """
        cdef Request req
        cdef Py_ssize_t i, n = len(batch)
        cdef list keep = None
        # Claim each delivery (TAKEN -> FINISHING): the deadline may have
        # failed a request LATE meanwhile; its outcome is dropped here.
        for i in range(n):
            req = <Request>batch[i]
            if not bc_cas_u32_acq_rel(&req.state, TAKEN, FINISHING):
                if keep is None:
                    keep = list(range(i))
                continue
            if keep is not None:
                keep.append(i)
            self.count_outcome(req.priority, OUTCOME_ANSWERED)
        if keep is not None:
            batch = [batch[i] for i in keep]
            if error is None:
                outputs = [outputs[i] for i in keep]
        # Not running any more before any caller wakes: stats() seen by a
        # caller that just returned already balances.
        bc_fetch_add_i64_relaxed(&self.n_running, -len(batch))
        with self.consumer_lock:
            if self.batches_running > 0:
                self.batches_running -= 1
            if self.batches_running == 0:
                self.busy_until = 0
        deliver(batch, outputs, error, &self.n_completed, &self.n_failed)

    def expire(self, Request req) -> bool:
        """req's deadline passed: fail it with TimeoutError, queued (expired)
        or inside a running batch (late; the batch's outcome for it is dropped)."""
        if Admission.expire(self, req):
            return True
        if req.waiter is not None and req.waiter.done():
            return False     # its caller gave up already (cancelled): the batch's outcome is dropped as usual
        if (not self.classic and req.in_batch
                and bc_cas_u32_acq_rel(&req.state, TAKEN, LATE)):
            bc_fetch_add_u64_relaxed(&self.n_timed_out, 1)
            bc_fetch_add_u64_relaxed(&self.n_late, 1)
            self.count_outcome(req.priority, OUTCOME_LATE)
            bc_fetch_add_i64_relaxed(&self.n_running, -1)
            # The input stays: its worker may be reading it on another thread
            # (clearing and restoring it would hand that worker None).
            finish_one(req, None, late_error(), None, True)
            return True
        return False

    def fail_unfinished(self, list batch, object error) -> None:
        """Fail the requests of batch not finished yet (a fault while delivering)."""
        cdef Request req
        cdef uint32_t state
        for req in batch:
            state = bc_load_u32_acquire(&req.state)
            # FINISHING: claimed by this worker's delivery; TAKEN: not yet
            if state == FINISHING or (state == TAKEN and bc_cas_u32_acq_rel(&req.state, TAKEN, FINISHING)):
                bc_fetch_add_u64_relaxed(&self.n_failed, 1)
                finish_one(req, None, error, error.__traceback__)

    def record_handler_time(self, Py_ssize_t n, int64_t ns) -> None:
        """Feed the estimate of handler time by batch size (called by workers)."""
        est_record(self.est_ns, self.max_items, n, ns)
        with self.consumer_lock:      # the collector and shedding read both models
            if n > 0 and ns >= 0:
                self.last_batch_n, self.last_batch_ns = n, ns
            if self.auto_delay:
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
        return {REASONS[i]: bc_load_u64_relaxed(&self.reasons[i]) for i in range(<int>N_REASONS)}

    # ----------------------------------------------------------- a broken worker

    def fail_queued(self, object error) -> int:
        """Fail every request still queued with error; return how many."""
        cdef Request req
        cdef int failed = 0
        cdef list reqs
        cdef size_t dropped = 0
        with self.consumer_lock:     # the collector may be forming a batch from another thread
            reqs = self.forming
            self.forming = []
            self.drain_ring(&dropped)
            reqs.extend(self.sched.take_all())
            if self.keys is not None:
                reqs.extend(self.keys.take_all())
                for req in reqs:
                    self.keys.leave(req.key, 1)
        if dropped:
            self.release(dropped)
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


cdef void _finish_predicted(list late) except *:
    """Fail requests claimed by _expire_predicted (counted already) with
    TimeoutError: outside consumer_lock, since waking a caller may run user code."""
    cdef Request req
    for req in late:
        finish_one(req, None, predicted_error(), None)
