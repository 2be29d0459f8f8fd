/* The register machine in C; see register.h. Every reply and error message
 * must match register-rust's byte for byte. */
#include "register.h"

#include <stdlib.h>
#include <string.h>

/* ---- Growable byte buffer. ---- */

typedef struct {
    uint8_t *ptr;
    size_t len, cap;
} buf_t;

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 16;
    while (cap < b->len + extra) cap *= 2;
    b->ptr = realloc(b->ptr, cap);
    if (!b->ptr) abort();
    b->cap = cap;
}

static void buf_push(buf_t *b, const void *data, size_t len) {
    buf_reserve(b, len);
    if (len) memcpy(b->ptr + b->len, data, len);
    b->len += len;
}

static void buf_str(buf_t *b, const char *s) { buf_push(b, s, strlen(s)); }
static void buf_slice(buf_t *b, slice_t s) { buf_push(b, s.ptr, s.len); }
static void buf_byte(buf_t *b, uint8_t c) { buf_push(b, &c, 1); }

static void buf_u64(buf_t *b, uint64_t v) {
    char digits[20];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) buf_byte(b, (uint8_t)digits[--n]);
}

static void buf_i64(buf_t *b, int64_t v) {
    if (v < 0) {
        buf_byte(b, '-');
        buf_u64(b, (uint64_t)0 - (uint64_t)v); /* also right for INT64_MIN */
    } else {
        buf_u64(b, (uint64_t)v);
    }
}

static bytes_t buf_take(buf_t *b) {
    if (!b->ptr) buf_reserve(b, 1); /* never hand out NULL */
    bytes_t out = {b->ptr, b->len};
    return out;
}

static reply_t ok_buf(buf_t *b) {
    reply_t r = {true, buf_take(b)};
    return r;
}

static reply_t ok_str(const char *s) {
    buf_t b = {0};
    buf_str(&b, s);
    return ok_buf(&b);
}

/* err("<prefix><arg>") */
static reply_t err2(const char *prefix, slice_t arg) {
    buf_t b = {0};
    buf_str(&b, prefix);
    buf_slice(&b, arg);
    reply_t r = {false, buf_take(&b)};
    return r;
}

static reply_t err(const char *message) {
    slice_t none = {0, 0};
    return err2(message, none);
}

/* ---- Parsing. ---- */

static slice_t cstr(const char *s) {
    slice_t out = {(const uint8_t *)s, strlen(s)};
    return out;
}

static bool eq(slice_t a, const char *s) {
    size_t n = strlen(s);
    return a.len == n && (n == 0 || memcmp(a.ptr, s, n) == 0);
}

static bool slice_eq(slice_t a, slice_t b) {
    return a.len == b.len && (a.len == 0 || memcmp(a.ptr, b.ptr, a.len) == 0);
}

/* Exactly what Rust's str::from_utf8 accepts (no overlongs, no surrogates,
 * nothing above U+10FFFF). */
static bool valid_utf8(slice_t s) {
    size_t i = 0;
    while (i < s.len) {
        uint8_t c = s.ptr[i];
        size_t need;
        uint8_t lo = 0x80, hi = 0xbf; /* range of the second byte */
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            need = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0) lo = 0xa0;
            if (c == 0xed) hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0) lo = 0x90;
            if (c == 0xf4) hi = 0x8f;
        } else {
            return false;
        }
        if (s.len - i - 1 < need) return false;
        if (s.ptr[i + 1] < lo || s.ptr[i + 1] > hi) return false;
        for (size_t k = 2; k <= need; k++) {
            if (s.ptr[i + k] < 0x80 || s.ptr[i + k] > 0xbf) return false;
        }
        i += need + 1;
    }
    return true;
}

/* Decimal i64 as Rust's str::parse reads it: an optional '+' or '-', then
 * one or more ASCII digits, in range. */
static bool parse_i64(slice_t s, int64_t *out) {
    size_t i = 0;
    bool neg = false;
    if (s.len == 0) return false;
    if (s.ptr[0] == '+' || s.ptr[0] == '-') {
        neg = s.ptr[0] == '-';
        i = 1;
        if (s.len == 1) return false;
    }
    int64_t v = 0;
    for (; i < s.len; i++) {
        uint8_t c = s.ptr[i];
        if (c < '0' || c > '9') return false;
        int64_t d = c - '0';
        /* Accumulate towards the sign so INT64_MIN parses. */
        if (neg) {
            if (v < (INT64_MIN + d) / 10) return false;
            v = v * 10 - d;
        } else {
            if (v > (INT64_MAX - d) / 10) return false;
            v = v * 10 + d;
        }
    }
    *out = v;
    return true;
}

/* Tokens split on single spaces; `a  b` has an empty middle token. */
typedef struct {
    slice_t *tok;
    size_t n;
} tokens_t;

static tokens_t split(slice_t s) {
    size_t n = 1;
    for (size_t i = 0; i < s.len; i++) n += s.ptr[i] == ' ';
    tokens_t t = {malloc(n * sizeof(slice_t)), 0};
    if (!t.tok) abort();
    size_t start = 0;
    for (size_t i = 0; i <= s.len; i++) {
        if (i == s.len || s.ptr[i] == ' ') {
            slice_t tok = {s.ptr + start, i - start};
            t.tok[t.n++] = tok;
            start = i + 1;
        }
    }
    return t;
}

/* The verb has exactly `n` non-empty arguments. */
static bool has_args(tokens_t t, size_t n) {
    if (t.n != n + 1) return false;
    for (size_t i = 1; i <= n; i++) {
        if (t.tok[i].len == 0) return false;
    }
    return true;
}

/* ---- Commands. ---- */

static reply_t do_get(tokens_t t) {
    if (!has_args(t, 1)) return err("usage: get KEY");
    bytes_t value;
    if (!host_get(t.tok[1], &value)) return err2("not found: ", t.tok[1]);
    reply_t r = {true, value};
    return r;
}

static reply_t do_set(tokens_t t) {
    if (!has_args(t, 2)) return err("usage: set KEY VALUE");
    host_set(t.tok[1], t.tok[2]);
    host_emit(t.tok[1], t.tok[2]);
    return ok_str("OK");
}

static reply_t do_incr(tokens_t t) {
    if (!has_args(t, 2)) return err("usage: incr KEY N");
    slice_t key = t.tok[1];
    int64_t n, current = 0;
    if (!parse_i64(t.tok[2], &n)) return err2("invalid number: ", t.tok[2]);
    bytes_t stored;
    if (host_get(key, &stored)) {
        slice_t s = {stored.ptr, stored.len};
        /* A decimal i64 is ASCII, so no separate UTF-8 check is needed. */
        bool ok = parse_i64(s, &current);
        free(stored.ptr);
        if (!ok) return err2("not a number: ", key);
    }
    int64_t next;
    if (__builtin_add_overflow(current, n, &next)) return err("overflow");
    buf_t b = {0};
    buf_i64(&b, next);
    slice_t value = {b.ptr, b.len};
    host_set(key, value);
    host_emit(key, value);
    return ok_buf(&b);
}

static reply_t do_del(tokens_t t) {
    if (!has_args(t, 1)) return err("usage: del KEY");
    bytes_t old;
    if (!host_get(t.tok[1], &old)) return ok_str("0");
    free(old.ptr);
    host_remove(t.tok[1]);
    host_emit(t.tok[1], cstr(""));
    return ok_str("1");
}

static reply_t do_cas(tokens_t t) {
    if (!has_args(t, 3)) return err("usage: cas KEY OLD NEW");
    slice_t key = t.tok[1], old = t.tok[2], new_value = t.tok[3];
    bytes_t current;
    bool exists = host_get(key, &current);
    bool matches;
    if (eq(old, "-")) {
        matches = !exists;
    } else {
        slice_t cur = {exists ? current.ptr : NULL, exists ? current.len : 0};
        matches = exists && slice_eq(cur, old);
    }
    if (exists) free(current.ptr);
    if (!matches) return err2("compare failed: ", key);
    host_set(key, new_value);
    host_emit(key, new_value);
    return ok_str("OK");
}

/* The smallest key above every key starting with `prefix`; empty (unbounded)
 * if none. Owned. */
static buf_t prefix_end(slice_t prefix) {
    buf_t end = {0};
    buf_slice(&end, prefix);
    while (end.len) {
        uint8_t last = end.ptr[end.len - 1];
        end.len--;
        if (last < 0xff) {
            buf_byte(&end, (uint8_t)(last + 1));
            break;
        }
    }
    return end;
}

static bool has_prefix(bytes_t key, slice_t prefix) {
    return key.len >= prefix.len && (prefix.len == 0 || memcmp(key.ptr, prefix.ptr, prefix.len) == 0);
}

/* Every entry under `prefix`, in key order, REGISTER_PAGE per scan: appended
 * to `out` as KEY=VALUE lines (if out) and counted. */
static uint64_t scan_prefix(slice_t prefix, buf_t *out) {
    buf_t end_buf = prefix_end(prefix);
    slice_t end = {end_buf.ptr, end_buf.len};
    buf_t start = {0};
    buf_slice(&start, prefix);
    uint64_t count = 0;
    for (;;) {
        entry_t *page;
        slice_t from = {start.ptr, start.len};
        size_t n = host_scan(from, end, REGISTER_PAGE, &page);
        for (size_t i = 0; i < n; i++) {
            if (!has_prefix(page[i].key, prefix)) continue;
            count++;
            if (out) {
                if (out->len) buf_byte(out, '\n');
                buf_push(out, page[i].key.ptr, page[i].key.len);
                buf_byte(out, '=');
                buf_push(out, page[i].value.ptr, page[i].value.len);
            }
        }
        bool more = n >= REGISTER_PAGE;
        if (more) {
            /* Next page: strictly after the last key. */
            start.len = 0;
            buf_push(&start, page[n - 1].key.ptr, page[n - 1].key.len);
            buf_byte(&start, 0);
        }
        host_free_entries(page, n);
        if (!more) break;
    }
    free(start.ptr);
    free(end_buf.ptr);
    return count;
}

static reply_t do_list(tokens_t t) {
    slice_t prefix = {0, 0};
    if (t.n != 1) {
        if (!has_args(t, 1)) return err("usage: list [PREFIX]");
        prefix = t.tok[1];
    }
    buf_t out = {0};
    scan_prefix(prefix, &out);
    return ok_buf(&out);
}

static reply_t do_count(tokens_t t) {
    if (!has_args(t, 0)) return err("usage: count");
    slice_t all = {0, 0};
    buf_t out = {0};
    buf_u64(&out, scan_prefix(all, NULL));
    return ok_buf(&out);
}

reply_t register_apply(slice_t command) {
    if (!valid_utf8(command)) return err("invalid UTF-8");
    tokens_t t = split(command);
    slice_t verb = t.tok[0];
    reply_t r;
    if (eq(verb, "set")) r = do_set(t);
    else if (eq(verb, "incr")) r = do_incr(t);
    else if (eq(verb, "del")) r = do_del(t);
    else if (eq(verb, "cas")) r = do_cas(t);
    else if (eq(verb, "get")) r = do_get(t);
    else r = err2("unknown command: ", verb);
    free(t.tok);
    return r;
}

reply_t register_query(slice_t request) {
    if (!valid_utf8(request)) return err("invalid UTF-8");
    tokens_t t = split(request);
    slice_t verb = t.tok[0];
    reply_t r;
    if (eq(verb, "get")) r = do_get(t);
    else if (eq(verb, "list")) r = do_list(t);
    else if (eq(verb, "count")) r = do_count(t);
    else r = err2("unknown query: ", verb);
    free(t.tok);
    return r;
}

void register_lease_revoked(const slice_t *keys, size_t n) {
    for (size_t i = 0; i < n; i++) {
        bytes_t old;
        if (host_get(keys[i], &old)) {
            free(old.ptr);
            host_remove(keys[i]);
            host_emit(keys[i], cstr(""));
        }
    }
}

bytes_t register_leader_change_message(bool is_leader, uint64_t term) {
    buf_t b = {0};
    buf_str(&b, "register: leader change: is-leader=");
    buf_str(&b, is_leader ? "true" : "false");
    buf_str(&b, " term=");
    buf_u64(&b, term);
    buf_byte(&b, 0);
    bytes_t out = buf_take(&b);
    out.len--; /* length without the NUL */
    return out;
}
