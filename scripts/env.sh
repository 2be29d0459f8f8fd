# Sourced by the scripts: shared build settings.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/raftvm/target}
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
# Link Debian's RocksDB instead of compiling it (see docs/operations.md).
export ROCKSDB_LIB_DIR=${ROCKSDB_LIB_DIR:-/usr/lib/$multiarch}
export SNAPPY_LIB_DIR=${SNAPPY_LIB_DIR:-/usr/lib/$multiarch}
export RAFTVM_GUESTS=${RAFTVM_GUESTS:-$CARGO_TARGET_DIR/guests}
