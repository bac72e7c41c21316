/* hello: prints a line and exits with boot_info->arg (7 when 0). */
#include "vmft.h"

int main(void)
{
    vmft_printf("hello from vmft guest\n");
    uint64_t arg = vmft_arg();
    return arg ? (int)arg : 7;
}
