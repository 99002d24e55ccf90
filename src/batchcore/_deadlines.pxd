# The one place where request deadlines fire (see _deadlines.pyx).
cimport cython
from atomics cimport bc_atomic_u32, bc_atomic_i64

cdef class DeadlineTimer:
    cdef list shards            # the _Shard heaps, fixed at creation (each guards itself)
    cdef bc_atomic_u32 epoch    # bumped when the thread must look again; it parks on it
    # When the thread will look at the heaps next (INT64_MAX: only when woken);
    # SCANNING while it looks.  An adder wakes it when its deadline is earlier.
    cdef bc_atomic_i64 armed
    cdef bc_atomic_u32 started  # 1 once the thread was started
    cdef cython.pymutex thread_lock   # guards thread (starting it once)
    cdef object thread
    # heapq's functions, held by the timer itself: a channel closed by a
    # finaliser at interpreter exit still sweeps after module globals are gone.
    cdef object heappush, heappop, heapify

    cdef void add(self, Request req, object channel) except *
    cdef void _start(self) except *
    cdef void _wake(self) noexcept

cdef DeadlineTimer timer()
