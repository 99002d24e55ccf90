# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The producer side of a channel: admit a request, or apply the overflow policy.

:class:`Admission` owns the ring of ring.h and the counters both sides agree
on; :class:`_collector.Channel` extends it with the consumer side.  Every call
style enters through :meth:`Admission.submit`; each ``on_full`` policy has one
implementation here (``push`` for reject and drop_oldest, ``wait_room`` and
the asyncio room futures for block); ``expire`` and ``cancel`` withdraw.

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
  - ``forming``, ``carry`` (and the collector's delay model): ``consumer_lock``,
    never held while sleeping, waiting for producers or running user code;
  - ``room_waiters``: a list never replaced, changed by single atomic list
    operations;
  - ``close_cause``: set once, under ``consumer_lock``.
"""

from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int64_t, uint32_t
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
from batched_fn._aio cimport mailbox_for
from batched_fn._deadlines cimport timer
from batched_fn._delivery cimport finish_one
from batched_fn._errors cimport closed_error, evicted_error, full_error, no_room_error, timeout_error
from batched_fn._request cimport (
    Request, new_request, park_until_done, take_outcome, WaiterKind,
    QUEUED, TAKEN, CANCELLED, KIND_ASYNC, KIND_BLOCKING, KIND_FUTURE,
)

from asyncio import get_running_loop as _get_running_loop
from batched_fn._errors import Full, InternalError

# A blocking caller waiting for room wakes at least this often for signals.
cdef int64_t SIGNAL_SLICE_NS = 50_000_000
# channel_cap=None: the ring's fixed size.  Its zeroed pages are committed by
# the OS only as the ring first walks over them (16 bytes a cell).
cdef size_t UNBOUNDED_CAPACITY = 1 << 20
cdef class Admission:
    """A bounded queue of requests: admission, overflow policy and withdrawal.

    Producers never block in a push; on_full="block" callers wait for room
    with the GIL released (threads) or on a future (asyncio).  Counters are
    atomics (see the module docstring for what guards the rest).
    """

    def __cinit__(self, Py_ssize_t cap, Py_ssize_t max_items, *args, OnFull on_full=REJECT, **kwargs):
        cdef size_t capacity
        if cap < 0:
            raise ValueError(f"Channel: cap must be >= 0 (got {cap!r})")
        if max_items < 1:
            raise ValueError(f"Channel: max_items must be >= 1 (got {max_items!r})")
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
            raise InternalError("Admission: ring geometry invalid after bc_ring_new")
        self.est_ns = <bc_atomic_i64 *>calloc(<size_t>max_items + 1, sizeof(bc_atomic_i64))
        if self.est_ns == NULL:
            raise MemoryError()
        self.max_items = max_items
        self.on_full = on_full
        self.forming = []
        self.room_waiters = []

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
    def is_closed(self) -> bool:
        """True once close() began."""
        return bc_load_u32_acquire(&self.closed) != 0

    def closed_error(self):
        """The Closed error calls get now (carrying the worker's failure, if any)."""
        return closed_error(self.close_cause)

    # ----------------------------------------------------------- the call styles

    def call(self, object value, object timeout=None, double cost=0.0):
        """Queue value and wait for its outcome, the GIL released while waiting.

        Raises Full, Closed, TimeoutError, or the handler's exception.
        """
        cdef Request req = self.submit(value, KIND_BLOCKING, None, None, timeout, cost)
        try:
            park_until_done(req)
        except BaseException:
            self.cancel(req)   # Ctrl-C: withdraw if still queued
            raise
        return take_outcome(req)

    def submit_here(self, object value, object timeout=None, double cost=0.0):
        """Queue value for the running event loop; return ``(request, future)``.

        One C call makes the future, finds the loop's mailbox and queues the
        request.  With on_full="block" and no room, nothing is queued and the
        result is ``(None, room)``: ``room`` is a future of the loop that is
        set when room may have come; the caller awaits it and tries again.
        """
        loop = _get_running_loop()
        fut = loop.create_future()
        if self.on_full != BLOCK:
            return self.submit(value, KIND_ASYNC, fut, mailbox_for(loop), timeout, cost), fut
        # Register for room before trying: a release between a failed try and
        # the registration would otherwise be missed (another thread may
        # release at any moment).
        room = loop.create_future()
        self.room_waiters.append(room)
        try:
            req = self.submit(value, KIND_ASYNC, fut, mailbox_for(loop), timeout, cost)
        except Full:
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

    def submit_future(self, object value, object fut, object timeout=None, double cost=0.0):
        """Queue value; its outcome is set on the concurrent future fut.

        With on_full="block" the calling thread waits for room first.
        """
        return self.submit(value, KIND_FUTURE, fut, None, timeout, cost)

    cdef Request submit(self, object value, WaiterKind kind, object waiter, object mailbox,
                        object timeout, double cost):
        """The one way in: make the request, admit it by the policy, arm its deadline."""
        cdef int64_t deadline_ns = -1
        if timeout is not None:
            deadline_ns = bc_now_ns() + to_ns(<double>timeout)
        cdef Request req = new_request(value, kind, deadline_ns, cost)
        req.waiter = waiter
        req.loop = mailbox
        if self.on_full == BLOCK and kind != KIND_ASYNC:
            self.wait_room(req)
        else:
            # asyncio with "block" reaches here only to try once: no rejection counted
            self.push(req, self.on_full != BLOCK)
        if deadline_ns >= 0:
            timer().add(req, self)
        return req

    # ----------------------------------------------------------- admission

    cdef int push(self, Request req, bint count_reject) except -1:
        """Queue req or raise Full/Closed; with drop_oldest, fail the oldest queued instead."""
        cdef size_t n
        cdef Request old
        cdef list evicted = None
        bc_fetch_add_seq_cst(&self.inflight, 1)
        if BC_UNLIKELY(bc_load_u32_seq_cst(&self.closed)):
            bc_fetch_sub_seq_cst(&self.inflight, 1)
            raise closed_error(self.close_cause)
        n = bc_fetch_add_seq_cst(&self.count, 1)
        while BC_UNLIKELY(n >= self.cap):
            bc_fetch_sub_seq_cst(&self.count, 1)
            old = self.evict_oldest() if self.on_full == DROP_OLDEST else None
            if old is None:
                bc_fetch_sub_seq_cst(&self.inflight, 1)
                if count_reject:
                    bc_fetch_add_u64_relaxed(&self.n_rejected, 1)
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
        if BC_UNLIKELY(not bc_ring_push(self.ring, <void *>req)):
            Py_DECREF(req)
            bc_fetch_sub_seq_cst(&self.count, 1)
            bc_fetch_sub_seq_cst(&self.inflight, 1)
            raise InternalError("push: ring full below its cap")
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

    cdef Request evict_oldest(self):
        """Take the oldest request still QUEUED out of the queue (now TAKEN), or None.

        Oldest first: the forming batch, then the request carried over by a
        cost bound, then the ring.  Its room in the queue is released.
        """
        cdef Request req = None
        cdef Request carried = None
        cdef Py_ssize_t i
        with self.consumer_lock:       # forming and carry are the collector's too
            for i in range(len(self.forming)):
                if bc_cas_u32_acq_rel(&(<Request>self.forming[i]).state, QUEUED, TAKEN):
                    req = <Request>self.forming[i]
                    del self.forming[i]
                    break
            if req is None and self.carry is not None:
                carried, self.carry = self.carry, None
        # release() may wake asyncio waiters: never under the lock
        if req is not None:
            self.release(1)
            return req
        if carried is not None:
            self.release(1)
            if bc_cas_u32_acq_rel(&carried.state, QUEUED, TAKEN):
                return carried
            bc_fetch_add_i64_relaxed(&self.withdrawn, -1)
        while True:
            req = self.pop()
            if req is None:
                return None
            self.release(1)
            if bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                return req
            bc_fetch_add_i64_relaxed(&self.withdrawn, -1)   # withdrawn by its caller: just drop it

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
            bc_fetch_add_i64_relaxed(&self.withdrawn, 1)
            finish_one(req, None, timeout_error(), None)
            return True
        return False

    def cancel(self, Request req) -> bool:
        """The caller gave up (task cancelled, Ctrl-C): withdraw req if still queued."""
        if bc_cas_u32_acq_rel(&req.state, QUEUED, CANCELLED):
            bc_fetch_add_u64_relaxed(&self.n_cancelled, 1)
            bc_fetch_add_i64_relaxed(&self.withdrawn, 1)
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
