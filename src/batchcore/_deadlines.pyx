# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""Request deadlines, fired by one shared thread: the one place a request times out.

Whatever the caller waits with (a parked thread, an asyncio future, a
concurrent future), its deadline is an entry here.  When it passes, the
thread asks the request's channel to fail it (``Channel.expire``), which
delivers ``TimeoutError`` like any other outcome, whether the request is still
queued or inside a running batch (the batch's output for it is then dropped).  The collector checks the same deadline when it dispatches.

Entries refer to the request and the channel weakly, so a finished request
and a closed, dropped channel are freed at once, not at their deadline.

What guards what: the entries live in N_SHARDS heaps, each under its own
lock; a calling thread always adds to the same shard (picked from its thread
id), so callers on different threads rarely meet on a lock, and none is held
while user code runs (a shard lock covers a heap operation only).  The thread
reads ``epoch`` before looking at the heaps and parks on it; an adder bumps
it when its deadline is earlier than ``armed`` (the time the thread means to
look next, or SCANNING while it looks), so no wake-up is lost.
"""

cimport cython
from cpython.pythread cimport PyThread_get_thread_ident
from libc.stdint cimport int64_t, uint64_t, INT64_MAX

import heapq as _heapq
import threading as _threading
from weakref import ref as _weakref

from atomics cimport (
    bc_fetch_add_u32_seq_cst, bc_load_u32_acquire, bc_store_u32_release,
    bc_load_i64_seq_cst, bc_store_i64_seq_cst,
)
from park cimport bc_now_ns, bc_park, bc_set_timer_slack, bc_unpark_one

# Never sweep a shard's heap shorter than this.
cdef size_t MIN_SWEEP = 1024
# The thread sleeps until the earliest deadline plus this much, and fires
# every deadline due by then in one wake: with thousands of requests a second
# (most of them answered long before their deadline) it wakes at most ~1000
# times a second instead of once per request, and a TimeoutError still comes
# within about a millisecond of its deadline.
cdef int64_t COALESCE_NS = 1_000_000
# Heaps of one timer (a power of two).
cdef enum:
    N_SHARDS = 16
# `armed` while the thread reads the heaps: every adder wakes it.
cdef int64_t SCANNING = -1


@cython.final
cdef class _Shard:
    """One heap of (deadline_ns, seq, request ref, channel ref); lock guards all of it."""
    cdef cython.pymutex lock
    cdef list heap
    cdef unsigned long long seq   # tie-breaker: entries never compare requests
    cdef size_t sweep_at          # sweep finished entries once the heap is this long

    def __cinit__(self):
        self.heap = []
        self.sweep_at = MIN_SWEEP


cdef inline Py_ssize_t _my_shard() noexcept:
    """This thread's shard (a multiplicative hash of its id)."""
    cdef uint64_t ident = <uint64_t>PyThread_get_thread_ident()
    return <Py_ssize_t>((ident * <uint64_t>0x9E3779B97F4A7C15ULL) >> 60) & (N_SHARDS - 1)


cdef class DeadlineTimer:
    """Heaps of deadlines served by one lazily started daemon thread."""

    def __cinit__(self):
        self.shards = [_Shard() for _ in range(N_SHARDS)]
        bc_store_i64_seq_cst(&self.armed, INT64_MAX)
        self.heappush = _heapq.heappush
        self.heappop = _heapq.heappop
        self.heapify = _heapq.heapify

    cdef void add(self, Request req, object channel) except *:
        """At req.deadline_ns, call ``channel.expire(req)`` if both still exist."""
        cdef _Shard shard = <_Shard>self.shards[_my_shard()]
        cdef int64_t deadline = req.deadline_ns, armed
        cdef bint sweep
        req_ref, chan_ref = _weakref(req), _weakref(channel)
        with shard.lock:
            self.heappush(shard.heap, (deadline, shard.seq, req_ref, chan_ref))
            shard.seq += 1
            sweep = <size_t>len(shard.heap) >= shard.sweep_at
        if sweep:
            self._sweep_shard(shard, None)
        if not bc_load_u32_acquire(&self.started):
            self._start()
        # After the push (the shard's unlock): the thread either finds the
        # entry, or had stored SCANNING / its next look before we read it.
        armed = bc_load_i64_seq_cst(&self.armed)
        if armed == SCANNING or deadline < armed:
            self._wake()

    cdef void _wake(self) noexcept:
        bc_fetch_add_u32_seq_cst(&self.epoch, 1)
        bc_unpark_one(&self.epoch)

    cdef void _start(self) except *:
        with self.thread_lock:
            if self.thread is None or not self.thread.is_alive():
                thread = _threading.Thread(target=self._run, name="batched_fn-deadlines", daemon=True)
                thread.start()
                self.thread = thread
            bc_store_u32_release(&self.started, 1)

    def __len__(self):
        cdef _Shard shard
        cdef Py_ssize_t n = 0
        for shard in self.shards:
            with shard.lock:
                n += len(shard.heap)
        return n

    def sweep(self, channel=None) -> None:
        """Drop entries whose request is gone or no longer queued (all of
        channel's such entries, or every channel's when channel is None)."""
        cdef _Shard shard
        for shard in self.shards:
            self._sweep_shard(shard, channel)

    def _sweep_shard(self, _Shard shard, channel) -> None:
        cdef list keep = [], old
        cdef Request req
        cdef unsigned int state
        # The heap is taken out and filtered without the lock: dropping the
        # last reference to a request may run user code (its value's
        # finaliser), which may add a deadline to this very shard.
        with shard.lock:
            old = shard.heap
            shard.heap = []
        if not old:
            return
        for entry in old:
            obj = entry[2]()
            if obj is not None:
                req = <Request>obj
                state = bc_load_u32_acquire(&req.state)
                # queued, or inside a running batch (it may still be late)
                if state == QUEUED or (state == TAKEN and req.in_batch) or (
                        channel is not None and entry[3]() is not channel):
                    keep.append(entry)
            obj = None
        old = None
        with shard.lock:
            keep.extend(shard.heap)      # added meanwhile
            self.heapify(keep)
            shard.heap = keep
            shard.sweep_at = max(MIN_SWEEP, <size_t>(2 * len(keep)))
        self._wake()   # the thread may have parked without the entries taken out

    def _run(self) -> None:
        cdef list due
        cdef _Shard shard
        cdef int64_t now, until
        cdef unsigned int seen
        bc_set_timer_slack(1)   # fire within ~20 us instead of ~70 us
        heappop = self.heappop
        while True:
            seen = bc_load_u32_acquire(&self.epoch)   # before reading the heaps: no lost wake
            bc_store_i64_seq_cst(&self.armed, SCANNING)
            now = bc_now_ns()
            until = INT64_MAX
            due = []
            for shard in self.shards:
                with shard.lock:
                    while shard.heap and <int64_t>shard.heap[0][0] <= now:
                        due.append(heappop(shard.heap))
                    if shard.heap and <int64_t>shard.heap[0][0] < until:
                        until = <int64_t>shard.heap[0][0]
            if due:
                for _, _, req_ref, chan_ref in due:
                    req, chan = req_ref(), chan_ref()
                    if req is not None and chan is not None:
                        try:
                            chan.expire(req)
                        except Exception:    # never let one request stop the timer
                            _log.exception("batched_fn: expiring a request failed")
                # hold nothing while parked: the request and its channel must
                # be free to go as soon as their callers drop them
                req = chan = req_ref = chan_ref = due = None
                continue
            bc_store_i64_seq_cst(&self.armed, until)
            with nogil:
                bc_park(&self.epoch, seen, -1 if until == INT64_MAX else until + COALESCE_NS)


cdef DeadlineTimer _TIMER = DeadlineTimer()


cdef DeadlineTimer timer():
    """The process's deadline timer."""
    return _TIMER


def pending() -> int:
    """Entries waiting in the timer (for tests)."""
    return len(_TIMER)


def reset_after_fork() -> None:
    """A forked child starts with an empty timer (its thread did not survive)."""
    global _TIMER
    _TIMER = DeadlineTimer()
