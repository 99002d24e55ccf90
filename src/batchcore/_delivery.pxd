# Completing requests and waking their callers (see _delivery.pyx).
from atomics cimport bc_atomic_u64

cdef void finish_one(Request req, object result, object error, object tb, bint keep_input=*) except *
cdef int deliver(list batch, object outputs, object error,
                 bc_atomic_u64 *completed, bc_atomic_u64 *failed) except -1
