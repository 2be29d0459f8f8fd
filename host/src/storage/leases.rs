//! The replicated lease table, in the host-reserved part of the `data` column family
//! (keys from 0x01, which no machine prefix can reach).
//!
//! - `0x01 "lease" 0x00 ++ id` → [`LeaseRecord`]: the lease is granted and not revoked.
//! - `0x01 "attach" 0x00 ++ machine ++ 0x00 ++ id ++ key` → empty: `machine` attached `key`
//!   (a key of its own store, without the machine prefix) to lease `id`.
//!
//! `id` is 8 big-endian bytes with the sign bit flipped, so ids sort numerically. Living in
//! `data`, the table moves with the rest of the state: it is written through the same
//! overlays (an attachment made by a command that fails is discarded with the command's
//! other writes), committed in the same batch, covered by the store hash and carried by
//! snapshots.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{prefix_end, read_through, scan_through, Committed, Overlay, StateDb};
use crate::types::{decode, encode};

const LEASE_PREFIX: &[u8] = b"\x01lease\x00";
const ATTACH_PREFIX: &[u8] = b"\x01attach\x00";
/// Rows fetched per scan while paging through a range.
const PAGE: usize = 1000;

/// A granted lease, as replicated. Deadlines are not replicated: only the leader keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Granted TTL in seconds (after the minimum TTL was applied).
    pub ttl: i64,
}

fn id_bytes(id: i64) -> [u8; 8] {
    ((id as u64) ^ (1 << 63)).to_be_bytes()
}

fn id_from(b: &[u8]) -> Option<i64> {
    let b: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
}

/// The table key of lease `id`.
pub fn lease_key(id: i64) -> Vec<u8> {
    [LEASE_PREFIX, &id_bytes(id)].concat()
}

/// The first key of `machine`'s attachments (all leases).
pub fn machine_attach_prefix(machine: &str) -> Vec<u8> {
    [ATTACH_PREFIX, machine.as_bytes(), b"\x00"].concat()
}

/// The first key of `machine`'s attachments to lease `id`.
fn attach_prefix(machine: &str, id: i64) -> Vec<u8> {
    [machine_attach_prefix(machine).as_slice(), &id_bytes(id)].concat()
}

/// The row saying `machine` attached `key` to lease `id`.
pub fn attach_key(machine: &str, id: i64, key: &[u8]) -> Vec<u8> {
    [attach_prefix(machine, id).as_slice(), key].concat()
}

pub fn encode_lease(rec: &LeaseRecord) -> Vec<u8> {
    encode(rec)
}

/// Lease `id` as seen through `layers` (topmost last) over the committed state.
pub fn get_lease(db: &(impl Committed + ?Sized), layers: &[&Overlay], id: i64) -> Result<Option<LeaseRecord>> {
    match read_through(db, layers, &lease_key(id))? {
        Some(v) => Ok(Some(decode(&v).context("decoding lease record")?)),
        None => Ok(None),
    }
}

/// Every committed lease, in id order.
pub fn list_leases(db: &StateDb) -> Result<Vec<(i64, LeaseRecord)>> {
    let end = prefix_end(LEASE_PREFIX);
    let mut start = LEASE_PREFIX.to_vec();
    let mut out = Vec::new();
    loop {
        let rows = db.scan_data(&start, &end, false, PAGE)?;
        let full = rows.len() == PAGE;
        for (k, v) in rows {
            let id = id_from(&k[LEASE_PREFIX.len()..]).context("malformed lease key")?;
            out.push((id, decode(&v).context("decoding lease record")?));
            start = [k.as_slice(), b"\x00"].concat();
        }
        if !full {
            return Ok(out);
        }
    }
}

/// The keys `machine` attached to lease `id`, in key order, through `layers`.
pub fn attached_keys(
    db: &StateDb,
    layers: &[&Overlay],
    machine: &str,
    id: i64,
) -> Result<Vec<Vec<u8>>> {
    let prefix = attach_prefix(machine, id);
    let end = prefix_end(&prefix);
    let mut start = prefix.clone();
    let mut out = Vec::new();
    loop {
        let rows = scan_through(db, layers, &start, &end, false, PAGE)?;
        let full = rows.len() == PAGE;
        for (k, _) in rows {
            start = [k.as_slice(), b"\x00"].concat();
            out.push(k[prefix.len()..].to_vec());
        }
        if !full {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::PendingBatch;

    fn grant(o: &mut Overlay, id: i64, ttl: i64) {
        o.map
            .insert(lease_key(id), Some(encode_lease(&LeaseRecord { ttl })));
    }

    #[test]
    fn ids_sort_numerically_and_roundtrip() {
        let ids = [i64::MIN, -5, -1, 1, 7, 0x390da20af2570205, i64::MAX];
        let keys: Vec<Vec<u8>> = ids.iter().map(|&i| lease_key(i)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for &i in &ids {
            assert_eq!(id_from(&id_bytes(i)), Some(i));
        }
        // Host keys stay out of every machine's range (names start with [a-z0-9]).
        assert!(lease_key(1)[0] == 1 && attach_key("kv", 1, b"k")[0] == 1);
    }

    #[test]
    fn table_reads_through_overlays() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let mut committed = PendingBatch::default();
        grant(&mut committed.data, 2, 60);
        grant(&mut committed.data, -3, 5);
        for k in [&b"a"[..], b"b", b"c"] {
            committed
                .data
                .map
                .insert(attach_key("kv", 2, k), Some(Vec::new()));
        }
        committed
            .data
            .map
            .insert(attach_key("kv", 3, b"other-lease"), Some(Vec::new()));
        committed
            .data
            .map
            .insert(attach_key("kv2", 2, b"other-machine"), Some(Vec::new()));
        db.commit(committed).unwrap();

        assert_eq!(
            list_leases(&db).unwrap(),
            vec![(-3, LeaseRecord { ttl: 5 }), (2, LeaseRecord { ttl: 60 })]
        );
        assert_eq!(
            get_lease(&db, &[], 2).unwrap(),
            Some(LeaseRecord { ttl: 60 })
        );
        assert_eq!(get_lease(&db, &[], 9).unwrap(), None);

        // A batch revokes lease 2 and a command attaches/detaches keys on top.
        let mut batch = Overlay::default();
        batch.map.insert(lease_key(-3), None);
        let mut cmd = Overlay::default();
        cmd.map.insert(attach_key("kv", 2, b"b"), None);
        cmd.map.insert(attach_key("kv", 2, b"d"), Some(Vec::new()));
        assert_eq!(get_lease(&db, &[&batch], -3).unwrap(), None);
        let keys = attached_keys(&db, &[&batch, &cmd], "kv", 2).unwrap();
        assert_eq!(keys, vec![b"a".to_vec(), b"c".to_vec(), b"d".to_vec()]);
        assert_eq!(attached_keys(&db, &[], "kv", 2).unwrap().len(), 3);
        assert_eq!(
            attached_keys(&db, &[], "kv2", 2).unwrap(),
            vec![b"other-machine".to_vec()]
        );
        assert!(attached_keys(&db, &[], "kv", 4).unwrap().is_empty());
    }

    #[test]
    fn paging_covers_large_tables() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let mut b = PendingBatch::default();
        for i in 0..(2 * PAGE as i64 + 7) {
            grant(&mut b.data, i + 1, 10);
            b.data.map.insert(
                attach_key("kv", 1, format!("k{i:05}").as_bytes()),
                Some(Vec::new()),
            );
        }
        db.commit(b).unwrap();
        assert_eq!(list_leases(&db).unwrap().len(), 2 * PAGE + 7);
        assert_eq!(
            attached_keys(&db, &[], "kv", 1).unwrap().len(),
            2 * PAGE + 7
        );
    }
}
