/* A busy wait for the simulated model: called through ctypes, which releases
 * the GIL for the call, so it costs CPU like a real model kernel would. */
#define _POSIX_C_SOURCE 200809L
#include <time.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

void spin_ns(long long ns) {
    long long end = now_ns() + ns;
    while (now_ns() < end) {
    }
}
