#!/usr/bin/env bash
# Install what is missing, build every guest from source, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prereqs.sh test
source scripts/env.sh
bash scripts/build-guests.sh
# The server embeds the kv machine (so running needs no Wasm toolchain); it must be the
# one built from this source.
if ! cmp -s "$RAFTVM_GUESTS/kv-mvcc.wasm" host/assets/kv-mvcc.wasm; then
  echo "host/assets/kv-mvcc.wasm is stale: cp \"$RAFTVM_GUESTS/kv-mvcc.wasm\" host/assets/" >&2
  exit 1
fi
cargo build -p raftvm --bins
export RAFTVM_BIN=$CARGO_TARGET_DIR/debug/raftvm
# Guest crates carry their own native unit/property tests.
for g in guest-examples/*/; do
  if [ -f "$g/Cargo.toml" ] && grep -q '^\[dev-dependencies\]' "$g/Cargo.toml"; then
    (cd "$g" && CARGO_TARGET_DIR=$HOME/.cache/raftvm/guest-native cargo test --quiet)
  fi
done
cargo test --workspace --no-fail-fast
