# The one place where request deadlines fire (see _deadlines.pyx).
from atomics cimport bc_atomic_u32

cdef class DeadlineTimer:
    cdef list heap              # (deadline_ns, seq, request ref, channel ref); the GIL guards it
    cdef unsigned long long seq  # tie-breaker: entries never compare requests
    cdef size_t sweep_at        # sweep finished entries once the heap is this long
    cdef bc_atomic_u32 epoch    # bumped on a new earliest deadline; the thread parks on it
    cdef object thread

    cdef void add(self, Request req, object channel) except *

cdef DeadlineTimer timer()
