# Declarations of delay.h for Cython: the adaptive batching delay (max_delay="auto").
from libc.stdint cimport int64_t

cdef extern from "delay.h" nogil:
    ctypedef struct bc_delay:
        int64_t cap_ns
        int64_t ref_ns
        double gap_ns
        double hit
    void bc_delay_init(bc_delay *d, int64_t cap_ns)
    void bc_delay_record(bc_delay *d, int64_t n, int64_t ns)
    double bc_delay_fixed_ns(const bc_delay *d)
    double bc_delay_window_ns(const bc_delay *d, double a)
    void bc_delay_arrival(bc_delay *d, int64_t t_ns)
    int64_t bc_delay_decide(bc_delay *d, int64_t now_ns, int64_t n, int64_t since_ns)
    int64_t bc_delay_target(const bc_delay *d, int64_t max_items)
