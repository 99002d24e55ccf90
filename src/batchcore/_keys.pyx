# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""Keyed batches (``batch_key=``): one scheduler queue per key, and which key goes next.

The ring stays the one hand-off from callers.  The collector drains it and
files each request under its key (:meth:`KeyQueues.add`), into that key's
:class:`RequestQueue` (_scheduler.pyx); a batch is then formed from one key's
queue only, so keys never mix, and inside a key it takes the highest
priority first (with aging), then the earliest deadline, then arrival, like
an unkeyed channel's.  Which key goes next (:meth:`KeyQueues.next_queue`) is
the keyed rule, not a priority: a key whose queue already holds a full batch
(``max_items``, or more cost than ``max_cost``), the one with the oldest
request among them; else the key whose oldest request is oldest, which
dispatches when its own delay (from that request) has passed.  Serving the
oldest first means no key starves.

Live keys are bounded: :meth:`KeyQueues.admit` refuses a new key while
``max_keys`` keys have requests queued, and a key with nothing queued is
forgotten.

What guards what: every structure here (the queues, ``live``, ``held``, the
per-key counters) is guarded by its channel's ``consumer_lock``, which every
caller of these methods holds: callers change ``live`` at admission, and
take requests out of the queues when they withdraw them or evict one for
room (``Admission.leave``, ``evict_for``), the collector the rest, and
``Channel.key_counters`` reads them.  Nothing here runs user code but a
key's ``__hash__``/``__eq__`` (a dict lookup); a key must not call into its
own channel from them.
"""

from libc.stdint cimport int64_t, INT64_MAX

from estimate cimport est_lookup


def too_many_keys_error(Py_ssize_t live, Py_ssize_t max_keys, object key):
    """The Full error of a call whose key would be one live key too many."""
    err = Full(f"too many batch keys: {live} keys have requests queued (max_keys={max_keys}); "
               f"key {_short_repr(key)} refused", live, 0.0)
    err.max_keys = max_keys     # every on_full policy refuses it at once
    return err


cdef str _short_repr(object key):
    try:
        text = repr(key)
    except BaseException:
        return f"of type {type(key).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


cdef class KeyQueue:
    """The popped requests of one key not yet in a batch, in a scheduler queue."""

    def __cinit__(self, object key, double aging=0.0, bint fifo=False):
        self.key = key
        self.sched = RequestQueue(aging, fifo, True)
        self.cost = 0.0

    def __len__(self):
        return self.sched.n

    cdef bint is_full(self, Py_ssize_t max_items, double max_cost) noexcept:
        """A whole batch is waiting: max_items requests, or more cost than one batch takes."""
        # Every item's cost is <= max_cost (checked at submit), so a sum above
        # it means the batch taken from the head stops before the end.
        return self.sched.n >= max_items or (max_cost > 0.0 and self.cost > max_cost)

    cdef int64_t first_arrival(self) noexcept:
        """The arrival of its oldest request (INT64_MAX: empty)."""
        return self.sched.first_arrival()


cdef class KeyQueues:
    """Every key's queue, the bound on live keys, and the per-key counters.

    aging, fifo: those of each key's RequestQueue (priority_aging=, classic).
    """

    def __cinit__(self, Py_ssize_t max_keys, double aging=0.0, bint fifo=False):
        if max_keys < 1:
            raise ValueError(f"invalid max_keys value: expected an int >= 1 (got {max_keys!r})")
        self.max_keys = max_keys
        self.aging = aging
        self.fifo = fifo
        self.live = {}
        self.queues = {}
        self.counts = {}

    # ----------------------------------------------------------- callers' side

    cdef int admit(self, object key) except -1:
        """Count one more request of key, or raise Full if key would be one live key too many."""
        # A key's count is a one-item list changed in place: a key type whose
        # __hash__/__eq__ is Python code can let another thread run inside a
        # dict lookup, and a read-then-store of an int there would lose its update.
        cdef list cell = self.live.get(key)
        if cell is None:
            if len(self.live) >= self.max_keys:
                raise too_many_keys_error(len(self.live), self.max_keys, key)
            self.live[key] = [1]
        else:
            cell[0] += 1
        c = self.counts.pop(key, None)
        if c is None:
            if len(self.counts) >= self.max_keys:
                # forget the least recently used key's counters
                del self.counts[next(iter(self.counts))]
            c = [0, 0, 0]
        c[0] += 1
        self.counts[key] = c
        return 0

    cdef void leave(self, object key, Py_ssize_t n) except *:
        """n requests of key left the queue (batched, withdrawn, evicted, failed)."""
        cdef list cell = self.live.get(key)
        if cell is None:
            return
        cell[0] -= n
        if cell[0] <= 0 and self.live.get(key) is cell:
            del self.live[key]      # nothing of this key waits: forget it

    cdef Py_ssize_t count_at_least(self, object key, int priority) except -1:
        """Requests of key held with a priority >= priority (shedding's work ahead)."""
        cdef KeyQueue q = self.queues.get(key)
        return 0 if q is None else q.sched.count_at_least(priority)

    cdef Py_ssize_t keys_before(self, object key, Py_ssize_t max_items, double max_cost,
                                Py_ssize_t *items) except -1:
        """How many batches of other keys go before the next batch of key, by
        next_queue's rule, for a call of key about to join its queue; *items:
        the requests in them.

        Every request queued is older than the call.  If the call's key is
        not full (with the call), every other key's requests go first (each
        key at its turn is the oldest); if it is, only the full batches of
        full keys whose oldest request is older than its own.  Priorities do
        not count across keys.
        """
        cdef KeyQueue q, own = self.queues.get(key)
        cdef int64_t own_first = INT64_MAX
        cdef bint own_full = max_items <= 1
        cdef Py_ssize_t n, batches = 0
        items[0] = 0
        if own is not None:
            own_first = own.first_arrival()
            own_full = own.sched.n + 1 >= max_items or own.is_full(max_items, max_cost)
        for q in self.queues.values():
            n = q.sched.n
            if q is own or n == 0:
                continue
            if not own_full:
                batches += (n + max_items - 1) // max_items
                items[0] += n
            elif q.is_full(max_items, max_cost) and q.first_arrival() < own_first:
                n = n // max_items if n >= max_items else 1     # 1: full by cost
                batches += n
                items[0] += n * max_items if n * max_items <= q.sched.n else q.sched.n
        return batches

    # ----------------------------------------------------------- the collector's side

    cdef void add(self, Request req) except *:
        """File a popped request under its key."""
        cdef KeyQueue q = self.queues.get(req.key)
        if q is None:
            q = KeyQueue(req.key, self.aging, self.fifo)
            self.queues[req.key] = q
        q.sched.push(req)
        q.cost += req.cost
        self.held += 1

    cdef void remove(self, KeyQueue q, Request req) except *:
        """Take req out of q (batched, withdrawn, evicted); q is forgotten once empty."""
        if q.sched.take(req) is None:
            return
        self.held -= 1
        q.cost -= req.cost
        if q.sched.n == 0:
            q.cost = 0.0
            q.waited = False
            self._forget_queue(q)

    cdef KeyQueue next_queue(self, Py_ssize_t max_items, double max_cost):
        """The queue to serve next: the oldest full one, else the oldest one; None if none holds anything."""
        cdef KeyQueue q, oldest = None, oldest_full = None
        cdef int64_t t, t_oldest = INT64_MAX, t_full = INT64_MAX
        for q in self.queues.values():
            if q.sched.n == 0:
                continue
            t = q.first_arrival()
            if t < t_oldest or oldest is None:
                oldest, t_oldest = q, t
            if (t < t_full or oldest_full is None) and q.is_full(max_items, max_cost):
                oldest_full, t_full = q, t
        return oldest_full if oldest_full is not None else oldest

    cdef KeyQueue urgent(self, int64_t now, bc_atomic_i64 *est_ns, Py_ssize_t max_items,
                         int64_t *wake_at):
        """The queue that must go now to meet its earliest deadline, or None.

        Like the unkeyed collector: a queue goes once its earliest deadline is
        less than the handler's estimated time (plus a quarter) away.  Lowers
        *wake_at (-1: none yet) to the next such moment of any queue.
        """
        cdef KeyQueue q, due = None
        cdef int64_t at, earliest, due_at = INT64_MAX
        cdef Py_ssize_t n
        for q in self.queues.values():
            earliest = q.sched.earliest_deadline()
            if earliest == INT64_MAX:
                continue
            n = q.sched.n + 1 if q.sched.n < max_items else max_items
            at = earliest - est_lookup(est_ns, max_items, n) * 5 // 4
            if at <= now:
                if at < due_at:
                    due, due_at = q, at
            elif wake_at[0] < 0 or at < wake_at[0]:
                wake_at[0] = at
        return due

    cdef Py_ssize_t largest(self) noexcept:
        """The most requests one queue holds."""
        cdef KeyQueue q
        cdef Py_ssize_t most = 0
        for q in self.queues.values():
            if q.sched.n > most:
                most = q.sched.n
        return most

    cdef void mark_waited(self) noexcept:
        """The collector slept: every queue holding requests has waited."""
        cdef KeyQueue q
        for q in self.queues.values():
            if q.sched.n:
                q.waited = True

    cdef void _forget_queue(self, KeyQueue q) except *:
        if self.queues.get(q.key) is q:
            del self.queues[q.key]

    cdef list take_all(self):
        """Every held request (closing after a worker failure); the queues are emptied."""
        cdef list out = []
        cdef KeyQueue q
        for q in self.queues.values():
            out.extend(q.sched.take_all())
            q.cost = 0.0
        self.queues = {}
        self.held = 0
        return out

    cdef void count_batch(self, object key, Py_ssize_t n) except *:
        """A batch of n requests of key was dispatched."""
        c = self.counts.get(key)
        if c is not None:
            c[1] += 1
            c[2] += n

    # ----------------------------------------------------------- reading

    def counters(self) -> dict:
        """key -> (submitted, batches, batched items, queued now), for the keys counted."""
        out = {}
        for key, c in list(self.counts.items()):
            cell = self.live.get(key)
            out[key] = (c[0], c[1], c[2], 0 if cell is None else cell[0])
        return out

    @property
    def live_keys(self) -> int:
        """Keys with requests queued now."""
        return len(self.live)

    @property
    def queue_count(self) -> int:
        """Keys with popped requests waiting in the collector's queues."""
        return len(self.queues)

