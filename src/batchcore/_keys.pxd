# Keyed batches: per-key scheduler queues and which key goes next (see _keys.pyx).
from libc.stdint cimport int64_t
from atomics cimport bc_atomic_i64


cdef class KeyQueue:
    cdef readonly object key
    # The popped requests of this key (still counted as queued), in the order
    # batches take them: a RequestQueue that also keeps arrival and deadline order.
    cdef RequestQueue sched
    cdef double cost             # summed cost of the requests held
    cdef bint waited             # the collector slept at least once while this queue held requests

    cdef bint is_full(self, Py_ssize_t max_items, double max_cost) noexcept
    cdef int64_t first_arrival(self) noexcept


cdef class KeyQueues:
    cdef readonly Py_ssize_t max_keys
    cdef double aging            # each key's RequestQueue: seconds worth one priority level
    cdef bint fifo               # each key's RequestQueue: arrival order alone (classic)
    # key -> requests of that key admitted and not yet left the queue (in the
    # ring or in its KeyQueue): the live keys, bounded by max_keys.
    cdef dict live
    # key -> its KeyQueue, for keys with popped requests waiting.
    cdef dict queues
    cdef readonly Py_ssize_t held    # requests held in queues
    # key -> [submitted, batches, batched items], for at most max_keys keys,
    # the least recently batched forgotten first.
    cdef dict counts

    cdef int admit(self, object key) except -1
    cdef void leave(self, object key, Py_ssize_t n) except *
    cdef void add(self, Request req) except *
    cdef void remove(self, KeyQueue q, Request req) except *
    cdef KeyQueue next_queue(self, Py_ssize_t max_items, double max_cost)
    cdef KeyQueue urgent(self, int64_t now, bc_atomic_i64 *est_ns, Py_ssize_t max_items, int64_t *wake_at)
    cdef void _forget_queue(self, KeyQueue q) except *
    cdef Py_ssize_t largest(self) noexcept
    cdef void mark_waited(self) noexcept
    cdef list take_all(self)
    cdef Py_ssize_t count_at_least(self, object key, int priority) except -1
    cdef Py_ssize_t keys_before(self, object key, Py_ssize_t max_items, double max_cost,
                                Py_ssize_t *items) except -1
    cdef void count_batch(self, object key, Py_ssize_t n) except *
