/*
 * A host stand-in for the vmft devices, so guest programs' logic (kv, mixed) can be tested as an
 * ordinary process without a VM: NET_RX/NET_TX become a TCP listener with the monitor's framing
 * (4-byte big-endian length + payload), the disk is a file, the clock is CLOCK_MONOTONIC.
 * Not part of any guest image. Environment: VMFT_HOST_PORT (default 7070; 0 = an ephemeral port, printed
 * on stderr as "host runtime: listening on 127.0.0.1:PORT"), VMFT_HOST_DISK (a file
 * whose size gives the sectors; absent: no disk), VMFT_HOST_ARG. SIGTERM ends it with
 * "host runtime: requests N" on stderr (N: the DATA messages handed to the program).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "vmft.h"

#define MAX_CONNS 256
#define MAX_FRAME (1 << 20)

struct conn {
    int fd;
    uint32_t id;
    uint8_t *buf;
    size_t len, cap;
    uint8_t *out; /* replies of the batch being sent: one write per connection per NET_TX */
    size_t out_len, out_cap;
    int opened_reported;
};

static int listen_fd = -1;
static struct conn conns[MAX_CONNS];
static uint32_t next_conn_id = 1;
static uint64_t timer_deadline;
static int disk_fd = -1;
static uint64_t start_ns;
static uint32_t pending_close[MAX_CONNS * 4];
static volatile uint64_t requests_delivered; /* DATA messages handed to the program, told on SIGTERM */
static int npending_close;

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void setup(void)
{
    if (listen_fd >= 0)
        return;
    start_ns = mono_ns();
    const char *port = getenv("VMFT_HOST_PORT");
    listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port ? atoi(port) : 7070)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (bind(listen_fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(listen_fd, 256) < 0 ||
        getsockname(listen_fd, (struct sockaddr *)&a, &alen) < 0) {
        perror("host runtime: bind/listen");
        exit(3);
    }
    /* VMFT_HOST_PORT=0: an ephemeral port, told on stderr so that a harness need not guess a free one. */
    if (port && strcmp(port, "0") == 0)
        fprintf(stderr, "host runtime: listening on 127.0.0.1:%u\n", ntohs(a.sin_port));
    for (int i = 0; i < MAX_CONNS; i++)
        conns[i].fd = -1;
    const char *disk = getenv("VMFT_HOST_DISK");
    if (disk && *disk) {
        disk_fd = open(disk, O_RDWR);
        if (disk_fd < 0) {
            perror("host runtime: disk");
            exit(3);
        }
    }
}

void vmft_console_write(const void *buf, size_t len)
{
    fwrite(buf, 1, len, stdout);
    fflush(stdout);
}
void vmft_console_flush(void) { fflush(stdout); }

uint64_t vmft_clock_ns(void)
{
    setup();
    return mono_ns() - start_ns;
}
void vmft_timer_arm(uint64_t deadline_ns) { timer_deadline = deadline_ns; }
void vmft_timer_disarm(void) { timer_deadline = 0; }

static void close_conn(struct conn *c, int report)
{
    close(c->fd);
    c->fd = -1;
    free(c->buf);
    c->buf = NULL;
    c->len = c->cap = 0;
    free(c->out);
    c->out = NULL;
    c->out_len = c->out_cap = 0;
    if (report && npending_close < (int)(sizeof pending_close / sizeof pending_close[0]))
        pending_close[npending_close++] = c->id;
}

static int frame_ready(const struct conn *c)
{
    if (c->len < 4)
        return 0;
    uint32_t n = ((uint32_t)c->buf[0] << 24) | ((uint32_t)c->buf[1] << 16) | ((uint32_t)c->buf[2] << 8) | c->buf[3];
    return c->len >= 4 + (size_t)n;
}

/* Poll sockets (waiting up to timeout_ms) and read what is there. Returns event bits. */
static uint32_t poll_io(int timeout_ms)
{
    setup();
    struct pollfd p[MAX_CONNS + 1];
    int idx[MAX_CONNS + 1], n = 0;
    p[n].fd = listen_fd;
    p[n].events = POLLIN;
    idx[n++] = -1;
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].fd >= 0) {
            p[n].fd = conns[i].fd;
            p[n].events = POLLIN;
            idx[n++] = i;
        }
    if (poll(p, (nfds_t)n, timeout_ms) > 0) {
        for (int k = 0; k < n; k++) {
            if (!(p[k].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            if (idx[k] < 0) {
                int fd = accept(listen_fd, NULL, NULL);
                if (fd < 0)
                    continue;
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                int slot = -1;
                for (int i = 0; i < MAX_CONNS; i++)
                    if (conns[i].fd < 0) {
                        slot = i;
                        break;
                    }
                if (slot < 0) {
                    close(fd);
                    continue;
                }
                conns[slot] = (struct conn){.fd = fd, .id = next_conn_id++};
                continue;
            }
            struct conn *c = &conns[idx[k]];
            if (c->cap - c->len < 65536) {
                c->cap = c->cap ? c->cap * 2 : 131072;
                c->buf = realloc(c->buf, c->cap);
            }
            ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
            if (r <= 0)
                close_conn(c, 1);
            else
                c->len += (size_t)r;
        }
    }
    uint32_t bits = 0;
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].fd >= 0 && (frame_ready(&conns[i]) || !conns[i].opened_reported))
            bits |= VMFT_EV_NET_RX;
    if (npending_close)
        bits |= VMFT_EV_NET_RX;
    if (timer_deadline && vmft_clock_ns() >= timer_deadline)
        bits |= VMFT_EV_TIMER;
    return bits;
}

uint32_t vmft_take_irqs(void) { return 0; }
uint32_t vmft_events(void) { return poll_io(0); }

uint32_t vmft_wait(void)
{
    for (;;) {
        int timeout = 1000;
        if (timer_deadline) {
            uint64_t now = vmft_clock_ns();
            timeout = timer_deadline <= now ? 0 : (int)((timer_deadline - now) / 1000000 + 1);
        }
        uint32_t bits = poll_io(timeout);
        if (bits) {
            if (bits & VMFT_EV_TIMER)
                timer_deadline = 0; /* one-shot */
            return bits;
        }
    }
}

static int put_msg(uint8_t *buf, uint32_t cap, uint32_t *off, uint32_t conn, uint32_t kind, const void *data,
                   uint32_t len)
{
    uint32_t rec = vmft_net_record_len(len);
    if (rec > cap - *off)
        return -1;
    struct vmft_net_msg *m = (struct vmft_net_msg *)(buf + *off);
    *m = (struct vmft_net_msg){.conn = conn, .kind = kind, .len = len};
    memcpy(m + 1, data, len);
    *off += rec;
    return 0;
}

int vmft_net_rx(void *buf, uint32_t cap)
{
    poll_io(0);
    uint32_t off = 0;
    int count = 0;
    while (npending_close > 0) {
        if (put_msg(buf, cap, &off, pending_close[0], VMFT_NET_CLOSE, NULL, 0) < 0)
            return count;
        memmove(pending_close, pending_close + 1, (size_t)--npending_close * sizeof pending_close[0]);
        count++;
    }
    for (int i = 0; i < MAX_CONNS; i++) {
        struct conn *c = &conns[i];
        if (c->fd < 0)
            continue;
        if (!c->opened_reported) {
            if (put_msg(buf, cap, &off, c->id, VMFT_NET_OPEN, NULL, 0) < 0)
                return count;
            c->opened_reported = 1;
            count++;
        }
        while (frame_ready(c)) {
            uint32_t n = ((uint32_t)c->buf[0] << 24) | ((uint32_t)c->buf[1] << 16) | ((uint32_t)c->buf[2] << 8) | c->buf[3];
            if (put_msg(buf, cap, &off, c->id, VMFT_NET_DATA, c->buf + 4, n) < 0)
                return count;
            memmove(c->buf, c->buf + 4 + n, c->len - 4 - n);
            c->len -= 4 + n;
            count++;
            requests_delivered++;
        }
    }
    return count;
}

/* Write a connection's queued replies (blocking: the socket was accepted blocking). */
static void flush_out(struct conn *c)
{
    size_t off = 0;
    while (off < c->out_len) {
        ssize_t n = write(c->fd, c->out + off, c->out_len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            close_conn(c, 1);
            return;
        }
        off += (size_t)n;
    }
    c->out_len = 0;
}

static int queue_out(struct conn *c, const void *payload, uint32_t len)
{
    if (c->out_cap - c->out_len < 4 + (size_t)len) {
        size_t cap = c->out_cap ? c->out_cap : 16384;
        while (cap - c->out_len < 4 + (size_t)len)
            cap *= 2;
        uint8_t *b = realloc(c->out, cap);
        if (!b)
            return -1;
        c->out = b;
        c->out_cap = cap;
    }
    uint8_t *h = c->out + c->out_len;
    h[0] = (uint8_t)(len >> 24), h[1] = (uint8_t)(len >> 16), h[2] = (uint8_t)(len >> 8), h[3] = (uint8_t)len;
    memcpy(h + 4, payload, len);
    c->out_len += 4 + (size_t)len;
    return 0;
}

/* One NET_TX: replies are gathered per connection and written once each, as a NIC would send a batch
 * (two small writes per reply would measure the host's syscalls, not the guest program). */
int vmft_tx_send(struct vmft_tx *tx)
{
    struct vmft_net_iter it;
    vmft_net_iter_init(&it, tx->buf, tx->len, (int)tx->count);
    const struct vmft_net_msg *m;
    int status = VMFT_ST_OK;
    while ((m = vmft_net_iter_next(&it))) {
        struct conn *c = NULL;
        for (int i = 0; i < MAX_CONNS; i++)
            if (conns[i].fd >= 0 && conns[i].id == m->conn)
                c = &conns[i];
        if (!c) {
            status = VMFT_ST_ENOTCONN;
            continue;
        }
        if (m->kind == VMFT_NET_CLOSE) {
            flush_out(c);
            if (c->fd >= 0)
                close_conn(c, 0);
            continue;
        }
        if (queue_out(c, vmft_net_payload(m), m->len) < 0)
            close_conn(c, 1);
    }
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].fd >= 0 && conns[i].out_len)
            flush_out(&conns[i]);
    tx->len = 0;
    tx->count = 0;
    return status;
}

uint64_t vmft_disk_sectors(void)
{
    setup();
    struct stat st;
    if (disk_fd < 0 || fstat(disk_fd, &st) < 0)
        return 0;
    return (uint64_t)st.st_size / VMFT_SECTOR_SIZE;
}

int vmft_disk_read(uint64_t sector, void *buf, uint32_t nsectors)
{
    size_t n = (size_t)nsectors * VMFT_SECTOR_SIZE;
    if (disk_fd < 0)
        return VMFT_ST_ENODEV;
    return pread(disk_fd, buf, n, (off_t)(sector * VMFT_SECTOR_SIZE)) == (ssize_t)n ? VMFT_ST_OK : VMFT_ST_EIO;
}

int vmft_disk_write(uint64_t sector, const void *buf, uint32_t nsectors)
{
    size_t n = (size_t)nsectors * VMFT_SECTOR_SIZE;
    if (disk_fd < 0)
        return VMFT_ST_ENODEV;
    return pwrite(disk_fd, buf, n, (off_t)(sector * VMFT_SECTOR_SIZE)) == (ssize_t)n ? VMFT_ST_OK : VMFT_ST_EIO;
}

int vmft_disk_flush(void) { return disk_fd < 0 ? VMFT_ST_ENODEV : (fdatasync(disk_fd) == 0 ? 0 : VMFT_ST_EIO); }

int vmft_entropy(void *buf, uint32_t len)
{
    for (uint32_t i = 0; i < len; i++)
        ((uint8_t *)buf)[i] = (uint8_t)rand();
    return VMFT_ST_OK;
}

void vmft_exit(int code)
{
    fflush(stdout);
    exit(code);
}

void vmft_panic(const char *msg)
{
    printf("PANIC: %s\n", msg);
    fflush(stdout);
    exit(101);
}

void vmft_panicf(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vmft_vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    vmft_panic(msg);
}

void vmft_crash(void)
{
    printf("CRASH (triple fault in a VM)\n");
    fflush(stdout);
    exit(102);
}

/* SIGTERM: say how many requests the program was handed (benchmarks check what a reference served), exit 0. */
static void on_sigterm(int sig)
{
    (void)sig;
    char msg[64] = "host runtime: requests ", digits[24];
    size_t n = strlen(msg), k = 0;
    uint64_t v = requests_delivered;
    do
        digits[k++] = (char)('0' + v % 10);
    while ((v /= 10) && k < sizeof digits);
    while (k)
        msg[n++] = digits[--k];
    msg[n++] = '\n';
    if (write(2, msg, n) < 0)
        _exit(1);
    _exit(0);
}

int main(int argc, char **argv);
int vmft_guest_main(void);

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGTERM, on_sigterm);
    setup();
    return vmft_guest_main();
}
