/* The vmft guest runtime, ring 3 (see vmft.h). */
#include "vmft.h"

/* ---------------------------------------------------------------- string functions */

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d == s || n == 0)
        return dst;
    if (d < s || d >= s + n)
        return memcpy(dst, src, n);
    while (n--) /* overlapping, copy backwards */
        d[n] = s[n];
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (unsigned char)*a - (unsigned char)*b;
}

/* ---------------------------------------------------------------- console */

#define CONSOLE_BUF 4096
static char console_buf[CONSOLE_BUF];
static uint32_t console_len;

void vmft_console_flush(void)
{
    if (console_len == 0)
        return;
    struct vmft_req req = {.addr = (uintptr_t)console_buf, .len = console_len};
    vmft_request(VMFT_PORT_CONSOLE_WRITE, &req);
    console_len = 0;
}

void vmft_console_write(const void *buf, size_t len)
{
    const char *p = buf;
    int newline = 0;
    while (len > 0) {
        size_t room = CONSOLE_BUF - console_len;
        size_t n = len < room ? len : room;
        for (size_t i = 0; i < n; i++) {
            char c = p[i];
            console_buf[console_len + i] = c;
            newline |= c == '\n';
        }
        console_len += (uint32_t)n;
        p += n;
        len -= n;
        if (console_len == CONSOLE_BUF)
            vmft_console_flush();
    }
    if (newline)
        vmft_console_flush();
}

void vmft_putc(char c) { vmft_console_write(&c, 1); }

void vmft_print(const char *s) { vmft_console_write(s, strlen(s)); }

int vmft_console_read(void *buf, uint32_t cap)
{
    struct vmft_req req = {.addr = (uintptr_t)buf, .len = cap};
    int32_t st = vmft_request(VMFT_PORT_CONSOLE_READ, &req);
    return st < 0 ? st : (int)req.result;
}

/* ---------------------------------------------------------------- time */

uint64_t vmft_clock_ns(void)
{
    struct vmft_req req = {0};
    vmft_request(VMFT_PORT_CLOCK, &req);
    return req.arg64;
}

void vmft_timer_arm(uint64_t deadline_ns)
{
    struct vmft_req req = {.arg64 = deadline_ns ? deadline_ns : 1};
    vmft_request(VMFT_PORT_TIMER, &req);
}

void vmft_timer_disarm(void)
{
    struct vmft_req req = {.arg64 = 0};
    vmft_request(VMFT_PORT_TIMER, &req);
}

/* ---------------------------------------------------------------- events */

static uint32_t deferred_events; /* bits taken while waiting for a disk completion */

static uint32_t take_irq_pending(void)
{
    uint32_t v = 0;
    __asm__ volatile("xchgl %0, %1" : "+r"(v), "+m"(VMFT_BOOT->irq_pending) : : "memory");
    return v;
}

uint32_t vmft_take_irqs(void)
{
    uint32_t v = take_irq_pending() | deferred_events;
    deferred_events = 0;
    return v;
}

uint32_t vmft_events(void)
{
    uint32_t bits = vmft_inl(VMFT_PORT_EVENTS);
    return bits | vmft_take_irqs();
}

uint32_t vmft_wait(void)
{
    /* Bits a disk wait took from the monitor must be handed out before blocking again. */
    if (deferred_events)
        return vmft_take_irqs();
    /* Otherwise always ask the monitor: it latches every interrupt it raises until an EVENTS/WAIT read
     * takes it, so WAIT returns at once when news is already pending (also news whose interrupt has
     * landed), and returning early on irq_pending alone would leave a stale latched bit behind (a
     * spurious wake-up later). The interrupt for news found at this exit lands right after it. */
    uint32_t bits = vmft_inl(VMFT_PORT_WAIT);
    return bits | vmft_take_irqs();
}

/* ---------------------------------------------------------------- network */

int vmft_net_rx(void *buf, uint32_t cap)
{
    struct vmft_req req = {.addr = (uintptr_t)buf, .len = cap};
    int32_t st = vmft_request(VMFT_PORT_NET_RX, &req);
    return st < 0 ? st : (int)req.result;
}

int vmft_tx_send(struct vmft_tx *tx)
{
    if (tx->len == 0)
        return 0;
    struct vmft_req req = {.addr = (uintptr_t)tx->buf, .len = tx->len};
    int32_t st = vmft_request(VMFT_PORT_NET_TX, &req);
    tx->len = 0;
    tx->count = 0;
    return st;
}

/* ---------------------------------------------------------------- block device */

#define REQ_PENDING 1 /* status value no monitor writes: "not completed yet" */

uint64_t vmft_disk_sectors(void)
{
    struct vmft_req req = {0};
    if (vmft_request(VMFT_PORT_BLOCK_INFO, &req) != VMFT_ST_OK)
        return 0;
    return req.arg64;
}

static int block_op(uint32_t op, uint64_t sector, uintptr_t buf, uint32_t nsectors)
{
    struct vmft_req req = {
        .addr = buf,
        .len = nsectors * VMFT_SECTOR_SIZE,
        .arg = op,
        .arg64 = sector,
        .status = REQ_PENDING,
    };
    int32_t st = vmft_request(VMFT_PORT_BLOCK, &req);
    /* The monitor completes requests inside the exit; should one ever complete later, it raises
     * VMFT_VEC_BLOCK: wait for it, keeping other news for the program's own vmft_wait(). */
    while (st == REQ_PENDING) {
        uint32_t bits = vmft_inl(VMFT_PORT_WAIT) | take_irq_pending();
        deferred_events |= bits & ~(uint32_t)VMFT_EV_BLOCK;
        st = *(volatile int32_t *)&req.status;
    }
    return st;
}

int vmft_disk_read(uint64_t sector, void *buf, uint32_t nsectors)
{
    return block_op(VMFT_BLK_READ, sector, (uintptr_t)buf, nsectors);
}

int vmft_disk_write(uint64_t sector, const void *buf, uint32_t nsectors)
{
    return block_op(VMFT_BLK_WRITE, sector, (uintptr_t)buf, nsectors);
}

int vmft_disk_flush(void) { return block_op(VMFT_BLK_FLUSH, 0, 0, 0); }

/* ---------------------------------------------------------------- entropy */

int vmft_entropy(void *buf, uint32_t len)
{
    struct vmft_req req = {.addr = (uintptr_t)buf, .len = len};
    return vmft_request(VMFT_PORT_ENTROPY, &req);
}

/* ---------------------------------------------------------------- power */

void vmft_exit(int code)
{
    vmft_console_flush();
    for (;;)
        vmft_outl(VMFT_PORT_POWER_EXIT, (uint32_t)code);
}

static VMFT_NORETURN void panic_at(const char *msg, size_t len, uintptr_t rip)
{
    vmft_console_flush();
    struct vmft_req req = {.addr = (uintptr_t)msg, .len = (uint32_t)len, .arg = 0, .arg64 = rip};
    for (;;)
        vmft_request(VMFT_PORT_POWER_PANIC, &req);
}

void vmft_panic(const char *msg)
{
    panic_at(msg, strlen(msg), (uintptr_t)__builtin_return_address(0));
}

void vmft_panicf(const char *fmt, ...)
{
    static char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vmft_vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    panic_at(msg, n < (int)sizeof msg ? (size_t)n : sizeof msg - 1, (uintptr_t)__builtin_return_address(0));
}

VMFT_NORETURN void vmft_sys_crash(void); /* shim.S: int $0x80 with rax = VMFT_SYS_CRASH */

void vmft_crash(void)
{
    vmft_console_flush();
    vmft_sys_crash();
}

/* ---------------------------------------------------------------- start */

void vmft_runtime_start(void);

void vmft_runtime_start(void)
{
    volatile struct vmft_boot_info *bi = VMFT_BOOT;
    if (bi->magic != VMFT_BOOT_INFO_MAGIC || bi->abi_version != VMFT_ABI_VERSION)
        vmft_panicf("vmft runtime: boot info magic 0x%lx version %u, expected ABI version %u",
                    (unsigned long)bi->magic, (unsigned)bi->abi_version, (unsigned)VMFT_ABI_VERSION);
    vmft_exit(main());
}
