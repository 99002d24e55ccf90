# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""The worker's scheduler: queued requests in the order batches take them.

The ring stays the lock-free hand-off from callers, in arrival order; the
collector drains it into a :class:`RequestQueue` and forms each batch from
there.  One RequestQueue is one ordering unit: a channel holds one, a keyed
channel one per key (_keys.pyx).

A RequestQueue keeps its requests in up to three orders at once, indexed
binary heaps over one table of entries, so that a request can also leave from
the middle (withdrawn by its caller) in O(log n):

- BEST, who goes next: the higher level first, then the earlier deadline,
  then the earlier arrival;
- WORST, who a full queue gives up first: the lower level first, then the
  later deadline (no deadline is the latest), then the earlier arrival;
- AGING, when each request gains its next level (kept only with aging);
- ARRIVAL and EARLIEST, the oldest request and the earliest deadline (kept
  only in a key's queue: which key goes next, and when one must go for a
  deadline, are read from them).

A request's level is its priority plus one for every ``aging_ns`` it has
waited in the queue, so a request of priority p waits at most about
``(q - p) * aging`` behind a steady stream of priority q, never forever.

What guards what: a RequestQueue has no lock of its own; its channel's
``consumer_lock`` (_admission.pyx) is held around every use, from any thread
(the collector, a producer evicting or shedding, a withdrawal), and so is a
queued request's ``slot``.  Nothing here runs user code.
"""

from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport INT64_MAX
from libc.stdlib cimport free, malloc, realloc

# The table's first size; it doubles as needed and never shrinks.  A key's
# queue starts smaller: it is made when its key gets a request and freed when
# it empties, often once per batch.
cdef Py_ssize_t FIRST_QUEUE_CAPACITY = 64
cdef Py_ssize_t FIRST_KEY_QUEUE_CAPACITY = 8


cdef inline bint _before(const Entry *x, const Entry *y, int order) noexcept nogil:
    """True if x comes before y in order."""
    if order == BEST:
        if x.level != y.level:
            return x.level > y.level
        if x.deadline != y.deadline:
            return x.deadline < y.deadline
    elif order == WORST:
        if x.level != y.level:
            return x.level < y.level
        if x.deadline != y.deadline:
            return x.deadline > y.deadline
    elif order == AGING:
        if x.next_gain != y.next_gain:
            return x.next_gain < y.next_gain
    elif order == EARLIEST:
        if x.due != y.due:
            return x.due < y.due
    if x.arrival != y.arrival:
        return x.arrival < y.arrival
    return x.seq < y.seq


cdef class RequestQueue:
    """Queued requests by priority (with aging), deadline and arrival.

    aging: seconds of waiting worth one priority level (0: no aging).
    fifo: arrival order alone (priorities and deadlines ignored): the classic
    channel's order.
    keyed: also keep the ARRIVAL and EARLIEST orders (a key's queue).
    """

    def __cinit__(self, double aging=0.0, bint fifo=False, bint keyed=False):
        cdef int k
        self.capacity = FIRST_KEY_QUEUE_CAPACITY if keyed else FIRST_QUEUE_CAPACITY
        self.entries = <Entry *>malloc(self.capacity * sizeof(Entry))
        self.free_list = <Py_ssize_t *>malloc(self.capacity * sizeof(Py_ssize_t))
        for k in range(N_ORDERS):
            self.heaps[k] = <Py_ssize_t *>malloc(self.capacity * sizeof(Py_ssize_t))
            if self.heaps[k] == NULL:
                raise MemoryError()
        if self.entries == NULL or self.free_list == NULL:
            raise MemoryError()
        self._fill_free(0)
        self.levels = {}
        self.fifo = fifo
        self.aging_ns = <int64_t>(aging * 1e9) if aging > 0.0 and not fifo else 0
        self.orders[0] = BEST
        self.orders[1] = WORST
        self.norders = 2
        if self.aging_ns > 0:
            self.orders[self.norders] = AGING
            self.norders += 1
        if keyed:
            self.orders[self.norders] = ARRIVAL
            self.orders[self.norders + 1] = EARLIEST
            self.norders += 2

    def __dealloc__(self):
        cdef Py_ssize_t i
        cdef int k
        if self.entries != NULL:
            for i in range(self.capacity):
                if self.entries[i].req != NULL:
                    Py_DECREF(<object>self.entries[i].req)
                    self.entries[i].req = NULL
        free(self.entries)
        free(self.free_list)
        for k in range(N_ORDERS):
            free(self.heaps[k])

    def __len__(self):
        return self.n

    cdef void _fill_free(self, Py_ssize_t start) noexcept:
        """Entries start..capacity-1 are new: mark them free (lowest index on top)."""
        cdef Py_ssize_t i
        for i in range(self.capacity - 1, start - 1, -1):
            self.entries[i].req = NULL
            self.free_list[self.nfree] = i
            self.nfree += 1

    cdef int _grow(self) except -1:
        cdef Py_ssize_t old = self.capacity, cap = 2 * self.capacity
        cdef Entry *entries = <Entry *>realloc(self.entries, cap * sizeof(Entry))
        if entries == NULL:
            raise MemoryError()
        self.entries = entries
        cdef Py_ssize_t *fl = <Py_ssize_t *>realloc(self.free_list, cap * sizeof(Py_ssize_t))
        if fl == NULL:
            raise MemoryError()
        self.free_list = fl
        cdef int k
        cdef Py_ssize_t *h
        for k in range(N_ORDERS):
            h = <Py_ssize_t *>realloc(self.heaps[k], cap * sizeof(Py_ssize_t))
            if h == NULL:
                raise MemoryError()
            self.heaps[k] = h
        self.capacity = cap
        self._fill_free(old)
        return 0

    # ----------------------------------------------------------- heap moves

    cdef void _place(self, int order, Py_ssize_t i, Py_ssize_t idx) noexcept:
        self.heaps[order][i] = idx
        self.entries[idx].pos[order] = i

    cdef void _sift_up(self, int order, Py_ssize_t i) noexcept:
        cdef Py_ssize_t *h = self.heaps[order]
        cdef Py_ssize_t idx = h[i], parent
        while i > 0:
            parent = (i - 1) >> 1
            if not _before(&self.entries[idx], &self.entries[h[parent]], order):
                break
            self._place(order, i, h[parent])
            i = parent
        self._place(order, i, idx)

    cdef void _sift_down(self, int order, Py_ssize_t i) noexcept:
        cdef Py_ssize_t *h = self.heaps[order]
        cdef Py_ssize_t idx = h[i], child, n = self.n
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and _before(&self.entries[h[child + 1]], &self.entries[h[child]], order):
                child += 1
            if not _before(&self.entries[h[child]], &self.entries[idx], order):
                break
            self._place(order, i, h[child])
            i = child
        self._place(order, i, idx)

    cdef void _fix(self, int order, Py_ssize_t i) noexcept:
        """The entry at heap position i changed its key: restore the heap."""
        if i > 0 and _before(&self.entries[self.heaps[order][i]],
                             &self.entries[self.heaps[order][(i - 1) >> 1]], order):
            self._sift_up(order, i)
        else:
            self._sift_down(order, i)

    # ----------------------------------------------------------- the interface

    cdef int push(self, Request req) except -1:
        """Hold req (a strong reference) until it is taken."""
        cdef Py_ssize_t idx
        cdef Entry *e
        cdef int j, k
        if self.nfree == 0:
            self._grow()
        self.nfree -= 1
        idx = self.free_list[self.nfree]
        e = &self.entries[idx]
        Py_INCREF(req)
        e.req = <PyObject *>req
        e.level = 0 if self.fifo else req.priority
        e.deadline = req.deadline_ns if req.deadline_ns >= 0 and not self.fifo else INT64_MAX
        e.due = req.deadline_ns if req.deadline_ns >= 0 else INT64_MAX
        e.arrival = req.arrival_ns
        e.seq = self.seq
        self.seq += 1
        e.next_gain = req.arrival_ns + self.aging_ns if self.aging_ns > 0 else INT64_MAX
        req.slot = idx
        self.n += 1
        if req.priority != 0:
            self.levels[req.priority] = self.levels.get(req.priority, 0) + 1
            self.nonzero += 1
        for j in range(self.norders):
            k = self.orders[j]
            self._place(k, self.n - 1, idx)
            self._sift_up(k, self.n - 1)
        return 0

    cdef Request peek_best(self):
        """The request that goes next, still held (None: empty)."""
        if self.n == 0:
            return None
        return <Request>self.entries[self.heaps[BEST][0]].req

    cdef Request pop_best(self):
        """Take the request that goes next out of the queue (None: empty)."""
        if self.n == 0:
            return None
        return self.take(<Request>self.entries[self.heaps[BEST][0]].req)

    cdef Request peek_worst(self):
        """The request a full queue gives up first, still held (None: empty)."""
        if self.n == 0:
            return None
        return <Request>self.entries[self.heaps[WORST][0]].req

    cdef Request take(self, Request req):
        """Take req out of the queue and return it; None if it is not held here."""
        cdef Py_ssize_t idx = req.slot, last, i
        cdef int j, k
        if not self.holds(req):
            return None
        self.n -= 1
        for j in range(self.norders):
            k = self.orders[j]
            i = self.entries[idx].pos[k]
            if i != self.n:
                last = self.heaps[k][self.n]
                self._place(k, i, last)
                self._fix(k, i)
        self.entries[idx].req = NULL
        self.free_list[self.nfree] = idx
        self.nfree += 1
        req.slot = -1
        if req.priority != 0:
            left = self.levels[req.priority] - 1
            if left:
                self.levels[req.priority] = left
            else:
                del self.levels[req.priority]
            self.nonzero -= 1
        Py_DECREF(req)    # the queue's reference; the caller's `req` keeps it alive
        return req

    cdef void age(self, int64_t now) noexcept:
        """Every request gains the levels due by now."""
        cdef Py_ssize_t idx
        cdef Entry *e
        if self.aging_ns == 0:
            return
        while self.n and self.entries[self.heaps[AGING][0]].next_gain <= now:
            idx = self.heaps[AGING][0]
            e = &self.entries[idx]
            e.level += 1
            e.next_gain += self.aging_ns
            self._fix(BEST, e.pos[BEST])
            self._fix(WORST, e.pos[WORST])
            self._sift_down(AGING, 0)

    cdef list take_all(self):
        """Take every request out, best first."""
        cdef list out = []
        cdef Request req
        while self.n:
            req = self.pop_best()
            out.append(req)
        return out

    cdef Py_ssize_t count_at_least(self, int priority):
        """How many requests held have a priority >= priority (aging not counted)."""
        cdef Py_ssize_t below = 0
        if self.fifo:
            return self.n
        if priority > 0:
            below = self.n - self.nonzero          # the priority-0 ones
        if self.nonzero:
            for level, count in self.levels.items():
                if level < priority:
                    below += count
        return self.n - below

    cdef bint holds(self, Request req) noexcept:
        """True if req is held here (and not in another queue)."""
        return 0 <= req.slot < self.capacity and self.entries[req.slot].req == <PyObject *>req

    cdef int64_t first_arrival(self) noexcept:
        """The arrival of the oldest request held (INT64_MAX: empty); a keyed queue only."""
        if self.n == 0:
            return INT64_MAX
        return self.entries[self.heaps[ARRIVAL][0]].arrival

    cdef int64_t earliest_deadline(self) noexcept:
        """The earliest deadline held (INT64_MAX: none); a keyed queue only."""
        if self.n == 0:
            return INT64_MAX
        return self.entries[self.heaps[EARLIEST][0]].due

    # ----------------------------------------------------------- for tests

    def level_of(self, Request req):
        """req's level now (its priority plus what it gained by waiting), or None if not held."""
        if req.slot < 0 or req.slot >= self.capacity or self.entries[req.slot].req != <PyObject *>req:
            return None
        return self.entries[req.slot].level
