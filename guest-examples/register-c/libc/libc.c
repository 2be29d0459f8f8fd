/* The little libc a wasm32-unknown-unknown C guest needs (there is no
 * wasi-libc, and a raftvm guest may not import WASI anyway).
 *
 * Allocator: power-of-two size classes, one free list per class, carved from
 * the top of linear memory (`__heap_base` onwards) and grown with memory.grow.
 * Every block has an 8-byte header holding its class, so payloads are 8-byte
 * aligned (the most the canonical ABI asks of cabi_realloc for this world).
 * Freed blocks are reused, never returned; memory.grow failing (the host's
 * memory cap) makes malloc return NULL, and the callers abort (a trap).
 *
 * Compile with -fno-builtin so the loops below are not "optimised" into calls
 * to themselves. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HEADER 8u
#define MIN_CLASS 4u  /* 16-byte blocks */
#define MAX_CLASS 31u /* 2 GiB blocks */
#define PAGE 65536u

extern unsigned char __heap_base;

static uintptr_t heap_next;           /* first byte not yet carved */
static void *free_lists[MAX_CLASS + 1];

static unsigned class_for(size_t size) {
    unsigned k = MIN_CLASS;
    while (k <= MAX_CLASS && ((size_t)1 << k) - HEADER < size) k++;
    return k;
}

static void *carve(size_t block) {
    if (heap_next == 0) heap_next = ((uintptr_t)&__heap_base + 7u) & ~(uintptr_t)7u;
    uintptr_t start = heap_next;
    uintptr_t end = start + block;
    if (end < start) return NULL;
    uintptr_t have = (uintptr_t)__builtin_wasm_memory_size(0) * PAGE;
    if (end > have) {
        uintptr_t need = end - have;
        size_t pages = (need + PAGE - 1) / PAGE;
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) return NULL;
    }
    heap_next = end;
    return (void *)start;
}

void *malloc(size_t size) {
    if (size == 0) size = 1;
    unsigned k = class_for(size);
    if (k > MAX_CLASS) return NULL;
    unsigned char *block = free_lists[k];
    if (block) {
        free_lists[k] = *(void **)(block + HEADER);
    } else {
        block = carve((size_t)1 << k);
        if (!block) return NULL;
    }
    *(uint32_t *)block = k;
    return block + HEADER;
}

void free(void *ptr) {
    if (!ptr) return;
    unsigned char *block = (unsigned char *)ptr - HEADER;
    unsigned k = *(uint32_t *)block;
    *(void **)ptr = free_lists[k];
    free_lists[k] = block;
}

void *calloc(size_t count, size_t size) {
    if (size && count > (size_t)-1 / size) return NULL;
    void *p = malloc(count * size);
    if (p) memset(p, 0, count * size);
    return p;
}

void *realloc(void *ptr, size_t size) {
    if (!ptr) return malloc(size);
    unsigned k = *(uint32_t *)((unsigned char *)ptr - HEADER);
    size_t capacity = ((size_t)1 << k) - HEADER;
    if (size <= capacity) return ptr;
    void *fresh = malloc(size);
    if (!fresh) return NULL;
    memcpy(fresh, ptr, capacity);
    free(ptr);
    return fresh;
}

_Noreturn void abort(void) {
    __builtin_trap();
}

void *memcpy(void *restrict dst, const void *restrict src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--) *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d < s) {
        while (n--) *d++ = *s++;
    } else if (d > s) {
        d += n;
        s += n;
        while (n--) *--d = *--s;
    }
    return dst;
}

void *memset(void *dst, int c, size_t n) {
    unsigned char *d = dst;
    while (n--) *d++ = (unsigned char)c;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n) {
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++) {
        if (*x != *y) return *x < *y ? -1 : 1;
    }
    return 0;
}

size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}
