#!/usr/bin/env bash
# Side-by-side benchmark of raftvm against etcd (issue 5): fresh 1- and 3-node clusters of
# both on loopback, identical `raftvm bench` workloads, memory of 1M keys.
#   bash scripts/bench-compare.sh --quick        # smoke test, ~2 minutes
#   bash scripts/bench-compare.sh                # the full comparison (long)
#   bash scripts/bench-compare.sh --help         # every option (scripts/bench_compare.py)
# Installs what is missing (etcd, python3, build deps), builds raftvm (release), then
# runs scripts/bench_compare.py with the arguments given. Results: bench-results/<timestamp>/.
set -euo pipefail
cd "$(dirname "$0")/.."

for a in "$@"; do
  case "$a" in -h|--help) exec python3 scripts/bench_compare.py --help ;; esac
done

missing=()
{ command -v etcd >/dev/null && command -v etcdctl >/dev/null; } || missing+=(etcd-server etcd-client)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
bash scripts/prereqs.sh run   # what building raftvm needs
source scripts/env.sh
cargo build --release -p raftvm
exec python3 scripts/bench_compare.py --raftvm-bin "$CARGO_TARGET_DIR/release/raftvm" "$@"
