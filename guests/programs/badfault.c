/* badfault: device requests that point outside guest RAM. The monitor must refuse each with
 * VMFT_ST_EFAULT (-1) without touching host memory; this guest prints every status and exits 0. */
#include "vmft.h"

static int32_t try_request(const char *what, uint16_t port, uint64_t addr, uint32_t len, uint32_t arg)
{
    struct vmft_req req = {.addr = addr, .len = len, .arg = arg, .status = 12345};
    int32_t st = vmft_request(port, &req);
    vmft_printf("badfault: %s status=%d\n", what, (int)st);
    return st;
}

static uint8_t small_buf[4096] __attribute__((aligned(8)));

int main(void)
{
    uint64_t mem = vmft_mem_size();
    vmft_printf("badfault: mem_size=%lu\n", (unsigned long)mem);
    try_request("console_write", VMFT_PORT_CONSOLE_WRITE, mem + 4096, 16, 0);
    try_request("console_write_wrap", VMFT_PORT_CONSOLE_WRITE, 0xFFFFFFFFFFFFF000ULL, 0x2000, 0);
    try_request("net_rx", VMFT_PORT_NET_RX, (uintptr_t)small_buf, 0xFFFFFF00u, 0);
    try_request("net_tx", VMFT_PORT_NET_TX, mem - 8, 4096, 0);
    try_request("entropy", VMFT_PORT_ENTROPY, mem, 32, 0);
    try_request("console_read", VMFT_PORT_CONSOLE_READ, mem + (1ULL << 20), 64, 0);
    /* Without a disk the block device may answer ENODEV (-4) instead. */
    try_request("block_read", VMFT_PORT_BLOCK, mem + 4096, 512, VMFT_BLK_READ);
    /* A request block outside RAM: the monitor cannot answer, but must not crash or touch host memory. */
    vmft_outl(VMFT_PORT_ENTROPY, (uint32_t)(mem + 8192 < 0xFFFFFFFFull ? mem + 8192 : 0xFFFFFFF8u));
    vmft_printf("badfault: request block outside RAM survived\n");
    /* Finally a good request, so a test can see the device still works. */
    int32_t st = vmft_entropy(small_buf, 16);
    vmft_printf("badfault: entropy_ok status=%d\n", (int)st);
    vmft_printf("badfault: done\n");
    return 0;
}
