/* Micro-benchmark of the lock-free ring (src/batchcore/ring.h).
 *
 * Prints ns per item for push+pop: one thread pushing then popping (no
 * contention), and P producer threads against one consumer thread.  A thread
 * that finds the ring full (or empty) yields its core, so the figures stay
 * meaningful with more threads than cores.
 * Usage: ring_bench [items_per_run] [runs]
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "ring.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    bc_ring *ring;
    long items;
} producer_arg;

static void *producer(void *p) {
    producer_arg *a = p;
    for (long i = 0; i < a->items; i++) {
        while (!bc_ring_push(a->ring, (void *)(uintptr_t)(i + 1))) {
            sched_yield();  /* full: let the consumer run (more threads than cores) */
        }
    }
    return NULL;
}

/* Same thread: push then pop, 1 item at a time. */
static double same_thread(long items) {
    bc_ring *r = bc_ring_new(1024);
    void *out = NULL;
    uintptr_t sum = 0;
    double t0 = now_s();
    for (long i = 0; i < items; i++) {
        bc_ring_push(r, (void *)(uintptr_t)(i + 1));
        bc_ring_pop(r, &out);
        sum += (uintptr_t)out;
    }
    double dt = now_s() - t0;
    bc_ring_free(r);
    if (sum == 0) printf("impossible\n");
    return dt * 1e9 / items;
}

/* P producers, one consumer (this thread): ns per item moved end to end. */
static double mpsc(int producers, long items) {
    bc_ring *r = bc_ring_new(1024);
    pthread_t th[64];
    producer_arg arg = {r, items / producers};
    long total = arg.items * producers;
    double t0 = now_s();
    for (int p = 0; p < producers; p++) pthread_create(&th[p], NULL, producer, &arg);
    void *out;
    for (long got = 0; got < total;) {
        if (bc_ring_pop(r, &out))
            got++;
        else
            sched_yield();  /* empty: let a producer run */
    }
    double dt = now_s() - t0;
    for (int p = 0; p < producers; p++) pthread_join(th[p], NULL);
    bc_ring_free(r);
    return dt * 1e9 / total;
}

int main(int argc, char **argv) {
    long items = argc > 1 ? atol(argv[1]) : 2000000;
    int runs = argc > 2 ? atoi(argv[2]) : 5;
    if (runs > 32) runs = 32;
    const int producer_counts[] = {1, 8};
    double v[32];
    for (int k = 0; k < runs; k++) v[k] = same_thread(items);
    qsort(v, runs, sizeof v[0], cmp_double);
    printf("same_thread producers=0 ns_per_item=%.2f min=%.2f\n", v[runs / 2], v[0]);
    for (int c = 0; c < 2; c++) {
        for (int k = 0; k < runs; k++) v[k] = mpsc(producer_counts[c], items);
        qsort(v, runs, sizeof v[0], cmp_double);
        printf("mpsc producers=%d ns_per_item=%.2f min=%.2f\n", producer_counts[c], v[runs / 2], v[0]);
    }
    return 0;
}
