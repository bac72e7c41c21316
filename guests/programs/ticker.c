/* ticker: a timer-heavy guest for record/replay tests. Arms 1 ms one-shot timers; on each expiry
 * reads the clock and mixes clock values and tick counts into a state; after boot_info->arg ticks
 * (default 200) prints the state hash and exits 0. */
#include "vmft.h"

#define PERIOD_NS 1000000ULL

int main(void)
{
    uint64_t target = vmft_arg() ? vmft_arg() : 200;
    uint64_t state = 0x6a09e667f3bcc908ULL;
    uint64_t ticks = 0, wakeups = 0;
    uint64_t now = vmft_clock_ns();
    uint64_t deadline = now + PERIOD_NS;
    vmft_timer_arm(deadline);
    while (ticks < target) {
        uint32_t bits = vmft_wait();
        wakeups++;
        state = vmft_mix64(state ^ bits ^ (wakeups << 32));
        now = vmft_clock_ns();
        if (now < deadline)
            continue; /* news that is not our timer (or an early wake-up): keep waiting */
        ticks++;
        state = vmft_mix64(state + now);
        state = vmft_mix64(state ^ ((uint64_t)vmft_ticks() << 17) ^ ticks);
        deadline = now + PERIOD_NS;
        vmft_timer_arm(deadline);
    }
    vmft_timer_disarm();
    vmft_printf("ticker: ticks=%lu wakeups=%lu irq_ticks=%u state=%lx\n", (unsigned long)ticks,
                (unsigned long)wakeups, vmft_ticks(), (unsigned long)state);
    return 0;
}
