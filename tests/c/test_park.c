/* Native test of park.h: a lost wake-up would hang this test (bounded by the
 * deadline), a broken timeout would return early.  Run under TSan by `make tsan`.
 * Protocol under test is the one the collector uses: the waiter reads the
 * epoch, announces itself, re-checks, then parks on the epoch; the waker
 * publishes, fences, and bumps + wakes only if someone announced. */
#include <pthread.h>
#include <stdio.h>
#include "park.h"

#define ROUNDS 20000

static bc_atomic_u32 epoch, sleepers;
static _Atomic(unsigned) published, consumed;

static void *waiter(void *arg) {
    (void)arg;
    while (atomic_load(&consumed) < ROUNDS) {
        uint32_t e = bc_load_u32_acquire(&epoch);
        bc_fetch_add_u32_seq_cst(&sleepers, 1);
        if (atomic_load(&published) > atomic_load(&consumed)) {
            bc_fetch_sub_u32_seq_cst(&sleepers, 1);
            atomic_fetch_add(&consumed, 1);
            continue;
        }
        int rc = bc_park(&epoch, e, bc_now_ns() + 2000000000LL);   /* 2 s: a lost wake */
        bc_fetch_sub_u32_seq_cst(&sleepers, 1);
        if (rc == BC_PARK_TIMEOUT) { fprintf(stderr, "lost wake-up\n"); return (void *)1; }
    }
    return NULL;
}

int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, waiter, NULL);
    for (unsigned i = 0; i < ROUNDS; i++) {
        while (atomic_load(&consumed) < i) { }   /* one item in flight at a time */
        atomic_fetch_add(&published, 1);
        bc_fence_seq_cst();
        if (bc_load_u32_relaxed(&sleepers)) {
            bc_fetch_add_u32_seq_cst(&epoch, 1);
            bc_unpark_one(&epoch);
        }
    }
    void *rc;
    pthread_join(t, &rc);
    if (rc != NULL) return 1;
    /* a timed park with nobody to wake it returns TIMEOUT, not before its deadline */
    bc_atomic_u32 word = 0;
    int64_t start = bc_now_ns();
    int r = bc_park(&word, 0, start + 20000000LL);
    if (r != BC_PARK_TIMEOUT || bc_now_ns() - start < 20000000LL) {
        fprintf(stderr, "timed park returned %d after %lld ns\n", r, (long long)(bc_now_ns() - start));
        return 1;
    }
    if (bc_park(&word, 1, -1) != BC_PARK_AGAIN) { fprintf(stderr, "park on a changed word slept\n"); return 1; }
    /* the precise variant: never returns before its deadline on a timeout */
    for (int i = 0; i < 50; i++) {
        int64_t t0 = bc_now_ns(), deadline = t0 + 200000;   /* 200 us, 50 us of it polled */
        if (bc_park_precise(&word, 0, deadline, 50000) != BC_PARK_TIMEOUT || bc_now_ns() < deadline) {
            fprintf(stderr, "precise park returned before its deadline\n");
            return 1;
        }
    }
    if (bc_park_precise(&word, 1, bc_now_ns() + 1000000, 50000) == BC_PARK_TIMEOUT) {
        fprintf(stderr, "precise park on a changed word waited for its deadline\n");
        return 1;
    }
    printf("park ok: %d hand-offs without a lost wake-up\n", ROUNDS);
    return 0;
}
