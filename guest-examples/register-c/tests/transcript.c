/* Native check: runs the register machine (src/register.c) against an
 * in-memory, transactional store and replays register-rust's transcript
 * (../register-rust/tests/transcript.txt), so the C and Rust machines give
 * the same bytes. Build and run: `make check`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../src/register.h"

/* ---- In-memory store: a sorted array, copied per call (transactions). ---- */

typedef struct {
    entry_t *e;
    size_t n, cap;
} map_t;

static map_t committed, working;
static bool read_only;
static entry_t events[64];
static size_t n_events;

static bytes_t dup(const uint8_t *p, size_t n) {
    bytes_t b = {malloc(n ? n : 1), n};
    if (n) memcpy(b.ptr, p, n);
    return b;
}

static int cmp(const uint8_t *a, size_t an, const uint8_t *b, size_t bn) {
    size_t n = an < bn ? an : bn;
    int c = n ? memcmp(a, b, n) : 0;
    if (c) return c;
    return an < bn ? -1 : an > bn;
}

/* Index of the first entry >= key. */
static size_t lower_bound(const map_t *m, slice_t key) {
    size_t lo = 0, hi = m->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cmp(m->e[mid].key.ptr, m->e[mid].key.len, key.ptr, key.len) < 0) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static bool found(const map_t *m, size_t i, slice_t key) {
    return i < m->n && cmp(m->e[i].key.ptr, m->e[i].key.len, key.ptr, key.len) == 0;
}

static void map_free(map_t *m) {
    for (size_t i = 0; i < m->n; i++) {
        free(m->e[i].key.ptr);
        free(m->e[i].value.ptr);
    }
    free(m->e);
    memset(m, 0, sizeof *m);
}

static map_t map_clone(const map_t *m) {
    map_t c = {malloc((m->n + 1) * sizeof(entry_t)), m->n, m->n + 1};
    for (size_t i = 0; i < m->n; i++) {
        c.e[i].key = dup(m->e[i].key.ptr, m->e[i].key.len);
        c.e[i].value = dup(m->e[i].value.ptr, m->e[i].value.len);
    }
    return c;
}

bool host_get(slice_t key, bytes_t *value) {
    size_t i = lower_bound(&working, key);
    if (!found(&working, i, key)) return false;
    *value = dup(working.e[i].value.ptr, working.e[i].value.len);
    return true;
}

void host_set(slice_t key, slice_t value) {
    if (read_only) {
        fprintf(stderr, "store.set during a query\n");
        exit(1);
    }
    size_t i = lower_bound(&working, key);
    if (found(&working, i, key)) {
        free(working.e[i].value.ptr);
        working.e[i].value = dup(value.ptr, value.len);
        return;
    }
    if (working.n == working.cap) {
        working.cap = working.cap * 2 + 8;
        working.e = realloc(working.e, working.cap * sizeof(entry_t));
    }
    memmove(&working.e[i + 1], &working.e[i], (working.n - i) * sizeof(entry_t));
    working.e[i].key = dup(key.ptr, key.len);
    working.e[i].value = dup(value.ptr, value.len);
    working.n++;
}

void host_remove(slice_t key) {
    if (read_only) {
        fprintf(stderr, "store.remove during a query\n");
        exit(1);
    }
    size_t i = lower_bound(&working, key);
    if (!found(&working, i, key)) return;
    free(working.e[i].key.ptr);
    free(working.e[i].value.ptr);
    memmove(&working.e[i], &working.e[i + 1], (working.n - i - 1) * sizeof(entry_t));
    working.n--;
}

size_t host_scan(slice_t start, slice_t end, uint32_t limit, entry_t **entries) {
    if (limit > REGISTER_PAGE) {
        fprintf(stderr, "scan limit %u\n", limit);
        exit(1);
    }
    *entries = malloc((limit + 1) * sizeof(entry_t));
    size_t n = 0;
    for (size_t i = lower_bound(&working, start); i < working.n && n < limit; i++) {
        entry_t *e = &working.e[i];
        if (end.len && cmp(e->key.ptr, e->key.len, end.ptr, end.len) >= 0) break;
        (*entries)[n].key = dup(e->key.ptr, e->key.len);
        (*entries)[n].value = dup(e->value.ptr, e->value.len);
        n++;
    }
    return n;
}

void host_free_entries(entry_t *entries, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(entries[i].key.ptr);
        free(entries[i].value.ptr);
    }
    free(entries);
}

void host_emit(slice_t key, slice_t event) {
    if (n_events == sizeof events / sizeof events[0]) {
        fprintf(stderr, "too many events in one call\n");
        exit(1);
    }
    events[n_events].key = dup(key.ptr, key.len);
    events[n_events].value = dup(event.ptr, event.len);
    n_events++;
}

/* ---- Transcript. ---- */

static bytes_t unescape(const char *s) {
    size_t n = strlen(s), len = 0;
    uint8_t *out = malloc(n + 1);
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\' && i + 1 < n) {
            char c = s[++i];
            if (c == 's') out[len++] = ' ';
            else if (c == 'n') out[len++] = '\n';
            else if (c == '\\') out[len++] = '\\';
            else if (c == 'x' && i + 2 < n + 1) {
                char hex[3] = {s[i + 1], s[i + 2], 0};
                out[len++] = (uint8_t)strtoul(hex, NULL, 16);
                i += 2;
            } else {
                fprintf(stderr, "bad escape \\%c\n", c);
                exit(1);
            }
        } else {
            out[len++] = (uint8_t)s[i];
        }
    }
    bytes_t b = {out, len};
    return b;
}

static bool same(bytes_t a, bytes_t b) {
    return a.len == b.len && (a.len == 0 || memcmp(a.ptr, b.ptr, a.len) == 0);
}

static void show(const char *label, bytes_t b) {
    fprintf(stderr, "  %s: \"", label);
    for (size_t i = 0; i < b.len; i++) {
        uint8_t c = b.ptr[i];
        if (c >= 0x20 && c < 0x7f && c != '\\') fputc(c, stderr);
        else fprintf(stderr, "\\x%02x", c);
    }
    fprintf(stderr, "\"\n");
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s TRANSCRIPT\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "r");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    static char lines[4096][512];
    size_t n_lines = 0;
    while (n_lines < 4096 && fgets(lines[n_lines], sizeof lines[0], f)) {
        lines[n_lines][strcspn(lines[n_lines], "\n")] = 0;
        n_lines++;
    }
    fclose(f);

    size_t checked = 0, failed = 0;
    for (size_t ln = 0; ln < n_lines; ln++) {
        char *line = lines[ln];
        if (line[0] == 0 || line[0] == '#' || line[0] == ' ') continue;
        char *arg = strchr(line, ' ');
        arg = arg ? arg + 1 : line + strlen(line);
        size_t call_len = strcspn(line, " ");

        working = map_clone(&committed);
        n_events = 0;
        reply_t r;
        if (call_len == 5 && !strncmp(line, "apply", 5)) {
            bytes_t cmd = unescape(arg);
            slice_t s = {cmd.ptr, cmd.len};
            r = register_apply(s);
            free(cmd.ptr);
        } else if (call_len == 5 && !strncmp(line, "query", 5)) {
            bytes_t req = unescape(arg);
            slice_t s = {req.ptr, req.len};
            read_only = true;
            r = register_query(s);
            read_only = false;
            free(req.ptr);
        } else if (call_len == 6 && !strncmp(line, "revoke", 6)) {
            slice_t keys[32];
            bytes_t owned[32];
            size_t n = 0;
            char *copy = strdup(arg);
            for (char *tok = strtok(copy, " "); tok && n < 32; tok = strtok(NULL, " ")) {
                owned[n] = unescape(tok);
                keys[n].ptr = owned[n].ptr;
                keys[n].len = owned[n].len;
                n++;
            }
            register_lease_revoked(keys, n);
            for (size_t i = 0; i < n; i++) free(owned[i].ptr);
            free(copy);
            r.ok = true;
            r.bytes.ptr = malloc(1);
            r.bytes.len = 0;
        } else {
            fprintf(stderr, "line %zu: unknown call: %s\n", ln + 1, line);
            return 2;
        }

        /* The expectations: the indented lines below. */
        bool want_ok = false, have_result = false;
        bytes_t want = {0, 0};
        size_t ev = 0;
        bool bad = false;
        size_t k = ln + 1;
        for (; k < n_lines && !strncmp(lines[k], "  ", 2); k++) {
            char *exp = lines[k] + 2;
            char *rest = strchr(exp, ' ');
            rest = rest ? rest + 1 : exp + strlen(exp);
            if (!strncmp(exp, "ok", 2) && (exp[2] == ' ' || exp[2] == 0)) {
                want_ok = true;
                have_result = true;
                want = unescape(rest);
            } else if (!strncmp(exp, "err", 3) && (exp[3] == ' ' || exp[3] == 0)) {
                want_ok = false;
                have_result = true;
                want = unescape(rest);
            } else if (!strncmp(exp, "event ", 6)) {
                char *eqs = strchr(rest, '=');
                *eqs = 0;
                bytes_t key = unescape(rest), value = unescape(eqs + 1);
                *eqs = '=';
                if (!r.ok || ev >= n_events || !same(key, events[ev].key) || !same(value, events[ev].value)) {
                    fprintf(stderr, "line %zu: %s: event %zu differs\n", ln + 1, line, ev);
                    bad = true;
                }
                ev++;
                free(key.ptr);
                free(value.ptr);
            }
        }
        if (!have_result) {
            fprintf(stderr, "line %zu: no expected result\n", ln + 1);
            return 2;
        }
        if (r.ok != want_ok || !same(r.bytes, want)) {
            fprintf(stderr, "line %zu: %s\n", ln + 1, line);
            show(want_ok ? "want ok" : "want err", want);
            show(r.ok ? "got ok" : "got err", r.bytes);
            bad = true;
        }
        if (r.ok && ev != n_events) {
            fprintf(stderr, "line %zu: %s: %zu events, want %zu\n", ln + 1, line, n_events, ev);
            bad = true;
        }
        free(want.ptr);
        free(r.bytes.ptr);
        for (size_t i = 0; i < n_events; i++) {
            free(events[i].key.ptr);
            free(events[i].value.ptr);
        }
        if (r.ok) {
            map_free(&committed);
            committed = working;
        } else {
            map_free(&working);
        }
        failed += bad;
        checked++;
        ln = k - 1;
    }
    map_free(&committed);

    /* Paging: more keys than one scan page. */
    working = map_clone(&committed);
    for (int i = 0; i < 250; i++) {
        char cmd[64];
        snprintf(cmd, sizeof cmd, "set k%03d v%d", i, i);
        slice_t s = {(const uint8_t *)cmd, strlen(cmd)};
        reply_t r = register_apply(s);
        free(r.bytes.ptr);
        for (size_t k = 0; k < n_events; k++) {
            free(events[k].key.ptr);
            free(events[k].value.ptr);
        }
        n_events = 0;
    }
    slice_t count = {(const uint8_t *)"count", 5};
    reply_t r = register_query(count);
    if (!r.ok || r.bytes.len != 3 || memcmp(r.bytes.ptr, "250", 3)) {
        fprintf(stderr, "paging: count is wrong\n");
        failed++;
    }
    free(r.bytes.ptr);
    slice_t list = {(const uint8_t *)"list k", 6};
    r = register_query(list);
    size_t lines_out = r.ok && r.bytes.len ? 1 : 0;
    for (size_t i = 0; i < r.bytes.len; i++) lines_out += r.bytes.ptr[i] == '\n';
    if (lines_out != 250 || memcmp(r.bytes.ptr, "k000=v0\n", 8)) {
        fprintf(stderr, "paging: list is wrong (%zu lines)\n", lines_out);
        failed++;
    }
    free(r.bytes.ptr);
    map_free(&working);

    bytes_t msg = register_leader_change_message(true, 7);
    if (strcmp((char *)msg.ptr, "register: leader change: is-leader=true term=7")) {
        fprintf(stderr, "leader change message: %s\n", msg.ptr);
        failed++;
    }
    free(msg.ptr);

    if (failed) {
        fprintf(stderr, "register-c: %zu of %zu transcript checks failed\n", failed, checked);
        return 1;
    }
    printf("register-c: transcript ok (%zu calls)\n", checked);
    return 0;
}
