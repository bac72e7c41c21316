/* memtouch: a guest for checkpoint benchmarks. Writes non-constant data into boot_info->arg MiB of RAM
 * from 8 MiB up (bits 0..31 of arg; capped at the end of RAM), prints one line, then idles in WAIT
 * forever. Bit 32 of arg: incompressible data (a 64-bit mix of the word index) instead of the default
 * pattern (each 64-byte line holds its index mixed, then counters: compresses a few times, as real
 * memory does). Console input "N" (decimal MiB) asks for one pass over N MiB from 8 MiB up: every word read
 * and rewritten, then a line with the pass's hash: the work scripts/bench checkpoint times just after a
 * restore. Without input it only idles. */
#include "vmft.h"

#define BASE (8ULL << 20)

int main(void)
{
    uint64_t arg = vmft_arg();
    uint64_t mib = arg & 0xffffffffULL;
    int random = (arg >> 32) & 1;
    uint64_t end = BASE + (mib << 20);
    if (end > vmft_mem_size())
        end = vmft_mem_size();
    volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)BASE;
    uint64_t words = end > BASE ? (end - BASE) / 8 : 0;
    for (uint64_t i = 0; i < words; i++) {
        if (random)
            p[i] = vmft_mix64(i + 1);
        else
            p[i] = (i & 7) ? (i >> 3) + (i & 7) : vmft_mix64(i >> 3);
    }
    vmft_printf("memtouch: %lu MiB touched\n", (unsigned long)((end - BASE) >> 20));
    for (uint64_t pass = 1;; pass++) {
        char cmd[24];
        int n;
        while ((n = vmft_console_read(cmd, sizeof cmd)) <= 0)
            vmft_wait();
        uint64_t work = 0;
        for (int k = 0; k < n && cmd[k] >= '0' && cmd[k] <= '9'; k++)
            work = work * 10 + (uint64_t)(cmd[k] - '0');
        uint64_t stop = BASE + (work << 20);
        if (stop > vmft_mem_size())
            stop = vmft_mem_size();
        uint64_t h = pass;
        for (uint64_t i = 0; BASE + i * 8 < stop; i++) {
            h = vmft_mix64(h ^ p[i]);
            p[i] = h;
        }
        vmft_printf("memtouch: pass %lu over %lu MiB hash %lx\n", (unsigned long)pass,
                    (unsigned long)((stop - BASE) >> 20), (unsigned long)h);
    }
    return 0;
}
