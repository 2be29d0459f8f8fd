# Sourced by the scripts (from the repository root): shared build settings.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/raftvm/target}
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
# RocksDB: a static library scripts/rocksdb.sh builds once per machine from the sources of
# the librocksdb-sys version Cargo.lock pins. The directory names that version, whether the
# CPU takes the SSE4.2/PCLMUL/AVX2/BMI/LZCNT build, and the build script's own hash, so a
# change to any of them builds a new library instead of reusing a stale one.
rocksdb_sys=$(sed -n '/^name = "librocksdb-sys"$/{n;s/^version = "\(.*\)"$/\1/p}' Cargo.lock)
RAFTVM_ROCKSDB_SSE=
if [ "$(uname -m)" = x86_64 ] &&
  [ "$(grep -m1 '^flags' /proc/cpuinfo | grep -ow -e sse4_2 -e pclmulqdq -e avx2 -e bmi1 -e abm | sort -u | wc -l)" = 5 ]; then
  RAFTVM_ROCKSDB_SSE=1
fi
export RAFTVM_ROCKSDB_SSE
export RAFTVM_ROCKSDB=$HOME/.cache/raftvm/rocksdb/librocksdb-sys-$rocksdb_sys-${RAFTVM_ROCKSDB_SSE:+sse-}$(sha256sum scripts/rocksdb.sh | cut -c1-12)
export ROCKSDB_LIB_DIR=$RAFTVM_ROCKSDB/lib ROCKSDB_STATIC=1
# Debian's libsnappy (RocksDB's default compression), linked as a shared library.
export SNAPPY_LIB_DIR=${SNAPPY_LIB_DIR:-/usr/lib/$multiarch}
export RAFTVM_GUESTS=${RAFTVM_GUESTS:-$CARGO_TARGET_DIR/guests}
