//! Byte layout of kv-mvcc's records in the machine's private store.
//!
//! Four disjoint key families, each with a one-letter prefix and a `/`:
//!
//! | store key                               | value                                   |
//! |-----------------------------------------|-----------------------------------------|
//! | `m/rev`                                 | current main revision, 8 bytes BE (absent = 1) |
//! | `m/compact`                             | compacted revision, 8 bytes BE i64 (absent = -1, never compacted) |
//! | `m/compact-todo`                        | [`CompactTodo`]: physical compaction still to do (absent = none) |
//! | `k/` + user key                         | [`IndexEntry`]: 40 bytes, the key's latest live revision |
//! | `h/` + esc(user key) + main + sub       | `mvccpb.KeyValue` without its key (a put), or the single byte `0x00` (a delete) |
//! | `r/` + main + sub                       | user key (revision-ordered pointer into `h/`) |
//!
//! `main` and `sub` are 8-byte big-endian revisions, so `h/` is ordered by key
//! then revision and `r/` by revision. `esc` makes user keys prefix-free while
//! keeping their order: every `0x00` byte becomes `0x00 0xFF` and the key ends
//! with `0x00 0x01`. Hence for keys `a < b`, every `h/` record of `a` sorts
//! before every `h/` record of `b`, and one key's records are contiguous.
//!
//! * Latest reads: one scan over `k/[key, end)`; the index entry has every
//!   field but the value (enough for `keys_only`, `count_only`, compares other
//!   than VALUE, and `count`). The value is one `get` of `h/…` at the entry's
//!   revision.
//! * Reads at a past revision R: walk the distinct keys of `h/[key, end)`;
//!   for each, a reverse scan of `h/esc(key)` below `(R+1, 0)` with limit 1
//!   gives the key's state at R (a tombstone or nothing means absent).
//! * Compaction at C: `m/compact` becomes C at once (reads below C fail from
//!   then on), and `m/compact-todo` records the physical work. Compaction
//!   steps then walk `r/` (revision order) from the previous compaction on;
//!   for each key it names, they remove every `h/` record at or below C
//!   except the newest one if it is a put, oldest first, and they remove the
//!   `r/` records they pass (below C nothing reads them; at C one stays while
//!   its change does), a bounded number of records per step. Until the work
//!   is done, records at or below C that compaction will remove may still be
//!   there; every reader skips them (see `mvcc::compact_step`).
//! * Watches from a past revision: `r/` lists every change from the compacted
//!   revision on, in revision order.

/// Prefix of the index family (`k/`) and its exclusive end.
pub const INDEX: &[u8] = b"k/";
pub const INDEX_END: &[u8] = b"k0";
/// Prefix of the key-major history family (`h/`) and its exclusive end.
pub const HIST: &[u8] = b"h/";
pub const HIST_END: &[u8] = b"h0";
/// Prefix of the revision-major family (`r/`) and its exclusive end.
pub const REVS: &[u8] = b"r/";
pub const REVS_END: &[u8] = b"r0";
/// Metadata keys.
pub const META_REV: &[u8] = b"m/rev";
pub const META_COMPACT: &[u8] = b"m/compact";
pub const META_COMPACT_TODO: &[u8] = b"m/compact-todo";

/// A revision: `main` is the store revision of a write request, `sub` orders
/// the changes inside it (a txn makes several).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rev {
    pub main: i64,
    pub sub: i64,
}

impl Rev {
    pub fn new(main: i64, sub: i64) -> Self {
        Rev { main, sub }
    }

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(self.main as u64).to_be_bytes());
        b[8..].copy_from_slice(&(self.sub as u64).to_be_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<Rev> {
        if b.len() != 16 {
            return None;
        }
        Some(Rev {
            main: u64::from_be_bytes(b[..8].try_into().ok()?) as i64,
            sub: u64::from_be_bytes(b[8..].try_into().ok()?) as i64,
        })
    }
}

/// The latest live state of a key, without its value: `k/<key>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Revision of the put that produced the current value (`mod_revision`
    /// is `modified.main`); locates the value in `h/`.
    pub modified: Rev,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl IndexEntry {
    pub fn encode(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[..16].copy_from_slice(&self.modified.to_bytes());
        b[16..24].copy_from_slice(&self.create_revision.to_be_bytes());
        b[24..32].copy_from_slice(&self.version.to_be_bytes());
        b[32..40].copy_from_slice(&self.lease.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<IndexEntry> {
        if b.len() != 40 {
            return None;
        }
        let i = |r: std::ops::Range<usize>| i64::from_be_bytes(b[r].try_into().unwrap());
        Some(IndexEntry {
            modified: Rev::from_bytes(&b[..16])?,
            create_revision: i(16..24),
            version: i(24..32),
            lease: i(32..40),
        })
    }
}

/// Physical compaction in progress: `m/compact-todo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactTodo {
    /// Remove history at or below this revision (the latest compaction's).
    pub target: i64,
    /// The `r/` position to go on from: every key with a change in `r/`
    /// below it is compacted to `target` (or is `key`).
    pub next: Rev,
    /// A key whose history a step began to remove but did not finish.
    pub key: Option<Vec<u8>>,
}

impl CompactTodo {
    /// target (8 bytes BE), next (16), then 0x01 + key, or nothing.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(25 + self.key.as_ref().map_or(0, Vec::len));
        b.extend_from_slice(&self.target.to_be_bytes());
        b.extend_from_slice(&self.next.to_bytes());
        if let Some(k) = &self.key {
            b.push(1);
            b.extend_from_slice(k);
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<CompactTodo> {
        if b.len() < 24 {
            return None;
        }
        let key = match b.get(24) {
            None => None,
            Some(1) => Some(b[25..].to_vec()),
            Some(_) => return None,
        };
        Some(CompactTodo {
            target: i64::from_be_bytes(b[..8].try_into().ok()?),
            next: Rev::from_bytes(&b[8..24])?,
            key,
        })
    }
}

/// `k/` + key.
pub fn index_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(INDEX.len() + key.len());
    k.extend_from_slice(INDEX);
    k.extend_from_slice(key);
    k
}

/// `h/` + esc(key): the common prefix of all history records of `key`.
pub fn hist_prefix(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(HIST.len() + key.len() + 2 + 16);
    k.extend_from_slice(HIST);
    for &b in key {
        k.push(b);
        if b == 0 {
            k.push(0xFF);
        }
    }
    k.extend_from_slice(&[0x00, 0x01]);
    k
}

/// `h/` + esc(key) + rev.
pub fn hist_key(key: &[u8], rev: Rev) -> Vec<u8> {
    let mut k = hist_prefix(key);
    k.extend_from_slice(&rev.to_bytes());
    k
}

/// A bound strictly above every history record of `key` and below every
/// record of any greater key.
pub fn hist_after(key: &[u8]) -> Vec<u8> {
    let mut k = hist_prefix(key);
    k.extend_from_slice(&[0xFF; 17]);
    k
}

/// Splits an `h/` store key into (user key, revision).
pub fn parse_hist_key(k: &[u8]) -> Option<(Vec<u8>, Rev)> {
    let body = k.strip_prefix(HIST)?;
    let mut key = Vec::with_capacity(body.len());
    let mut i = 0;
    loop {
        let b = *body.get(i)?;
        if b != 0 {
            key.push(b);
            i += 1;
            continue;
        }
        match *body.get(i + 1)? {
            0xFF => {
                key.push(0);
                i += 2;
            }
            0x01 => {
                let rev = Rev::from_bytes(body.get(i + 2..)?)?;
                return Some((key, rev));
            }
            _ => return None,
        }
    }
}

/// `r/` + rev.
pub fn rev_key(rev: Rev) -> Vec<u8> {
    let mut k = Vec::with_capacity(REVS.len() + 16);
    k.extend_from_slice(REVS);
    k.extend_from_slice(&rev.to_bytes());
    k
}

pub fn parse_rev_key(k: &[u8]) -> Option<Rev> {
    Rev::from_bytes(k.strip_prefix(REVS)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hist_keys_sort_by_key_then_revision() {
        let keys: [&[u8]; 6] = [b"", b"\0", b"\0\0", b"\0\x01", b"a", b"a\0"];
        let revs = [Rev::new(1, 0), Rev::new(1, 5), Rev::new(300, 0)];
        let mut encoded = Vec::new();
        for k in keys {
            for r in revs {
                encoded.push((hist_key(k, r), k.to_vec(), r));
            }
        }
        let mut sorted = encoded.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut expected = encoded.clone();
        expected.sort_by_key(|a| (a.1.clone(), a.2));
        assert_eq!(sorted, expected);
        for (bytes, k, r) in &encoded {
            assert_eq!(parse_hist_key(bytes), Some((k.clone(), *r)));
            assert!(bytes.starts_with(&hist_prefix(k)));
            assert!(bytes.as_slice() < hist_after(k).as_slice());
        }
        // hist_after(k) is below every record of the next key.
        assert!(hist_after(b"a").as_slice() < hist_key(b"a\0", Rev::new(0, 0)).as_slice());
        assert!(hist_after(b"\0").as_slice() < hist_key(b"\0\0", Rev::new(0, 0)).as_slice());
    }

    #[test]
    fn index_entry_round_trips() {
        let e = IndexEntry {
            modified: Rev::new(7, 3),
            create_revision: 2,
            version: 4,
            lease: -9,
        };
        assert_eq!(IndexEntry::decode(&e.encode()), Some(e));
        assert_eq!(IndexEntry::decode(&[0; 39]), None);
        for key in [None, Some(Vec::new()), Some(b"k\0".to_vec())] {
            let t = CompactTodo {
                target: 12,
                next: Rev::new(7, 2),
                key,
            };
            assert_eq!(CompactTodo::decode(&t.encode()), Some(t));
        }
        assert_eq!(CompactTodo::decode(&[0; 23]), None);
        assert_eq!(CompactTodo::decode(&[[0; 24].as_slice(), &[2]].concat()), None);
        assert_eq!(
            parse_rev_key(&rev_key(Rev::new(9, 1))),
            Some(Rev::new(9, 1))
        );
    }
}
