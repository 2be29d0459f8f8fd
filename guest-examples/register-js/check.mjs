// Replays register-rust's transcript (replies, errors, events, lease revocation) against
// register.js under Node, with an in-memory, transactional host: the JavaScript twin of
// register-rust's `transcript` test and register-c's `make check`. build-guests.sh runs it
// before it builds the component.
//
//   node check.mjs ../register-rust/tests/transcript.txt
//
// register.js imports raftvm's world ('raftvm:machine/store@0.1.0', ...), which Node
// cannot resolve: a copy of it with those imports pointed at this file's host runs instead.

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const transcript = process.argv[2];
if (!transcript) {
  console.error('usage: node check.mjs TRANSCRIPT');
  process.exit(2);
}

// ---- the host: committed store, pending writes and events of the current call ----------

const hex = (b) => Buffer.from(b).toString('hex');
const fromHex = (h) => new Uint8Array(Buffer.from(h, 'hex'));
const compare = (a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b));

const host = {
  committed: new Map(), // hex key -> Uint8Array
  pending: new Map(), // hex key -> Uint8Array | null (a removal)
  events: [],
  view() {
    const v = new Map(this.committed);
    for (const [k, val] of this.pending) {
      if (val === null) v.delete(k);
      else v.set(k, val);
    }
    return v;
  },
  commit() {
    this.committed = this.view();
    this.pending.clear();
    const events = this.events;
    this.events = [];
    return events;
  },
  rollback() {
    this.pending.clear();
    this.events = [];
  },
};

const hostModule = `
const h = globalThis.__registerHost;
export const get = (k) => h.get(k);
export const set = (k, v) => h.set(k, v);
export const remove = (k) => h.remove(k);
export const scan = (s, e, r, l) => h.scan(s, e, r, l);
export const emit = (k, e) => h.emit(k, e);
export const log = (level, message) => h.log(level, message);
`;

globalThis.__registerHost = {
  get(key) {
    const k = hex(key);
    if (host.pending.has(k)) return host.pending.get(k) ?? undefined;
    return host.committed.get(k);
  },
  set(key, value) {
    host.pending.set(hex(key), Uint8Array.from(value));
  },
  remove(key) {
    host.pending.set(hex(key), null);
  },
  scan(start, end, reverse, limit) {
    if (reverse) throw new Error('register-js scans forward only');
    if (limit > 100) throw new Error(`scan limit ${limit} above the guest's page of 100`);
    return [...host.view().entries()]
      .map(([k, v]) => [fromHex(k), v])
      .filter(([k]) => compare(k, start) >= 0 && (end.length === 0 || compare(k, end) < 0))
      .sort(([a], [b]) => compare(a, b))
      .slice(0, limit);
  },
  emit(key, event) {
    host.events.push([Uint8Array.from(key), Uint8Array.from(event)]);
  },
  log() {},
};

// ---- register.js with its imports pointed at the host above ---------------------------

const dir = mkdtempSync(join(tmpdir(), 'register-js-check-'));
let guest;
try {
  writeFileSync(join(dir, 'host.mjs'), hostModule);
  const source = readFileSync(join(here, 'register.js'), 'utf8').replace(
    /'raftvm:machine\/(store|events|log)@0\.1\.0'/g,
    "'./host.mjs'",
  );
  writeFileSync(join(dir, 'register.mjs'), source);
  guest = await import(pathToFileURL(join(dir, 'register.mjs')).href);
} finally {
  rmSync(dir, { recursive: true, force: true });
}

// ---- the transcript -------------------------------------------------------------------

function unescape(s) {
  const out = [];
  const b = Buffer.from(s, 'utf8');
  for (let i = 0; i < b.length; ) {
    if (b[i] === 0x5c && i + 1 < b.length) {
      const c = String.fromCharCode(b[i + 1]);
      if (c === 's') out.push(0x20);
      else if (c === 'n') out.push(0x0a);
      else if (c === '\\') out.push(0x5c);
      else if (c === 'x') {
        out.push(parseInt(b.subarray(i + 2, i + 4).toString('latin1'), 16));
        i += 2;
      } else throw new Error(`bad escape \\${c}`);
      i += 2;
    } else {
      out.push(b[i]);
      i += 1;
    }
  }
  return Uint8Array.from(out);
}

const splitWord = (line) => {
  const at = line.indexOf(' ');
  return at < 0 ? [line, ''] : [line.slice(0, at), line.slice(at + 1)];
};
const show = (b) => Buffer.from(b).toString('utf8');
const describe = (o) =>
  o.ok
    ? `ok ${JSON.stringify(show(o.bytes))} events ${JSON.stringify(o.events.map(([k, v]) => [show(k), show(v)]))}`
    : `err ${JSON.stringify(o.message)}`;

function run(call, arg) {
  try {
    let bytes;
    if (call === 'apply') bytes = guest.apply({ index: 1n, term: 1n, timestampMs: 0n }, unescape(arg));
    else if (call === 'query') {
      bytes = guest.query(unescape(arg));
      if (host.pending.size > 0 || host.events.length > 0) throw new Error('a query wrote');
    } else if (call === 'revoke') {
      const keys = arg.split(' ').filter((k) => k !== '').map(unescape);
      guest.onLeaseRevoked({ index: 1n, term: 1n, timestampMs: 0n }, 7n, keys);
      bytes = new Uint8Array(0);
    } else throw new Error(`unknown call ${call}`);
    return { ok: true, bytes, events: host.commit() };
  } catch (e) {
    if (e === null || typeof e !== 'object' || typeof e.payload !== 'string') throw e;
    host.rollback();
    return { ok: false, message: e.payload };
  }
}

const lines = readFileSync(transcript, 'utf8').split('\n');
let checked = 0;
let failed = 0;
for (let n = 0; n < lines.length; n++) {
  const line = lines[n];
  if (line.trim() === '' || line.startsWith('#')) continue;
  const at = n + 1;
  const [call, arg] = splitWord(line);
  const got = run(call, arg);
  const events = [];
  let expected = null;
  while (n + 1 < lines.length && lines[n + 1].startsWith('  ')) {
    const [kind, rest] = splitWord(lines[n + 1].slice(2));
    if (kind === 'ok') expected = { ok: true, bytes: unescape(rest) };
    else if (kind === 'err') expected = { ok: false, message: show(unescape(rest)) };
    else if (kind === 'event') {
      const eq = rest.indexOf('=');
      events.push([unescape(rest.slice(0, eq)), unescape(rest.slice(eq + 1))]);
    } else throw new Error(`line ${n + 2}: unknown expectation ${kind}`);
    n += 1;
  }
  if (expected === null) throw new Error(`line ${at}: no expected result`);
  if (expected.ok) expected.events = events;
  if (describe(got) !== describe(expected)) {
    console.error(`line ${at}: ${line}\n  got:      ${describe(got)}\n  expected: ${describe(expected)}`);
    failed += 1;
  }
  checked += 1;
}
if (failed > 0 || checked < 50) {
  console.error(`register-js: ${failed} of ${checked} transcript calls differ`);
  process.exit(1);
}
console.log(`register-js: transcript ok (${checked} calls)`);
