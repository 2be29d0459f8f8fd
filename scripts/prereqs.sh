#!/usr/bin/env bash
# Install the Debian packages raftvm needs, then build RocksDB if this machine has not yet.
# Usage: scripts/prereqs.sh run|test
#   run : what building and running the server needs (libclang for bindgen; a C++ compiler,
#         make and snappy for RocksDB, see scripts/rocksdb.sh).
#   test: also the Wasm guest toolchain and a real etcd for differential tests.
set -euo pipefail
mode=${1:-run}
pkgs=(clang libclang-dev g++ make libsnappy-dev pkg-config)
if [ "$mode" = test ]; then
  # protobuf-compiler: the etcd-client crate (used by tests) compiles its protos with protoc;
  # libprotobuf-dev has the well-known types they import (google/protobuf/descriptor.proto),
  # which protoc only recommends, and recommends are not installed here.
  pkgs+=(rustc-web rust-web-src lld-16 clang-16 etcd-server etcd-client protobuf-compiler libprotobuf-dev python3-pip)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "$mode" = test ] && ! PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python python3 -c 'import etcd3, pytest' 2>/dev/null; then
  echo "installing Python packages: etcd3 pytest" >&2
  pip_args=(--quiet --disable-pip-version-check etcd3==0.12.0 pytest)
  # Debian's own python3 refuses pip installs unless told to.
  python3 -m pip install "${pip_args[@]}" 2>/dev/null || python3 -m pip install --break-system-packages "${pip_args[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
bash "$(dirname "$0")/rocksdb.sh"
