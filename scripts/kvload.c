/*
 * kvload: a closed-loop load generator for the kv service (guests/programs/kv.c), in C so that the load is
 * never the bottleneck of a benchmark.
 *
 * Wire format (as replica/kv_client.py): each message is a 4-byte big-endian length and that many bytes of
 * text; one reply per request, in order, per connection. Requests:
 *   SET clientid:seq key value   -> OK
 *   GET key                      -> VALUE v | NOTFOUND
 * Each connection is its own client (clientid = TAG + connection number) and its seq starts at the wall
 * clock in microseconds and grows by one per SET, so that a later run reusing a tag is never `ERR stale`.
 *
 * N connections, each keeping up to DEPTH requests in flight (pipelining; 1 = one at a time), on one epoll
 * loop. Keys are drawn uniformly from K keys; a request is a SET with probability SET_RATIO. The run lasts
 * SECONDS (after an optional warm-up that is not counted) or until REQUESTS replies arrived; either way a
 * hard deadline bounds it. Latency is the time from queueing a request to reading its reply, kept in a
 * log-linear histogram (64 sub-buckets per power of two: < 1.6% error).
 *
 * `--echo-server` forks a trivial server on a loopback port first (OK to a SET, NOTFOUND to a GET) and
 * drives it instead: the generator's own ceiling.
 *
 * `--reconnect` (for failover): a connection that breaks is reopened to the next address, with a short
 * bounded backoff, and its unanswered requests are sent again with the same request ids (the service
 * applies a write once). Each connection's recovery (its last reply before the break to its first after)
 * is reported; a connection that finds no address for --reconnect-timeout fails the run. With
 * --reconnect an address that refuses at the start (a backup not serving yet) is no error either.
 *
 * SIGTERM or SIGINT ends a run early, as its duration would: no new requests, replies drained, JSON printed.
 *
 * Output: one JSON object on stdout (see print_json); exit 0 when every request got a reply that is not
 * ERR, 1 when the run failed (the JSON says why in "error", and so does stderr), 2 on bad usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNECTIONS 4096
#define MAX_DEPTH 1024
#define MAX_ADDRESSES 8
#define MAX_VALUE 1024
#define MAX_TAG 40
#define MAX_REPLY (1u << 20)
#define SUB_BITS 6
#define SUB (1u << SUB_BITS)
#define NBUCKETS ((64 - SUB_BITS + 1) * SUB)

/* ------------------------------------------------------------------ options and results */

struct options {
    const char *addresses[MAX_ADDRESSES];
    int naddresses;
    int connections, depth, keys, value_size, cpu, server_cpu, echo_server, reconnect;
    double seconds, warmup, timeout, connect_timeout, set_ratio, reconnect_timeout;
    uint64_t requests;
    const char *tag, *key_prefix;
};

#define MAX_RECOVERIES 4096

struct stats {
    uint64_t replies, sets, gets, found, notfound, errors, request_bytes, reply_bytes, reconnects, stale_resent;
    uint64_t recoveries[MAX_RECOVERIES]; /* ns, one per connection per break, in the order they ended */
    unsigned nrecoveries;
    uint64_t hist[NBUCKETS];
    uint64_t lat_min, lat_max, lat_sum;
};

static struct options opt = {
    .connections = 32, .depth = 1, .keys = 1000, .value_size = 48, .cpu = -1, .server_cpu = -1,
    .seconds = 0, .timeout = 0, .connect_timeout = 5.0, .set_ratio = 0.5, .key_prefix = "k",
    .reconnect_timeout = 10.0,
};
static struct stats st = {.lat_min = UINT64_MAX};
static char first_error[256];
static char failure[512];
static pid_t echo_pid = -1;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    if (failure[0])
        return; /* keep the first cause */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(failure, sizeof failure, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------ histogram */

static unsigned bucket_of(uint64_t v)
{
    if (v < SUB)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned e = msb - SUB_BITS + 1; /* >= 1 */
    return e * SUB + (unsigned)((v >> (e - 1)) - SUB);
}

/* The smallest value of bucket i, and its width. */
static uint64_t bucket_low(unsigned i) { return i < SUB ? i : (uint64_t)(i % SUB + SUB) << (i / SUB - 1); }
static uint64_t bucket_width(unsigned i) { return i < SUB ? 1 : 1ull << (i / SUB - 1); }

static void record_latency(uint64_t ns)
{
    st.hist[bucket_of(ns)]++;
    st.lat_sum += ns;
    if (ns < st.lat_min)
        st.lat_min = ns;
    if (ns > st.lat_max)
        st.lat_max = ns;
}

/* The p-th percentile (nearest rank) as its bucket's midpoint, capped at the exact maximum. */
static double percentile_ns(double p)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < NBUCKETS; i++)
        total += st.hist[i];
    if (!total)
        return 0;
    uint64_t rank = (uint64_t)(p / 100.0 * (double)total + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < NBUCKETS; i++) {
        seen += st.hist[i];
        if (seen >= rank) {
            double mid = (double)bucket_low(i) + (double)(bucket_width(i) - 1) / 2.0;
            return mid > (double)st.lat_max ? (double)st.lat_max : mid;
        }
    }
    return (double)st.lat_max;
}

/* ------------------------------------------------------------------ connections */

enum conn_state { CONNECTING, OPEN, BROKEN };

struct conn {
    int fd, index;
    enum conn_state state;
    char client[MAX_TAG + 16];
    uint64_t seq, rng;
    /* Request bytes: [wstart, woff) sent and not answered (kept to send again after a reconnect),
     * [woff, wlen) not yet sent. */
    uint8_t *wbuf;
    size_t wstart, wlen, woff, wcap;
    uint32_t *req_len; /* ring beside sent_at: each in-flight request's bytes in wbuf */
    uint8_t *rbuf;
    size_t rlen, rcap;
    uint64_t *sent_at; /* ring of the in-flight requests' queueing times (0: not counted) */
    uint8_t *is_set;
    uint8_t *resent; /* sent again after a reconnect */
    int head, inflight;
    int want_out;
    int address;                 /* index into opt.addresses */
    uint64_t last_reply_at;      /* for the recovery gap */
    uint64_t broken_since, retry_at, backoff_ns;
    int down;                    /* failed since its last reply (or since the start) */
    int in_gap;                  /* down, and it had been serving: a recovery to measure */
};

static struct conn *conns;
static int epfd = -1;
static struct sockaddr_storage addr[MAX_ADDRESSES];
static socklen_t alen[MAX_ADDRESSES];
static uint64_t issued_counted, measure_start, end_at, last_counted_reply;
static int stopping, load_started;
static volatile sig_atomic_t stop_requested; /* SIGTERM or SIGINT: stop issuing, drain, report */

static void on_stop_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}
static char value[MAX_VALUE + 1];

static uint64_t next_rand(struct conn *c)
{
    /* xorshift64*: cheap, and a fixed seed per connection makes runs repeatable */
    c->rng ^= c->rng >> 12;
    c->rng ^= c->rng << 25;
    c->rng ^= c->rng >> 27;
    return c->rng * 0x2545F4914F6CDD1Dull;
}

static int may_issue(void)
{
    if (stopping)
        return 0;
    return !opt.requests || issued_counted < opt.requests;
}

static void set_events(struct conn *c)
{
    int want = c->woff < c->wlen;
    if (want == c->want_out || c->state != OPEN)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.u32 = (uint32_t)c->index};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        fail("epoll_ctl: %s", strerror(errno));
    c->want_out = want;
}

/* Queue requests until DEPTH are in flight (or the run stops issuing). */
static void refill(struct conn *c, uint64_t now)
{
    while (c->inflight < opt.depth && may_issue()) {
        if (c->wstart == c->wlen)
            c->wstart = c->woff = c->wlen = 0;
        if (c->wcap - c->wlen < (size_t)opt.value_size + 512) {
            memmove(c->wbuf, c->wbuf + c->wstart, c->wlen - c->wstart);
            c->wlen -= c->wstart;
            c->woff -= c->wstart;
            c->wstart = 0;
        }
        uint64_t r = next_rand(c);
        uint64_t key = (r >> 11) % (uint64_t)opt.keys;
        int is_set = (double)(r & 0x7ff) < opt.set_ratio * 2048.0;
        char *p = (char *)c->wbuf + c->wlen + 4;
        size_t room = c->wcap - c->wlen - 4;
        int n;
        if (is_set)
            n = snprintf(p, room, "SET %s:%llu %s%llu %s", c->client, (unsigned long long)++c->seq,
                         opt.key_prefix, (unsigned long long)key, value);
        else
            n = snprintf(p, room, "GET %s%llu", opt.key_prefix, (unsigned long long)key);
        if (n < 0 || (size_t)n >= room) {
            fail("internal: request buffer too small");
            return;
        }
        uint8_t *h = c->wbuf + c->wlen;
        h[0] = (uint8_t)(n >> 24), h[1] = (uint8_t)(n >> 16), h[2] = (uint8_t)(n >> 8), h[3] = (uint8_t)n;
        c->wlen += 4 + (size_t)n;
        int slot = (c->head + c->inflight) % opt.depth;
        int counted = now >= measure_start;
        c->sent_at[slot] = counted ? now : 0;
        c->is_set[slot] = (uint8_t)is_set;
        c->req_len[slot] = 4 + (uint32_t)n;
        c->resent[slot] = 0;
        c->inflight++;
        if (counted) {
            issued_counted++;
            st.request_bytes += 4 + (uint64_t)n;
        }
    }
}

static void broken(struct conn *c, const char *why, int err);

static void do_write(struct conn *c)
{
    if (c->state != OPEN)
        return;
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (errno == EINTR)
                continue;
            broken(c, "send", errno);
            return;
        }
        c->woff += (size_t)n;
    }
    set_events(c);
}

static void handle_reply(struct conn *c, const uint8_t *p, uint32_t n, uint64_t now)
{
    if (c->inflight == 0) {
        (void)p;
        fail("connection %d: a reply without a request", c->index);
        return;
    }
    uint64_t sent = c->sent_at[c->head];
    int is_set = c->is_set[c->head];
    int resent = c->resent[c->head];
    c->wstart += c->req_len[c->head];
    c->head = (c->head + 1) % opt.depth;
    c->inflight--;
    if (c->in_gap && st.nrecoveries < MAX_RECOVERIES)
        st.recoveries[st.nrecoveries++] = now - c->last_reply_at;
    c->in_gap = c->down = 0;
    c->last_reply_at = now;
    if (!sent)
        return; /* warm-up */
    st.replies++;
    st.reply_bytes += 4 + (uint64_t)n;
    last_counted_reply = now;
    record_latency(now - sent);
    if (is_set)
        st.sets++;
    else
        st.gets++;
    if (n >= 2 && memcmp(p, "OK", 2) == 0 && (n == 2 || p[2] == ' '))
        return;
    if (n >= 6 && memcmp(p, "VALUE ", 6) == 0) {
        st.found++;
        return;
    }
    if (n == 8 && memcmp(p, "NOTFOUND", 8) == 0) {
        st.notfound++;
        return;
    }
    if (resent && n == 9 && memcmp(p, "ERR stale", 9) == 0) {
        /* A write sent again whose reply was lost, and a later write of this connection was applied after
         * it: the service applied it (it keeps only the last reply per client). */
        st.stale_resent++;
        return;
    }
    st.errors++;
    if (!first_error[0]) {
        uint32_t k = n < sizeof first_error - 1 ? n : (uint32_t)sizeof first_error - 1;
        memcpy(first_error, p, k); /* json_string keeps it printable */
        first_error[k] = 0;
    }
}

static void do_read(struct conn *c)
{
    for (;;) {
        if (c->rcap - c->rlen < 16384) {
            size_t cap = c->rcap * 2;
            if (cap > MAX_REPLY + 65536) {
                fail("connection %d: reply too large", c->index);
                return;
            }
            uint8_t *b = realloc(c->rbuf, cap);
            if (!b) {
                fail("out of memory");
                return;
            }
            c->rbuf = b, c->rcap = cap;
        }
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (errno == EINTR)
                continue;
            broken(c, "recv", errno);
            return;
        }
        if (n == 0) {
            broken(c, "closed by the server", 0);
            return;
        }
        c->rlen += (size_t)n;
        if ((size_t)n < c->rcap - c->rlen + (size_t)n)
            break; /* short read: the socket is drained */
    }
    uint64_t now = now_ns();
    size_t off = 0;
    while (c->rlen - off >= 4) {
        const uint8_t *h = c->rbuf + off;
        uint32_t len = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
        if (len > MAX_REPLY) {
            fail("connection %d: reply of %u bytes: not the kv protocol", c->index, len);
            return;
        }
        if (c->rlen - off < 4 + (size_t)len)
            break;
        handle_reply(c, h + 4, len, now);
        off += 4 + (size_t)len;
    }
    memmove(c->rbuf, c->rbuf + off, c->rlen - off);
    c->rlen -= off;
    refill(c, now);
    do_write(c);
}

/* ------------------------------------------------------------------ failures and reconnecting */

static int open_socket(struct conn *c)
{
    int a = c->address;
    c->fd = socket(addr[a].ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        fail("socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&addr[a], alen[a]) < 0 && errno != EINPROGRESS)
        return errno;
    c->state = CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)c->index};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        fail("epoll_ctl: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* A connection failed (err: an errno, or 0 for a close). Without --reconnect the run fails; with it the
 * socket is dropped and, after a backoff, reopened to the next address with its requests sent again. */
static void broken(struct conn *c, const char *why, int err)
{
    if (!opt.reconnect) {
        fail("connection %d: %s%s%s (%d requests in flight)", c->index, why, err ? ": " : "",
             err ? strerror(err) : "", c->inflight);
        return;
    }
    uint64_t now = now_ns();
    if (c->fd >= 0)
        close(c->fd); /* also leaves the epoll set */
    c->fd = -1;
    c->state = BROKEN;
    c->rlen = 0;          /* a partial reply: its request is sent again */
    c->woff = c->wstart;  /* every unanswered request is sent again, same request id */
    for (int k = 0; k < c->inflight; k++)
        c->resent[(c->head + k) % opt.depth] = 1;
    c->want_out = -1;
    if (!c->down) {
        c->down = 1;
        c->broken_since = now;
        c->backoff_ns = 1000000;
        if (load_started) { /* a refused first connect is no recovery */
            c->in_gap = 1;
            st.reconnects++;
        }
    } else if (c->backoff_ns < 16000000) { /* capped low: a failover shows as itself, not as backoff */
        c->backoff_ns *= 2;
    }
    if (now - c->broken_since > (uint64_t)(opt.reconnect_timeout * 1e9)) {
        fail("connection %d: no address answered within %.1f s (last: %s%s%s)", c->index, opt.reconnect_timeout,
             why, err ? ": " : "", err ? strerror(err) : "");
        return;
    }
    c->address = (c->address + 1) % opt.naddresses;
    c->retry_at = now + c->backoff_ns;
}

/* A CONNECTING socket became writable: established, or failed. */
static void finish_connect(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        broken(c, "connect", err);
        return;
    }
    c->state = OPEN;
    c->want_out = -1;
    set_events(c);
    do_write(c);
}

static void retry_broken(uint64_t now)
{
    for (int i = 0; i < opt.connections && !failure[0]; i++) {
        struct conn *c = &conns[i];
        if (c->state != BROKEN || now < c->retry_at)
            continue;
        int err = open_socket(c);
        if (err > 0)
            broken(c, "connect", err);
    }
}

/* ------------------------------------------------------------------ addresses and connecting */

static int resolve(const char *address, struct sockaddr_storage *out, socklen_t *outlen)
{
    char host[256];
    const char *colon = strrchr(address, ':');
    if (!colon || colon == address || strlen(address) >= sizeof host) {
        fail("bad address %s (want HOST:PORT)", address);
        return -1;
    }
    size_t hl = (size_t)(colon - address);
    memcpy(host, address, hl);
    host[hl] = 0;
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = 0;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_family = AF_UNSPEC}, *res;
    int rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc != 0) {
        fail("address %s: %s", address, gai_strerror(rc));
        return -1;
    }
    memcpy(out, res->ai_addr, res->ai_addrlen);
    *outlen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* Open every connection (connection i to address i mod count); at the start a failure is fatal. */
static int connect_all(void)
{
    for (int i = 0; i < opt.naddresses; i++)
        if (resolve(opt.addresses[i], &addr[i], &alen[i]) < 0)
            return -1;
    for (int i = 0; i < opt.connections; i++) {
        struct conn *c = &conns[i];
        c->address = i % opt.naddresses;
        int err = open_socket(c);
        if (err > 0 && opt.reconnect) {
            broken(c, "connect", err); /* the main loop tries the next address */
            continue;
        }
        if (err > 0)
            fail("connect %s: %s", opt.addresses[c->address], strerror(err));
        if (err)
            return -1;
    }
    int pending = 0;
    for (int i = 0; i < opt.connections; i++)
        pending += conns[i].state == CONNECTING;
    uint64_t deadline = now_ns() + (uint64_t)(opt.connect_timeout * 1e9);
    struct epoll_event evs[256];
    while (pending > 0) {
        uint64_t now = now_ns();
        if (now >= deadline) {
            fail("connect: %d of %d connections not established within %.1f s", pending, opt.connections,
                 opt.connect_timeout);
            return -1;
        }
        int n = epoll_wait(epfd, evs, 256, (int)((deadline - now) / 1000000 + 1));
        if (n < 0 && errno != EINTR) {
            fail("epoll_wait: %s", strerror(errno));
            return -1;
        }
        for (int k = 0; k < n; k++) {
            struct conn *c = &conns[evs[k].data.u32];
            if (c->state != CONNECTING)
                continue;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err && opt.reconnect) {
                broken(c, "connect", err);
                pending--;
                continue;
            }
            if (err) {
                fail("connect %s: %s", opt.addresses[c->address], strerror(err));
                return -1;
            }
            c->state = OPEN;
            c->want_out = -1;
            set_events(c);
            pending--;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ the echo server (--echo-server) */

static void echo_serve(int lfd)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    enum { CAP = 1 << 16 };
    static uint8_t *in[65536];
    static size_t inlen[65536];
    uint8_t out[CAP + 64];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n < 0 && errno != EINTR)
            _exit(1);
        if (getppid() == 1)
            _exit(0); /* the generator is gone */
        for (int k = 0; k < n; k++) {
            int fd = evs[k].data.fd;
            if (fd == lfd) {
                int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (c < 0 || c >= 65536) {
                    if (c >= 0)
                        close(c);
                    continue;
                }
                int one = 1;
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                in[c] = in[c] ? in[c] : malloc(CAP + MAX_VALUE + 512);
                inlen[c] = 0;
                struct epoll_event e = {.events = EPOLLIN, .data.fd = c};
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &e);
                continue;
            }
            ssize_t r = recv(fd, in[fd] + inlen[fd], CAP - inlen[fd], 0);
            if (r <= 0) {
                close(fd); /* also leaves the epoll set */
                continue;
            }
            inlen[fd] += (size_t)r;
            size_t off = 0, olen = 0;
            while (inlen[fd] - off >= 4) {
                const uint8_t *h = in[fd] + off;
                uint32_t len = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
                if (len > CAP - 4) {
                    inlen[fd] = off = 0; /* not our protocol: drop it */
                    break;
                }
                if (inlen[fd] - off < 4 + (size_t)len)
                    break;
                const char *reply = len && h[4] == 'G' ? "NOTFOUND" : "OK";
                uint32_t rl = (uint32_t)strlen(reply);
                out[olen] = 0, out[olen + 1] = 0, out[olen + 2] = 0, out[olen + 3] = (uint8_t)rl;
                memcpy(out + olen + 4, reply, rl);
                olen += 4 + rl;
                off += 4 + (size_t)len;
                if (olen > CAP) {
                    if (send(fd, out, olen, MSG_NOSIGNAL) < 0)
                        break;
                    olen = 0;
                }
            }
            memmove(in[fd], in[fd] + off, inlen[fd] - off);
            inlen[fd] -= off;
            if (olen) {
                /* blocking socket: a client that stops reading stalls only this toy server */
                size_t sent = 0;
                while (sent < olen) {
                    ssize_t s = send(fd, out + sent, olen - sent, MSG_NOSIGNAL);
                    if (s <= 0)
                        break;
                    sent += (size_t)s;
                }
            }
        }
    }
}

static int pin_to(int cpu, const char *who)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) < 0) {
        fail("%s: cannot pin to cpu %d: %s", who, cpu, strerror(errno));
        return -1;
    }
    return 0;
}

/* Fork the echo server on 127.0.0.1:<ephemeral>; its address goes into static storage. */
static int start_echo_server(const cpu_set_t *original)
{
    static char address[64];
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 1024) < 0 ||
        getsockname(lfd, (struct sockaddr *)&a, &len) < 0) {
        fail("echo server: %s", strerror(errno));
        return -1;
    }
    fflush(NULL);
    echo_pid = fork();
    if (echo_pid < 0) {
        fail("fork: %s", strerror(errno));
        return -1;
    }
    if (echo_pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (opt.server_cpu >= 0) {
            if (pin_to(opt.server_cpu, "echo server") < 0)
                _exit(1);
        } else {
            sched_setaffinity(0, sizeof *original, original); /* not the generator's pinning */
        }
        echo_serve(lfd);
        _exit(0);
    }
    close(lfd);
    snprintf(address, sizeof address, "127.0.0.1:%u", ntohs(a.sin_port));
    opt.addresses[0] = address;
    opt.naddresses = 1;
    return 0;
}

/* ------------------------------------------------------------------ output */

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           (double)ru.ru_stime.tv_usec / 1e6;
}

/* A JSON string: printable ASCII kept, quotes and backslashes escaped, anything else as '?'. */
static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            putchar('\\');
        putchar(*s >= 0x20 && *s < 0x7f ? *s : '?');
    }
    putchar('"');
}

static void print_json(double seconds)
{
    printf("{\"ok\": %s, ", failure[0] || st.errors ? "false" : "true");
    if (failure[0] || st.errors) {
        char msg[600];
        if (failure[0])
            snprintf(msg, sizeof msg, "%s", failure);
        else
            snprintf(msg, sizeof msg, "%llu ERR replies, the first: %s", (unsigned long long)st.errors, first_error);
        printf("\"error\": ");
        json_string(msg);
        printf(", ");
    }
    printf("\"address\": ");
    json_string(opt.addresses[0]);
    printf(", \"connections\": %d, \"depth\": %d, \"keys\": %d, \"set_ratio\": %g, "
           "\"value_size\": %d, \"echo_server\": %s, ",
           opt.connections, opt.depth, opt.keys, opt.set_ratio, opt.value_size,
           opt.echo_server ? "true" : "false");
    printf("\"requests\": %llu, \"seconds\": %.6f, \"rate\": %.1f, ", (unsigned long long)st.replies, seconds,
           seconds > 0 ? (double)st.replies / seconds : 0.0);
    printf("\"sets\": %llu, \"gets\": %llu, \"found\": %llu, \"notfound\": %llu, \"errors\": %llu, "
           "\"request_bytes\": %llu, \"reply_bytes\": %llu, ",
           (unsigned long long)st.sets, (unsigned long long)st.gets, (unsigned long long)st.found,
           (unsigned long long)st.notfound, (unsigned long long)st.errors, (unsigned long long)st.request_bytes,
           (unsigned long long)st.reply_bytes);
    printf("\"reconnects\": %llu, \"stale_resent\": %llu, \"recoveries_us\": [", (unsigned long long)st.reconnects,
           (unsigned long long)st.stale_resent);
    for (unsigned i = 0; i < st.nrecoveries; i++)
        printf("%s%.1f", i ? ", " : "", (double)st.recoveries[i] / 1e3);
    printf("], ");
    printf("\"started_at\": %.6f, \"cpu_seconds\": %.4f, \"cpu\": ", (double)measure_start / 1e9, cpu_seconds());
    if (opt.cpu >= 0)
        printf("%d, ", opt.cpu);
    else
        printf("null, ");
    double us = 1e-3;
    printf("\"latency_us\": {\"min\": %.3f, \"mean\": %.3f, \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, "
           "\"p999\": %.3f, \"max\": %.3f}, ",
           st.replies ? (double)st.lat_min * us : 0.0, st.replies ? (double)st.lat_sum / (double)st.replies * us : 0.0,
           percentile_ns(50) * us, percentile_ns(90) * us, percentile_ns(99) * us, percentile_ns(99.9) * us,
           (double)st.lat_max * us);
    /* Non-empty buckets as [lowest ns, width ns, count], so that runs can be merged exactly. */
    printf("\"histogram\": [");
    int first = 1;
    for (unsigned i = 0; i < NBUCKETS; i++)
        if (st.hist[i]) {
            printf("%s[%llu, %llu, %llu]", first ? "" : ", ", (unsigned long long)bucket_low(i),
                   (unsigned long long)bucket_width(i), (unsigned long long)st.hist[i]);
            first = 0;
        }
    printf("]}\n");
    fflush(stdout);
}

/* ------------------------------------------------------------------ main */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvload (--address HOST:PORT ... | --echo-server) (--seconds S | --requests N) [options]\n"
            "  --address HOST:PORT   kv service (repeatable: connection i uses address i mod count)\n"
            "  --echo-server         fork a trivial server and drive it (the generator's own ceiling)\n"
            "  --connections N       concurrent connections (default 32)\n"
            "  --depth D             requests in flight per connection (default 1: no pipelining)\n"
            "  --seconds S           measure for S seconds (after --warmup)\n"
            "  --requests N          or: stop after N replies\n"
            "  --warmup S            seconds of load before measuring (default 0)\n"
            "  --keys K              keys drawn uniformly from PREFIX0..PREFIX(K-1) (default 1000)\n"
            "  --key-prefix P        (default k)\n"
            "  --set-ratio R         fraction of SETs (default 0.5)\n"
            "  --value-size B        bytes per SET value (default 48, at most %d)\n"
            "  --tag T               client id prefix (default L<pid>); client ids are T<connection>\n"
            "  --timeout S           hard bound on the whole run (default: warmup + seconds + 10, or 60)\n"
            "  --connect-timeout S   (default 5)\n"
            "  --reconnect           survive broken connections: reopen to the next address, resend\n"
            "  --reconnect-timeout S a connection without any address for S fails the run (default 10)\n"
            "  --cpu N               pin the generator to cpu N\n"
            "  --server-cpu N        pin the echo server to cpu N\n",
            MAX_VALUE);
}

static double parse_double(const char *s, const char *name)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || v < 0) {
        fprintf(stderr, "kvload: bad %s: %s\n", name, s);
        exit(2);
    }
    return v;
}

static long parse_long(const char *s, const char *name, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "kvload: bad %s: %s (want %ld..%ld)\n", name, s, lo, hi);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"address", required_argument, 0, 'a'},   {"echo-server", no_argument, 0, 'E'},
        {"connections", required_argument, 0, 'c'}, {"depth", required_argument, 0, 'd'},
        {"seconds", required_argument, 0, 's'},   {"requests", required_argument, 0, 'n'},
        {"warmup", required_argument, 0, 'w'},    {"keys", required_argument, 0, 'k'},
        {"key-prefix", required_argument, 0, 'P'}, {"set-ratio", required_argument, 0, 'r'},
        {"value-size", required_argument, 0, 'v'}, {"tag", required_argument, 0, 't'},
        {"timeout", required_argument, 0, 'T'},   {"connect-timeout", required_argument, 0, 'C'},
        {"cpu", required_argument, 0, 'p'},       {"server-cpu", required_argument, 0, 'S'},
        {"reconnect", no_argument, 0, 'R'},       {"reconnect-timeout", required_argument, 0, 'X'},
        {"help", no_argument, 0, 'h'},            {0, 0, 0, 0},
    };
    static char default_tag[32];
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'a':
            if (opt.naddresses == MAX_ADDRESSES) {
                fprintf(stderr, "kvload: at most %d addresses\n", MAX_ADDRESSES);
                return 2;
            }
            opt.addresses[opt.naddresses++] = optarg;
            break;
        case 'E': opt.echo_server = 1; break;
        case 'c': opt.connections = (int)parse_long(optarg, "--connections", 1, MAX_CONNECTIONS); break;
        case 'd': opt.depth = (int)parse_long(optarg, "--depth", 1, MAX_DEPTH); break;
        case 's': opt.seconds = parse_double(optarg, "--seconds"); break;
        case 'n': opt.requests = (uint64_t)parse_long(optarg, "--requests", 1, 1L << 40); break;
        case 'w': opt.warmup = parse_double(optarg, "--warmup"); break;
        case 'k': opt.keys = (int)parse_long(optarg, "--keys", 1, 1L << 30); break;
        case 'P': opt.key_prefix = optarg; break;
        case 'r': opt.set_ratio = parse_double(optarg, "--set-ratio"); break;
        case 'v': opt.value_size = (int)parse_long(optarg, "--value-size", 1, MAX_VALUE); break;
        case 't': opt.tag = optarg; break;
        case 'T': opt.timeout = parse_double(optarg, "--timeout"); break;
        case 'C': opt.connect_timeout = parse_double(optarg, "--connect-timeout"); break;
        case 'p': opt.cpu = (int)parse_long(optarg, "--cpu", 0, CPU_SETSIZE - 1); break;
        case 'S': opt.server_cpu = (int)parse_long(optarg, "--server-cpu", 0, CPU_SETSIZE - 1); break;
        case 'R': opt.reconnect = 1; break;
        case 'X': opt.reconnect_timeout = parse_double(optarg, "--reconnect-timeout"); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc || (opt.naddresses > 0) == opt.echo_server || (opt.seconds > 0) == (opt.requests > 0) ||
        opt.set_ratio > 1) {
        fprintf(stderr, "kvload: give --address or --echo-server, and --seconds or --requests "
                        "(and --set-ratio at most 1)\n");
        usage(stderr);
        return 2;
    }
    if (!opt.tag) {
        snprintf(default_tag, sizeof default_tag, "L%d", (int)getpid());
        opt.tag = default_tag;
    }
    if (strlen(opt.tag) > MAX_TAG || strchr(opt.tag, ' ') || strchr(opt.tag, ':') || strlen(opt.key_prefix) > 100 ||
        strchr(opt.key_prefix, ' ')) {
        fprintf(stderr, "kvload: --tag (at most %d bytes) and --key-prefix must hold no space or colon\n", MAX_TAG);
        return 2;
    }
    if (opt.timeout <= 0)
        opt.timeout = opt.seconds > 0 ? opt.warmup + opt.seconds + 10.0 : 60.0;
    memset(value, 'v', (size_t)opt.value_size);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_stop_signal}; /* no SA_RESTART: epoll_wait returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    uint64_t t_begin = now_ns();
    uint64_t hard_deadline = t_begin + (uint64_t)(opt.timeout * 1e9);
    double seconds = 0;
    cpu_set_t original;
    sched_getaffinity(0, sizeof original, &original);
    if (opt.cpu >= 0 && pin_to(opt.cpu, "kvload") < 0)
        goto out;
    if (opt.echo_server && start_echo_server(&original) < 0)
        goto out;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    conns = calloc((size_t)opt.connections, sizeof *conns);
    if (epfd < 0 || !conns) {
        fail("setup: %s", strerror(errno));
        goto out;
    }
    uint64_t seq0 = 0;
    {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seq0 = (uint64_t)ts.tv_sec * 1000000ull + (uint64_t)ts.tv_nsec / 1000;
    }
    for (int i = 0; i < opt.connections; i++) {
        struct conn *c = &conns[i];
        c->fd = -1;
        c->index = i;
        snprintf(c->client, sizeof c->client, "%s%d", opt.tag, i);
        c->seq = seq0;
        c->rng = 0x9E3779B97F4A7C15ull * (uint64_t)(i + 1) ^ (uint64_t)opt.connections;
        c->wcap = (size_t)opt.depth * ((size_t)opt.value_size + 300) + 4096;
        c->wbuf = malloc(c->wcap);
        c->rcap = 65536;
        c->rbuf = malloc(c->rcap);
        c->sent_at = calloc((size_t)opt.depth, sizeof *c->sent_at);
        c->is_set = calloc((size_t)opt.depth, 1);
        c->req_len = calloc((size_t)opt.depth, sizeof *c->req_len);
        c->resent = calloc((size_t)opt.depth, 1);
        if (!c->wbuf || !c->rbuf || !c->sent_at || !c->is_set || !c->req_len || !c->resent) {
            fail("out of memory");
            goto out;
        }
    }
    if (connect_all() < 0)
        goto out;

    uint64_t t0 = now_ns();
    load_started = 1;
    measure_start = t0 + (uint64_t)(opt.warmup * 1e9);
    end_at = opt.seconds > 0 ? measure_start + (uint64_t)(opt.seconds * 1e9) : 0;
    for (int i = 0; i < opt.connections; i++) {
        conns[i].last_reply_at = t0;
        refill(&conns[i], t0);
        do_write(&conns[i]);
    }
    struct epoll_event evs[256];
    while (!failure[0]) {
        uint64_t now = now_ns();
        if ((end_at && now >= end_at) || stop_requested)
            stopping = 1;
        int busy = 0;
        for (int i = 0; i < opt.connections && !busy; i++)
            busy = conns[i].inflight > 0;
        if (!busy && !may_issue())
            break;
        if (now >= hard_deadline) {
            uint64_t inflight = 0;
            for (int i = 0; i < opt.connections; i++)
                inflight += (uint64_t)conns[i].inflight;
            fail("timed out after %.1f s with %llu requests in flight (%llu replies so far)", opt.timeout,
                 (unsigned long long)inflight, (unsigned long long)st.replies);
            break;
        }
        retry_broken(now);
        if (failure[0])
            break;
        uint64_t wake = hard_deadline;
        if (end_at && !stopping && end_at < wake)
            wake = end_at;
        for (int i = 0; i < opt.connections; i++)
            if (conns[i].state == BROKEN && conns[i].retry_at < wake)
                wake = conns[i].retry_at > now ? conns[i].retry_at : now;
        int timeout_ms = (int)((wake - now) / 1000000 + 1);
        if (timeout_ms > 100)
            timeout_ms = 100;
        int n = epoll_wait(epfd, evs, 256, timeout_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail("epoll_wait: %s", strerror(errno));
            break;
        }
        for (int k = 0; k < n && !failure[0]; k++) {
            struct conn *c = &conns[evs[k].data.u32];
            if (c->state == CONNECTING) {
                finish_connect(c);
                continue;
            }
            if (c->state != OPEN)
                continue; /* broke earlier in this batch */
            if (evs[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                do_read(c);
            if (!failure[0] && c->state == OPEN && (evs[k].events & EPOLLOUT))
                do_write(c);
        }
    }
    if (last_counted_reply > measure_start)
        seconds = (double)(last_counted_reply - measure_start) / 1e9;

out:
    if (conns)
        for (int i = 0; i < opt.connections; i++)
            if (conns[i].fd >= 0)
                close(conns[i].fd);
    if (echo_pid > 0) {
        kill(echo_pid, SIGKILL);
        waitpid(echo_pid, NULL, 0);
    }
    if (!opt.addresses[0])
        opt.addresses[0] = "";
    print_json(seconds);
    if (failure[0] || st.errors) {
        fprintf(stderr, "kvload: %s\n", failure[0] ? failure : first_error);
        return 1;
    }
    return 0;
}
