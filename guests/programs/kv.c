/*
 * kv: a key-value service over the vmft NIC.
 *
 * Each request is one NET_RX DATA message (the monitor frames TCP as 4-byte length + payload); each
 * gets one DATA reply on the same connection:
 *   GET key                 -> VALUE v | NOTFOUND
 *   SET rid key value       -> OK                (value: the rest of the message, may hold spaces)
 *   INCR rid key delta      -> VALUE n           (missing key = 0; ERR not an integer)
 *   DEL rid key             -> OK | NOTFOUND
 *   STATS                   -> STATS keys=N ticks=T writes=W
 *   CRASH | PANIC | HANG | SCRIBBLE   fault injection
 * rid = clientid:seq. Per client the last seq and its reply are kept: a retry of that seq gets the
 * cached reply without applying again, an older seq gets `ERR stale`.
 *
 * One loop iteration: vmft_wait(), one NET_RX for the whole batch, process it, append the batch's
 * write records to the disk log (one BLOCK write plus a header write), then one NET_TX with every reply.
 * A periodic 50 ms timer counts ticks and checks the hash table's integrity.
 *
 * Disk log (when BLOCK_INFO reports a disk): sector 0 is a header {magic, version, records, next
 * sector}; records follow from sector 1, packed, each batch padded to a sector. Records hold the
 * result of a write (key = value, or key deleted, or nothing) with its dedup info (client, seq, reply),
 * so replaying the log at start restores both the data and the exactly-once state.
 */
#include "vmft.h"

#define MAX_KEY 128
#define MAX_VAL 1024
#define MAX_CLIENT 64
#define MAX_REPLY_CACHE 64
#define NBUCKETS 4096
#define NCLIENT_BUCKETS 1024
#define ARENA_SIZE (4u << 20)
#define TICK_NS 50000000ULL

#define RX_CAP (64 * 1024)
#define TX_CAP (64 * 1024)
#define LOG_CAP (64 * 1024)
#define MAX_REPLY (MAX_VAL + 32)

/* ------------------------------------------------------------------ arena and tables */

static uint8_t arena[ARENA_SIZE] __attribute__((aligned(16)));
static uint32_t arena_used;

#define ENTRY_MAGIC 0x4B56454Eu  /* "KVEN" */
#define NCLASSES 7               /* value blocks of 16 << c bytes, c < NCLASSES (16 .. 1024) */

struct entry {
    uint32_t magic;
    uint32_t hash;
    struct entry *next;
    char *val;
    uint16_t klen, vlen;
    uint8_t vclass;
    char key[MAX_KEY];
};

struct client {
    struct client *next;
    uint64_t seq;
    uint8_t idlen, rlen;
    char id[MAX_CLIENT];
    char reply[MAX_REPLY_CACHE];
};

static struct entry *buckets[NBUCKETS];
static struct client *client_buckets[NCLIENT_BUCKETS];
static struct entry *free_entries;
static void *free_blocks[NCLASSES];

static uint64_t nkeys, ticks, writes;

static void *arena_alloc(uint32_t size)
{
    size = (size + 15u) & ~15u;
    if (size > ARENA_SIZE - arena_used)
        return NULL;
    void *p = arena + arena_used;
    arena_used += size;
    return p;
}

static int in_arena(const void *p, uint32_t size)
{
    uintptr_t a = (uintptr_t)p, lo = (uintptr_t)arena;
    return a >= lo && a + size <= lo + arena_used && a + size >= a;
}

static char *block_alloc(uint32_t len, uint8_t *cls)
{
    uint8_t c = 0;
    while ((16u << c) < len)
        c++;
    *cls = c;
    if (free_blocks[c]) {
        void *p = free_blocks[c];
        free_blocks[c] = *(void **)p;
        return p;
    }
    return arena_alloc(16u << c);
}

static void block_free(char *p, uint8_t cls)
{
    *(void **)p = free_blocks[cls];
    free_blocks[cls] = p;
}

static uint32_t hash_bytes(const char *p, uint32_t n)
{
    uint64_t h = vmft_fnv1a(p, n, 0);
    return (uint32_t)(h ^ (h >> 32));
}

static struct entry *lookup(const char *key, uint32_t klen, uint32_t h, struct entry ***link_out)
{
    struct entry **link = &buckets[h & (NBUCKETS - 1)];
    for (struct entry *e = *link; e; link = &e->next, e = e->next) {
        if (e->hash == h && e->klen == klen && memcmp(e->key, key, klen) == 0) {
            if (link_out)
                *link_out = link;
            return e;
        }
    }
    if (link_out)
        *link_out = link;
    return NULL;
}

/* Set key = val. Returns 0, or -1 when the arena is full. */
static int table_put(const char *key, uint32_t klen, const char *val, uint32_t vlen)
{
    uint32_t h = hash_bytes(key, klen);
    struct entry *e = lookup(key, klen, h, NULL);
    uint8_t cls;
    if (e && vlen <= (16u << e->vclass)) {
        memcpy(e->val, val, vlen);
        e->vlen = (uint16_t)vlen;
        return 0;
    }
    char *block = block_alloc(vlen ? vlen : 1, &cls);
    if (!block)
        return -1;
    if (!e) {
        e = free_entries;
        if (e)
            free_entries = e->next;
        else
            e = arena_alloc(sizeof *e);
        if (!e) {
            block_free(block, cls);
            return -1;
        }
        e->magic = ENTRY_MAGIC;
        e->hash = h;
        e->klen = (uint16_t)klen;
        memcpy(e->key, key, klen);
        e->val = NULL;
        e->next = buckets[h & (NBUCKETS - 1)];
        buckets[h & (NBUCKETS - 1)] = e;
        nkeys++;
    }
    if (e->val)
        block_free(e->val, e->vclass);
    e->val = block;
    e->vclass = cls;
    memcpy(e->val, val, vlen);
    e->vlen = (uint16_t)vlen;
    return 0;
}

static int table_del(const char *key, uint32_t klen)
{
    struct entry **link;
    struct entry *e = lookup(key, klen, hash_bytes(key, klen), &link);
    if (!e)
        return 0;
    *link = e->next;
    block_free(e->val, e->vclass);
    e->magic = 0;
    e->next = free_entries;
    free_entries = e;
    nkeys--;
    return 1;
}

static struct client *client_get(const char *id, uint32_t idlen, int create)
{
    uint32_t h = hash_bytes(id, idlen) & (NCLIENT_BUCKETS - 1);
    for (struct client *c = client_buckets[h]; c; c = c->next)
        if (c->idlen == idlen && memcmp(c->id, id, idlen) == 0)
            return c;
    if (!create)
        return NULL;
    struct client *c = arena_alloc(sizeof *c);
    if (!c)
        return NULL;
    memset(c, 0, sizeof *c);
    c->idlen = (uint8_t)idlen;
    memcpy(c->id, id, idlen);
    c->next = client_buckets[h];
    client_buckets[h] = c;
    return c;
}

static void client_record(struct client *c, uint64_t seq, const char *reply, uint32_t rlen)
{
    c->seq = seq;
    if (rlen > MAX_REPLY_CACHE)
        rlen = MAX_REPLY_CACHE;
    c->rlen = (uint8_t)rlen;
    memcpy(c->reply, reply, rlen);
}

/* Walk every chain: pointers must stay inside the arena and entries must carry their magic. */
static void check_integrity(void)
{
    uint64_t count = 0;
    for (uint32_t b = 0; b < NBUCKETS; b++) {
        for (struct entry *e = buckets[b]; e; e = e->next) {
            if (!in_arena(e, sizeof *e) || e->magic != ENTRY_MAGIC || (e->hash & (NBUCKETS - 1)) != b ||
                e->klen > MAX_KEY || e->vlen > MAX_VAL || !in_arena(e->val, 16u << e->vclass) ||
                ++count > nkeys)
                vmft_panicf("kv: hash table corrupted (bucket %u)", b);
        }
    }
    if (count != nkeys)
        vmft_panicf("kv: hash table corrupted (%lu keys found, %lu expected)", (unsigned long)count,
                    (unsigned long)nkeys);
}

static void scribble(void)
{
    /* Deliberate corruption: garbage links in a spread of buckets. */
    for (uint32_t b = 0; b < NBUCKETS; b += 97)
        buckets[b] = (struct entry *)(uintptr_t)(0xdead0000ull + b * 8);
}

/* ------------------------------------------------------------------ disk log */

#define LOG_MAGIC 0x314C564B54464D56ull /* "VMFTKVL1" */
#define LOG_VERSION 1
#define REC_MAGIC 0x4345524Bu /* "KREC" */
enum { REC_PUT = 1, REC_DEL = 2, REC_NONE = 3 };

struct log_header {
    uint64_t magic;
    uint32_t version;
    uint32_t reserved;
    uint64_t records;
    uint64_t next_sector; /* first free sector; records live in [1, next_sector) */
    uint64_t check;       /* fnv1a of the fields above */
};

struct rec_head {
    uint32_t magic;
    uint16_t total; /* bytes, head included, 8-aligned */
    uint8_t op;
    uint8_t cidlen;
    uint16_t klen;
    uint16_t vlen;
    uint8_t rlen;
    uint8_t pad[7];
    uint64_t seq;
};
#define MAX_REC (sizeof(struct rec_head) + MAX_CLIENT + MAX_KEY + MAX_VAL + MAX_REPLY_CACHE + 8)

static uint64_t disk_sectors;         /* 0: no persistence */
static struct log_header log_hdr;
static uint8_t log_buf[LOG_CAP + MAX_REC] __attribute__((aligned(16)));
static uint32_t log_len, log_pending_records;
static uint8_t sector_buf[VMFT_SECTOR_SIZE] __attribute__((aligned(16)));

static uint64_t header_check(const struct log_header *h)
{
    return vmft_fnv1a(h, offsetof(struct log_header, check), 0);
}

static void write_header(void)
{
    log_hdr.check = header_check(&log_hdr);
    memset(sector_buf, 0, sizeof sector_buf);
    memcpy(sector_buf, &log_hdr, sizeof log_hdr);
    int st = vmft_disk_write(0, sector_buf, 1);
    if (st != VMFT_ST_OK)
        vmft_panicf("kv: log header write failed, status %d", st);
}

static uint32_t sectors_for(uint32_t bytes) { return (bytes + VMFT_SECTOR_SIZE - 1) / VMFT_SECTOR_SIZE; }

/* Would a record of `rec` more bytes still fit on the disk? */
static int log_has_room(uint32_t rec)
{
    if (!disk_sectors)
        return 1;
    return log_hdr.next_sector + sectors_for(log_len + rec) <= disk_sectors;
}

static void log_append(uint8_t op, const struct client *c, uint64_t seq, const char *key, uint32_t klen,
                       const char *val, uint32_t vlen, const char *reply, uint32_t rlen)
{
    if (!disk_sectors)
        return;
    if (rlen > MAX_REPLY_CACHE)
        rlen = MAX_REPLY_CACHE;
    uint32_t total = (uint32_t)sizeof(struct rec_head) + c->idlen + klen + vlen + rlen;
    total = (total + 7u) & ~7u;
    struct rec_head *h = (struct rec_head *)(log_buf + log_len);
    memset(h, 0, total);
    h->magic = REC_MAGIC;
    h->total = (uint16_t)total;
    h->op = op;
    h->cidlen = c->idlen;
    h->klen = (uint16_t)klen;
    h->vlen = (uint16_t)vlen;
    h->rlen = (uint8_t)rlen;
    h->seq = seq;
    char *p = (char *)(h + 1);
    memcpy(p, c->id, c->idlen);
    p += c->idlen;
    memcpy(p, key, klen);
    p += klen;
    memcpy(p, val, vlen);
    p += vlen;
    memcpy(p, reply, rlen);
    log_len += total;
    log_pending_records++;
}

/* Make the batch's records durable: one write for the records, one for the header. */
static void log_persist(void)
{
    if (!disk_sectors || log_len == 0)
        return;
    uint32_t n = sectors_for(log_len);
    memset(log_buf + log_len, 0, n * VMFT_SECTOR_SIZE - log_len);
    int st = vmft_disk_write(log_hdr.next_sector, log_buf, n);
    if (st != VMFT_ST_OK)
        vmft_panicf("kv: log write failed, status %d", st);
    log_hdr.next_sector += n;
    log_hdr.records += log_pending_records;
    write_header();
    log_len = 0;
    log_pending_records = 0;
}

static void apply_record(const struct rec_head *h)
{
    const char *p = (const char *)(h + 1);
    const char *cid = p, *key = cid + h->cidlen, *val = key + h->klen, *reply = val + h->vlen;
    if (h->op == REC_PUT) {
        if (table_put(key, h->klen, val, h->vlen) < 0)
            vmft_panic("kv: arena full while replaying the log");
    } else if (h->op == REC_DEL) {
        table_del(key, h->klen);
    }
    writes++;
    if (h->cidlen) {
        struct client *c = client_get(cid, h->cidlen, 1);
        if (!c)
            vmft_panic("kv: arena full while replaying the log");
        client_record(c, h->seq, reply, h->rlen);
    }
}

/* Read the header and replay every record. Returns the number of records replayed. */
static uint64_t log_open(void)
{
    disk_sectors = vmft_disk_sectors();
    if (disk_sectors < 2) {
        disk_sectors = 0;
        return 0;
    }
    int st = vmft_disk_read(0, sector_buf, 1);
    if (st != VMFT_ST_OK)
        vmft_panicf("kv: log header read failed, status %d", st);
    memcpy(&log_hdr, sector_buf, sizeof log_hdr);
    if (log_hdr.magic != LOG_MAGIC || log_hdr.version != LOG_VERSION || log_hdr.check != header_check(&log_hdr) ||
        log_hdr.next_sector < 1 || log_hdr.next_sector > disk_sectors) {
        if (log_hdr.magic == LOG_MAGIC)
            vmft_printf("kv: disk log header damaged, starting an empty log\n");
        memset(&log_hdr, 0, sizeof log_hdr);
        log_hdr.magic = LOG_MAGIC;
        log_hdr.version = LOG_VERSION;
        log_hdr.next_sector = 1;
        write_header();
        return 0;
    }
    /* Stream [1, next_sector) through log_buf, keeping at least one whole record in view. */
    uint64_t sector = 1, end = log_hdr.next_sector, replayed = 0;
    uint32_t have = 0, pos = 0;
    const uint32_t chunk = LOG_CAP / VMFT_SECTOR_SIZE;
    for (;;) {
        if (have - pos < MAX_REC && sector < end) {
            uint32_t shift = pos / VMFT_SECTOR_SIZE * VMFT_SECTOR_SIZE; /* keep sector alignment */
            memmove(log_buf, log_buf + shift, have - shift);
            have -= shift;
            pos -= shift;
            uint32_t n = (uint32_t)((end - sector) < chunk ? (end - sector) : chunk);
            if (have + n * VMFT_SECTOR_SIZE > sizeof log_buf)
                n = (uint32_t)(sizeof log_buf - have) / VMFT_SECTOR_SIZE;
            st = vmft_disk_read(sector, log_buf + have, n);
            if (st != VMFT_ST_OK)
                vmft_panicf("kv: log read failed at sector %lu, status %d", (unsigned long)sector, st);
            sector += n;
            have += n * VMFT_SECTOR_SIZE;
        }
        if (have - pos < sizeof(struct rec_head))
            break;
        const struct rec_head *h = (const struct rec_head *)(log_buf + pos);
        if (h->magic != REC_MAGIC) {
            /* batch padding: skip to the next sector */
            uint32_t next = (pos / VMFT_SECTOR_SIZE + 1) * VMFT_SECTOR_SIZE;
            if (next > have)
                break;
            pos = next;
            continue;
        }
        if (h->total < sizeof *h || h->total > have - pos || h->klen > MAX_KEY || h->vlen > MAX_VAL ||
            h->cidlen > MAX_CLIENT || h->rlen > MAX_REPLY_CACHE ||
            sizeof *h + h->cidlen + h->klen + h->vlen + h->rlen > h->total) {
            vmft_printf("kv: damaged log record at byte %u of a chunk, stopping replay\n", pos);
            break;
        }
        apply_record(h);
        replayed++;
        pos += h->total;
    }
    if (replayed != log_hdr.records)
        vmft_printf("kv: log header says %lu records, replayed %lu\n", (unsigned long)log_hdr.records,
                    (unsigned long)replayed);
    log_len = 0;
    return replayed;
}

/* ------------------------------------------------------------------ requests */

struct str {
    const char *p;
    uint32_t n;
};

/* Next space-separated token of *s (consumed), or an empty str. */
static struct str next_token(struct str *s)
{
    while (s->n && s->p[0] == ' ')
        s->p++, s->n--;
    struct str t = {s->p, 0};
    while (t.n < s->n && s->p[t.n] != ' ')
        t.n++;
    s->p += t.n;
    s->n -= t.n;
    return t;
}

static int str_eq(struct str s, const char *lit)
{
    uint32_t n = (uint32_t)strlen(lit);
    return s.n == n && memcmp(s.p, lit, n) == 0;
}

static int parse_i64(struct str s, int64_t *out)
{
    uint32_t i = 0;
    int neg = 0;
    if (s.n && (s.p[0] == '-' || s.p[0] == '+')) {
        neg = s.p[0] == '-';
        i = 1;
    }
    if (i == s.n || s.n - i > 19)
        return -1;
    uint64_t v = 0;
    for (; i < s.n; i++) {
        if (s.p[i] < '0' || s.p[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(s.p[i] - '0');
    }
    if (v > (uint64_t)INT64_MAX + (uint64_t)neg)
        return -1;
    *out = neg ? (int64_t)(0 - v) : (int64_t)v;
    return 0;
}

static int parse_u64(struct str s, uint64_t *out)
{
    if (s.n == 0 || s.n > 19)
        return -1;
    uint64_t v = 0;
    for (uint32_t i = 0; i < s.n; i++) {
        if (s.p[i] < '0' || s.p[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(s.p[i] - '0');
    }
    *out = v;
    return 0;
}

static char reply[MAX_REPLY + 64];

#define REPLY(...) ((uint32_t)vmft_snprintf(reply, sizeof reply, __VA_ARGS__))

static uint32_t reply_lit(const char *s)
{
    uint32_t n = (uint32_t)strlen(s);
    memcpy(reply, s, n);
    return n;
}

static int valid_key(struct str k) { return k.n > 0 && k.n <= MAX_KEY; }

/* A write command: rid checks, apply, log, cache. Returns the reply length (reply in `reply`). */
static uint32_t do_write(struct str cmd, struct str rest)
{
    struct str rid = next_token(&rest);
    uint32_t colon = rid.n;
    while (colon > 0 && rid.p[colon - 1] != ':')
        colon--;
    uint64_t seq;
    if (colon < 2 || colon - 1 > MAX_CLIENT || parse_u64((struct str){rid.p + colon, rid.n - colon}, &seq) < 0)
        return reply_lit("ERR bad request id (want clientid:seq)");
    struct str cid = {rid.p, colon - 1};

    struct str key = next_token(&rest);
    if (!valid_key(key))
        return reply_lit(key.n ? "ERR key too long" : "ERR missing key");
    struct str val = {0, 0};
    int64_t delta = 0;
    if (str_eq(cmd, "SET")) {
        if (rest.n == 0 || rest.p[0] != ' ')
            return reply_lit("ERR missing value");
        val = (struct str){rest.p + 1, rest.n - 1};
        if (val.n > MAX_VAL)
            return reply_lit("ERR value too long");
    } else if (str_eq(cmd, "INCR")) {
        struct str d = next_token(&rest);
        if (parse_i64(d, &delta) < 0)
            return reply_lit("ERR bad delta");
        if (next_token(&rest).n)
            return reply_lit("ERR trailing arguments");
    } else if (next_token(&rest).n) { /* DEL */
        return reply_lit("ERR trailing arguments");
    }

    struct client *c = client_get(cid.p, cid.n, 0);
    if (c && c->rlen && seq == c->seq) {
        memcpy(reply, c->reply, c->rlen);
        return c->rlen;
    }
    if (c && c->rlen && seq <= c->seq)
        return reply_lit("ERR stale");
    if (!c && !(c = client_get(cid.p, cid.n, 1)))
        return reply_lit("ERR out of memory");
    if (!log_has_room(MAX_REC))
        return reply_lit("ERR disk full");

    uint32_t n;
    uint8_t op = REC_NONE;
    char numbuf[24];
    if (str_eq(cmd, "SET")) {
        if (table_put(key.p, key.n, val.p, val.n) < 0)
            return reply_lit("ERR out of memory");
        op = REC_PUT;
        n = reply_lit("OK");
    } else if (str_eq(cmd, "INCR")) {
        struct entry *e = lookup(key.p, key.n, hash_bytes(key.p, key.n), NULL);
        int64_t cur = 0;
        if (e && parse_i64((struct str){e->val, e->vlen}, &cur) < 0) {
            n = reply_lit("ERR not an integer");
        } else {
            int64_t now = (int64_t)((uint64_t)cur + (uint64_t)delta); /* wraps like two's complement */
            uint32_t len = (uint32_t)vmft_snprintf(numbuf, sizeof numbuf, "%ld", (long)now);
            if (table_put(key.p, key.n, numbuf, len) < 0)
                return reply_lit("ERR out of memory");
            op = REC_PUT;
            val = (struct str){numbuf, len};
            n = REPLY("VALUE %s", numbuf);
        }
    } else {
        if (table_del(key.p, key.n)) {
            op = REC_DEL;
            n = reply_lit("OK");
        } else {
            n = reply_lit("NOTFOUND");
        }
    }
    if (op == REC_DEL || op == REC_NONE)
        val = (struct str){0, 0};
    writes++;
    client_record(c, seq, reply, n);
    log_append(op, c, seq, key.p, key.n, val.p, val.n, reply, n);
    return n;
}

static uint32_t handle(const char *msg, uint32_t len)
{
    while (len && (msg[len - 1] == '\n' || msg[len - 1] == '\r'))
        len--;
    struct str rest = {msg, len};
    struct str cmd = next_token(&rest);
    if (cmd.n == 0)
        return reply_lit("ERR empty request");
    if (str_eq(cmd, "GET")) {
        struct str key = next_token(&rest);
        if (!valid_key(key) || next_token(&rest).n)
            return reply_lit("ERR usage: GET key");
        struct entry *e = lookup(key.p, key.n, hash_bytes(key.p, key.n), NULL);
        if (!e)
            return reply_lit("NOTFOUND");
        memcpy(reply, "VALUE ", 6);
        memcpy(reply + 6, e->val, e->vlen);
        return 6u + e->vlen;
    }
    if (str_eq(cmd, "SET") || str_eq(cmd, "INCR") || str_eq(cmd, "DEL"))
        return do_write(cmd, rest);
    if (str_eq(cmd, "STATS"))
        return REPLY("STATS keys=%lu ticks=%lu writes=%lu", (unsigned long)nkeys, (unsigned long)ticks,
                     (unsigned long)writes);
    if (str_eq(cmd, "CRASH")) {
        vmft_printf("kv: CRASH requested\n");
        vmft_crash();
    }
    if (str_eq(cmd, "PANIC"))
        vmft_panic("kv: PANIC requested");
    if (str_eq(cmd, "HANG")) {
        vmft_printf("kv: HANG requested\n");
        volatile uint64_t spin = 0;
        for (;;)
            spin++;
    }
    if (str_eq(cmd, "SCRIBBLE")) {
        vmft_printf("kv: SCRIBBLE requested\n");
        scribble();
        return reply_lit("OK scribbled");
    }
    return reply_lit("ERR unknown command");
}

/* ------------------------------------------------------------------ main loop */

static uint8_t rx_buf[RX_CAP] __attribute__((aligned(16)));
static uint8_t tx_buf[TX_CAP] __attribute__((aligned(16)));
static struct vmft_tx tx;

/* Records before replies: a reply leaves only once its write is on disk. And fail-stop before output:
 * replies leave only from a table that passed its integrity check, so a corruption (SCRIBBLE) panics the
 * guest before any reply computed from it is seen, and a restart from a checkpoint plus the log up to the
 * last released reply loses nothing a client saw. */
static void flush_batch(void)
{
    check_integrity();
    log_persist();
    int st = vmft_tx_send(&tx);
    if (st != VMFT_ST_OK && st != VMFT_ST_ENOTCONN)
        vmft_printf("kv: NET_TX status %d\n", st);
}

int main(void)
{
    log_open();
    vmft_tx_init(&tx, tx_buf, TX_CAP);
    vmft_printf("kv: ready (%lu keys restored%s)\n", (unsigned long)nkeys,
                disk_sectors ? "" : ", no disk");

    uint64_t next_tick = vmft_clock_ns() + TICK_NS;
    vmft_timer_arm(next_tick);
    int more = 0;
    for (;;) {
        uint32_t bits = more ? vmft_events() : vmft_wait();
        if (bits & VMFT_EV_TIMER) {
            uint64_t now = vmft_clock_ns();
            if (now >= next_tick) {
                ticks++;
                check_integrity();
                next_tick += TICK_NS;
                if (next_tick <= now)
                    next_tick = now + TICK_NS;
            }
            vmft_timer_arm(next_tick);
        }
        if (!(bits & VMFT_EV_NET_RX) && !more)
            continue;
        int count = vmft_net_rx(rx_buf, RX_CAP);
        more = 0;
        if (count <= 0) {
            if (count < 0)
                vmft_printf("kv: NET_RX status %d\n", count);
            continue;
        }
        struct vmft_net_iter it;
        vmft_net_iter_init(&it, rx_buf, RX_CAP, count);
        const struct vmft_net_msg *m;
        while ((m = vmft_net_iter_next(&it))) {
            if (m->kind != VMFT_NET_DATA)
                continue; /* OPEN / CLOSE: no per-connection state */
            if (vmft_tx_space(&tx) < vmft_net_record_len(MAX_REPLY + 64) || LOG_CAP - log_len < MAX_REC)
                flush_batch();
            uint32_t n = handle((const char *)vmft_net_payload(m), m->len);
            vmft_tx_append(&tx, m->conn, VMFT_NET_DATA, reply, n);
        }
        /* A full buffer may have left messages queued: poll again before waiting. */
        more = it.off + vmft_net_record_len(MAX_KEY + MAX_VAL + 128) > RX_CAP;
        flush_batch();
    }
}
