# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""The producer side of a channel: admit a request, or apply the overflow policy.

:class:`Admission` owns the ring of ring.h and the counters both sides agree
on; :class:`_collector.Channel` extends it with the consumer side.  Every call
style enters through :meth:`Admission.submit`, where a call with a deadline
that by the handler model cannot finish in time is shed (``shed_if_late``);
each ``on_full`` policy has one implementation here (``push`` and
``evict_for`` for reject and drop_oldest, ``wait_room`` and the asyncio room
futures for block); ``expire`` and ``cancel`` withdraw.

The collector drains the ring into a scheduler queue (``drain_ring``): the
channel's ``sched``, or with batch_key= the queue of the request's key in
``keys``; a withdrawn request leaves whichever holds it at once (``leave``).

Ownership: the ring holds one strong reference per queued request, taken
by the producer (``Py_INCREF`` before the push) and given up by the consumer
that popped it (``pop``).

What guards what (no state here relies on a GIL; free-threaded builds run
producers, the collector, the deadline thread and withdrawers in parallel):
  - the ring: lock-free MPMC (ring.h); producers push, the collector and
    drop_oldest's eviction pop;
  - ``count``, ``inflight``, ``closed``, the epochs and sleeper counts: C11
    atomics (Dekker pairs commented where they are used);
  - the event counters and ``withdrawn``: relaxed atomic adds;
  - a request's fate: one CAS on ``Request.state`` (QUEUED -> TAKEN or
    CANCELLED); whoever wins it alone counts and finishes the request;
  - ``forming``, the scheduler queues ``sched`` and ``keys`` (their per-key
    counters included), the handler model (``last_batch_*``,
    ``batches_running``, ``busy_until``, ``overhead_*``) and the collector's
    delay model: ``consumer_lock``, taken by the collector, by eviction and
    shedding, by withdrawal (``leave``), by a keyed call's admission and by
    ``record_handler_time``; never held while sleeping, waiting for
    producers or running user code (requests failed under it are finished
    once it is given back), and never taken by a plain push (no eviction, no
    deadline, no key);
  - ``est_ns``: relaxed atomics (one word per batch size);
  - outcomes by priority: priority 0 in relaxed atomics, the others in a dict
    under ``outcomes_lock``;
  - ``room_waiters``: a list never replaced, changed by single atomic list
    operations;
  - ``close_cause``: set once, under ``consumer_lock``.
"""

from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int64_t, uint32_t, uint64_t, INT64_MAX
from libc.stdlib cimport calloc, free

from atomics cimport (
    bc_atomic_i64, bc_load_relaxed, bc_fetch_add_seq_cst, bc_fetch_sub_seq_cst,
    bc_load_u64_relaxed, bc_fetch_add_u64_relaxed, bc_load_i64_relaxed, bc_fetch_add_i64_relaxed,
    bc_load_u32_acquire, bc_load_u32_relaxed, bc_load_u32_seq_cst, bc_store_u32_seq_cst,
    bc_fetch_add_u32_seq_cst, bc_fetch_sub_u32_seq_cst, bc_cas_u32_acq_rel,
    bc_fence_seq_cst, BC_UNLIKELY,
)
from debug cimport BATCHCORE_DEBUG
from estimate cimport est_full_batch
from park cimport bc_now_ns, bc_park, bc_unpark_one, bc_unpark_all
from ring cimport bc_ring_new, bc_ring_free, bc_ring_push, bc_ring_pop, bc_ring_round_up, bc_ring_valid

from asyncio import get_running_loop as _get_running_loop

# channel_cap=None: the ring's fixed size.  Its zeroed pages are committed by
# the OS only as the ring first walks over them (16 bytes a cell).
cdef size_t UNBOUNDED_CAPACITY = 1 << 20
cdef class Admission:
    """A bounded queue of requests: admission, overflow policy and withdrawal.

    Producers never block in a push; on_full="block" callers wait for room
    with the GIL released (threads) or on a future (asyncio).  Counters are
    atomics (see the module docstring for what guards the rest).
    """

    def __cinit__(self, Py_ssize_t cap, Py_ssize_t max_items, *args, OnFull on_full=REJECT,
                  double priority_aging=0.0, bint classic=False, Py_ssize_t workers=1, **kwargs):
        cdef size_t capacity
        if cap < 0:
            raise ValueError(f"Channel: cap must be >= 0 (got {cap!r})")
        if max_items < 1:
            raise ValueError(f"Channel: max_items must be >= 1 (got {max_items!r})")
        # The ring holds twice the cap: a withdrawn request gives its slot of
        # the cap back at once but keeps its cell until a worker pops it.
        if cap == 0:
            capacity = 2 * UNBOUNDED_CAPACITY
            self.cap = UNBOUNDED_CAPACITY
        else:
            capacity = bc_ring_round_up(2 * <size_t>cap)
            self.cap = <size_t>cap
        self.ring = bc_ring_new(capacity)
        if self.ring == NULL:
            raise MemoryError(f"cannot allocate a ring of {capacity} cells")
        if BATCHCORE_DEBUG and not bc_ring_valid(self.ring):
            raise InternalError("Admission: ring geometry invalid after bc_ring_new")
        self.est_ns = <bc_atomic_i64 *>calloc(<size_t>max_items + 1, sizeof(bc_atomic_i64))
        if self.est_ns == NULL:
            raise MemoryError()
        self.max_items = max_items
        self.on_full = on_full
        self.forming = []
        self.room_waiters = []
        self.classic = classic
        self.sched = RequestQueue(priority_aging, classic)
        self.workers = workers if workers > 0 else 1
        self.outcomes = {}

    def __dealloc__(self):
        cdef void *item
        if self.ring != NULL:
            # Give back the references of requests nobody will take any more.
            while bc_ring_pop(self.ring, &item):
                Py_DECREF(<object>item)
            bc_ring_free(self.ring)
            self.ring = NULL
        free(self.est_ns)

    def __reduce__(self):
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    @property
    def queued(self) -> int:
        """Requests queued and not yet taken (approximate while calls run)."""
        cdef long long live = <long long>bc_load_relaxed(&self.count) - bc_load_i64_relaxed(&self.withdrawn)
        return live if live > 0 else 0

    @property
    def submitted(self) -> int:
        """Requests accepted into the queue."""
        return bc_load_u64_relaxed(&self.n_submitted)

    @property
    def rejected(self) -> int:
        """Calls refused with Full (never queued)."""
        return bc_load_u64_relaxed(&self.n_rejected)

    @property
    def evicted(self) -> int:
        """Requests evicted by on_full="drop_oldest" (also counted as failed)."""
        return bc_load_u64_relaxed(&self.n_evicted)

    @property
    def timed_out(self) -> int:
        """Requests whose deadline passed before a batch took them."""
        return bc_load_u64_relaxed(&self.n_timed_out)

    @property
    def cancelled(self) -> int:
        """Requests withdrawn by their caller."""
        return bc_load_u64_relaxed(&self.n_cancelled)

    @property
    def completed(self) -> int:
        """Requests that got the handler's output."""
        return bc_load_u64_relaxed(&self.n_completed)

    @property
    def failed(self) -> int:
        """Requests that got an exception (handler error, Failed item, eviction, a broken worker)."""
        return bc_load_u64_relaxed(&self.n_failed)

    @property
    def late(self) -> int:
        """Of timed_out: requests whose deadline came while their batch ran (the outcome dropped)."""
        return bc_load_u64_relaxed(&self.n_late)

    @property
    def expired(self) -> int:
        """Of timed_out: requests whose deadline came (or would have, by the model) while queued."""
        return bc_load_u64_relaxed(&self.n_expired)

    @property
    def shed(self) -> int:
        """Calls refused at once because by the model they could not finish in time (also in rejected)."""
        return bc_load_u64_relaxed(&self.n_shed)

    @property
    def is_closed(self) -> bool:
        """True once close() began."""
        return bc_load_u32_acquire(&self.closed) != 0

    def closed_error(self):
        """The Closed error calls get now (carrying the worker's failure, if any)."""
        return closed_error(self.close_cause)

    # ----------------------------------------------------------- the call styles

    def call(self, object value, object timeout=None, double cost=0.0, int priority=0, object key=None):
        """Queue value and wait for its outcome, the GIL released while waiting.

        key: its batch key (a keyed channel only).  Raises Full, Closed,
        TimeoutError, or the handler's exception.
        """
        cdef Request req = self.submit(value, KIND_BLOCKING, None, None, timeout, cost, priority, key)
        try:
            park_until_done(req)
        except BaseException:
            self.cancel(req)   # Ctrl-C: withdraw if still queued
            raise
        return take_outcome(req)

    def submit_here(self, object value, object timeout=None, double cost=0.0, int priority=0, object key=None):
        """Queue value for the running event loop; return ``(request, future)``.

        One C call makes the future, finds the loop's mailbox and queues the
        request.  With on_full="block" and no room, nothing is queued and the
        result is ``(None, room)``: ``room`` is a future of the loop that is
        set when room may have come; the caller awaits it and tries again.
        """
        loop = _get_running_loop()
        fut = loop.create_future()
        if self.on_full != BLOCK:
            return self.submit(value, KIND_ASYNC, fut, mailbox_for(loop), timeout, cost, priority, key), fut
        # Register for room before trying: a release between a failed try and
        # the registration would otherwise be missed (another thread may
        # release at any moment).
        room = loop.create_future()
        self.room_waiters.append(room)
        try:
            req = self.submit(value, KIND_ASYNC, fut, mailbox_for(loop), timeout, cost, priority, key)
        except Full as exc:
            if getattr(exc, "max_keys", None) is not None:
                self._forget_room(room)     # too many keys: refused at once, like a thread
                raise
            return None, room
        except BaseException:
            self._forget_room(room)
            raise
        self._forget_room(room)
        return req, fut

    cdef void _forget_room(self, object room) except *:
        try:
            self.room_waiters.remove(room)
        except ValueError:     # a release took it meanwhile
            pass

    def submit_future(self, object value, object fut, object timeout=None, double cost=0.0, int priority=0,
                      object key=None, bint wait=True):
        """Queue value; its outcome is set on the concurrent future fut.

        With on_full="block" the calling thread waits for room first; with
        wait=False it tries once and raises Full (no rejection counted): the
        caller waits for room its own way (cross-process calls do).
        """
        return self.submit(value, KIND_FUTURE, fut, None, timeout, cost, priority, key, wait)

    cdef Request submit(self, object value, WaiterKind kind, object waiter, object mailbox,
                        object timeout, double cost, int priority=0, object key=None, bint wait=True):
        """The one way in: make the request, admit it by the policy, arm its deadline."""
        cdef int64_t deadline_ns = -1
        if timeout is not None:
            deadline_ns = bc_now_ns() + to_ns(<double>timeout)
        cdef Request req = new_request(value, kind, deadline_ns, cost, priority)
        req.waiter = waiter
        req.loop = mailbox
        if self.keys is not None:
            req.key = key
        if deadline_ns >= 0 and not self.classic and self.on_full != BLOCK:
            self.shed_if_late(req)   # "block" callers wait instead, up to their timeout
        if self.keys is not None:
            try:
                with self.consumer_lock:
                    self.keys.admit(key)      # Full past max_keys live keys
            except Full:
                bc_fetch_add_u64_relaxed(&self.n_rejected, 1)
                raise
        try:
            if self.on_full == BLOCK and kind != KIND_ASYNC and wait:
                self.wait_room(req)
            else:
                # asyncio with "block" reaches here only to try once: no rejection counted
                self.push(req, self.on_full != BLOCK)
        except BaseException:
            if self.keys is not None:
                with self.consumer_lock:
                    self.keys.leave(key, 1)   # never queued
            raise
        if deadline_ns >= 0:
            timer().add(req, self)
        return req

    # ----------------------------------------------------------- admission

    cdef int push(self, Request req, bint count_reject) except -1:
        """Queue req or raise Full/Closed; with drop_oldest, fail the oldest queued instead."""
        cdef size_t n
        cdef Request old
        cdef list evicted = None
        cdef size_t dropped
        bc_fetch_add_seq_cst(&self.inflight, 1)
        if BC_UNLIKELY(bc_load_u32_seq_cst(&self.closed)):
            bc_fetch_sub_seq_cst(&self.inflight, 1)
            raise closed_error(self.close_cause)
        n = bc_fetch_add_seq_cst(&self.count, 1)
        # n counts withdrawn requests still in the ring: they hold a cell, not a slot of the cap
        while BC_UNLIKELY(<long long>n - bc_load_i64_relaxed(&self.withdrawn) >= <long long>self.cap):
            bc_fetch_sub_seq_cst(&self.count, 1)
            dropped = 0
            with self.consumer_lock:
                old = self.evict_for(req, &dropped)
            if dropped:
                self.release(dropped)   # withdrawn requests met while draining
            if old is not None:
                self.release(1)
            if old is None:
                bc_fetch_sub_seq_cst(&self.inflight, 1)
                if count_reject:
                    bc_fetch_add_u64_relaxed(&self.n_rejected, 1)
                # what is queued now (evict_for may have dropped withdrawn requests from the ring)
                n = <size_t>max(<long long>bc_load_relaxed(&self.count) - bc_load_i64_relaxed(&self.withdrawn), 0)
                self.fail_evicted(evicted, n)
                raise full_error(n, self.cap, self.retry_after(n))
            if evicted is None:
                evicted = []
            evicted.append(old)
            n = bc_fetch_add_seq_cst(&self.count, 1)
        Py_INCREF(req)   # the ring's reference; the consumer gives it up
        # Counted before the push: once a worker can pop it, it may finish
        # (and be counted completed) before this thread runs another line.
        bc_fetch_add_u64_relaxed(&self.n_submitted, 1)
        if BC_UNLIKELY(not bc_ring_push(self.ring, <void *>req)) and not self._drain_and_push(req):
            # every cell is held, more than cap of them by withdrawn requests
            # behind a queued one: rare, and Full is the truth about the ring
            bc_fetch_add_u64_relaxed(&self.n_submitted, <uint64_t>-1)
            Py_DECREF(req)
            bc_fetch_sub_seq_cst(&self.count, 1)
            bc_fetch_sub_seq_cst(&self.inflight, 1)
            raise full_error(n, self.cap, self.retry_after(n))
        bc_fetch_sub_seq_cst(&self.inflight, 1)
        # Dekker with the collector: our push above, then the fence, then the
        # read of sleepers; the collector raises sleepers, then re-reads the
        # ring.  One of the two sees the other, so a wake-up is never lost.
        bc_fence_seq_cst()
        if bc_load_u32_relaxed(&self.sleepers) and (
                n + 1 >= bc_load_u32_relaxed(&self.wake_threshold) or req.deadline_ns >= 0):
            bc_fetch_add_u32_seq_cst(&self.work_epoch, 1)
            bc_unpark_one(&self.work_epoch)
        # Only now, with inflight back down, may user code run (future
        # callbacks): it may call close(), which waits for inflight.
        self.fail_evicted(evicted, n)
        return 0

    cdef int wait_room(self, Request req) except -1:
        """on_full="block" for threads: sleep (GIL released) until a push fits or the deadline."""
        cdef uint32_t epoch
        cdef int64_t until, deadline_ns = req.deadline_ns
        while True:
            epoch = bc_load_u32_acquire(&self.space_epoch)
            bc_fetch_add_u32_seq_cst(&self.space_sleepers, 1)
            try:
                try:
                    self.push(req, False)
                    return 0
                except Full:
                    pass
                if deadline_ns >= 0 and bc_now_ns() >= deadline_ns:
                    raise no_room_error()
                until = bc_now_ns() + SIGNAL_SLICE_NS
                if deadline_ns >= 0 and deadline_ns < until:
                    until = deadline_ns
                with nogil:
                    bc_park(&self.space_epoch, epoch, until)
            finally:
                bc_fetch_sub_u32_seq_cst(&self.space_sleepers, 1)
            PyErr_CheckSignals()

    cdef Request evict_for(self, Request req, size_t *dropped):
        """The queue is full: take out the request that req displaces (now TAKEN), or None.

        The candidate is the lowest priority, then the furthest deadline (none
        is furthest), then the oldest, over every queue (with batch_key=, the
        worst of each key's queue) and the batch forming; a classic channel's
        is the oldest.  on_full="drop_oldest" evicts it unless req's priority
        is lower; the other policies evict it only if its priority is lower
        than req's.  consumer_lock held: the caller releases its room (and
        *dropped, withdrawn requests met in the ring) once the lock is given back.
        """
        cdef Request worst = None, cand
        cdef KeyQueue q, worst_q = None
        cdef Py_ssize_t i, at = -1
        cdef bint evict
        self.drain_ring(dropped)
        if self.keys is not None:
            for q in self.keys.queues.values():
                cand = q.sched.peek_worst()
                if cand is not None and (worst is None or _worse(cand, worst, self.classic)):
                    worst, worst_q = cand, q
        else:
            worst = self.sched.peek_worst()
        # The forming batch holds the best requests of their time, but a
        # later one may be worse (or, with nothing else queued, it is all).
        for i in range(len(self.forming)):
            cand = <Request>self.forming[i]
            if bc_load_u32_relaxed(&cand.state) == QUEUED and (worst is None or _worse(cand, worst, self.classic)):
                worst, at = cand, i
        if worst is None:
            return None
        if self.classic or self.on_full == DROP_OLDEST:
            evict = self.on_full == DROP_OLDEST and (self.classic or worst.priority <= req.priority)
        else:
            evict = worst.priority < req.priority
        if not evict or not bc_cas_u32_acq_rel(&worst.state, QUEUED, TAKEN):
            return None
        if at >= 0:
            del self.forming[at]
        elif worst_q is not None:
            self.keys.remove(worst_q, worst)
            self.keys.leave(worst.key, 1)
        else:
            self.sched.take(worst)
        return worst

    cdef Py_ssize_t drain_ring(self, size_t *dropped) except -1:
        """Move every request in the ring into its scheduler queue; drop
        withdrawn ones (added to *dropped: the caller releases their room once
        consumer_lock, held here, is given back).  Returns how many were
        popped (cells freed)."""
        cdef Request req
        cdef Py_ssize_t popped = 0
        while True:
            req = self.pop()
            if req is None:
                return popped
            popped += 1
            if bc_load_u32_relaxed(&req.state) != QUEUED:
                dropped[0] += 1       # withdrawn by its caller
                bc_fetch_add_i64_relaxed(&self.withdrawn, -1)
                if self.keys is not None:
                    self.keys.leave(req.key, 1)
                continue
            if self.keys is not None:
                self.keys.add(req)
            else:
                self.sched.push(req)

    cdef bint _drain_and_push(self, Request req) except -1:
        """The ring had no free cell: drain it into the scheduler and try once more."""
        cdef size_t dropped = 0
        cdef Py_ssize_t popped
        with self.consumer_lock:
            popped = self.drain_ring(&dropped)
        if dropped:
            self.release(dropped)
        return popped > 0 and bc_ring_push(self.ring, <void *>req)

    cdef int shed_if_late(self, Request req) except -1:
        """Raise Full at once if, by the handler model, req would finish after its deadline.

        The work ahead of it (batches_ahead) runs after what the running
        batch has left.  An idle worker with nothing queued always admits:
        whatever the model says, the call runs and the model is measured
        again, so a burst of slow batches cannot shut admission for good.
        Full.retry_after: how long until that work has drained enough.
        """
        cdef int64_t now, wait, remaining
        cdef Py_ssize_t ahead = 0, rest = 0, full_batches
        cdef size_t dropped = 0
        if bc_load_u32_acquire(&self.closed):
            return 0         # the push says Closed
        with self.consumer_lock:
            self.drain_ring(&dropped)
            full_batches = self.batches_ahead(req, &ahead, &rest)
            if ahead == 0 and self.batches_running == 0:
                wait = 0
            else:
                now = bc_now_ns()
                remaining = self.busy_until - now if self.busy_until > now else 0
                wait = (remaining + full_batches * (self.predict_ns(self.max_items)
                                                    + min(self.overhead_ns, self.overhead_last_ns))
                        // self.workers
                        + self.predict_ns(rest + 1))
        if dropped:
            self.release(dropped)
        if wait == 0 or now + wait <= req.deadline_ns:
            return 0         # idle, nothing measured yet, or it fits
        bc_fetch_add_u64_relaxed(&self.n_shed, 1)
        bc_fetch_add_u64_relaxed(&self.n_rejected, 1)
        self.count_outcome(req.priority, OUTCOME_SHED)
        raise shed_error(ahead, (now + wait - req.deadline_ns) * 1e-9)

    cdef Py_ssize_t batches_ahead(self, Request req, Py_ssize_t *ahead, Py_ssize_t *rest) except -1:
        """Whole batches that go before req's (the batch req joins not counted);
        *ahead: the requests in them and in req's batch before it; *rest: those
        in req's batch before it.

        Unkeyed: what is queued at req's priority or higher, and the batch
        forming.  Keyed (batches never mix keys): the whole batches of req's
        own key at its priority or higher, plus the batches of other keys
        served before req's key (KeyQueues.keys_before: priorities do not
        order keys).
        """
        cdef Py_ssize_t own, others, others_items = 0
        if self.keys is None:
            ahead[0] = self.sched.count_at_least(req.priority) + len(self.forming)
            rest[0] = ahead[0] % self.max_items
            return ahead[0] // self.max_items
        own = self.keys.count_at_least(req.key, req.priority)
        others = self.keys.keys_before(req.key, self.max_items, self.max_cost, &others_items)
        ahead[0] = own + others_items
        rest[0] = own % self.max_items
        return own // self.max_items + others

    cdef int64_t predict_ns(self, Py_ssize_t n) noexcept:
        """The handler's ns for a batch of n by the model (0: nothing measured yet).

        The running estimate for the nearest size measured (a smaller one's
        time unscaled: a prediction that fails calls must not guess high),
        unless the latest batch says the handler is now faster (its time
        scaled to n inputs): a handler that sped up is believed after one
        batch, one that slowed down within a few.  consumer_lock held.
        """
        cdef int64_t h = _est_nearest(self.est_ns, self.max_items, n), recent
        if self.last_batch_n > 0:
            recent = self.last_batch_ns
            if n > self.last_batch_n:
                recent = recent * n // self.last_batch_n
            if h == 0 or recent < h:
                h = recent
        return h

    cdef void count_outcome(self, int priority, int outcome) except *:
        """Count one outcome (OUTCOME_*) of a request of this priority."""
        cdef list counts
        if priority == 0:
            bc_fetch_add_u64_relaxed(&self.outcomes0[outcome], 1)
            return
        with self.outcomes_lock:     # a dict lookup and an int add: no user code
            counts = self.outcomes.get(priority)
            if counts is None:
                counts = self.outcomes[priority] = [0, 0, 0, 0]
            counts[outcome] += 1

    def outcomes_by_priority(self) -> dict:
        """``{priority: (answered, late, shed, expired)}`` for every priority seen."""
        cdef dict out
        cdef tuple zero = tuple([bc_load_u64_relaxed(&self.outcomes0[i]) for i in range(4)])
        with self.outcomes_lock:
            out = {p: tuple(c) for p, c in self.outcomes.items()}
        if any(zero):
            out[0] = zero
        return dict(sorted(out.items()))

    cdef void leave(self, Request req) except *:
        """req was just withdrawn: out of its scheduler queue at once (its
        room freed), else (still in the ring, or in a batch being formed or
        claimed) counted withdrawn until the collector drops it."""
        cdef KeyQueue q
        cdef bint taken = False
        with self.consumer_lock:     # the collector, evictions and other withdrawals move it too
            if self.keys is not None:
                q = self.keys.queues.get(req.key)
                if q is not None and q.sched.holds(req):
                    self.keys.remove(q, req)
                    self.keys.leave(req.key, 1)
                    taken = True
            elif self.sched.take(req) is not None:
                taken = True
            if not taken:
                bc_fetch_add_i64_relaxed(&self.withdrawn, 1)
        if taken:
            self.release(1)
        else:
            _room_came(self)

    cdef void fail_evicted(self, list evicted, size_t n) except *:
        cdef Request old
        if evicted is None:
            return
        for old in evicted:
            bc_fetch_add_u64_relaxed(&self.n_evicted, 1)
            bc_fetch_add_u64_relaxed(&self.n_failed, 1)
            finish_one(old, None, evicted_error(n, self.retry_after(n)), None)

    cdef double retry_after(self, size_t n) noexcept:
        """Seconds until the queue has drained n items at the recent pace."""
        return (<double>n / <double>self.max_items) * est_full_batch(self.est_ns, self.max_items) * 1e-9

    # ----------------------------------------------------------- withdrawal

    def expire(self, Request req) -> bool:
        """req's deadline passed: withdraw it if still queued and fail it with TimeoutError.

        The deadline timer and the collector both come here: the one place a
        request times out.
        """
        if bc_cas_u32_acq_rel(&req.state, QUEUED, CANCELLED):
            bc_fetch_add_u64_relaxed(&self.n_timed_out, 1)
            bc_fetch_add_u64_relaxed(&self.n_expired, 1)
            self.count_outcome(req.priority, OUTCOME_EXPIRED)
            self.leave(req)
            finish_one(req, None, timeout_error(), None)
            return True
        return False

    def cancel(self, Request req) -> bool:
        """The caller gave up (task cancelled, Ctrl-C): withdraw req if still queued."""
        if bc_cas_u32_acq_rel(&req.state, QUEUED, CANCELLED):
            bc_fetch_add_u64_relaxed(&self.n_cancelled, 1)
            self.leave(req)
            req.value = None
            return True
        return False

    # ----------------------------------------------------------- the consumer's hooks

    cdef Request pop(self):
        """Pop one request (or None); the ring's reference becomes ours.

        The request still counts as queued (and against the cap) until
        release(): it may wait in a forming batch, where its caller can still
        withdraw it.
        """
        cdef void *item
        cdef Request req
        if not bc_ring_pop(self.ring, &item):
            return None
        req = <Request>item      # +1 for the local variable
        Py_DECREF(req)           # -1: the ring's reference is given up
        if BATCHCORE_DEBUG and req.kind not in (KIND_BLOCKING, KIND_ASYNC, KIND_FUTURE):
            raise InternalError("pop: ring cell does not hold a Request")
        return req

    cdef void release(self, size_t k) except *:
        """k popped requests left the queue: make room, wake on_full="block" callers."""
        if k == 0:
            return
        bc_fetch_sub_seq_cst(&self.count, k)
        bc_fence_seq_cst()   # the room is visible before we read space_sleepers
        if bc_load_u32_relaxed(&self.space_sleepers):
            bc_fetch_add_u32_seq_cst(&self.space_epoch, 1)
            bc_unpark_all(&self.space_epoch)
        if self.room_waiters:
            _wake_rooms(self.room_waiters)

    # ----------------------------------------------------------- closing

    def close(self, object cause=None) -> None:
        """Refuse new requests and wake every sleeper; idempotent.

        cause: the exception that broke a worker, carried by later Closed errors.
        """
        cdef bint first = bc_load_u32_seq_cst(&self.closed) == 0
        if cause is not None and self.close_cause is None:
            with self.consumer_lock:
                if self.close_cause is None:
                    self.close_cause = cause
        bc_store_u32_seq_cst(&self.closed, 1)
        # Producers that passed the closed-check finish their push before we
        # return (they hold no lock and never wait: this is a few ns).
        self.wait_inflight()
        bc_fetch_add_u32_seq_cst(&self.work_epoch, 1)
        bc_unpark_all(&self.work_epoch)
        bc_fetch_add_u32_seq_cst(&self.space_epoch, 1)
        bc_unpark_all(&self.space_epoch)
        _wake_rooms(self.room_waiters)     # they try again and get Closed
        if first:
            # Its deadline entries go now; a later close() has none to drop
            # (and at interpreter exit a finaliser's close() must not need
            # the timer's module any more).
            timer().sweep(self)

    cdef void wait_inflight(self) noexcept:
        """Sleep in 10 us naps, GIL released, until no producer is mid-push."""
        cdef bc_atomic_u32 nap = 0   # a private word: parking on it is a 10 us sleep
        while bc_load_relaxed(&self.inflight):
            with nogil:
                bc_park(&nap, 0, bc_now_ns() + 10_000)


cdef inline int64_t _est_nearest(bc_atomic_i64 *est, Py_ssize_t max_items, Py_ssize_t n) noexcept:
    """est[n], else the nearest larger size measured, else the nearest smaller (0: none)."""
    cdef Py_ssize_t i
    if n > max_items:
        n = max_items
    for i in range(n, max_items + 1):
        if bc_load_i64_relaxed(&est[i]):
            return bc_load_i64_relaxed(&est[i])
    for i in range(n - 1, 0, -1):
        if bc_load_i64_relaxed(&est[i]):
            return bc_load_i64_relaxed(&est[i])
    return 0


cdef inline bint _worse(Request a, Request b, bint fifo) noexcept:
    """True if a full queue gives up a before b (see evict_for)."""
    cdef int64_t da, db
    if not fifo:
        if a.priority != b.priority:
            return a.priority < b.priority
        da = a.deadline_ns if a.deadline_ns >= 0 else INT64_MAX
        db = b.deadline_ns if b.deadline_ns >= 0 else INT64_MAX
        if da != db:
            return da > db
    return a.arrival_ns < b.arrival_ns


cdef void _room_came(Admission adm) except *:
    """A withdrawal gave a slot of the cap back: wake on_full="block" callers waiting for room."""
    bc_fence_seq_cst()   # the withdrawal is visible before we read space_sleepers
    if bc_load_u32_relaxed(&adm.space_sleepers):
        bc_fetch_add_u32_seq_cst(&adm.space_epoch, 1)
        bc_unpark_all(&adm.space_epoch)
    if adm.room_waiters:
        _wake_rooms(adm.room_waiters)


cdef void _wake_rooms(list waiters) except *:
    """Wake every asyncio caller waiting for room, one pop at a time: an
    append racing with this is either popped here or left for the next wake."""
    while True:
        try:
            fut = waiters.pop()
        except IndexError:
            return
        _set_room(fut)


cdef void _set_room(object fut) except *:
    """Tell an asyncio caller waiting for room to try again (from any thread)."""
    try:
        fut.get_loop().call_soon_threadsafe(wake_room, fut)
    except RuntimeError:     # its loop is closed: nobody is left to wait
        pass


def wake_room(fut) -> None:
    """Set the room signal fut of an asyncio caller (in its loop), unless already set."""
    if not fut.done():
        fut.set_result(None)
