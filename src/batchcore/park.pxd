# Declarations of park.h for Cython: compare-and-sleep with the GIL released.
from libc.stdint cimport uint32_t, int64_t
from atomics cimport bc_atomic_u32

cdef extern from "park.h" nogil:
    const char *BC_PARK_IMPL
    int64_t bc_now_ns()
    int bc_park(bc_atomic_u32 *addr, uint32_t expected, int64_t deadline_ns)
    int bc_park_precise(bc_atomic_u32 *addr, uint32_t expected, int64_t deadline_ns, int64_t spin_ns)
    void bc_unpark_one(bc_atomic_u32 *addr)
    void bc_unpark_all(bc_atomic_u32 *addr)
    void bc_set_timer_slack(unsigned long ns)
