/* The spin benchmark's loop, shared by spin.elf (guest) and spin-native (host). */
#pragma once
#include <stdint.h>

#define SPIN_DEFAULT_ITERATIONS 100000000ULL

uint64_t spin_loop(uint64_t iterations);
