/* CPU-bound loop with a data dependency between iterations (xorshift64 plus arithmetic), so the
 * compiler can neither vectorise it nor fold it: guest and native run the same instructions. */
#include "spin_loop.h"

uint64_t spin_loop(uint64_t iterations)
{
    uint64_t x = 0x9E3779B97F4A7C15ULL, acc = 0;
    for (uint64_t i = 0; i < iterations; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc += (x ^ i) * 0x2545F4914F6CDD1DULL;
        acc = (acc << 5) | (acc >> 59);
    }
    return acc ^ x;
}
