"""register-py (app.py): the register machine of guest-examples/register-rust, in Python.

Built into a component by scripts/build-guests.sh with componentize-py and
`--stub-wasi`, so the component imports only raftvm's world: a guest that reaches
for a clock, a file or stdout traps, on every replica alike (and `random` repeats
the sequence of a seed fixed at build time). Every command must give the same bytes
as the Rust, C and JavaScript guests (docs/guest-abi.md, "Example: the register
protocol"; tests/it/neutrality.rs runs them side by side, and check.py replays
register-rust's transcript under CPython).
"""

import re

import wit_world
from componentize_py_types import Err
from wit_world.imports import events, log, store
from wit_world.imports.types import Level

# Entries fetched per `store.scan` call (as the Rust guest).
PAGE = 100
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
NUMBER = re.compile(r"[+-]?[0-9]+")


def refuse(message: str):
    """A WIT `result` error: componentize-py turns a raised `Err` into `err`."""
    raise Err(message)


def utf8(b: bytes) -> str:
    # Python's strict decoder refuses what Rust's `str::from_utf8` refuses: overlong
    # forms, surrogates, anything above U+10FFFF, truncated sequences.
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        refuse("invalid UTF-8")


def tokens(b: bytes) -> list:
    """Splits a command on single spaces (so `a  b` has an empty middle token)."""
    return utf8(b).split(" ")


def args(t: list, n: int, usage: str) -> list:
    """The `n` arguments after the verb, all non-empty, or `usage: ...`."""
    a = t[1:]
    if len(a) != n or any(x == "" for x in a):
        refuse(f"usage: {usage}")
    return a


def parse_i64(text: str):
    """Decimal i64 as Rust's `str::parse` reads it: an optional `+` or `-`, then one or
    more ASCII digits, in range. (`int()` alone would also take `_`, spaces and other
    scripts' digits.)"""
    if NUMBER.fullmatch(text) is None:
        return None
    v = int(text)
    return v if I64_MIN <= v <= I64_MAX else None


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with `prefix`, or empty
    (unbounded) if there is none."""
    end = bytearray(prefix)
    while end:
        last = end.pop()
        if last < 0xFF:
            end.append(last + 1)
            return bytes(end)
    return b""


def scan_prefix(prefix: bytes):
    """Every (key, value) whose key starts with `prefix`, in key order, `PAGE` per scan."""
    end = prefix_end(prefix)
    start = prefix
    while True:
        page = store.scan(start, end, False, PAGE)
        for key, value in page:
            if key.startswith(prefix):
                yield key, value
        if len(page) < PAGE:
            return
        # Next page: strictly after the last key.
        start = page[-1][0] + b"\x00"


def get_key(t: list) -> bytes:
    (key,) = args(t, 1, "get KEY")
    v = store.get(key.encode())
    if v is None:
        refuse(f"not found: {key}")
    return v


def put(key: str, value: bytes):
    store.set(key.encode(), value)
    events.emit(key.encode(), value)


def incr(t: list) -> bytes:
    key, n = args(t, 2, "incr KEY N")
    by = parse_i64(n)
    if by is None:
        refuse(f"invalid number: {n}")
    stored = store.get(key.encode())
    current = 0
    if stored is not None:
        try:
            current = parse_i64(stored.decode("utf-8"))
        except UnicodeDecodeError:
            current = None
        if current is None:
            refuse(f"not a number: {key}")
    total = current + by
    if not I64_MIN <= total <= I64_MAX:
        refuse("overflow")
    out = str(total).encode()
    put(key, out)
    return out


def delete(t: list) -> bytes:
    (key,) = args(t, 1, "del KEY")
    if store.get(key.encode()) is None:
        return b"0"
    store.remove(key.encode())
    events.emit(key.encode(), b"")
    return b"1"


def cas(t: list) -> bytes:
    key, old, new = args(t, 3, "cas KEY OLD NEW")
    current = store.get(key.encode())
    matches = current is None if old == "-" else current == old.encode()
    if not matches:
        refuse(f"compare failed: {key}")
    put(key, new.encode())
    return b"OK"


class WitWorld(wit_world.WitWorld):
    def apply(self, ctx, command: bytes) -> bytes:
        t = tokens(command)
        verb = t[0]
        if verb == "set":
            key, value = args(t, 2, "set KEY VALUE")
            put(key, value.encode())
            return b"OK"
        if verb == "incr":
            return incr(t)
        if verb == "del":
            return delete(t)
        if verb == "cas":
            return cas(t)
        if verb == "get":
            return get_key(t)
        refuse(f"unknown command: {verb}")

    def query(self, request: bytes) -> bytes:
        t = tokens(request)
        verb = t[0]
        if verb == "get":
            return get_key(t)
        if verb == "list":
            prefix = "" if len(t) == 1 else args(t, 1, "list [PREFIX]")[0]
            return b"\n".join(k + b"=" + v for k, v in scan_prefix(prefix.encode()))
        if verb == "count":
            args(t, 0, "count")
            return str(sum(1 for _ in scan_prefix(b""))).encode()
        refuse(f"unknown query: {verb}")

    def on_lease_revoked(self, ctx, lease: int, keys: list) -> None:
        for key in keys:
            if store.get(key) is not None:
                store.remove(key)
                events.emit(key, b"")

    def on_leader_change(self, is_leader: bool, term: int) -> None:
        log.log(Level.INFO, f"register: leader change: is-leader={str(is_leader).lower()} term={term}")
