/* openloop: an open-loop HTTP/1.1 load generator (one thread, epoll, keep-alive).
 *
 *   openloop --url http://127.0.0.1:8000/embed --body '{"text": "hi"}' --rate 5000 \
 *            --duration 4 [--warmup 1] [--connections 2048] [--seed 1] [--slo-ms 50] \
 *            [--body2 '{"text": "hi", "priority": 1}' --share2 0.2] [--drain-ms 2000] [--log FILE]
 *
 * The send times are drawn up front: a Poisson process (exponential gaps, mean 1/rate) over
 * warmup + duration seconds, each request of class 2 (--body2) with probability --share2.  At
 * each scheduled time the request goes out on an idle keep-alive connection (most recently used
 * first); when none is idle a new connection is opened, up to --connections at once.  When all
 * of them are busy the request is NOT sent and counts as "blocked": the generator never queues
 * (a queue in the client would hide the server's own queueing) and never delays a send.  Every
 * latency counts from the SCHEDULED send time, so a late send (the generator behind, a
 * connection still opening) is charged to the request: no coordinated omission.  One request
 * per connection at a time (no pipelining).
 *
 * Each response is read to its end (status line, Content-Length, chunked, or until close) and
 * `Connection: close` is honoured.  A connection that fails (refused, reset, closed before the
 * answer) counts its request as a connection error; a request still unanswered --drain-ms
 * after the last scheduled send counts as unanswered.  Only requests scheduled after the
 * warm-up are counted.  Stdout: one JSON object (counts by status, goodput = 200s within the
 * SLO of their scheduled time per second, p50/p99 of the 200s, the generator's send lag and
 * its own CPU time).  --log writes one line per request: scheduled µs from the start, status
 * (0 connection error, -1 blocked, -2 unanswered), latency µs, class.
 *
 * Memory is bounded: 24 bytes per scheduled request (at most MAX_REQUESTS) plus a 16 KiB read
 * buffer per connection.  Build: cc -std=c11 -O2 -Wall -Wextra -o build/openloop openloop.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_REQUESTS 4000000
#define MAX_CONNECTIONS 16384
#define RBUF 16384
#define TIMER_TAG UINT32_MAX

/* request status besides the HTTP code */
#define S_PENDING (-3) /* scheduled, not yet sent or not yet answered */
#define S_UNANSWERED (-2)
#define S_BLOCKED (-1)
#define S_CONNERR 0

enum { C_FREE, C_CONNECTING, C_IDLE, C_BUSY };
enum { B_LENGTH, B_CHUNK_SIZE, B_CHUNK_DATA, B_CHUNK_CRLF, B_TRAILER, B_UNTIL_CLOSE };

struct conn {
    int fd;
    int state;
    int32_t req;         /* the request in flight, or -1 */
    uint32_t woff;       /* bytes of it written */
    uint32_t rlen;       /* bytes in rbuf */
    int hdr_done, status, body_mode, close_after;
    int64_t body_left;
    int32_t prev, next;  /* the idle list (most recently used first) */
    char *rbuf;
};

static struct {
    struct sockaddr_in addr;
    char *req[2];
    size_t req_len[2];
    int64_t *sched;      /* ns from the start */
    int64_t *sent_at;    /* ns from the start, or -1 */
    int32_t *lat_us;
    int16_t *status;
    uint8_t *cls;
    int32_t n;
    struct conn *conns;
    int32_t pool, open, idle_head, inflight;
    int ep;
    int64_t t0;
    int64_t opened, conn_failures;
} g;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "openloop: %s\n", what);
    exit(2);
}

/* splitmix64: the schedule is a function of the seed alone */
static uint64_t rng_state;
static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static double rng_unit(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }

static void idle_push(int32_t c) {
    struct conn *k = &g.conns[c];
    k->state = C_IDLE;
    k->prev = -1;
    k->next = g.idle_head;
    if (g.idle_head >= 0) g.conns[g.idle_head].prev = c;
    g.idle_head = c;
}

static void idle_remove(int32_t c) {
    struct conn *k = &g.conns[c];
    if (k->prev >= 0) g.conns[k->prev].next = k->next; else g.idle_head = k->next;
    if (k->next >= 0) g.conns[k->next].prev = k->prev;
    k->prev = k->next = -1;
}

static void reset_parse(struct conn *k) {
    k->rlen = 0;
    k->hdr_done = 0;
    k->status = 0;
    k->body_mode = B_LENGTH;
    k->close_after = 0;
    k->body_left = 0;
}

static void finish(struct conn *k, int status) {
    if (k->req >= 0) {
        int64_t lat = now_ns() - g.t0 - g.sched[k->req];
        g.status[k->req] = (int16_t)status;
        g.lat_us[k->req] = (int32_t)(lat / 1000 > INT32_MAX ? INT32_MAX : lat / 1000);
        k->req = -1;
        g.inflight--;
    }
}

static void close_conn(int32_t c, int status) {
    struct conn *k = &g.conns[c];
    if (k->state == C_IDLE) idle_remove(c);
    finish(k, status);
    epoll_ctl(g.ep, EPOLL_CTL_DEL, k->fd, NULL);
    close(k->fd);
    k->fd = -1;
    k->state = C_FREE;
    g.open--;
}

static void want_write(struct conn *k, int c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.u32 = (uint32_t)c};
    epoll_ctl(g.ep, EPOLL_CTL_MOD, k->fd, &ev);
}

/* write what is left of the request; 0 on success (done or waiting for EPOLLOUT) */
static int write_req(int32_t c) {
    struct conn *k = &g.conns[c];
    const char *buf = g.req[g.cls[k->req]];
    size_t len = g.req_len[g.cls[k->req]];
    if (k->woff == 0) g.sent_at[k->req] = now_ns() - g.t0;
    while (k->woff < len) {
        ssize_t w = send(k->fd, buf + k->woff, len - k->woff, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                want_write(k, c, 1);
                return 0;
            }
            if (errno == EINTR) continue;
            return -1;
        }
        k->woff += (uint32_t)w;
    }
    return 0;
}

static int32_t open_conn(void) {
    int32_t c;
    for (c = 0; c < g.pool; c++)
        if (g.conns[c].state == C_FREE) break;
    if (c == g.pool) return -1;
    struct conn *k = &g.conns[c];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -2;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    k->fd = fd;
    k->req = -1;
    k->prev = k->next = -1;
    reset_parse(k);
    g.open++;
    g.opened++;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)c};
    epoll_ctl(g.ep, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&g.addr, sizeof g.addr) < 0 && errno != EINPROGRESS) {
        k->state = C_CONNECTING;
        g.conn_failures++;
        close_conn(c, S_CONNERR);
        return -2;
    }
    k->state = C_CONNECTING; /* EPOLLOUT says when it is up (even if connect() returned 0) */
    return c;
}

static void dispatch(int32_t i) {
    int32_t c = g.idle_head;
    if (c >= 0) {
        idle_remove(c);
    } else {
        c = open_conn();
        if (c == -1) {
            g.status[i] = S_BLOCKED;
            return;
        }
        if (c == -2) {
            g.status[i] = S_CONNERR;
            return;
        }
    }
    struct conn *k = &g.conns[c];
    k->req = i;
    k->woff = 0;
    g.inflight++;
    if (k->state == C_CONNECTING) return; /* written once connected */
    k->state = C_BUSY;
    reset_parse(k);
    if (write_req(c) < 0) close_conn(c, S_CONNERR);
}

/* find "\r\n" in [p, end); the index past it or -1 */
static int64_t line_end(const char *p, const char *end) {
    for (const char *q = p; q + 1 < end; q++)
        if (q[0] == '\r' && q[1] == '\n') return q + 2 - p;
    return -1;
}

static int has_token(const char *v, size_t n, const char *tok) {
    size_t t = strlen(tok);
    for (size_t i = 0; i + t <= n; i++)
        if (strncasecmp(v + i, tok, t) == 0) return 1;
    return 0;
}

/* parse the headers in k->rbuf[0, hlen); 0 on success */
static int parse_headers(struct conn *k, size_t hlen) {
    const char *p = k->rbuf, *end = k->rbuf + hlen;
    if (hlen < 12 || strncmp(p, "HTTP/1.", 7) != 0 || p[8] != ' ') return -1;
    k->status = atoi(p + 9);
    if (k->status < 100 || k->status > 999) return -1;
    if (p[7] == '0') k->close_after = 1; /* HTTP/1.0: closes unless keep-alive (not asked) */
    int have_length = 0, chunked = 0;
    p += line_end(p, end);
    while (p < end) {
        int64_t l = line_end(p, end);
        if (l <= 2) break;
        const char *colon = memchr(p, ':', (size_t)l);
        if (colon) {
            size_t name = (size_t)(colon - p);
            const char *v = colon + 1;
            size_t vn = (size_t)(p + l - 2 - v);
            if (name == 14 && strncasecmp(p, "content-length", 14) == 0) {
                k->body_left = strtoll(v, NULL, 10);
                have_length = 1;
            } else if (name == 17 && strncasecmp(p, "transfer-encoding", 17) == 0) {
                chunked = has_token(v, vn, "chunked");
            } else if (name == 10 && strncasecmp(p, "connection", 10) == 0) {
                if (has_token(v, vn, "close")) k->close_after = 1;
                else if (has_token(v, vn, "keep-alive")) k->close_after = 0;
            }
        }
        p += l;
    }
    if (chunked) k->body_mode = B_CHUNK_SIZE;
    else if (have_length) k->body_mode = B_LENGTH;
    else if (k->status == 204 || k->status == 304 || k->status < 200) k->body_mode = B_LENGTH, k->body_left = 0;
    else k->body_mode = B_UNTIL_CLOSE, k->close_after = 1;
    return 0;
}

/* consume what rbuf holds; 1 when the response is complete, 0 for more, -1 on a protocol error */
static int parse(struct conn *k) {
    size_t off = 0;
    int done = 0;
    if (!k->hdr_done) {
        char *h = memmem(k->rbuf, k->rlen, "\r\n\r\n", 4);
        if (!h) return k->rlen == RBUF ? -1 : 0;
        size_t hlen = (size_t)(h - k->rbuf) + 4;
        if (parse_headers(k, hlen) < 0) return -1;
        k->hdr_done = 1;
        off = hlen;
    }
    while (!done) {
        const char *p = k->rbuf + off, *end = k->rbuf + k->rlen;
        size_t avail = (size_t)(end - p);
        if (k->body_mode == B_LENGTH) {
            size_t take = avail < (size_t)k->body_left ? avail : (size_t)k->body_left;
            off += take;
            k->body_left -= (int64_t)take;
            if (k->body_left == 0) done = 1;
            break;
        } else if (k->body_mode == B_UNTIL_CLOSE) {
            off += avail;
            break;
        } else if (k->body_mode == B_CHUNK_DATA) {
            size_t take = avail < (size_t)k->body_left ? avail : (size_t)k->body_left;
            off += take;
            k->body_left -= (int64_t)take;
            if (k->body_left > 0) break;
            k->body_mode = B_CHUNK_CRLF;
        } else if (k->body_mode == B_CHUNK_CRLF) {
            if (avail < 2) break;
            off += 2;
            k->body_mode = B_CHUNK_SIZE;
        } else { /* B_CHUNK_SIZE or B_TRAILER: a whole line */
            int64_t l = line_end(p, end);
            if (l < 0) {
                if (avail >= 1024) return -1;
                break;
            }
            off += (size_t)l;
            if (k->body_mode == B_TRAILER) {
                if (l == 2) done = 1;
            } else {
                k->body_left = strtoll(p, NULL, 16);
                k->body_mode = k->body_left > 0 ? B_CHUNK_DATA : B_TRAILER;
            }
        }
    }
    memmove(k->rbuf, k->rbuf + off, k->rlen - off);
    k->rlen -= (uint32_t)off;
    return done;
}

static void on_event(int32_t c, uint32_t events) {
    struct conn *k = &g.conns[c];
    if (k->state == C_FREE) return;
    if (k->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(k->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            g.conn_failures++;
            close_conn(c, S_CONNERR);
            return;
        }
        if (!(events & EPOLLOUT)) return;
        want_write(k, c, 0);
        if (k->req < 0) {
            idle_push(c);
            return;
        }
        k->state = C_BUSY;
        reset_parse(k);
        if (write_req(c) < 0) close_conn(c, S_CONNERR);
        return;
    }
    if ((events & EPOLLOUT) && k->state == C_BUSY) {
        const size_t len = g.req_len[g.cls[k->req]];
        if (k->woff < len && write_req(c) < 0) {
            close_conn(c, S_CONNERR);
            return;
        }
        if (k->woff >= len) want_write(k, c, 0);
    }
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP))) return;
    for (;;) {
        ssize_t r = recv(k->fd, k->rbuf + k->rlen, RBUF - k->rlen, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            close_conn(c, S_CONNERR);
            return;
        }
        if (r == 0) { /* closed by the server */
            if (k->state == C_BUSY && k->hdr_done && k->body_mode == B_UNTIL_CLOSE) close_conn(c, k->status);
            else close_conn(c, S_CONNERR);
            return;
        }
        if (k->state != C_BUSY) { /* bytes nobody asked for (e.g. a 408 on an idle connection) */
            close_conn(c, S_CONNERR);
            return;
        }
        k->rlen += (uint32_t)r;
        int done = parse(k);
        if (done < 0) {
            close_conn(c, S_CONNERR);
            return;
        }
        if (done) {
            int keep = !k->close_after && k->rlen == 0;
            if (!keep) {
                close_conn(c, k->status);
                return;
            }
            finish(k, k->status);
            reset_parse(k);
            idle_push(c);
            return;
        }
    }
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* the q-quantile (nearest rank) of sorted µs values, as milliseconds in JSON (null when empty) */
static const char *pct_ms(const int32_t *v, int64_t n, double q, char *buf, size_t cap) {
    if (n == 0) return "null";
    int64_t i = (int64_t)llround(q * (double)(n - 1));
    snprintf(buf, cap, "%.3f", v[i] / 1000.0);
    return buf;
}

static char *build_request(const char *host, const char *path, const char *body, size_t *len) {
    size_t blen = strlen(body), cap = strlen(host) + strlen(path) + blen + 256;
    char *buf = malloc(cap);
    if (!buf) die("out of memory");
    int n = snprintf(buf, cap,
                     "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     path, host, blen, body);
    if (n < 0 || (size_t)n >= cap) die("request too long");
    *len = (size_t)n;
    return buf;
}

static void usage(void) {
    fputs("usage: openloop --url http://127.0.0.1:PORT/PATH --body JSON --rate R --duration S\n"
          "       [--warmup S] [--connections N] [--seed N] [--slo-ms MS] [--drain-ms MS]\n"
          "       [--body2 JSON --share2 F] [--log FILE]\n", stderr);
    exit(2);
}

int main(int argc, char **argv) {
    const char *url = NULL, *body = NULL, *body2 = NULL, *logpath = NULL;
    double rate = 0, duration = 0, warmup = 0, share2 = 0, slo_ms = 50, drain_ms = 2000;
    long pool = 2048;
    unsigned long long seed = 1;
    static const struct option opts[] = {
        {"url", 1, 0, 'u'},      {"body", 1, 0, 'b'},   {"body2", 1, 0, 'B'},    {"share2", 1, 0, 'S'},
        {"rate", 1, 0, 'r'},     {"duration", 1, 0, 'd'}, {"warmup", 1, 0, 'w'}, {"connections", 1, 0, 'c'},
        {"seed", 1, 0, 's'},     {"slo-ms", 1, 0, 'l'}, {"drain-ms", 1, 0, 'D'}, {"log", 1, 0, 'L'},
        {"help", 0, 0, 'h'},     {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'u': url = optarg; break;
        case 'b': body = optarg; break;
        case 'B': body2 = optarg; break;
        case 'S': share2 = atof(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'c': pool = atol(optarg); break;
        case 's': seed = strtoull(optarg, NULL, 10); break;
        case 'l': slo_ms = atof(optarg); break;
        case 'D': drain_ms = atof(optarg); break;
        case 'L': logpath = optarg; break;
        default: usage();
        }
    }
    if (!url || !body || !(rate > 0) || !(duration > 0) || warmup < 0 || !(slo_ms > 0) || drain_ms < 0) usage();
    if (pool < 1 || pool > MAX_CONNECTIONS) die("--connections must be 1..16384");
    if (share2 < 0 || share2 > 1 || (share2 > 0 && !body2)) die("--share2 must be 0..1 and needs --body2");
    if ((warmup + duration) * rate > MAX_REQUESTS) die("rate x (warmup + duration) exceeds 4,000,000 requests");

    /* http://HOST:PORT/PATH with an IPv4 literal (or localhost) */
    char host[256];
    int port = 80;
    if (strncmp(url, "http://", 7) != 0) die("--url must start with http://");
    const char *hp = url + 7, *slash = strchr(hp, '/');
    const char *path = slash ? slash : "/";
    size_t hl = slash ? (size_t)(slash - hp) : strlen(hp);
    if (hl == 0 || hl >= sizeof host) die("bad host in --url");
    memcpy(host, hp, hl);
    host[hl] = 0;
    char ip[256];
    strcpy(ip, host);
    char *colon = strchr(ip, ':');
    if (colon) {
        *colon = 0;
        port = atoi(colon + 1);
    }
    if (strcmp(ip, "localhost") == 0) strcpy(ip, "127.0.0.1");
    g.addr.sin_family = AF_INET;
    g.addr.sin_port = htons((uint16_t)port);
    if (port <= 0 || port > 65535 || inet_pton(AF_INET, ip, &g.addr.sin_addr) != 1)
        die("--url needs an IPv4 address and a port, e.g. http://127.0.0.1:8000/embed");
    g.req[0] = build_request(host, path, body, &g.req_len[0]);
    g.req[1] = build_request(host, path, body2 ? body2 : body, &g.req_len[1]);

    /* the schedule, drawn before anything is sent */
    int64_t span = (int64_t)((warmup + duration) * 1e9), warm_ns = (int64_t)(warmup * 1e9);
    int64_t cap = (int64_t)((warmup + duration) * rate * 1.2 + 1000);
    if (cap > MAX_REQUESTS) cap = MAX_REQUESTS;
    g.sched = malloc((size_t)cap * sizeof *g.sched);
    g.sent_at = malloc((size_t)cap * sizeof *g.sent_at);
    g.lat_us = malloc((size_t)cap * sizeof *g.lat_us);
    g.status = malloc((size_t)cap * sizeof *g.status);
    g.cls = malloc((size_t)cap * sizeof *g.cls);
    if (!g.sched || !g.sent_at || !g.lat_us || !g.status || !g.cls) die("out of memory");
    rng_state = seed;
    double t = 0;
    for (;;) {
        t += -log(1.0 - rng_unit()) / rate;
        int64_t ns = (int64_t)(t * 1e9);
        if (ns >= span || g.n >= cap) break;
        g.sched[g.n] = ns;
        g.cls[g.n] = (uint8_t)(share2 > 0 && rng_unit() < share2);
        g.status[g.n] = S_PENDING;
        g.sent_at[g.n] = -1;
        g.lat_us[g.n] = -1;
        g.n++;
    }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)pool + 64) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)pool + 64 ? rl.rlim_max : (rlim_t)pool + 64;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    g.pool = (int32_t)pool;
    g.conns = calloc((size_t)pool, sizeof *g.conns);
    if (!g.conns) die("out of memory");
    for (int32_t c = 0; c < g.pool; c++) {
        g.conns[c].fd = -1;
        g.conns[c].req = -1;
        g.conns[c].rbuf = malloc(RBUF);
        if (!g.conns[c].rbuf) die("out of memory");
    }
    g.idle_head = -1;
    g.ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (g.ep < 0 || tfd < 0) die("epoll/timerfd unavailable");
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = TIMER_TAG};
    epoll_ctl(g.ep, EPOLL_CTL_ADD, tfd, &tev);

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    g.t0 = now_ns() + 20000000; /* 20 ms from now */
    int64_t armed = -1, drain_end = g.t0 + span + (int64_t)(drain_ms * 1e6);
    int32_t next = 0;
    struct epoll_event evs[256];
    for (;;) {
        int64_t now = now_ns();
        while (next < g.n && g.t0 + g.sched[next] <= now) dispatch(next++);
        int timeout_ms = -1;
        if (next < g.n) {
            int64_t due = g.t0 + g.sched[next];
            if (due != armed) {
                struct itimerspec its = {.it_value = {.tv_sec = due / 1000000000LL, .tv_nsec = due % 1000000000LL}};
                timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
                armed = due;
            }
        } else {
            if (g.inflight == 0 || now >= drain_end) break;
            timeout_ms = (int)((drain_end - now) / 1000000) + 1;
        }
        int nev = epoll_wait(g.ep, evs, 256, timeout_ms);
        if (nev < 0 && errno != EINTR) die("epoll_wait failed");
        for (int e = 0; e < nev; e++) {
            if (evs[e].data.u32 == TIMER_TAG) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN) die("timerfd read failed");
                armed = -1;
            } else {
                on_event((int32_t)evs[e].data.u32, evs[e].events);
            }
        }
    }
    int64_t wall_ns = now_ns() - g.t0;
    getrusage(RUSAGE_SELF, &ru1);
    for (int32_t i = 0; i < g.n; i++)
        if (g.status[i] == S_PENDING) g.status[i] = S_UNANSWERED;
    for (int32_t c = 0; c < g.pool; c++)
        if (g.conns[c].state != C_FREE) close(g.conns[c].fd);

    /* the summary: requests scheduled after the warm-up */
    int64_t slo_us = (int64_t)(slo_ms * 1000), counted = 0, blocked = 0, connerr = 0, unanswered = 0;
    int64_t by_status[1000] = {0}, cls_n[2] = {0}, cls_ok[2] = {0}, cls_good[2] = {0}, late = 0;
    int32_t *ok_lat = malloc((size_t)g.n * sizeof *ok_lat), *lag = malloc((size_t)g.n * sizeof *lag);
    if (!ok_lat || !lag) die("out of memory");
    int64_t n_ok = 0, n_lag = 0;
    for (int32_t i = 0; i < g.n; i++) {
        if (g.sched[i] < warm_ns) continue;
        counted++;
        int s = g.status[i], k = g.cls[i];
        cls_n[k]++;
        if (g.sent_at[i] >= 0) {
            int64_t l = (g.sent_at[i] - g.sched[i]) / 1000;
            lag[n_lag++] = (int32_t)(l > INT32_MAX ? INT32_MAX : l);
            if (l > 1000) late++;
        }
        if (s == S_BLOCKED) blocked++;
        else if (s == S_CONNERR) connerr++;
        else if (s == S_UNANSWERED) unanswered++;
        else if (s >= 100 && s < 1000) by_status[s]++;
        if (s == 200) {
            ok_lat[n_ok++] = g.lat_us[i];
            cls_ok[k]++;
            if (g.lat_us[i] <= slo_us) cls_good[k]++;
        }
    }
    qsort(ok_lat, (size_t)n_ok, sizeof *ok_lat, cmp_i32);
    qsort(lag, (size_t)n_lag, sizeof *lag, cmp_i32);
    double cpu_user = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6;
    double cpu_sys = (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    int64_t good = cls_good[0] + cls_good[1];
    char b1[32], b2[32];
    printf("{\"rate\": %.3f, \"duration_s\": %.3f, \"warmup_s\": %.3f, \"slo_ms\": %.3f, \"scheduled\": %lld, "
           "\"sent\": %lld, \"blocked\": %lld, \"conn_errors\": %lld, \"unanswered\": %lld, \"status\": {",
           rate, duration, warmup, slo_ms, (long long)counted, (long long)(counted - blocked), (long long)blocked,
           (long long)connerr, (long long)unanswered);
    int first = 1;
    for (int s = 100; s < 1000; s++)
        if (by_status[s]) {
            printf("%s\"%d\": %lld", first ? "" : ", ", s, (long long)by_status[s]);
            first = 0;
        }
    printf("}, \"good\": %lld, \"offered_rps\": %.1f, \"goodput_rps\": %.1f, \"p50_ms\": %s, \"p99_ms\": %s, "
           "\"classes\": [",
           (long long)good, counted / duration, good / duration, pct_ms(ok_lat, n_ok, 0.5, b1, sizeof b1), pct_ms(ok_lat, n_ok, 0.99, b2, sizeof b2));
    for (int k = 0; k < 2; k++)
        printf("%s{\"scheduled\": %lld, \"ok\": %lld, \"good\": %lld}", k ? ", " : "", (long long)cls_n[k],
               (long long)cls_ok[k], (long long)cls_good[k]);
    printf("], \"send_lag_p50_ms\": %s, \"send_lag_p99_ms\": %s, \"sent_late_1ms\": %lld, "
           "\"connections_opened\": %lld, \"connect_failures\": %lld, \"cpu_user_s\": %.3f, \"cpu_sys_s\": %.3f, "
           "\"wall_s\": %.3f}\n",
           pct_ms(lag, n_lag, 0.5, b1, sizeof b1), pct_ms(lag, n_lag, 0.99, b2, sizeof b2), (long long)late, (long long)g.opened,
           (long long)g.conn_failures, cpu_user, cpu_sys, wall_ns / 1e9);
    if (logpath) {
        FILE *f = fopen(logpath, "w");
        if (!f) die("cannot open --log file");
        for (int32_t i = 0; i < g.n; i++)
            fprintf(f, "%lld %d %d %d\n", (long long)(g.sched[i] / 1000), g.status[i], g.lat_us[i], g.cls[i]);
        fclose(f);
    }
    free(ok_lat);
    free(lag);
    for (int32_t c = 0; c < g.pool; c++) free(g.conns[c].rbuf);
    free(g.conns);
    free(g.sched);
    free(g.sent_at);
    free(g.lat_us);
    free(g.status);
    free(g.cls);
    free(g.req[0]);
    free(g.req[1]);
    close(tfd);
    close(g.ep);
    return 0;
}
