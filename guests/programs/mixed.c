/* mixed: network, disk and entropy together. An echo server: for every DATA message it mixes in
 * 16 entropy bytes, writes a record (sequence number, payload hash, entropy) to the disk (when there
 * is one; sector 1 + n modulo the disk), and replies `HASH <16 hex digits> <n>`. A message `QUIT` is
 * answered `BYE <final hash>` and the guest exits 0. One NET_RX and one NET_TX per loop iteration. */
#include "vmft.h"

#define RX_CAP (64 * 1024)
#define TX_CAP (64 * 1024)

static uint8_t rx_buf[RX_CAP] __attribute__((aligned(16)));
static uint8_t tx_buf[TX_CAP] __attribute__((aligned(16)));
static uint8_t sector[VMFT_SECTOR_SIZE] __attribute__((aligned(16)));

struct record {
    uint64_t magic;
    uint64_t seq;
    uint64_t payload_hash;
    uint64_t state;
    uint8_t entropy[16];
};

int main(void)
{
    struct vmft_tx tx;
    vmft_tx_init(&tx, tx_buf, TX_CAP);
    uint64_t disk = vmft_disk_sectors();
    uint64_t state = 0x243F6A8885A308D3ULL, seq = 0;
    vmft_printf("mixed: ready (disk %lu sectors)\n", (unsigned long)disk);
    int quit = 0;
    while (!quit) {
        uint32_t bits = vmft_wait();
        if (!(bits & VMFT_EV_NET_RX))
            continue;
        int count = vmft_net_rx(rx_buf, RX_CAP);
        if (count < 0) {
            vmft_printf("mixed: NET_RX status %d\n", count);
            continue;
        }
        struct vmft_net_iter it;
        vmft_net_iter_init(&it, rx_buf, RX_CAP, count);
        const struct vmft_net_msg *m;
        while ((m = vmft_net_iter_next(&it)) && !quit) {
            if (m->kind != VMFT_NET_DATA)
                continue;
            const uint8_t *p = vmft_net_payload(m);
            uint32_t len = m->len;
            while (len && (p[len - 1] == '\n' || p[len - 1] == '\r'))
                len--;
            char out[64];
            uint32_t n;
            if (len == 4 && memcmp(p, "QUIT", 4) == 0) {
                n = (uint32_t)vmft_snprintf(out, sizeof out, "BYE %016lx", (unsigned long)state);
                quit = 1;
            } else {
                struct record r = {.magic = 0x44524F434558494DULL, .seq = ++seq};
                if (vmft_entropy(r.entropy, sizeof r.entropy) != VMFT_ST_OK)
                    vmft_panic("mixed: entropy request failed");
                r.payload_hash = vmft_fnv1a(p, len, 0);
                state = vmft_fnv1a(r.entropy, sizeof r.entropy, vmft_mix64(state ^ r.payload_hash));
                r.state = state;
                if (disk > 1) {
                    memset(sector, 0, sizeof sector);
                    memcpy(sector, &r, sizeof r);
                    int st = vmft_disk_write(1 + (seq - 1) % (disk - 1), sector, 1);
                    if (st != VMFT_ST_OK)
                        vmft_panicf("mixed: disk write status %d", st);
                }
                n = (uint32_t)vmft_snprintf(out, sizeof out, "HASH %016lx %lu", (unsigned long)state,
                                            (unsigned long)seq);
            }
            if (vmft_tx_append(&tx, m->conn, VMFT_NET_DATA, out, n) < 0) {
                vmft_tx_send(&tx);
                vmft_tx_append(&tx, m->conn, VMFT_NET_DATA, out, n);
            }
        }
        vmft_tx_send(&tx);
    }
    vmft_printf("mixed: quit after %lu messages, state %016lx\n", (unsigned long)seq, (unsigned long)state);
    return 0;
}
