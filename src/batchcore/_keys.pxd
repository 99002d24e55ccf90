# Keyed batches: per-key queues and which key goes next (see _keys.pyx).
from libc.stdint cimport int64_t


cdef class KeyQueue:
    cdef readonly object key
    cdef list items              # popped Requests of this key, arrival order (still counted as queued)
    cdef double cost             # summed cost of items
    cdef int64_t min_deadline    # earliest deadline among items (INT64_MAX: none)
    cdef bint waited             # the collector slept at least once while this queue held items

    cdef bint is_full(self, Py_ssize_t max_items, double max_cost) noexcept
    cdef int64_t first_arrival(self) noexcept


cdef class KeyQueues:
    cdef readonly Py_ssize_t max_keys
    # key -> [requests of that key admitted and not yet left the queue (in the
    # ring or in its KeyQueue)]: the live keys, bounded by max_keys.
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
    cdef KeyQueue next_queue(self, Py_ssize_t max_items, double max_cost)
    cdef KeyQueue urgent(self, int64_t now, const int64_t *est_ns, Py_ssize_t max_items, int64_t *wake_at)
    cdef void _forget_queue(self, KeyQueue q) except *
    cdef Py_ssize_t largest(self) noexcept
    cdef void mark_waited(self) noexcept
    cdef list take(self, KeyQueue q, Py_ssize_t max_items, double max_cost, double *cost)
    cdef list take_all(self)
    cdef Request evict_oldest(self)
    cdef void count_batch(self, object key, Py_ssize_t n) except *
