/* The parts of the vmft runtime that touch no device: formatting, network buffers, hashing.
 * Also compiled for the host (guests/host/) so guest logic can be tested without a VM. */
#include "vmft.h"

uint64_t vmft_fnv1a(const void *data, size_t len, uint64_t h)
{
    const unsigned char *p = data;
    if (h == 0)
        h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* ---------------------------------------------------------------- formatting */

struct sink {
    char *buf; /* NULL: the console */
    size_t cap;
    size_t n; /* characters produced */
};

static void sink_put(struct sink *s, const char *p, size_t len)
{
    if (!s->buf) {
        vmft_console_write(p, len);
    } else {
        for (size_t i = 0; i < len; i++)
            if (s->n + i + 1 < s->cap)
                s->buf[s->n + i] = p[i];
    }
    s->n += len;
}

static void sink_pad(struct sink *s, char c, int count)
{
    while (count-- > 0)
        sink_put(s, &c, 1);
}

static void vformat(struct sink *s, const char *fmt, va_list ap)
{
    while (*fmt) {
        if (*fmt != '%') {
            const char *start = fmt;
            while (*fmt && *fmt != '%')
                fmt++;
            sink_put(s, start, (size_t)(fmt - start));
            continue;
        }
        fmt++;
        int left = 0, zero = 0, width = 0, lng = 0;
        for (;; fmt++) {
            if (*fmt == '-')
                left = 1;
            else if (*fmt == '0')
                zero = 1;
            else
                break;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') {
            lng++;
            fmt++;
        }
        char tmp[24];
        const char *str = tmp;
        size_t len = 0;
        int neg = 0;
        char conv = *fmt ? *fmt++ : '\0';
        switch (conv) {
        case 'd':
        case 'i': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
            neg = v < 0;
            char *e = tmp + sizeof tmp, *p = e;
            do {
                *--p = (char)('0' + u % 10);
                u /= 10;
            } while (u);
            str = p;
            len = (size_t)(e - p);
            break;
        }
        case 'u':
        case 'x':
        case 'X':
        case 'p': {
            uint64_t u;
            if (conv == 'p')
                u = (uintptr_t)va_arg(ap, void *);
            else
                u = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned int);
            unsigned base = conv == 'u' ? 10 : 16;
            const char *digits = conv == 'X' ? "0123456789ABCDEF" : "0123456789abcdef";
            char *e = tmp + sizeof tmp, *p = e;
            do {
                *--p = digits[u % base];
                u /= base;
            } while (u);
            if (conv == 'p') {
                *--p = 'x';
                *--p = '0';
            }
            str = p;
            len = (size_t)(e - p);
            break;
        }
        case 's':
            str = va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            len = strlen(str);
            zero = 0;
            break;
        case 'c':
            tmp[0] = (char)va_arg(ap, int);
            len = 1;
            zero = 0;
            break;
        case '%':
            tmp[0] = '%';
            len = 1;
            width = 0;
            break;
        default: /* unknown conversion: print it as is */
            tmp[0] = '%';
            tmp[1] = conv;
            len = conv ? 2 : 1;
            width = 0;
            break;
        }
        int pad = width - (int)len - neg;
        if (!left && !zero)
            sink_pad(s, ' ', pad);
        if (neg)
            sink_put(s, "-", 1);
        if (!left && zero)
            sink_pad(s, '0', pad);
        sink_put(s, str, len);
        if (left)
            sink_pad(s, ' ', pad);
    }
}

int vmft_vprintf(const char *fmt, va_list ap)
{
    struct sink s = {0};
    vformat(&s, fmt, ap);
    return (int)s.n;
}

int vmft_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vmft_vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int vmft_vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap)
{
    char dummy;
    struct sink s = {.buf = cap ? buf : &dummy, .cap = cap ? cap : 1};
    vformat(&s, fmt, ap);
    s.buf[s.n < s.cap ? s.n : s.cap - 1] = '\0';
    return (int)s.n;
}

int vmft_snprintf(char *buf, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vmft_vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

/* ---------------------------------------------------------------- network buffers */

void vmft_net_iter_init(struct vmft_net_iter *it, const void *buf, uint32_t cap, int count)
{
    it->buf = buf;
    it->cap = cap;
    it->off = 0;
    it->left = count > 0 ? (uint32_t)count : 0;
}

const struct vmft_net_msg *vmft_net_iter_next(struct vmft_net_iter *it)
{
    if (it->left == 0 || it->cap - it->off < sizeof(struct vmft_net_msg))
        return NULL;
    const struct vmft_net_msg *m = (const struct vmft_net_msg *)(it->buf + it->off);
    uint32_t room = it->cap - it->off - (uint32_t)sizeof(struct vmft_net_msg);
    if (m->len > room)
        return NULL;
    uint32_t rec = vmft_net_record_len(m->len);
    it->off = rec > it->cap - it->off ? it->cap : it->off + rec;
    it->left--;
    return m;
}

void vmft_tx_init(struct vmft_tx *tx, void *buf, uint32_t cap)
{
    tx->buf = buf;
    tx->cap = cap & ~7u;
    tx->len = 0;
    tx->count = 0;
}

int vmft_tx_append(struct vmft_tx *tx, uint32_t conn, uint32_t kind, const void *data, uint32_t len)
{
    if (len > tx->cap || vmft_net_record_len(len) > tx->cap - tx->len)
        return -1;
    struct vmft_net_msg *m = (struct vmft_net_msg *)(tx->buf + tx->len);
    m->conn = conn;
    m->kind = kind;
    m->len = len;
    m->reserved = 0;
    if (len)
        memcpy(m + 1, data, len);
    uint32_t rec = vmft_net_record_len(len);
    if (rec > sizeof *m + len)
        memset((uint8_t *)(m + 1) + len, 0, rec - sizeof *m - len);
    tx->len += rec;
    tx->count++;
    return 0;
}

