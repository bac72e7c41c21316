/* spin-native: the spin guest's loop run natively on the host (N from argv[1], default 100M);
 * prints the same line as the guest. */
#include <stdio.h>
#include <stdlib.h>

#include "spin_loop.h"

int main(int argc, char **argv)
{
    uint64_t n = SPIN_DEFAULT_ITERATIONS;
    if (argc > 1) {
        char *end;
        n = strtoull(argv[1], &end, 0);
        if (*end != '\0' || n == 0) {
            fprintf(stderr, "usage: %s [iterations]\n", argv[0]);
            return 2;
        }
    }
    uint64_t sum = spin_loop(n);
    printf("spin: iterations=%lu checksum=%lx\n", (unsigned long)n, (unsigned long)sum);
    return 0;
}
