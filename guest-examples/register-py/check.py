"""Replays register-rust's transcript (replies, errors, events, lease revocation) against
app.py under CPython, with an in-memory, transactional host: the Python twin of
register-rust's `transcript` test, register-c's `make check` and register-js's check.mjs.
build-guests.sh runs it before it builds the component.

    python3 check.py ../register-rust/tests/transcript.txt

app.py imports the modules componentize-py generates from raftvm's world (`wit_world`,
`componentize_py_types`); stand-ins for them, backed by the host below, are put in
`sys.modules` first.
"""

import enum
import importlib
import sys
import types
from pathlib import Path


class Err(Exception):
    """componentize-py's `Err`: raised by a guest to return a WIT `result` error."""

    def __init__(self, value):
        super().__init__(value)
        self.value = value


class Host:
    """Committed store, and the pending writes and events of the current call."""

    def __init__(self):
        self.committed = {}
        self.pending = {}  # key -> bytes, or None for a removal
        self.events = []

    def view(self):
        v = dict(self.committed)
        for k, val in self.pending.items():
            if val is None:
                v.pop(k, None)
            else:
                v[k] = val
        return v

    def commit(self):
        self.committed = self.view()
        self.pending.clear()
        events, self.events = self.events, []
        return events

    def rollback(self):
        self.pending.clear()
        self.events = []

    # raftvm:machine/store
    def get(self, key):
        if key in self.pending:
            return self.pending[key]
        return self.committed.get(key)

    def set(self, key, value):
        self.pending[bytes(key)] = bytes(value)

    def remove(self, key):
        self.pending[bytes(key)] = None

    def scan(self, start, end, reverse, limit):
        if reverse:
            raise AssertionError("register-py scans forward only")
        if limit > 100:
            raise AssertionError(f"scan limit {limit} above the guest's page of 100")
        keys = sorted(k for k in self.view() if k >= start and (end == b"" or k < end))
        view = self.view()
        return [(k, view[k]) for k in keys[:limit]]

    # raftvm:machine/events
    def emit(self, key, event):
        self.events.append((bytes(key), bytes(event)))


host = Host()


def module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


class Level(enum.Enum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4


module("componentize_py_types", Err=Err)
world = module("wit_world", WitWorld=object)
imports = module("wit_world.imports")
world.imports = imports
imports.store = module("wit_world.imports.store", get=host.get, set=host.set, remove=host.remove, scan=host.scan)
imports.events = module("wit_world.imports.events", emit=host.emit)
imports.log = module("wit_world.imports.log", log=lambda level, message: None)
imports.types = module("wit_world.imports.types", Level=Level)

# No __pycache__ beside the sources.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
guest = importlib.import_module("app").WitWorld()


def unescape(s):
    out = bytearray()
    b = s.encode()
    i = 0
    while i < len(b):
        if b[i] == 0x5C and i + 1 < len(b):
            c = chr(b[i + 1])
            if c == "s":
                out.append(0x20)
            elif c == "n":
                out.append(0x0A)
            elif c == "\\":
                out.append(0x5C)
            elif c == "x":
                out.append(int(b[i + 2 : i + 4], 16))
                i += 2
            else:
                raise ValueError(f"bad escape \\{c}")
            i += 2
        else:
            out.append(b[i])
            i += 1
    return bytes(out)


def run(call, arg):
    ctx = types.SimpleNamespace(index=1, term=1, timestamp_ms=0)
    try:
        if call == "apply":
            out = guest.apply(ctx, unescape(arg))
        elif call == "query":
            out = guest.query(unescape(arg))
            if host.pending or host.events:
                raise AssertionError("a query wrote")
        elif call == "revoke":
            guest.on_lease_revoked(ctx, 7, [unescape(k) for k in arg.split(" ") if k])
            out = b""
        else:
            raise ValueError(f"unknown call {call}")
        if not isinstance(out, bytes):
            raise AssertionError(f"{call} {arg!r} returned {out!r}, not bytes")
        return ("ok", out, host.commit())
    except Err as e:
        host.rollback()
        return ("err", e.value)


def main(transcript):
    lines = Path(transcript).read_text().split("\n")
    checked = failed = 0
    n = 0
    while n < len(lines):
        line = lines[n]
        if line.strip() == "" or line.startswith("#"):
            n += 1
            continue
        at = n + 1
        call, _, arg = line.partition(" ")
        got = run(call, arg)
        expected, events = None, []
        while n + 1 < len(lines) and lines[n + 1].startswith("  "):
            kind, _, rest = lines[n + 1][2:].partition(" ")
            if kind == "ok":
                expected = ["ok", unescape(rest)]
            elif kind == "err":
                expected = ["err", unescape(rest).decode()]
            elif kind == "event":
                key, _, value = rest.partition("=")
                events.append((unescape(key), unescape(value)))
            else:
                raise ValueError(f"line {n + 2}: unknown expectation {kind}")
            n += 1
        n += 1
        if expected is None:
            raise ValueError(f"line {at}: no expected result")
        if expected[0] == "ok":
            expected.append(events)
        if got != tuple(expected):
            print(f"line {at}: {line}\n  got:      {got!r}\n  expected: {tuple(expected)!r}", file=sys.stderr)
            failed += 1
        checked += 1
    if failed or checked < 50:
        print(f"register-py: {failed} of {checked} transcript calls differ", file=sys.stderr)
        return 1
    print(f"register-py: transcript ok ({checked} calls)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python3 check.py TRANSCRIPT", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
