/* The vDSO vmft maps into Linux guests run with `--clock vdso` (monitor/linux/vdso.py).
 *
 * Clock reads answer from the time page the monitor keeps one page below this image (as Linux's
 * [vvar] sits below its vDSO). The monitor rewrites the page only at synchronous exits, logging what it
 * wrote, so a replay sees the same values at the same instructions. The guest never writes it (mapped
 * read-only) and never sees it change while it runs (one vCPU, stopped while the monitor writes): no
 * sequence lock is needed. Clocks the page does not hold go to the real system call.
 *
 * Built by scripts/setup: gcc -shared -nostdlib -fPIC -O2, laid out by vdso.lds, versions (LINUX_2.6) from vdso.map.
 * Freestanding: no libc, no relocations (everything is reached PC-relative).
 */
#include <stdint.h>

struct timespec_k { int64_t tv_sec; int64_t tv_nsec; };
struct timeval_k { int64_t tv_sec; int64_t tv_usec; };

/* The time page (monitor/linux/vdso.py TIME_PAGE_LAYOUT must agree). */
struct vmft_time_page {
    uint64_t version;        /* 0: not written yet, use the system call */
    int64_t realtime_sec;
    int64_t realtime_nsec;
    int64_t monotonic_sec;
    int64_t monotonic_nsec;
    int64_t coarse_res_nsec; /* what clock_getres says of the *_COARSE clocks */
};

/* The time page is the page before this image's ELF header (__ehdr_start, placed by the linker; taken
 * PC-relative, so the image needs no relocation wherever it is mapped). */
static inline const volatile struct vmft_time_page *page(void)
{
    uintptr_t base;
    __asm__("lea __ehdr_start(%%rip), %0" : "=r"(base));
    return (const volatile struct vmft_time_page *)(base - 4096);
}

static inline long sys2(long nr, long a, long b)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "0"(nr), "D"(a), "S"(b) : "rcx", "r11", "memory");
    return ret;
}

#define NR_gettimeofday 96
#define NR_time 201
#define NR_clock_gettime 228
#define NR_clock_getres 229

/* Clock ids: REALTIME 0, MONOTONIC 1, MONOTONIC_RAW 4, REALTIME_COARSE 5, MONOTONIC_COARSE 6,
 * BOOTTIME 7 (a guest never suspends: BOOTTIME is MONOTONIC). Returns 0 for clocks not on the page. */
static inline int on_page(long clock)
{
    return clock == 0 || clock == 1 || clock == 4 || clock == 5 || clock == 6 || clock == 7;
}

int __vdso_clock_gettime(long clock, struct timespec_k *ts)
{
    const volatile struct vmft_time_page *p = page();
    if (!on_page(clock) || !p->version)
        return (int)sys2(NR_clock_gettime, clock, (long)ts);
    if (clock == 0 || clock == 5) {
        ts->tv_sec = p->realtime_sec;
        ts->tv_nsec = p->realtime_nsec;
    } else {
        ts->tv_sec = p->monotonic_sec;
        ts->tv_nsec = p->monotonic_nsec;
    }
    return 0;
}

int __vdso_gettimeofday(struct timeval_k *tv, void *tz)
{
    const volatile struct vmft_time_page *p = page();
    if (!p->version || tz)
        return (int)sys2(NR_gettimeofday, (long)tv, (long)tz);
    if (tv) {
        tv->tv_sec = p->realtime_sec;
        tv->tv_usec = p->realtime_nsec / 1000;
    }
    return 0;
}

long __vdso_time(long *t)
{
    const volatile struct vmft_time_page *p = page();
    if (!p->version)
        return sys2(NR_time, (long)t, 0);
    long now = p->realtime_sec;
    if (t)
        *t = now;
    return now;
}

int __vdso_clock_getres(long clock, struct timespec_k *res)
{
    const volatile struct vmft_time_page *p = page();
    if (!on_page(clock) || !p->version)
        return (int)sys2(NR_clock_getres, clock, (long)res);
    if (res) {
        res->tv_sec = 0;
        res->tv_nsec = (clock == 5 || clock == 6) ? p->coarse_res_nsec : 1;
    }
    return 0;
}

long __vdso_getcpu(unsigned *cpu, unsigned *node, void *unused)
{
    /* One vCPU: the answer never depends on the host core (the system call would say the same). */
    (void)unused;
    if (cpu)
        *cpu = 0;
    if (node)
        *node = 0;
    return 0;
}

/* The names glibc and musl also look up without the __vdso_ prefix. */
int clock_gettime(long, struct timespec_k *) __attribute__((weak, alias("__vdso_clock_gettime")));
int gettimeofday(struct timeval_k *, void *) __attribute__((weak, alias("__vdso_gettimeofday")));
long time(long *) __attribute__((weak, alias("__vdso_time")));
int clock_getres(long, struct timespec_k *) __attribute__((weak, alias("__vdso_clock_getres")));
long getcpu(unsigned *, unsigned *, void *) __attribute__((weak, alias("__vdso_getcpu")));
