#!/usr/bin/env bash
# Build every guest under guest-examples/ from source into a raftvm component:
#
#   ${RAFTVM_GUESTS:-${CARGO_TARGET_DIR:-$HOME/.cache/raftvm/target}/guests}/NAME.wasm
#
# NAME is the guest's directory name (guest-examples/register-rust ->
# register-rust.wasm). A directory with a Cargo.toml is a Rust wit-bindgen
# guest; one with a Makefile (and no Cargo.toml) is a C guest built with
# `make wasm check` (see guest-examples/register-c/README.md); one with a
# package.json is a JavaScript guest built with componentize-js (see
# guest-examples/register-js/README.md); one with a requirements.txt is a Python
# guest (module app.py) built with componentize-py (see
# guest-examples/register-py/README.md).
#
# Installs what it needs if missing (Debian: rustc-web rust-web-src lld-16
# clang-16 make; wit-bindgen-cli into the cache), so it runs unattended from a
# fresh clone (CI: root, no stdin). Incremental: cargo and make skip what is
# up to date. Everything built lives under $HOME/.cache/raftvm, not the repo:
#   guest-wasm/   the guests' shared cargo target dir (RAFTVM_GUEST_TARGET)
#   tools/        wit-bindgen-cli (RAFTVM_TOOLS)
#   guest-wasm/js/NAME/  a JavaScript guest's npm packages (from its lock file)
#   guest-wasm/py/NAME/  a Python guest's build tool (from its requirements.txt)
# See docs/guest-abi.md for the why of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

cache=$HOME/.cache/raftvm
target=${CARGO_TARGET_DIR:-$cache/target}
out=${RAFTVM_GUESTS:-$target/guests}
guest_target=${RAFTVM_GUEST_TARGET:-$cache/guest-wasm}
tools=${RAFTVM_TOOLS:-$cache/tools}
# wit-bindgen 0.60.x is built on wit-component 0.254.x, the version the host
# and tools/componentize use. Keep in sync with the guests' Cargo.toml.
wit_bindgen_version=0.60.0

say() { echo "build-guests: $*" >&2; }

# ---- Prerequisites ----------------------------------------------------------

pkgs=(rustc-web rust-web-src lld-16 clang-16 make)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  say "cargo not found: install Rust with rustup (https://rustup.rs) first"
  exit 1
fi

# Debian's rustc (1.96, ships std sources) builds the wasm32 std itself with
# -Zbuild-std: rustup's wasm32 target is not available here.
pkg_file() { dpkg -L "$1" 2>/dev/null | grep -m1 "$2" || true; }
guest_rustc=$(pkg_file rustc-web 'bin/rustc$')
wasm_ld=$(pkg_file lld-16 'bin/wasm-ld$')
clang=$(pkg_file clang-16 'bin/clang$')
[ -n "$clang" ] || clang=$(command -v clang-16 || true)
for tool in guest_rustc wasm_ld clang; do
  if [ -z "${!tool}" ] || [ ! -x "${!tool}" ]; then
    say "cannot find $tool: are rustc-web, lld-16 and clang-16 installed?"
    exit 1
  fi
done
if [ ! -d "$("$guest_rustc" --print sysroot)/lib/rustlib/src/rust/library" ]; then
  say "$guest_rustc has no std sources (is rust-web-src installed?)"
  exit 1
fi
host_cc=cc
command -v cc >/dev/null || host_cc=$clang

# tools/componentize: core module -> component, and the world check. Built
# with the normal toolchain in the main workspace (shares its target dir).
say "building tools/componentize"
(unset RUSTC RUSTC_BOOTSTRAP; CARGO_TARGET_DIR=$target cargo build --quiet -p componentize)
componentize=$target/debug/componentize

# wit-bindgen-cli (C bindings), only when a C guest needs it.
wit_bindgen=$tools/bin/wit-bindgen
need_wit_bindgen() {
  if ! "$wit_bindgen" --version 2>/dev/null | grep -q " $wit_bindgen_version\b"; then
    say "installing wit-bindgen-cli $wit_bindgen_version into $tools (a few minutes, once)"
    (unset RUSTC RUSTC_BOOTSTRAP; CARGO_TARGET_DIR=$cache/tools-build \
      cargo install --quiet wit-bindgen-cli --version "$wit_bindgen_version" --locked --root "$tools")
  fi
}

mkdir -p "$out"
produced=()

# ---- JavaScript guests (package.json) ---------------------------------------

build_js() { # DIR NAME
  local dir=$1 name=$2 build=$guest_target/js/$2 main
  if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    say "installing nodejs npm"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  mkdir -p "$build"
  # The packages (componentize-js with its SpiderMonkey engine, ~400 MB) go into
  # the cache, installed exactly as the lock file says, again only when it changes.
  if ! cmp -s "$dir/package-lock.json" "$build/package-lock.json" || [ ! -d "$build/node_modules" ]; then
    say "installing $name's npm packages into $build"
    cp "$dir/package.json" "$dir/package-lock.json" "$build/"
    if ! (cd "$build" && npm ci --silent --no-audit --no-fund >&2); then
      rm -f "$build/package-lock.json" # so the next run installs again
      say "$name: npm ci failed"
      return 1
    fi
  fi
  main=$(cd "$dir" && node -p 'require("./package.json").main')
  if [ -f "$dir/check.mjs" ]; then
    # Replays register-rust's transcript against the source under Node (a second),
    # events included, as `make check` does for register-c.
    node "$dir/check.mjs" "$root/guest-examples/register-rust/tests/transcript.txt" >&2
  fi
  if [ -f "$out/$name.wasm" ] && [ -z "$(find "$dir/$main" "$dir/package-lock.json" "$root/wit" -newer "$out/$name.wasm" -print -quit)" ]; then
    say "$name (JavaScript) is up to date"
  else
    say "building $name (JavaScript)"
    # Every WASI feature disabled: the component imports raftvm's world only.
    "$build/node_modules/.bin/componentize-js" "$dir/$main" --wit "$root/wit" --world-name state-machine \
      --disable stdio random clocks http fetch-event -o "$out/$name.wasm" >&2
  fi
  "$componentize" --check "$out/$name.wasm" >/dev/null
  produced+=("$out/$name.wasm")
}

# ---- Python guests (requirements.txt, module app.py) ---------------------------

build_py() { # DIR NAME
  local dir=$1 name=$2 build=$guest_target/py/$2 pip_args
  if ! python3 -m pip --version >/dev/null 2>&1; then
    say "installing python3-pip"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  # componentize-py (CPython for wasm32 inside, ~50 MB) goes into the cache, as
  # requirements.txt pins it, again only when that file changes. --target needs no
  # venv and leaves the system's packages alone.
  if ! cmp -s "$dir/requirements.txt" "$build/requirements.txt"; then
    say "installing $name's build tool into $build"
    rm -rf "$build" && mkdir -p "$build"
    pip_args=(--quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore --target "$build/lib" -r "$dir/requirements.txt")
    if ! python3 -m pip install "${pip_args[@]}" >&2 2>/dev/null && ! python3 -m pip install --break-system-packages "${pip_args[@]}" >&2; then
      say "$name: pip install failed"
      return 1
    fi
    cp "$dir/requirements.txt" "$build/"
  fi
  if [ -f "$dir/check.py" ]; then
    # Replays register-rust's transcript against the source under CPython (a
    # second), events included, as check.mjs does for register-js.
    python3 "$dir/check.py" "$root/guest-examples/register-rust/tests/transcript.txt" >&2
  fi
  if [ -f "$out/$name.wasm" ] && [ -z "$(find "$dir" "$root/wit" -newer "$out/$name.wasm" \( -name '*.py' -o -name '*.wit' -o -name requirements.txt \) -print -quit)" ]; then
    say "$name (Python) is up to date"
  else
    say "building $name (Python)"
    # --stub-wasi: every WASI import becomes a trap inside the component, which then
    # imports raftvm's world only: a clock, a file or print traps; `random` runs
    # from a seed fixed at build time.
    (cd "$dir" && PYTHONPATH="$build/lib" python3 -c 'import sys; from componentize_py import script; sys.argv[0] = "componentize-py"; sys.exit(script())' \
      -d "$root/wit" -w state-machine componentize --stub-wasi -p "$dir" app -o "$out/$name.wasm" >&2)
  fi
  "$componentize" --check "$out/$name.wasm" >/dev/null
  produced+=("$out/$name.wasm")
}

# ---- Rust guests ------------------------------------------------------------

build_rust() { # DIR NAME
  local dir=$1 name=$2 log core
  say "building $name (Rust)"
  log=$(mktemp)
  # Stable cargo driving Debian's rustc; RUSTC_BOOTSTRAP unlocks -Zbuild-std.
  # Host RUSTFLAGS are meant for the host build, not for wasm32 guests.
  if ! (cd "$dir" &&
        env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
          RUSTC_BOOTSTRAP=1 RUSTC="$guest_rustc" \
          CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$wasm_ld" \
          CARGO_TARGET_DIR="$guest_target" \
          cargo build --release --target wasm32-unknown-unknown \
            -Zbuild-std=std,panic_abort \
            --message-format=json-render-diagnostics >"$log"); then
    rm -f "$log"
    say "$name: cargo build failed"
    return 1
  fi
  # The cdylib artifact, e.g. .../wasm32-unknown-unknown/release/register_rust.wasm
  core=$(grep -o '"[^"]*/wasm32-unknown-unknown/release/[^"/]*\.wasm"' "$log" | tr -d '"' | tail -n1)
  rm -f "$log"
  if [ -z "$core" ] || [ ! -f "$core" ]; then
    say "$name: no .wasm artifact (is crate-type cdylib?)"
    return 1
  fi
  "$componentize" "$core" "$out/$name.wasm" >/dev/null
  produced+=("$out/$name.wasm")
}

# ---- C guests (Makefile) ----------------------------------------------------

build_c() { # DIR NAME
  local dir=$1 name=$2 build=$guest_target/c/$2
  need_wit_bindgen
  say "building $name (C)"
  mkdir -p "$build"
  # `check` replays register-rust's transcript natively (a second): the two
  # register machines must not drift apart. stdout is kept for the file list.
  make --no-print-directory -s -C "$dir" wasm check \
    BUILD="$build" WIT_BINDGEN="$wit_bindgen" CLANG="$clang" WASM_LD="$wasm_ld" HOST_CC="$host_cc" >&2
  "$componentize" "$build/guest.wasm" "$out/$name.wasm" >/dev/null
  produced+=("$out/$name.wasm")
}

for dir in guest-examples/*/; do
  dir=${dir%/}
  name=$(basename "$dir")
  if [ -f "$dir/Cargo.toml" ]; then
    build_rust "$root/$dir" "$name"
  elif [ -f "$dir/Makefile" ]; then
    build_c "$root/$dir" "$name"
  elif [ -f "$dir/package.json" ]; then
    build_js "$root/$dir" "$name"
  elif [ -f "$dir/requirements.txt" ]; then
    build_py "$root/$dir" "$name"
  else
    say "skipping $dir (no Cargo.toml, Makefile, package.json or requirements.txt)"
  fi
done

# The register machines must expose the same interface.
for other in register-c register-js register-py; do
  if [ -f "$out/register-rust.wasm" ] && [ -f "$out/$other.wasm" ]; then
    "$componentize" --same-exports "$out/register-rust.wasm" "$out/$other.wasm" >/dev/null
  fi
done

for f in "${produced[@]}"; do
  printf '%s\t%s bytes\n' "$f" "$(wc -c <"$f")"
done
