# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""Keyed batches (``batch_key=``): one queue per key, and which key goes next.

The ring stays the one hand-off from callers.  The collector pops it and
files each request under its key (:meth:`KeyQueues.add`); a batch is then
formed from one key's queue only, so keys never mix.  Which key goes next
(:meth:`KeyQueues.next_queue`): a key whose queue already holds a full batch
(``max_items``, or more cost than ``max_cost``), the one with the oldest
first request among them; else the key whose first request is oldest, which
dispatches when its own delay (from that first request) has passed.  Serving
the oldest first means no key starves.

Live keys are bounded: :meth:`KeyQueues.admit` refuses a new key while
``max_keys`` keys have requests queued, and a key with nothing queued is
forgotten.  Every structure here is guarded by the GIL: callers change
``live`` at admission, the collector the rest (``evict_oldest`` runs in a
caller's thread with on_full="drop_oldest", while the collector sleeps or
between its steps).
"""

from libc.stdint cimport int64_t, INT64_MAX

from atomics cimport bc_cas_u32_acq_rel, bc_load_u32_relaxed
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
    """The popped requests of one key, in arrival order, not yet in a batch."""

    def __cinit__(self, object key):
        self.key = key
        self.items = []
        self.cost = 0.0
        self.min_deadline = INT64_MAX

    def __len__(self):
        return len(self.items)

    cdef bint is_full(self, Py_ssize_t max_items, double max_cost) noexcept:
        """A whole batch is waiting: max_items requests, or more cost than one batch takes."""
        # Every item's cost is <= max_cost (checked at submit), so a sum above
        # it means the batch taken from the head stops before the end.
        return len(self.items) >= max_items or (max_cost > 0.0 and self.cost > max_cost)

    cdef int64_t first_arrival(self) noexcept:
        return (<Request>self.items[0]).arrival_ns if self.items else INT64_MAX


cdef class KeyQueues:
    """Every key's queue, the bound on live keys, and the per-key counters."""

    def __cinit__(self, Py_ssize_t max_keys):
        if max_keys < 1:
            raise ValueError(f"invalid max_keys value: expected an int >= 1 (got {max_keys!r})")
        self.max_keys = max_keys
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

    # ----------------------------------------------------------- the collector's side

    cdef void add(self, Request req) except *:
        """File a popped request under its key."""
        cdef KeyQueue q = self.queues.get(req.key)
        if q is None:
            q = KeyQueue(req.key)
            self.queues[req.key] = q
        q.items.append(req)
        q.cost += req.cost
        if req.deadline_ns >= 0 and req.deadline_ns < q.min_deadline:
            q.min_deadline = req.deadline_ns
        self.held += 1

    cdef KeyQueue next_queue(self, Py_ssize_t max_items, double max_cost):
        """The queue to serve next: the oldest full one, else the oldest one; None if none holds anything."""
        cdef KeyQueue q, oldest = None, oldest_full = None
        cdef int64_t t, t_oldest = INT64_MAX, t_full = INT64_MAX
        for q in self.queues.values():
            if not q.items:
                continue
            t = q.first_arrival()
            if t < t_oldest or oldest is None:
                oldest, t_oldest = q, t
            if (t < t_full or oldest_full is None) and q.is_full(max_items, max_cost):
                oldest_full, t_full = q, t
        return oldest_full if oldest_full is not None else oldest

    cdef KeyQueue urgent(self, int64_t now, const int64_t *est_ns, Py_ssize_t max_items,
                         int64_t *wake_at):
        """The queue that must go now to meet its earliest deadline, or None.

        Like the unkeyed collector: a queue goes once its earliest deadline is
        less than the handler's estimated time (plus a quarter) away.  Lowers
        *wake_at (-1: none yet) to the next such moment of any queue.
        """
        cdef KeyQueue q, due = None
        cdef int64_t at, due_at = INT64_MAX
        for q in self.queues.values():
            if q.min_deadline == INT64_MAX or not q.items:
                continue
            at = q.min_deadline - est_lookup(est_ns, max_items, len(q.items) + 1) * 5 // 4
            if at <= now:
                if at < due_at:
                    due, due_at = q, at
            elif wake_at[0] < 0 or at < wake_at[0]:
                wake_at[0] = at
        return due

    cdef Py_ssize_t largest(self) noexcept:
        """The most requests one queue holds."""
        cdef KeyQueue q
        cdef Py_ssize_t n, most = 0
        for q in self.queues.values():
            n = len(q.items)
            if n > most:
                most = n
        return most

    cdef void mark_waited(self) noexcept:
        """The collector slept: every queue holding requests has waited."""
        cdef KeyQueue q
        for q in self.queues.values():
            if q.items:
                q.waited = True

    cdef list take(self, KeyQueue q, Py_ssize_t max_items, double max_cost, double *cost):
        """Take the batch at the head of q: arrival order, within max_items and max_cost.

        *cost: its summed cost.  q is forgotten once empty.
        """
        cdef Py_ssize_t n = 0, total = len(q.items)
        cdef double summed = 0.0
        cdef Request req
        while n < total and n < max_items:
            req = <Request>q.items[n]
            if max_cost > 0.0 and n > 0 and summed + req.cost > max_cost:
                break
            summed += req.cost
            n += 1
        batch = q.items[:n]
        del q.items[:n]
        self.held -= n
        cost[0] = summed
        q.waited = False
        q.cost = 0.0
        q.min_deadline = INT64_MAX
        for req in q.items:       # what stays: recompute its sums
            q.cost += req.cost
            if req.deadline_ns >= 0 and req.deadline_ns < q.min_deadline:
                q.min_deadline = req.deadline_ns
        if not q.items:
            self._forget_queue(q)
        return batch

    cdef void _forget_queue(self, KeyQueue q) except *:
        if self.queues.get(q.key) is q:
            del self.queues[q.key]

    cdef list take_all(self):
        """Every held request (closing after a worker failure); the queues are emptied."""
        cdef list out = []
        cdef KeyQueue q
        for q in self.queues.values():
            out.extend(q.items)
            q.items = []
        self.queues = {}
        self.held = 0
        return out

    cdef Request evict_oldest(self):
        """Take the oldest held request still QUEUED out of its queue (now TAKEN), or None."""
        cdef KeyQueue q, best = None
        cdef Request req, oldest = None
        cdef Py_ssize_t i, best_at = -1
        for q in list(self.queues.values()):
            for i in range(len(q.items)):
                req = <Request>q.items[i]
                if bc_load_u32_relaxed(&req.state) == QUEUED:
                    if oldest is None or req.arrival_ns < oldest.arrival_ns:
                        oldest, best, best_at = req, q, i
                    break
        if oldest is None or not bc_cas_u32_acq_rel(&oldest.state, QUEUED, TAKEN):
            return None
        del best.items[best_at]
        best.cost -= oldest.cost
        self.held -= 1
        if not best.items:
            best.cost = 0.0
            best.min_deadline = INT64_MAX
            self._forget_queue(best)
        return oldest

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

