# One call: its input, its outcome and how its caller waits (see _request.pyx).
from libc.stdint cimport int64_t
from atomics cimport bc_atomic_u32

# Request.state: the one word every party agrees on.  Transitions:
#   QUEUED -> TAKEN      by the collector, when the request enters a batch
#   QUEUED -> CANCELLED  by the caller or its deadline (withdrawn)
#   TAKEN  -> DONE       by whoever took it out of the queue to fail it (evicted, closed)
#   TAKEN  -> FINISHING  by the worker, claiming the delivery of its batch's outcome
#   FINISHING -> DONE    by the worker, after the outcome is stored
#   TAKEN  -> LATE       by the deadline while its batch runs (in_batch): the
#                        batch's outcome for it will be dropped
#   LATE   -> DONE       by the deadline, after TimeoutError is stored
#   CANCELLED -> DONE    by the deadline, after TimeoutError is stored
cdef enum RequestState:
    QUEUED = 0
    TAKEN = 1
    CANCELLED = 2
    DONE = 3
    FINISHING = 4
    LATE = 5

# How a caller waits for its request.
cdef enum WaiterKind:
    KIND_BLOCKING = 0   # parks on Request.state
    KIND_ASYNC = 1      # an asyncio future, set in its loop's thread
    KIND_FUTURE = 2     # a concurrent.futures.Future


cdef class Request:
    cdef bc_atomic_u32 state     # RequestState; the futex word of a blocking caller
    cdef bc_atomic_u32 parked    # 1 while a blocking caller sleeps on state
    cdef readonly object value
    cdef object result
    cdef object error            # an exception for this caller, or None
    cdef object error_tb         # its traceback as the worker saw it
    cdef readonly int64_t arrival_ns
    cdef readonly int64_t deadline_ns   # -1: none
    cdef readonly double cost
    cdef readonly object key     # its batch_key (None without batch_key=)
    cdef readonly int priority   # higher is served first (see _scheduler.pyx)
    # Its entry in the scheduler queue holding it (-1: none): lets a withdrawn
    # request leave the queue at once.  Its channel's consumer_lock guards it.
    cdef Py_ssize_t slot
    # Set by the collector before it claims the request into a batch: the
    # deadline may then fail it LATE (TAKEN also marks an evicted request).
    cdef bint in_batch
    cdef WaiterKind kind
    cdef object waiter           # asyncio or concurrent future, or None
    cdef object loop             # the LoopMailbox of an asyncio caller
    cdef object __weakref__      # the deadline timer refers to requests weakly


cdef Request new_request(object value, WaiterKind kind, int64_t deadline_ns, double cost, int priority=*)
cdef void store(Request req, object result, object error, object tb, bint keep_input=*) noexcept
cdef object take_outcome(Request req)
cdef int park_until_done(Request req) except -1
