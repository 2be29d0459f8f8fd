/* A freestanding assert.h: a failed assertion traps. */
#ifndef RAFTVM_ASSERT_H
#define RAFTVM_ASSERT_H
#ifdef NDEBUG
#define assert(x) ((void)0)
#else
#define assert(x) ((x) ? (void)0 : __builtin_trap())
#endif
#endif
