# The running estimate of handler time by batch size: inline helpers over a
# table est[0..max_items] of ns (0: no sample yet), shared by admission
# (Full.retry_after) and the collector (deadline-aware close).
#
# Thread safety: every cell is a relaxed atomic, so readers in any thread see
# a whole value.  Two workers recording the same size at once may lose one
# sample of the average (an estimate; nothing depends on every sample).
from libc.stdint cimport int64_t
from atomics cimport bc_atomic_i64, bc_load_i64_relaxed, bc_store_i64_relaxed

# Share of the estimate kept per new sample (an EWMA).
DEF EST_KEEP = 0.8


cdef inline void est_record(bc_atomic_i64 *est, Py_ssize_t max_items, Py_ssize_t n, int64_t ns) noexcept:
    """Feed one batch of n that took ns."""
    cdef int64_t old
    if 0 < n <= max_items:
        old = bc_load_i64_relaxed(&est[n])
        if old == 0:
            bc_store_i64_relaxed(&est[n], ns)
        else:
            bc_store_i64_relaxed(&est[n], <int64_t>(EST_KEEP * old + (1.0 - EST_KEEP) * ns))


cdef inline int64_t est_lookup(bc_atomic_i64 *est, Py_ssize_t max_items, Py_ssize_t n) noexcept:
    """Expected handler ns for a batch of n (0: nothing seen yet)."""
    cdef Py_ssize_t i
    cdef int64_t v
    if n > max_items:
        n = max_items
    for i in range(n, max_items + 1):   # a larger batch bounds a smaller one
        v = bc_load_i64_relaxed(&est[i])
        if v:
            return v
    for i in range(n - 1, 0, -1):       # else scale the largest smaller one
        v = bc_load_i64_relaxed(&est[i])
        if v:
            return v * n // i
    return 0


cdef inline int64_t est_full_batch(bc_atomic_i64 *est, Py_ssize_t max_items) noexcept:
    """Expected handler ns for a full batch, scaled from the largest seen."""
    cdef Py_ssize_t i
    cdef int64_t v = bc_load_i64_relaxed(&est[max_items])
    if v:
        return v
    for i in range(max_items - 1, 0, -1):
        v = bc_load_i64_relaxed(&est[i])
        if v:
            return v * max_items // i
    return 0
