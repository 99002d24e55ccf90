# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""Request deadlines, fired by one shared thread: the one place a request times out.

Whatever the caller waits with (a parked thread, an asyncio future, a
concurrent future), its deadline is an entry here.  When it passes, the
thread asks the request's channel to fail it (``Channel.expire``), which
delivers ``TimeoutError`` like any other outcome, whether the request is still
queued or inside a running batch (the batch's output for it is then dropped).  The collector checks the same deadline when it dispatches.

Entries refer to the request and the channel weakly, so a finished request
and a closed, dropped channel are freed at once, not at their deadline.
"""

from heapq import heappop as _heappop, heappush as _heappush, heapify as _heapify
import threading as _threading
from weakref import ref as _weakref

from libc.stdint cimport int64_t

from atomics cimport bc_fetch_add_u32_seq_cst, bc_load_u32_acquire
from park cimport bc_now_ns, bc_park, bc_set_timer_slack, bc_unpark_one

# Never sweep a heap shorter than this.
cdef size_t MIN_SWEEP = 1024
# The thread sleeps until the earliest deadline plus this much, and fires
# every deadline due by then in one wake: with thousands of requests a second
# (most of them answered long before their deadline) it wakes at most ~1000
# times a second instead of once per request, and a TimeoutError still comes
# within about a millisecond of its deadline.
cdef int64_t COALESCE_NS = 1_000_000


cdef class DeadlineTimer:
    """A heap of deadlines served by one lazily started daemon thread."""

    def __cinit__(self):
        self.heap = []
        self.sweep_at = MIN_SWEEP

    cdef void add(self, Request req, object channel) except *:
        """At req.deadline_ns, call ``channel.expire(req)`` if both still exist."""
        entry = (req.deadline_ns, self.seq, _weakref(req), _weakref(channel))
        self.seq += 1
        _heappush(self.heap, entry)
        if <size_t>len(self.heap) >= self.sweep_at:
            self.sweep(None)
        if self.thread is None or not self.thread.is_alive():
            self.thread = _threading.Thread(target=self._run, name="batched_fn-deadlines", daemon=True)
            self.thread.start()
        elif self.heap and self.heap[0] is entry:   # a sweep may have emptied it (bounds are not checked)
            bc_fetch_add_u32_seq_cst(&self.epoch, 1)
            bc_unpark_one(&self.epoch)

    def sweep(self, channel=None) -> None:
        """Drop entries whose request is gone or no longer queued (all of
        channel's such entries, or every channel's when channel is None)."""
        cdef list keep = []
        cdef Request req
        cdef unsigned int state
        for entry in self.heap:
            obj = entry[2]()
            if obj is not None:
                req = <Request>obj
                state = bc_load_u32_acquire(&req.state)
                # queued, or inside a running batch (it may still be late)
                if state == QUEUED or (state == TAKEN and req.in_batch) or (
                        channel is not None and entry[3]() is not channel):
                    keep.append(entry)
        _heapify(keep)
        self.heap = keep
        self.sweep_at = max(MIN_SWEEP, <size_t>(2 * len(keep)))

    def _run(self) -> None:
        cdef list due
        cdef int64_t now, until
        cdef unsigned int seen
        bc_set_timer_slack(1)   # fire within ~20 us instead of ~70 us
        while True:
            seen = bc_load_u32_acquire(&self.epoch)   # before reading the heap: no lost wake
            now = bc_now_ns()
            due = []
            while self.heap and <int64_t>self.heap[0][0] <= now:
                due.append(_heappop(self.heap))
            if due:
                for _, _, req_ref, chan_ref in due:
                    req, chan = req_ref(), chan_ref()
                    if req is not None and chan is not None:
                        chan.expire(req)
                # hold nothing while parked: the request and its channel must
                # be free to go as soon as their callers drop them
                req = chan = req_ref = chan_ref = due = None
                continue
            until = <int64_t>self.heap[0][0] + COALESCE_NS if self.heap else -1
            with nogil:
                bc_park(&self.epoch, seen, until)


cdef DeadlineTimer _TIMER = DeadlineTimer()


cdef DeadlineTimer timer():
    """The process's deadline timer."""
    return _TIMER


def pending() -> int:
    """Entries waiting in the timer (for tests)."""
    return len(_TIMER.heap)


def reset_after_fork() -> None:
    """A forked child starts with an empty timer (its thread did not survive)."""
    global _TIMER
    _TIMER = DeadlineTimer()
