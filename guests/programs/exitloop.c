/* exitloop: boot_info->arg (default 100000) `out VMFT_PORT_NOP` exits in a tight ring-3 loop. */
#include "vmft.h"

int main(void)
{
    uint64_t n = vmft_arg() ? vmft_arg() : 100000;
    for (uint64_t i = 0; i < n; i++)
        vmft_outl(VMFT_PORT_NOP, (uint32_t)i);
    return 0;
}
