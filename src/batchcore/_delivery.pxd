# Completing requests and waking their callers (see _delivery.pyx).

cdef void finish_one(Request req, object result, object error, object tb) except *
cdef int deliver(list batch, object outputs, object error,
                 unsigned long long *completed, unsigned long long *failed) except -1
