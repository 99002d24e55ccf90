# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""The producer side of a channel: admit a request, or apply the overflow policy.

:class:`Admission` owns the ring of ring.h and the counters both sides agree
on; :class:`_collector.Channel` extends it with the consumer side.  Every call
style enters through :meth:`Admission.submit`; each ``on_full`` policy has one
implementation here (``push`` for reject and drop_oldest, ``wait_room`` and
the asyncio room futures for block); ``expire`` and ``cancel`` withdraw.

Ownership: the ring holds one strong reference per queued request, taken with
the GIL held by the producer (``Py_INCREF`` before the push) and given up by
the consumer that popped it (``pop``).
"""

from cpython.exc cimport PyErr_CheckSignals
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport calloc, free

from atomics cimport (
    bc_load_relaxed, bc_fetch_add_seq_cst, bc_fetch_sub_seq_cst,
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
    plain C integers changed only with the GIL held.
    """

    def __cinit__(self, Py_ssize_t cap, Py_ssize_t max_items, *args, OnFull on_full=REJECT, **kwargs):
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
        self.est_ns = <int64_t *>calloc(<size_t>max_items + 1, sizeof(int64_t))
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
        cdef long long live = <long long>bc_load_relaxed(&self.count) - self.withdrawn
        return live if live > 0 else 0

    @property
    def is_closed(self) -> bool:
        """True once close() began."""
        return bc_load_u32_acquire(&self.closed) != 0

    def closed_error(self):
        """The Closed error calls get now (carrying the worker's failure, if any)."""
        return closed_error(self.close_cause)

    # ----------------------------------------------------------- the call styles

    def call(self, object value, object timeout=None, double cost=0.0, object key=None):
        """Queue value and wait for its outcome, the GIL released while waiting.

        key: its batch key (a keyed channel only).  Raises Full, Closed,
        TimeoutError, or the handler's exception.
        """
        cdef Request req = self.submit(value, KIND_BLOCKING, None, None, timeout, cost, key)
        try:
            park_until_done(req)
        except BaseException:
            self.cancel(req)   # Ctrl-C: withdraw if still queued
            raise
        return take_outcome(req)

    def submit_here(self, object value, object timeout=None, double cost=0.0, object key=None):
        """Queue value for the running event loop; return ``(request, future)``.

        One C call makes the future, finds the loop's mailbox and queues the
        request.  With on_full="block" and no room, nothing is queued and the
        result is ``(None, room)``: ``room`` is a future of the loop that is
        set when room may have come; the caller awaits it and tries again.
        """
        loop = _get_running_loop()
        fut = loop.create_future()
        if self.on_full != BLOCK:
            return self.submit(value, KIND_ASYNC, fut, mailbox_for(loop), timeout, cost, key), fut
        # Register for room before trying: a release between a failed try and
        # the registration would otherwise be missed (user code may run when
        # Full is built, and with it another thread).
        room = loop.create_future()
        self.room_waiters.append(room)
        try:
            req = self.submit(value, KIND_ASYNC, fut, mailbox_for(loop), timeout, cost, key)
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
        except ValueError:     # a release took the list meanwhile
            pass

    def submit_future(self, object value, object fut, object timeout=None, double cost=0.0, object key=None,
                      bint wait=True):
        """Queue value; its outcome is set on the concurrent future fut.

        With on_full="block" the calling thread waits for room first; with
        wait=False it tries once and raises Full (no rejection counted): the
        caller waits for room its own way (cross-process calls do).
        """
        return self.submit(value, KIND_FUTURE, fut, None, timeout, cost, key, wait)

    cdef Request submit(self, object value, WaiterKind kind, object waiter, object mailbox,
                        object timeout, double cost, object key=None, bint wait=True):
        """The one way in: make the request, admit it by the policy, arm its deadline."""
        cdef int64_t deadline_ns = -1
        if timeout is not None:
            deadline_ns = bc_now_ns() + to_ns(<double>timeout)
        cdef Request req = new_request(value, kind, deadline_ns, cost)
        req.waiter = waiter
        req.loop = mailbox
        if self.keys is not None:
            req.key = key
            try:
                self.keys.admit(key)      # Full past max_keys live keys
            except Full:
                self.rejected += 1
                raise
        try:
            if self.on_full == BLOCK and kind != KIND_ASYNC and wait:
                self.wait_room(req)
            else:
                # asyncio with "block" reaches here only to try once: no rejection counted
                self.push(req, self.on_full != BLOCK)
        except BaseException:
            if self.keys is not None:
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
        bc_fetch_add_seq_cst(&self.inflight, 1)
        if BC_UNLIKELY(bc_load_u32_seq_cst(&self.closed)):
            bc_fetch_sub_seq_cst(&self.inflight, 1)
            raise closed_error(self.close_cause)
        n = bc_fetch_add_seq_cst(&self.count, 1)
        # n counts withdrawn requests still in the ring: they hold a cell, not a slot of the cap
        while BC_UNLIKELY(<long long>n - self.withdrawn >= <long long>self.cap):
            bc_fetch_sub_seq_cst(&self.count, 1)
            old = self.evict_oldest() if self.on_full == DROP_OLDEST else None
            if old is None:
                bc_fetch_sub_seq_cst(&self.inflight, 1)
                if count_reject:
                    self.rejected += 1
                n = <size_t>max(<long long>n - self.withdrawn, 0)
                self.fail_evicted(evicted, n)
                raise full_error(n, self.cap, self.retry_after(n))
            if evicted is None:
                evicted = []
            evicted.append(old)
            n = bc_fetch_add_seq_cst(&self.count, 1)
        Py_INCREF(req)   # the ring's reference; the consumer gives it up
        if BC_UNLIKELY(not bc_ring_push(self.ring, <void *>req)) and not (
                _drop_withdrawn_head(self) and bc_ring_push(self.ring, <void *>req)):
            # every cell is held, more than cap of them by withdrawn requests
            # behind a queued one: rare, and Full is the truth about the ring
            Py_DECREF(req)
            bc_fetch_sub_seq_cst(&self.count, 1)
            bc_fetch_sub_seq_cst(&self.inflight, 1)
            raise full_error(n, self.cap, self.retry_after(n))
        bc_fetch_sub_seq_cst(&self.inflight, 1)
        self.submitted += 1
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

        Oldest first: the forming batch (with batch_key: the per-key queues),
        then the request carried over by a cost bound, then the ring.  Its
        room in the queue is released.
        """
        cdef Request req
        cdef Py_ssize_t i
        if self.keys is not None:
            req = self.keys.evict_oldest()
            if req is not None:
                self.release(1)
                self.keys.leave(req.key, 1)
                return req
        for i in range(len(self.forming)):
            req = <Request>self.forming[i]
            if bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                del self.forming[i]
                self.release(1)
                return req
        if self.carry is not None:
            req, self.carry = self.carry, None
            self.release(1)
            if bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                return req
            self.withdrawn -= 1
        while True:
            req = self.pop()
            if req is None:
                return None
            self.release(1)
            if self.keys is not None:
                self.keys.leave(req.key, 1)
            if bc_cas_u32_acq_rel(&req.state, QUEUED, TAKEN):
                return req
            self.withdrawn -= 1        # withdrawn by its caller: just drop it

    cdef void fail_evicted(self, list evicted, size_t n) except *:
        cdef Request old
        if evicted is None:
            return
        for old in evicted:
            self.evicted += 1
            self.failed += 1
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
            self.timed_out += 1
            self.withdrawn += 1
            _room_came(self)
            finish_one(req, None, timeout_error(), None)
            return True
        return False

    def cancel(self, Request req) -> bool:
        """The caller gave up (task cancelled, Ctrl-C): withdraw req if still queued."""
        if bc_cas_u32_acq_rel(&req.state, QUEUED, CANCELLED):
            self.cancelled += 1
            self.withdrawn += 1
            req.value = None
            _room_came(self)
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
            waiters, self.room_waiters = self.room_waiters, []
            for fut in waiters:
                _set_room(fut)

    # ----------------------------------------------------------- closing

    def close(self, object cause=None) -> None:
        """Refuse new requests and wake every sleeper; idempotent.

        cause: the exception that broke a worker, carried by later Closed errors.
        """
        if cause is not None and self.close_cause is None:
            self.close_cause = cause
        bc_store_u32_seq_cst(&self.closed, 1)
        # Producers that passed the closed-check finish their push before we
        # return (they hold no lock and never wait: this is a few ns).
        self.wait_inflight()
        bc_fetch_add_u32_seq_cst(&self.work_epoch, 1)
        bc_unpark_all(&self.work_epoch)
        bc_fetch_add_u32_seq_cst(&self.space_epoch, 1)
        bc_unpark_all(&self.space_epoch)
        waiters, self.room_waiters = self.room_waiters, []
        for fut in waiters:
            _set_room(fut)     # they try again and get Closed
        timer().sweep(self)

    cdef void wait_inflight(self) noexcept:
        """Sleep in 10 us naps, GIL released, until no producer is mid-push."""
        cdef bc_atomic_u32 nap = 0   # a private word: parking on it is a 10 us sleep
        while bc_load_relaxed(&self.inflight):
            with nogil:
                bc_park(&nap, 0, bc_now_ns() + 10_000)


cdef bint _drop_withdrawn_head(Admission adm) except -1:
    """The ring is out of cells: drop the withdrawn requests at its head (a
    queued one popped on the way becomes the carry, still first in line).
    True if a cell came free.  The GIL serialises this with the collector."""
    cdef Request req
    cdef bint freed = False
    while adm.withdrawn > 0 and adm.carry is None:
        req = adm.pop()
        if req is None:
            break
        freed = True
        if bc_load_u32_relaxed(&req.state) != QUEUED:
            adm.release(1)     # withdrawn by its caller: just drop it
            adm.withdrawn -= 1
        else:
            adm.carry = req
    return freed


cdef void _room_came(Admission adm) except *:
    """A withdrawal gave a slot of the cap back: wake on_full="block" callers waiting for room."""
    bc_fence_seq_cst()   # the withdrawal is visible before we read space_sleepers
    if bc_load_u32_relaxed(&adm.space_sleepers):
        bc_fetch_add_u32_seq_cst(&adm.space_epoch, 1)
        bc_unpark_all(&adm.space_epoch)
    if adm.room_waiters:
        waiters, adm.room_waiters = adm.room_waiters, []
        for fut in waiters:
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
