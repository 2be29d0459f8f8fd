// register-js: the register machine of guest-examples/register-rust, in JavaScript.
// Built into a component by scripts/build-guests.sh with componentize-js, every WASI
// feature disabled, so the component imports only raftvm's world. Every command must
// give the same bytes as the Rust and C guests (docs/guest-abi.md, "Example: the
// register protocol"; tests/it/neutrality.rs runs them side by side).

import { get, set, remove, scan } from 'raftvm:machine/store@0.1.0';
import { emit } from 'raftvm:machine/events@0.1.0';
import { log } from 'raftvm:machine/log@0.1.0';

// Entries fetched per `store.scan` call (as the Rust guest).
const PAGE = 100;
const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;

const encoder = new TextEncoder();
const bytes = (s) => encoder.encode(s);

// A WIT `result` error: componentize-js turns a thrown value with a `payload` into `err`.
class Refused extends Error {
  constructor(message) {
    super(message);
    this.payload = message;
  }
}
const refuse = (message) => {
  throw new Refused(message);
};

// UTF-8 as Rust's `str::from_utf8` accepts it: no overlong forms, no surrogates,
// nothing above U+10FFFF. Returns the decoded string, or refuses.
function utf8(b) {
  let out = '';
  for (let i = 0; i < b.length; ) {
    const c = b[i];
    let n, cp, min;
    if (c < 0x80) {
      n = 0; cp = c; min = 0;
    } else if (c >= 0xc2 && c <= 0xdf) {
      n = 1; cp = c & 0x1f; min = 0x80;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 2; cp = c & 0x0f; min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 3; cp = c & 0x07; min = 0x10000;
    } else {
      refuse('invalid UTF-8');
    }
    for (let k = 1; k <= n; k++) {
      const d = b[i + k];
      if (d === undefined || (d & 0xc0) !== 0x80) refuse('invalid UTF-8');
      cp = (cp << 6) | (d & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) refuse('invalid UTF-8');
    out += String.fromCodePoint(cp);
    i += n + 1;
  }
  return out;
}

// Splits a command on single spaces (so `a  b` has an empty middle token).
const tokens = (b) => utf8(b).split(' ');

// The `n` arguments after the verb, all non-empty, or `usage: ...`.
function args(t, n, usage) {
  const a = t.slice(1);
  if (a.length !== n || a.some((x) => x === '')) refuse(`usage: ${usage}`);
  return a;
}

// Decimal i64 as Rust's `str::parse` reads it: an optional `+` or `-`, then one or
// more ASCII digits, in range.
function parseI64(text) {
  if (!/^[+-]?[0-9]+$/.test(text)) return null;
  const v = BigInt(text);
  return v < I64_MIN || v > I64_MAX ? null : v;
}

function equal(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function startsWith(key, prefix) {
  return key.length >= prefix.length && equal(key.subarray(0, prefix.length), prefix);
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

// The smallest key greater than every key that starts with `prefix`, or empty
// (unbounded) if there is none.
function prefixEnd(prefix) {
  const end = Array.from(prefix);
  while (end.length > 0) {
    const last = end.pop();
    if (last < 0xff) {
      end.push(last + 1);
      return Uint8Array.from(end);
    }
  }
  return new Uint8Array(0);
}

// Visits every entry whose key starts with `prefix`, in key order, `PAGE` per scan.
function scanPrefix(prefix, visit) {
  const end = prefixEnd(prefix);
  let start = prefix;
  for (;;) {
    const page = scan(start, end, false, PAGE);
    for (const [key, value] of page) {
      if (startsWith(key, prefix)) visit(key, value);
    }
    if (page.length < PAGE) return;
    // Next page: strictly after the last key.
    start = concat([page[page.length - 1][0], Uint8Array.of(0)]);
  }
}

function getKey(t) {
  const [key] = args(t, 1, 'get KEY');
  const v = get(bytes(key));
  if (v === undefined) refuse(`not found: ${key}`);
  return v;
}

export function apply(_ctx, command) {
  const t = tokens(command);
  switch (t[0]) {
    case 'set': {
      const [key, value] = args(t, 2, 'set KEY VALUE');
      set(bytes(key), bytes(value));
      emit(bytes(key), bytes(value));
      return bytes('OK');
    }
    case 'incr': {
      const [key, n] = args(t, 2, 'incr KEY N');
      const by = parseI64(n);
      if (by === null) refuse(`invalid number: ${n}`);
      const stored = get(bytes(key));
      let current = 0n;
      if (stored !== undefined) {
        let text = null;
        try {
          text = utf8(stored);
        } catch (_) {
          text = null;
        }
        current = text === null ? null : parseI64(text);
        if (current === null) refuse(`not a number: ${key}`);
      }
      const sum = current + by;
      if (sum < I64_MIN || sum > I64_MAX) refuse('overflow');
      const out = bytes(sum.toString());
      set(bytes(key), out);
      emit(bytes(key), out);
      return out;
    }
    case 'del': {
      const [key] = args(t, 1, 'del KEY');
      if (get(bytes(key)) === undefined) return bytes('0');
      remove(bytes(key));
      emit(bytes(key), new Uint8Array(0));
      return bytes('1');
    }
    case 'cas': {
      const [key, old, now] = args(t, 3, 'cas KEY OLD NEW');
      const current = get(bytes(key));
      const matches = old === '-' ? current === undefined : current !== undefined && equal(current, bytes(old));
      if (!matches) refuse(`compare failed: ${key}`);
      set(bytes(key), bytes(now));
      emit(bytes(key), bytes(now));
      return bytes('OK');
    }
    case 'get':
      return getKey(t);
    default:
      refuse(`unknown command: ${t[0]}`);
  }
}

export function query(request) {
  const t = tokens(request);
  switch (t[0]) {
    case 'get':
      return getKey(t);
    case 'list': {
      const prefix = t.length === 1 ? '' : args(t, 1, 'list [PREFIX]')[0];
      const parts = [];
      scanPrefix(bytes(prefix), (key, value) => {
        if (parts.length > 0) parts.push(bytes('\n'));
        parts.push(key, bytes('='), value);
      });
      return concat(parts);
    }
    case 'count': {
      args(t, 0, 'count');
      let n = 0;
      scanPrefix(new Uint8Array(0), () => {
        n += 1;
      });
      return bytes(String(n));
    }
    default:
      refuse(`unknown query: ${t[0]}`);
  }
}

export function onLeaseRevoked(_ctx, _lease, keys) {
  for (const key of keys) {
    if (get(key) !== undefined) {
      remove(key);
      emit(key, new Uint8Array(0));
    }
  }
}

export function onLeaderChange(isLeader, term) {
  log('info', `register: leader change: is-leader=${isLeader} term=${term}`);
}
