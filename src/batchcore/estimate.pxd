# The running estimate of handler time by batch size: inline helpers over a
# table est[0..max_items] of ns (0: no sample yet), shared by admission
# (Full.retry_after) and the collector (deadline-aware close).
from libc.stdint cimport int64_t

# Share of the estimate kept per new sample (an EWMA).
DEF EST_KEEP = 0.8


cdef inline void est_record(int64_t *est, Py_ssize_t max_items, Py_ssize_t n, int64_t ns) noexcept:
    """Feed one batch of n that took ns."""
    if 0 < n <= max_items:
        if est[n] == 0:
            est[n] = ns
        else:
            est[n] = <int64_t>(EST_KEEP * est[n] + (1.0 - EST_KEEP) * ns)


cdef inline int64_t est_lookup(const int64_t *est, Py_ssize_t max_items, Py_ssize_t n) noexcept:
    """Expected handler ns for a batch of n (0: nothing seen yet)."""
    cdef Py_ssize_t i
    if n > max_items:
        n = max_items
    for i in range(n, max_items + 1):   # a larger batch bounds a smaller one
        if est[i]:
            return est[i]
    for i in range(n - 1, 0, -1):       # else scale the largest smaller one
        if est[i]:
            return est[i] * n // i
    return 0


cdef inline int64_t est_full_batch(const int64_t *est, Py_ssize_t max_items) noexcept:
    """Expected handler ns for a full batch, scaled from the largest seen."""
    cdef Py_ssize_t i
    if est[max_items]:
        return est[max_items]
    for i in range(max_items - 1, 0, -1):
        if est[i]:
            return est[i] * max_items // i
    return 0
