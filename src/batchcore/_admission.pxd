# The producer side of a channel: admission, overflow policies, withdrawal (see _admission.pyx).
cimport cython
from libc.stdint cimport int64_t, INT64_MAX
from atomics cimport bc_atomic_size, bc_atomic_u32, bc_atomic_i64, bc_atomic_u64
from ring cimport bc_ring
from batched_fn._request cimport Request, WaiterKind

# What a call does when the queue holds `cap` requests (on_full=).
cpdef enum OnFull:
    REJECT = 0        # raise Full at once
    BLOCK = 1         # wait for room, up to the call's timeout
    DROP_OLDEST = 2   # fail the oldest queued request with Full, take the new one


cdef class Admission:
    cdef bc_ring *ring
    cdef readonly size_t cap           # most requests queued at once
    cdef readonly Py_ssize_t max_items
    cdef readonly OnFull on_full

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
    # Blocking callers of on_full="block" sleep on space_epoch; bumped after pops.
    cdef bc_atomic_u32 space_epoch
    cdef bc_atomic_u32 space_sleepers
    # asyncio futures of on_full="block" callers waiting for room.  Never
    # replaced; each append, remove and pop is atomic on the list itself, and
    # wakers pop entries one at a time, so none is lost to a concurrent append.
    cdef list room_waiters
    # Guards the consumer's shared state: `forming`, `carry`, and in Channel
    # the adaptive delay model.  Held by the collector while it takes requests
    # and decides (never while it sleeps or runs user code), by drop_oldest's
    # eviction, fail_queued and record_handler_time.  Producers' pushes never
    # take it.  A PyMutex (3.13+), else a PyThread lock; a thread blocked on it
    # does not hold the GIL.
    cdef cython.pymutex consumer_lock

    # Set once, by the first close() with a cause (under consumer_lock);
    # readers see None or the cause.
    cdef readonly object close_cause
    cdef Request carry    # popped, did not fit the last batch's cost; next first (consumer_lock)
    # The batch being formed by the collector: popped, still QUEUED, still
    # counted.  drop_oldest may evict from it while the collector sleeps
    # (consumer_lock guards the attribute and the list).
    cdef list forming
    # Handler ns by batch size (estimate.pxd), index 1..max_items: relaxed
    # atomics, written by workers, read by producers (retry_after) and the collector.
    cdef bc_atomic_i64 *est_ns

    # Event counters (read through properties of the same names): relaxed
    # atomic adds from any thread, each counted before the caller it
    # concerns is woken (so a caller that returned sees itself counted).
    cdef bc_atomic_u64 n_submitted, n_rejected, n_evicted, n_timed_out
    cdef bc_atomic_u64 n_cancelled, n_completed, n_failed
    # Withdrawn (timed out, cancelled) but still in the ring or a forming
    # batch: they hold room until a worker drops them, but are not "queued".
    # An atomic: withdrawers add, the collector subtracts.
    cdef bc_atomic_i64 withdrawn
    cdef object __weakref__    # the deadline timer refers to channels weakly

    cdef Request submit(self, object value, WaiterKind kind, object waiter, object mailbox,
                        object timeout, double cost)
    cdef int push(self, Request req, bint count_reject) except -1
    cdef int wait_room(self, Request req) except -1
    cdef Request evict_oldest(self)
    cdef void fail_evicted(self, list evicted, size_t n) except *
    cdef double retry_after(self, size_t n) noexcept
    cdef Request pop(self)
    cdef void release(self, size_t k) except *
    cdef void wait_inflight(self) noexcept
    cdef void _forget_room(self, object room) except *


cdef inline int64_t to_ns(double seconds) noexcept:
    """Seconds (finite, >= 0) to ns, saturating at ~73 years ("forever"), which
    keeps every `now + duration` far from int64 overflow."""
    if seconds * 1e9 >= <double>(INT64_MAX // 4):
        return INT64_MAX // 4
    return <int64_t>(seconds * 1e9)
