# Completing requests and waking their callers (see _delivery.pyx).
from batched_fn._request cimport Request

cdef void finish_one(Request req, object result, object error, object tb) except *
cdef int deliver(list batch, object outputs, object error,
                 unsigned long long *completed, unsigned long long *failed) except -1
