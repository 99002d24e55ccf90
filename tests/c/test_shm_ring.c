/* Stress test of shm_ring.h: a producer and a consumer, as two processes
 * sharing an anonymous mapping (the real use) or as two threads (what
 * ThreadSanitizer can check).  Messages of many lengths, wrapping around a
 * small ring; the consumer checks every byte and the order, and sleeps on
 * the ring's futex whenever it is empty.
 *
 *   test_shm_ring procs|threads [messages] [ring bytes]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shm_ring.h"

static long n_messages = 200000;

static uint32_t length_of(long i) { return (uint32_t)((i * 7919) % 1500); }   /* 0 .. 1499 */

static void fill(unsigned char *buf, long i, uint32_t n) {
    for (uint32_t j = 0; j < n; j++) buf[j] = (unsigned char)(i * 31 + j);
}

static void *produce(void *arg) {
    bc_shm_ring *r = (bc_shm_ring *)arg;
    unsigned char buf[1500];
    for (long i = 0; i < n_messages; i++) {
        uint32_t n = length_of(i);
        fill(buf, i, n);
        int rc;
        while ((rc = bc_shm_push(r, buf, n)) == 0) sched_yield();   /* full: let the consumer run */
        if (rc < 0) {
            fprintf(stderr, "message %ld of %u bytes never fits the ring\n", i, n);
            exit(1);
        }
    }
    return NULL;
}

static int consume(bc_shm_ring *r) {
    unsigned char got[1500], want[1500];
    long sleeps = 0;
    for (long i = 0; i < n_messages; i++) {
        int64_t n, deadline = bc_now_ns() + 5000000000LL;
        while ((n = bc_shm_next_len(r)) < 0) {
            /* a return with nothing there is allowed (a late wake meant for an
               earlier sleep): wait again, up to the deadline */
            if (bc_now_ns() > deadline) {
                fprintf(stderr, "message %ld: nothing within 5 s (lost wake-up?)\n", i);
                return 1;
            }
            bc_shm_wait(r, deadline);
            sleeps++;
        }
        if ((uint32_t)n != length_of(i)) {
            fprintf(stderr, "message %ld: length %lld, want %u\n", i, (long long)n, length_of(i));
            return 1;
        }
        bc_shm_pop(r, got);
        fill(want, i, (uint32_t)n);
        if (memcmp(got, want, (size_t)n) != 0) {
            fprintf(stderr, "message %ld: bytes differ\n", i);
            return 1;
        }
    }
    if (bc_shm_next_len(r) != -1) {
        fprintf(stderr, "ring not empty after the last message\n");
        return 1;
    }
    printf("ok: %ld messages, %ld waits\n", n_messages, sleeps);
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "procs";
    if (argc > 2) n_messages = atol(argv[2]);
    size_t ring_bytes = argc > 3 ? (size_t)atol(argv[3]) : 8192;   /* >= 2048: the longest message fits */
    size_t size = bc_shm_region_size(ring_bytes);
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED || !bc_shm_init(mem, size) || !bc_shm_check(mem, size)) {
        fprintf(stderr, "set-up failed\n");
        return 1;
    }
    bc_shm_ring *r = (bc_shm_ring *)mem;
    if (strcmp(mode, "threads") == 0) {
        pthread_t t;
        pthread_create(&t, NULL, produce, r);
        int rc = consume(r);
        pthread_join(t, NULL);
        return rc;
    }
    pid_t pid = fork();
    if (pid == 0) {
        produce(r);
        _exit(0);
    }
    int rc = consume(r), status = 0;
    waitpid(pid, &status, 0);
    return rc || !WIFEXITED(status) || WEXITSTATUS(status) != 0;
}
