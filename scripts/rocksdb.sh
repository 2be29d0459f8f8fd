#!/usr/bin/env bash
# Build RocksDB once per machine as a static library, from the sources the `librocksdb-sys`
# crate ships (the version Cargo.lock pins), into $RAFTVM_ROCKSDB (see scripts/env.sh).
#
# Why not Debian's librocksdb-dev: it is compiled without NDEBUG, so every skiplist insert
# and block read runs RocksDB's debug assertions and test sync points, and as a shared
# library its thread-locals cost a __tls_get_addr call each. Why not the crate's own
# bundled build: it compiles RocksDB again for every cargo profile and target dir. This
# build takes ~7 minutes on 2 cores, once; see docs/operations.md, "Why our own RocksDB".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
lib="$RAFTVM_ROCKSDB/lib/librocksdb.a"
link_into_clone() { ln -sfn "$RAFTVM_ROCKSDB" .rocksdb; }
if [ -f "$lib" ]; then
  link_into_clone
  exit 0
fi
mkdir -p "$(dirname "$RAFTVM_ROCKSDB")"
exec 9>"$(dirname "$RAFTVM_ROCKSDB")/.lock"
flock 9
if [ -f "$lib" ]; then # another script built it while this one waited
  link_into_clone
  exit 0
fi
manifest=$(cargo metadata --format-version 1 --locked |
  grep -o '"manifest_path":"[^"]*/librocksdb-sys-[^"/]*/Cargo.toml"' | head -1 | cut -d'"' -f4)
src="$(dirname "$manifest")/rocksdb"
[ -f "$src/Makefile" ] || { echo "rocksdb.sh: no RocksDB sources at $src" >&2; exit 1; }
build="$RAFTVM_ROCKSDB.build"
rm -rf "$build"
cp -r "$src" "$build"
echo "building RocksDB from $src (once per machine, ~7 minutes on 2 cores)" >&2
# Only what raftvm uses: snappy (RocksDB's default compression) and none of the optional
# libraries the build would otherwise pick up from whatever the machine has installed.
export ROCKSDB_DISABLE_GFLAGS=1 ROCKSDB_DISABLE_ZLIB=1 ROCKSDB_DISABLE_BZIP=1 \
  ROCKSDB_DISABLE_LZ4=1 ROCKSDB_DISABLE_ZSTD=1 ROCKSDB_DISABLE_NUMA=1 ROCKSDB_DISABLE_TBB=1 \
  ROCKSDB_DISABLE_JEMALLOC=1 ROCKSDB_DISABLE_TCMALLOC=1 ROCKSDB_DISABLE_MEMKIND=1 \
  ROCKSDB_DISABLE_LIBURING=1 ROCKSDB_DISABLE_BENCHMARK=1 ROCKSDB_DISABLE_BACKTRACE=1
# DEBUG_LEVEL=0: -O2 -DNDEBUG. PORTABLE=1: no -march=native; USE_SSE adds SSE4.2, PCLMUL,
# AVX2, BMI and LZCNT without checking the CPU has them, so env.sh asks only where it does.
# USE_SSE must be in the environment: the Makefile passes only some of its own variables
# on to build_detect_platform, which reads it (a make variable was silently ignored).
USE_SSE=${RAFTVM_ROCKSDB_SSE:-} make -C "$build" -j"$(nproc)" static_lib DEBUG_LEVEL=0 \
  PORTABLE=1 USE_RTTI=1 >"$build.log" 2>&1 ||
  { tail -30 "$build.log" >&2; echo "rocksdb.sh: build failed, log in $build.log" >&2; exit 1; }
if [ -n "${RAFTVM_ROCKSDB_SSE:-}" ] && ! grep -q -- '-DHAVE_SSE42 .*-DHAVE_PCLMUL' "$build/make_config.mk"; then
  echo "rocksdb.sh: USE_SSE was asked for but RocksDB's build did not take it ($build/make_config.mk)" >&2
  exit 1
fi
mkdir -p "$RAFTVM_ROCKSDB/lib"
# Symbols stay (profiles need them); the debug info would make the archive 850 MB.
strip --strip-debug -o "$lib.tmp" "$build/librocksdb.a"
mv "$lib.tmp" "$lib"
rm -rf "$build" "$build.log"
link_into_clone
