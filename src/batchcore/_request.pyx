# A part of _batchcore.pyx, which includes it (compiler directives are set there).
"""One call (:class:`Request`): its input, its outcome and how its caller waits.

A blocking caller parks on ``state`` (GIL released) until the worker stores
the outcome and stores DONE; the worker wakes it only if ``parked`` says it
sleeps (Dekker: each side writes its word, then reads the other's).

What guards what: ``state`` (one CAS decides a request's fate) and
``parked`` are atomics; the object fields are written by one party at a
time, handed over by ``state``: the producer before the push, the winner of
the QUEUED CAS while the request is TAKEN or CANCELLED, the caller after it
acquired DONE.  The debug counters are atomics.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint32_t

from atomics cimport (
    bc_atomic_size, bc_fetch_add_seq_cst, bc_fetch_sub_seq_cst, bc_load_relaxed,
    bc_load_u32_acquire, bc_load_u32_seq_cst, bc_store_u32_seq_cst,
)
from debug cimport BATCHCORE_DEBUG
from park cimport bc_now_ns, bc_park

# A blocking caller (waiting for its outcome, or for room with on_full="block")
# wakes at least this often to run signal handlers (Ctrl-C).
cdef int64_t SIGNAL_SLICE_NS = 50_000_000

# Debug builds only (compiled out of release builds): Requests alive, and blocking callers
# asleep in park_until_done.  Atomic because a caller counts itself parked
# while other threads count; the tests' teardown checks both are back to 0.
cdef bc_atomic_size _live_requests
cdef bc_atomic_size _parked_callers


def debug_counters() -> dict:
    """``{"live_requests": n, "parked_callers": n}``; always zeros in a release build."""
    return {"live_requests": bc_load_relaxed(&_live_requests),
            "parked_callers": bc_load_relaxed(&_parked_callers)}


@cython.final
@cython.freelist(64)
cdef class Request:
    """One call: its input, its outcome and how its caller waits."""

    def __cinit__(self):
        if BATCHCORE_DEBUG:
            bc_fetch_add_seq_cst(&_live_requests, 1)

    def __init__(self):
        raise TypeError("Request is not supposed to be instantiated from Python")

    def __dealloc__(self):
        if BATCHCORE_DEBUG:
            bc_fetch_sub_seq_cst(&_live_requests, 1)


cdef Request new_request(object value, WaiterKind kind, int64_t deadline_ns, double cost, int priority=0):
    cdef Request req = Request.__new__(Request)
    req.value = value
    req.priority = priority
    req.slot = -1
    req.kind = kind
    req.arrival_ns = bc_now_ns()
    req.deadline_ns = deadline_ns
    req.cost = cost
    return req


cdef inline void store(Request req, object result, object error, object tb, bint keep_input=False) noexcept:
    """Store req's outcome (GIL held); the input is not needed any more, unless
    keep_input (a request failed LATE: its running batch's worker may be
    reading the input on another thread right now)."""
    if not keep_input:
        req.value = None
    req.result = result
    req.error = error
    req.error_tb = tb


cdef object take_outcome(Request req):
    """Return the stored result, or raise the stored error; clear both."""
    result, error, tb = req.result, req.error, req.error_tb
    req.result = req.error = req.error_tb = None
    if error is not None:
        raise error.with_traceback(tb)
    return result


cdef int park_until_done(Request req) except -1:
    """Sleep, GIL released, until req is DONE; run signal handlers meanwhile.

    Raises what a signal handler raised (Ctrl-C): the caller withdraws req.
    """
    cdef uint32_t s
    while True:
        s = bc_load_u32_acquire(&req.state)
        if s == DONE:
            return 0
        # Announce the sleep before re-reading state (Dekker with the waker).
        bc_store_u32_seq_cst(&req.parked, 1)
        if bc_load_u32_seq_cst(&req.state) == s:
            if BATCHCORE_DEBUG:
                bc_fetch_add_seq_cst(&_parked_callers, 1)
            with nogil:
                bc_park(&req.state, s, bc_now_ns() + SIGNAL_SLICE_NS)
            if BATCHCORE_DEBUG:
                bc_fetch_sub_seq_cst(&_parked_callers, 1)
        bc_store_u32_seq_cst(&req.parked, 0)
        PyErr_CheckSignals()
