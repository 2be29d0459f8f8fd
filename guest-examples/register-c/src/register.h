/* The register machine's logic, independent of the WIT bindings so that it
 * also runs natively (tests/transcript.c). The protocol is specified in
 * docs/guest-abi.md; register-rust implements the same machine and both must
 * reproduce ../register-rust/tests/transcript.txt byte for byte. */
#ifndef REGISTER_H
#define REGISTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Borrowed bytes. */
typedef struct {
    const uint8_t *ptr;
    size_t len;
} slice_t;

/* Owned bytes (malloc'd; free with free()). */
typedef struct {
    uint8_t *ptr;
    size_t len;
} bytes_t;

typedef struct {
    bytes_t key;
    bytes_t value;
} entry_t;

/* Entries fetched per store scan. */
#define REGISTER_PAGE 100u

/* ---- What the machine needs from the host (guest.c: the WIT imports). ---- */

/* Store: true and *value (owned) if `key` exists. */
bool host_get(slice_t key, bytes_t *value);
void host_set(slice_t key, slice_t value);
void host_remove(slice_t key);
/* Ascending entries with start <= key < end (empty end: unbounded), at most
 * `limit`; *entries is owned by the caller, release with host_free_entries. */
size_t host_scan(slice_t start, slice_t end, uint32_t limit, entry_t **entries);
void host_free_entries(entry_t *entries, size_t n);
void host_emit(slice_t key, slice_t event);

/* ---- The machine. ---- */

/* ok: `bytes` is the reply; !ok: `bytes` is the UTF-8 error message. Owned. */
typedef struct {
    bool ok;
    bytes_t bytes;
} reply_t;

reply_t register_apply(slice_t command);
reply_t register_query(slice_t request);
void register_lease_revoked(const slice_t *keys, size_t n);
/* The message on-leader-change logs at info level (owned, NUL-terminated). */
bytes_t register_leader_change_message(bool is_leader, uint64_t term);

#endif
