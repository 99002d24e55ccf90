# The errors of the core and the one builder of each message (see _errors.pyx).
cdef class Failed:
    cdef readonly object error

cpdef object timeout_error()
cpdef object late_error()
cpdef object predicted_error()
cpdef object shed_error(size_t ahead, double retry_after)
cpdef object no_room_error()
cpdef object full_error(size_t queued, size_t cap, double retry_after)
cpdef object evicted_error(size_t queued, double retry_after)
cpdef object closed_error(object cause)
cpdef object wrapped_error(object exc)
cdef object caller_copy(object exc)
