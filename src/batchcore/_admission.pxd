# The producer side of a channel: admission, overflow policies, withdrawal (see _admission.pyx).
cimport cython
from libc.stdint cimport int64_t, INT64_MAX
from atomics cimport bc_atomic_size, bc_atomic_u32, bc_atomic_i64, bc_atomic_u64
from ring cimport bc_ring

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
    # never full (count < 2 * cap <= ring capacity; withdrawn ones count here).
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
    # Guards the consumer's shared state: `forming`, the scheduler queues
    # (`sched`, `keys`), the handler model and, in Channel, the adaptive delay
    # model.  Held by the collector while it takes requests and decides (never
    # while it sleeps or runs user code), by eviction (a full queue),
    # shedding, withdrawal (expire, cancel), a keyed call's admission,
    # fail_queued and record_handler_time.  A producer's plain push never
    # takes it.  A PyMutex (3.13+), else a PyThread lock; a thread blocked on it
    # does not hold the GIL.
    cdef cython.pymutex consumer_lock

    # Set once, by the first close() with a cause (under consumer_lock);
    # readers see None or the cause.
    cdef readonly object close_cause
    # The batch being formed by the collector: popped, still QUEUED, still
    # counted.  drop_oldest may evict from it while the collector sleeps
    # (consumer_lock guards the attribute and the list).
    cdef list forming
    # batch_key=: the per-key queues the collector forms batches from (each
    # a RequestQueue, like `sched`), and the bound on live keys (None: one
    # queue, `sched`, and the batch `forming`); consumer_lock guards it.
    cdef KeyQueues keys
    # Handler ns by batch size (estimate.pxd), index 1..max_items: relaxed
    # atomics, written by workers, read by producers (retry_after, shedding) and the collector.
    cdef bc_atomic_i64 *est_ns
    # Requests drained from the ring, in the order batches take them (an
    # unkeyed channel; a keyed one has one per key in `keys`); consumer_lock
    # guards it (the collector, producers evicting or shedding, withdrawals).
    cdef RequestQueue sched
    # Classic behaviour (arrival order, timeout= bounds only the queue wait,
    # no shedding): the baseline the goodput benchmark compares against.
    cdef readonly bint classic
    # The handler model for deadlines (predict_ns), beside est_ns: the latest
    # batch's time and size, so a handler that sped up is believed at once.
    # Running batches and when, by the model, the last dispatched one ends
    # (0: none).  consumer_lock guards all four (and overhead_ns, overhead_last_ns);
    # the collector and record_handler_time write them, shedding reads them.
    cdef int64_t last_batch_ns
    cdef Py_ssize_t last_batch_n
    cdef Py_ssize_t batches_running
    cdef int64_t busy_until
    # What a batch costs the worker besides the handler (delivery, forming
    # the next batch, waiting for the GIL), ns: an EWMA over back-to-back full
    # batches, so shedding predicts how fast the queue really drains.
    cdef int64_t overhead_ns
    cdef int64_t overhead_last_ns   # the latest sample: one stall of the OS must not shed for long
    cdef readonly Py_ssize_t workers   # worker threads serving the queue
    # Outcomes by priority (OUTCOME_* index): priority 0 in relaxed atomics,
    # others in the dict, whose lists outcomes_lock guards (taken for one
    # increment or one copy: never around anything else).
    cdef bc_atomic_u64 outcomes0[4]
    cdef dict outcomes
    cdef cython.pymutex outcomes_lock

    # Event counters (read through properties of the same names): relaxed
    # atomic adds from any thread, each counted before the caller it
    # concerns is woken (so a caller that returned sees itself counted).
    cdef bc_atomic_u64 n_submitted, n_rejected, n_evicted, n_timed_out
    cdef bc_atomic_u64 n_cancelled, n_completed, n_failed
    # Of timed_out: `late` timed out inside a running batch (its outcome is
    # dropped), `expired` while queued.  `shed`: refused by prediction (also
    # counted in rejected).  Relaxed atomics like the others.
    cdef bc_atomic_u64 n_late, n_expired, n_shed
    # Withdrawn (timed out, cancelled) but still in the ring or a forming
    # batch: they hold a ring cell until a worker drops them, but neither a
    # slot of the cap nor a place in "queued".  An atomic: withdrawers add,
    # the collector subtracts.
    cdef bc_atomic_i64 withdrawn
    cdef object __weakref__    # the deadline timer refers to channels weakly

    cdef Request submit(self, object value, WaiterKind kind, object waiter, object mailbox,
                        object timeout, double cost, int priority=*, object key=*, bint wait=*)
    cdef int push(self, Request req, bint count_reject) except -1
    cdef int wait_room(self, Request req) except -1
    cdef Request evict_for(self, Request req, size_t *dropped)
    cdef Py_ssize_t drain_ring(self, size_t *dropped) except -1
    cdef void leave(self, Request req) except *
    cdef bint _drain_and_push(self, Request req) except -1
    cdef int shed_if_late(self, Request req) except -1
    cdef Py_ssize_t batches_ahead(self, Request req, Py_ssize_t *ahead, Py_ssize_t *rest) except -1
    cdef int64_t predict_ns(self, Py_ssize_t n) noexcept
    cdef void count_outcome(self, int priority, int outcome) except *
    cdef void fail_evicted(self, list evicted, size_t n) except *
    cdef double retry_after(self, size_t n) noexcept
    cdef Request pop(self)
    cdef void release(self, size_t k) except *
    cdef void wait_inflight(self) noexcept
    cdef void _forget_room(self, object room) except *


# Outcomes counted by priority (Admission.count_outcome).
cdef enum:
    OUTCOME_ANSWERED = 0   # the handler's outcome reached its caller in time
    OUTCOME_LATE = 1       # its deadline came while its batch ran
    OUTCOME_SHED = 2       # refused at once: by the model it could not finish in time
    OUTCOME_EXPIRED = 3    # its deadline came, or would have in its batch, while queued


cdef inline int64_t to_ns(double seconds) noexcept:
    """Seconds (finite, >= 0) to ns, saturating at ~73 years ("forever"), which
    keeps every `now + duration` far from int64 overflow."""
    if seconds * 1e9 >= <double>(INT64_MAX // 4):
        return INT64_MAX // 4
    return <int64_t>(seconds * 1e9)
