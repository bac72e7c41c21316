/* spin: runs spin_loop for boot_info->arg iterations (default 100M) and prints the checksum. */
#include "spin_loop.h"
#include "vmft.h"

int main(void)
{
    uint64_t n = vmft_arg() ? vmft_arg() : SPIN_DEFAULT_ITERATIONS;
    uint64_t sum = spin_loop(n);
    vmft_printf("spin: iterations=%lu checksum=%lx\n", (unsigned long)n, (unsigned long)sum);
    return 0;
}
