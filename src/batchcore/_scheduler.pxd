# The worker's scheduler: queued requests in the order batches take them (see _scheduler.pyx).
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint64_t

# The orders a RequestQueue keeps (index into its heaps): who goes next, who
# a full queue gives up first, who gains a priority level next, and (a key's
# queue only) who arrived first and whose deadline comes first.
cdef enum:
    BEST = 0
    WORST = 1
    AGING = 2
    ARRIVAL = 3
    EARLIEST = 4
    N_ORDERS = 5

# One queued request.
cdef struct Entry:
    PyObject *req          # the queue's strong reference; NULL: a free entry
    int64_t level          # its priority plus the levels it gained by waiting
    int64_t deadline       # INT64_MAX: none (or a fifo queue: not an order)
    int64_t due            # the request's deadline for EARLIEST (INT64_MAX: none)
    int64_t arrival
    uint64_t seq           # insertion order: the last tie-breaker
    int64_t next_gain      # when it gains its next level (INT64_MAX: never)
    Py_ssize_t pos[N_ORDERS]   # its index in each heap kept


cdef class RequestQueue:
    # Everything here is touched under the owning channel's consumer_lock
    # (the collector, producers evicting or shedding, the deadline timer and
    # cancels withdrawing); no method runs user code or releases it midway.
    cdef Entry *entries              # `capacity` entries, free ones with req NULL
    cdef Py_ssize_t *heaps[N_ORDERS] # per order: entry indices, a binary heap
    cdef Py_ssize_t *free_list       # indices of free entries (a stack)
    cdef Py_ssize_t nfree
    cdef Py_ssize_t capacity
    cdef readonly Py_ssize_t n       # requests held
    cdef int orders[N_ORDERS]        # the orders kept: BEST, WORST, then AGING, ARRIVAL, EARLIEST if kept
    cdef int norders
    cdef uint64_t seq
    # Requests held by priority, for the priorities other than 0 (count_at_least)
    cdef dict levels
    cdef Py_ssize_t nonzero            # held with a priority other than 0
    cdef readonly bint fifo          # arrival order alone
    cdef readonly int64_t aging_ns   # a level gained per this many ns waited; 0: never

    cdef void _fill_free(self, Py_ssize_t start) noexcept
    cdef int _grow(self) except -1
    cdef void _place(self, int order, Py_ssize_t i, Py_ssize_t idx) noexcept
    cdef void _sift_up(self, int order, Py_ssize_t i) noexcept
    cdef void _sift_down(self, int order, Py_ssize_t i) noexcept
    cdef void _fix(self, int order, Py_ssize_t i) noexcept

    cdef int push(self, Request req) except -1
    cdef Request peek_best(self)
    cdef Request pop_best(self)
    cdef Request peek_worst(self)
    cdef Request take(self, Request req)
    cdef void age(self, int64_t now) noexcept
    cdef list take_all(self)
    cdef Py_ssize_t count_at_least(self, int priority)
    cdef bint holds(self, Request req) noexcept
    cdef int64_t first_arrival(self) noexcept
    cdef int64_t earliest_deadline(self) noexcept
