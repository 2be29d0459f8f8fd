#!/usr/bin/env bash
# Build and run a single-node raftvm on 127.0.0.1:2379 (client) / 2380 (peer).
# Extra arguments go to `raftvm serve` (etcd's flags).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prereqs.sh run
source scripts/env.sh
cargo build --release -p raftvm
exec "$CARGO_TARGET_DIR/release/raftvm" serve "$@"
