/* Compare-and-sleep on a 32-bit word, with an absolute monotonic deadline.
 *
 *   bc_park(addr, expected, deadline_ns)  sleeps while *addr == expected,
 *       until bc_unpark_*() on addr, the deadline (CLOCK_MONOTONIC ns; -1 =
 *       none) or a signal.  Returns a code below.  Spurious returns are
 *       allowed: callers re-check their condition in a loop.
 *   bc_unpark_one / bc_unpark_all(addr)  wake sleepers on addr.
 *
 * Callers change *addr before waking, so a wake that races with a sleeper
 * going to bed is never lost: the sleeper sees *addr != expected (AGAIN).
 * Linux: futex (one syscall to sleep, one to wake).  Elsewhere (macOS, the
 * BSDs), or on Linux when built with BATCHCORE_PORTABLE_PARK defined
 * (setup.py: BATCHCORE_PARK=portable, which is how the fallback is built and
 * tested on Linux): one mutex and condition variable for every word, slower
 * but correct.  BC_PARK_IMPL names the one compiled in.
 * No Python.h: call bc_park with the GIL released.
 */
#ifndef BATCHCORE_PARK_H
#define BATCHCORE_PARK_H

#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>
#include "atomics.h"

#define BC_PARK_OK       0   /* woken, or a spurious return */
#define BC_PARK_AGAIN    1   /* *addr != expected on entry: did not sleep */
#define BC_PARK_TIMEOUT  2   /* the deadline passed */
#define BC_PARK_INTR     3   /* a signal arrived: run the handlers, retry */

/* CLOCK_MONOTONIC in ns: the clock of Python's time.monotonic_ns(). */
static inline int64_t bc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#if defined(__linux__) && !defined(BATCHCORE_PORTABLE_PARK)
#define BC_PARK_IMPL "futex"
#include <linux/futex.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* unistd.h declares syscall() only under _DEFAULT_SOURCE, which -std=c11
 * leaves off; its prototype, repeated (a compatible redeclaration): */
extern long syscall(long number, ...);

static inline int bc_park(bc_atomic_u32 *addr, uint32_t expected, int64_t deadline_ns) {
    struct timespec ts, *tsp = NULL;
    if (deadline_ns >= 0) {
        ts.tv_sec = (time_t)(deadline_ns / 1000000000LL);
        ts.tv_nsec = (long)(deadline_ns % 1000000000LL);
        tsp = &ts;
    }
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline, so a
       retry after a spurious wake does not stretch the wait. */
    long rc = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_BITSET_PRIVATE,
                      expected, tsp, NULL, FUTEX_BITSET_MATCH_ANY);
    if (rc == 0) return BC_PARK_OK;
    switch (errno) {
        case EAGAIN:    return BC_PARK_AGAIN;
        case ETIMEDOUT: return BC_PARK_TIMEOUT;
        case EINTR:     return BC_PARK_INTR;
        default:        return BC_PARK_OK;
    }
}

static inline void bc_unpark_one(bc_atomic_u32 *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static inline void bc_unpark_all(bc_atomic_u32 *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
}

/* Timed waits of the calling thread overshoot by the timer slack (50 us by
   default); the batch worker asks for `ns` instead. */
static inline void bc_set_timer_slack(unsigned long ns) { prctl(PR_SET_TIMERSLACK, ns, 0, 0, 0); }

#else  /* portable fallback */
#define BC_PARK_IMPL "pthread"
#include <pthread.h>

/* One lock for every parked word (the whole extension is one translation
   unit, so one pair): it guards nothing but the sleep/wake handshake, and
   the word is re-checked under it, so a wake between a sleeper's check and
   its wait cannot be lost.  A wake reaches every sleeper, which re-checks. */
static pthread_mutex_t bc_park_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t bc_park_cond = PTHREAD_COND_INITIALIZER;
static pthread_once_t bc_park_once = PTHREAD_ONCE_INIT;

/* A forked child has only the forking thread, but the condition variable
   still counts the parent's sleepers (and the mutex may be held by one of
   them): a wake in the child would wait for threads that do not exist.
   The child starts with a fresh pair. */
static void bc_park_after_fork(void) {
    pthread_mutex_init(&bc_park_mutex, NULL);
    pthread_cond_init(&bc_park_cond, NULL);
}

static void bc_park_register_fork_hook(void) { pthread_atfork(NULL, NULL, bc_park_after_fork); }

static inline int bc_park(bc_atomic_u32 *addr, uint32_t expected, int64_t deadline_ns) {
    int rc = BC_PARK_OK;
    pthread_once(&bc_park_once, bc_park_register_fork_hook);
    pthread_mutex_lock(&bc_park_mutex);
    if (bc_load_u32_seq_cst(addr) != expected) {
        rc = BC_PARK_AGAIN;
    } else if (deadline_ns < 0) {
        pthread_cond_wait(&bc_park_cond, &bc_park_mutex);
    } else {
        /* the fallback converts the monotonic deadline to the realtime clock */
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        int64_t abs_ns = (int64_t)now.tv_sec * 1000000000LL + now.tv_nsec + (deadline_ns - bc_now_ns());
        struct timespec ts = {(time_t)(abs_ns / 1000000000LL), (long)(abs_ns % 1000000000LL)};
        if (pthread_cond_timedwait(&bc_park_cond, &bc_park_mutex, &ts) == ETIMEDOUT) rc = BC_PARK_TIMEOUT;
    }
    pthread_mutex_unlock(&bc_park_mutex);
    return rc;
}

static inline void bc_unpark_all(bc_atomic_u32 *addr) {
    (void)addr;
    pthread_once(&bc_park_once, bc_park_register_fork_hook);
    pthread_mutex_lock(&bc_park_mutex);
    pthread_cond_broadcast(&bc_park_cond);
    pthread_mutex_unlock(&bc_park_mutex);
}

static inline void bc_unpark_one(bc_atomic_u32 *addr) { bc_unpark_all(addr); }

static inline void bc_set_timer_slack(unsigned long ns) { (void)ns; }
#endif

/* bc_park, but the last spin_ns before the deadline are spent polling *addr
 * and yielding the CPU between polls, instead of sleeping: a
 * timer wake-up lands tens of microseconds late on a VM, a poll lands on
 * time.  Bounded by spin_ns; the caller holds no lock (the GIL is released);
 * it ends early when *addr changes.  sched_yield rather than a pause loop:
 * any runnable thread gets the CPU first, and a hypervisor sees no spin. */
static inline int bc_park_precise(bc_atomic_u32 *addr, uint32_t expected, int64_t deadline_ns,
                                  int64_t spin_ns) {
    if (deadline_ns < 0 || spin_ns <= 0) return bc_park(addr, expected, deadline_ns);
    if (deadline_ns - bc_now_ns() > spin_ns) {
        int rc = bc_park(addr, expected, deadline_ns - spin_ns);
        if (rc != BC_PARK_TIMEOUT) return rc;   /* woken, or the word changed */
    }
    while (bc_now_ns() < deadline_ns) {
        if (bc_load_u32_acquire(addr) != expected) return BC_PARK_OK;
        sched_yield();   /* let any runnable thread have this CPU first */
    }
    return BC_PARK_TIMEOUT;
}

#endif /* BATCHCORE_PARK_H */
