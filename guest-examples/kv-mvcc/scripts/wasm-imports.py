#!/usr/bin/env python3
"""List a core wasm module's imports and exports; exit 1 if any import is not
from a `raftvm:machine/...` interface (wit-bindgen names them
`raftvm:machine/<iface>@0.1.0`). Stdlib only.

usage: wasm-imports.py MODULE.wasm
"""
import sys


def leb(buf, i):
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return result, i


def name(buf, i):
    n, i = leb(buf, i)
    return buf[i:i + n].decode(), i + n


def skip_limits(buf, i):
    flags = buf[i]
    i += 1
    _, i = leb(buf, i)
    if flags & 1:
        _, i = leb(buf, i)
    return i


def main(path):
    buf = open(path, "rb").read()
    assert buf[:4] == b"\0asm", "not a wasm module"
    assert buf[4:8] == b"\x01\0\0\0", "not a core module (a component?)"
    i, imports, exports = 8, [], []
    while i < len(buf):
        sid = buf[i]
        size, i = leb(buf, i + 1)
        end = i + size
        if sid == 2:  # import section
            count, j = leb(buf, i)
            for _ in range(count):
                mod, j = name(buf, j)
                field, j = name(buf, j)
                kind = buf[j]
                j += 1
                if kind == 0:
                    _, j = leb(buf, j)
                elif kind == 1:
                    j = skip_limits(buf, j + 1)
                elif kind == 2:
                    j = skip_limits(buf, j)
                elif kind == 3:
                    j += 2
                else:
                    raise SystemExit(f"unknown import kind {kind}")
                imports.append((mod, field, "func table memory global".split()[kind]))
        elif sid == 7:  # export section
            count, j = leb(buf, i)
            for _ in range(count):
                field, j = name(buf, j)
                kind = buf[j]
                _, j = leb(buf, j + 1)
                exports.append((field, kind))
        i = end
    bad = [imp for imp in imports if not imp[0].startswith("raftvm:machine/")]
    for mod, field, kind in imports:
        print(f"import {kind:6} {mod} :: {field}")
    for field, _ in exports:
        print(f"export {field}")
    if bad:
        print(f"FAIL: {len(bad)} import(s) outside raftvm:machine/*", file=sys.stderr)
        return 1
    print(f"OK: {len(imports)} imports, all from raftvm:machine/*")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
