/* A freestanding stdlib.h for wasm32-unknown-unknown guests: just what the
 * guest and wit-bindgen's generated C use. Implemented in ../libc.c. */
#ifndef RAFTVM_STDLIB_H
#define RAFTVM_STDLIB_H
#include <stddef.h>

void *malloc(size_t size);
void *calloc(size_t count, size_t size);
void *realloc(void *ptr, size_t size);
void free(void *ptr);
_Noreturn void abort(void);

#endif
