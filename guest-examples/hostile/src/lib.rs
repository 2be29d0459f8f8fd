//! hostile: a raftvm guest that misbehaves on request, so the host's tests can
//! prove a bad machine cannot take a node down or break determinism. It only
//! builds for wasm32 (scripts/build-guests.sh). Commands (UTF-8, split on
//! single spaces):
//!
//! ```text
//! apply trap                  panics (a trap)
//! apply loop                  spins forever (runs out of fuel)
//! apply bomb                  allocates and touches memory until allocation
//!                             fails (hits the memory cap, then traps)
//! apply write-then-trap KEY   store.set(KEY, "x"), then panics: the write must vanish
//! apply write-then-err KEY    store.set(KEY, "x") and emits an event, then
//!                             returns err("write-then-err"): both must vanish
//! apply set KEY VALUE         stores VALUE, returns OK
//! apply get KEY               the value, or err("not found: KEY")
//! apply nan                   "f32=XXXXXXXX f64=XXXXXXXXXXXXXXXX": the bits of
//!                             arithmetic on NaNs with a payload (canonical NaNs
//!                             are 7fc00000 / 7ff8000000000000)
//! apply calls                 how many apply calls this instance has served
//!                             (a global: hidden state, which the host confines
//!                             to one log entry; see `stash`)
//! apply stash KEY             stores that count under KEY: hidden state written
//!                             to the store. Replicas agree only if every one
//!                             runs the entry on an instance with the same past
//! query get KEY               the value, or err("not found: KEY")
//! query loop | trap | bomb    as for apply
//! query write KEY             store.set during a query (the host must trap it)
//! ```
//!
//! Anything else is `err("unknown command: ...")`.

wit_bindgen::generate!({
    world: "state-machine",
    path: "../../wit",
});

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use raftvm::machine::types::Level;
use raftvm::machine::{events, log, store};

static CALLS: AtomicU64 = AtomicU64::new(0);

struct Hostile;

fn trap(why: &str) -> ! {
    panic!("hostile: {why}")
}

/// Spins until the host stops it; `black_box` keeps the loop from being
/// optimised away or proven side-effect free.
fn spin() -> ! {
    let mut i: u64 = 0;
    loop {
        i = black_box(i.wrapping_add(1));
    }
}

/// Grows the heap 1 MiB at a time, writing to every page, until the
/// allocator cannot get more memory (memory.grow fails at the host's cap, or
/// at 4 GiB) and aborts: a trap.
fn bomb() -> ! {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; 1 << 20];
        for page in chunk.chunks_mut(4096) {
            page[0] = black_box(1);
        }
        chunks.push(black_box(chunk));
    }
}

fn nan_bits() -> String {
    // NaNs with a non-canonical payload. Without NaN canonicalisation the
    // payload leaks through arithmetic differently on different CPUs.
    let f = black_box(f32::from_bits(0x7fc0_0001)) + black_box(1.0f32);
    let d = black_box(f64::from_bits(0x7ff8_0000_0000_0001)) * black_box(2.0f64);
    format!("f32={:08x} f64={:016x}", f.to_bits(), d.to_bits())
}

fn get(key: &str) -> Result<Vec<u8>, String> {
    store::get(key.as_bytes()).ok_or_else(|| format!("not found: {key}"))
}

fn words(bytes: &[u8]) -> Result<Vec<&str>, String> {
    Ok(std::str::from_utf8(bytes)
        .map_err(|_| "invalid UTF-8".to_string())?
        .split(' ')
        .collect())
}

impl Guest for Hostile {
    fn apply(_ctx: ApplyContext, command: Vec<u8>) -> Result<Vec<u8>, String> {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        match words(&command)?.as_slice() {
            ["trap"] => trap("trap requested"),
            ["loop"] => spin(),
            ["bomb"] => bomb(),
            ["write-then-trap", key] => {
                store::set(key.as_bytes(), b"x");
                trap("write-then-trap")
            }
            ["write-then-err", key] => {
                store::set(key.as_bytes(), b"x");
                events::emit(key.as_bytes(), b"x");
                Err("write-then-err".into())
            }
            ["set", key, value] => {
                store::set(key.as_bytes(), value.as_bytes());
                Ok(b"OK".to_vec())
            }
            ["get", key] => get(key),
            ["nan"] => Ok(nan_bits().into_bytes()),
            ["calls"] => Ok(calls.to_string().into_bytes()),
            ["stash", key] => {
                store::set(key.as_bytes(), calls.to_string().as_bytes());
                Ok(calls.to_string().into_bytes())
            }
            [verb, ..] => Err(format!("unknown command: {verb}")),
            [] => unreachable!(),
        }
    }

    fn query(request: Vec<u8>) -> Result<Vec<u8>, String> {
        match words(&request)?.as_slice() {
            ["get", key] => get(key),
            ["loop"] => spin(),
            ["trap"] => trap("trap requested"),
            ["bomb"] => bomb(),
            ["write", key] => {
                store::set(key.as_bytes(), b"x");
                Ok(b"the host let a query write".to_vec())
            }
            [verb, ..] => Err(format!("unknown query: {verb}")),
            [] => unreachable!(),
        }
    }

    fn on_lease_revoked(_ctx: ApplyContext, _lease: i64, keys: Vec<Vec<u8>>) -> Result<(), String> {
        for key in keys {
            store::remove(&key);
        }
        Ok(())
    }

    fn on_leader_change(is_leader: bool, term: u64) {
        log::log(
            Level::Warn,
            &format!("hostile: leader change: is-leader={is_leader} term={term}"),
        );
    }
}

export!(Hostile);
