/*
 * The vmft guest runtime (ring 3). Programs define `int main(void)`; its return value is the exit code.
 *
 * Devices are doorbells (docs/platform.md): a `struct vmft_req` in guest memory, `out PORT, eax` with its
 * address. IOPL is 3, so port I/O needs no system call. Ring 3 must never execute cli, sti or hlt (they
 * #GP on this KVM) nor RDTSC/RDTSCP/RDRAND/RDSEED (the determinism contract): use vmft_clock_ns() and
 * vmft_entropy() instead.
 */
#pragma once

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "vmft_abi.h"

#define VMFT_NORETURN __attribute__((noreturn))
#define VMFT_PRINTF(f, a) __attribute__((format(printf, f, a)))

#define VMFT_BOOT ((volatile struct vmft_boot_info *)(uintptr_t)VMFT_BOOT_INFO_ADDR)

/* ---- raw port I/O ---- */
static inline void vmft_outl(uint16_t port, uint32_t value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline uint32_t vmft_inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

/* Ring the doorbell of `port` with request block `req` (8-aligned, in guest RAM); returns req->status. */
static inline int32_t vmft_request(uint16_t port, struct vmft_req *req)
{
    __asm__ volatile("outl %0, %1"
                     :
                     : "a"((uint32_t)(uintptr_t)req), "Nd"(port), "m"(*req)
                     : "memory");
    return *(volatile int32_t *)&req->status;
}

/* ---- boot info ---- */
static inline uint64_t vmft_arg(void) { return VMFT_BOOT->arg; }
static inline uint64_t vmft_mem_size(void) { return VMFT_BOOT->mem_size; }
/* Timer interrupts delivered so far (counted by the shim). */
static inline uint32_t vmft_ticks(void) { return VMFT_BOOT->ticks; }

/* ---- console ---- */
void vmft_console_write(const void *buf, size_t len); /* buffered; flushed at newline, when full, at exit */
void vmft_console_flush(void);                        /* one CONSOLE_WRITE exit */
void vmft_putc(char c);
void vmft_print(const char *s); /* no newline added */
int vmft_printf(const char *fmt, ...) VMFT_PRINTF(1, 2);
int vmft_vprintf(const char *fmt, va_list ap);
/* %d %i %u %x %X %s %c %p %% with l/ll/z sizes, '-', '0' and a width. Always NUL-terminates (cap > 0);
 * returns the length the full output would have. */
int vmft_snprintf(char *buf, size_t cap, const char *fmt, ...) VMFT_PRINTF(3, 4);
int vmft_vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap);
/* Console input: copies what is available (never blocks); returns bytes read or a negative status. */
int vmft_console_read(void *buf, uint32_t cap);

/* ---- time ---- */
uint64_t vmft_clock_ns(void);              /* virtual ns since the VM started (one exit) */
void vmft_timer_arm(uint64_t deadline_ns); /* one-shot, absolute; fires VMFT_VEC_TIMER */
void vmft_timer_disarm(void);

/* ---- events ----
 * Bits are VMFT_EV_*. Interrupts set bits in boot_info.irq_pending; the WAIT/EVENTS ports report what
 * the monitor has news of. Treat bits as hints: poll the device they name. */
uint32_t vmft_take_irqs(void); /* atomically take (xchg) the interrupt bits, plus any deferred ones */
uint32_t vmft_events(void);    /* EVENTS port | taken interrupt bits; never blocks */
uint32_t vmft_wait(void);      /* WAIT (blocks in the monitor until news) | taken interrupt bits */

/* ---- network ---- */
/* Receive a batch: fills buf with struct vmft_net_msg records (each followed by its payload, padded
 * to 8 bytes). Returns the number of messages (>= 0) or a negative VMFT_ST_* status. */
int vmft_net_rx(void *buf, uint32_t cap);

struct vmft_net_iter {
    const uint8_t *buf;
    uint32_t cap;
    uint32_t off;
    uint32_t left;
};
void vmft_net_iter_init(struct vmft_net_iter *it, const void *buf, uint32_t cap, int count);
/* Next message, or NULL at the end (or at a malformed record). */
const struct vmft_net_msg *vmft_net_iter_next(struct vmft_net_iter *it);
static inline const uint8_t *vmft_net_payload(const struct vmft_net_msg *m)
{
    return (const uint8_t *)(m + 1);
}
static inline uint32_t vmft_net_record_len(uint32_t payload_len)
{
    return (uint32_t)sizeof(struct vmft_net_msg) + ((payload_len + 7u) & ~7u);
}

/* A TX batch: append many messages, send them all with one NET_TX exit. The buffer must be 8-aligned. */
struct vmft_tx {
    uint8_t *buf;
    uint32_t cap;
    uint32_t len;
    uint32_t count;
};
void vmft_tx_init(struct vmft_tx *tx, void *buf, uint32_t cap);
int vmft_tx_append(struct vmft_tx *tx, uint32_t conn, uint32_t kind, const void *data, uint32_t len); /* 0 or -1 (full) */
static inline uint32_t vmft_tx_space(const struct vmft_tx *tx) { return tx->cap - tx->len; }
int vmft_tx_send(struct vmft_tx *tx); /* status of the NET_TX exit (0 if empty); empties the batch */

/* ---- block device (VMFT_SECTOR_SIZE sectors) ---- */
uint64_t vmft_disk_sectors(void); /* 0 without a disk */
int vmft_disk_read(uint64_t sector, void *buf, uint32_t nsectors);
int vmft_disk_write(uint64_t sector, const void *buf, uint32_t nsectors);
int vmft_disk_flush(void);

/* ---- entropy ---- */
int vmft_entropy(void *buf, uint32_t len);

/* ---- power ---- */
VMFT_NORETURN void vmft_exit(int code);
VMFT_NORETURN void vmft_panic(const char *msg);
VMFT_NORETURN void vmft_panicf(const char *fmt, ...) VMFT_PRINTF(1, 2);
VMFT_NORETURN void vmft_crash(void); /* triple fault via the shim's int 0x80 gate */

/* ---- string functions (gcc emits calls to the first four) ---- */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

/* ---- small helpers ---- */
static inline uint64_t vmft_mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}
uint64_t vmft_fnv1a(const void *data, size_t len, uint64_t h); /* h = 0 starts a fresh hash */

#ifndef VMFT_HOST_RUNTIME
int main(void);
#endif
