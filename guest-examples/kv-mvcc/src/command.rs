//! The host <-> kv-mvcc command encoding: one tag byte, then a protobuf
//! etcd request. The `ok` bytes are the protobuf of the matching response,
//! `header.revision` set; cluster_id, member_id and raft_term are left 0 for
//! the host to fill.
//!
//! | tag | request              | response             | apply | query |
//! |-----|----------------------|----------------------|-------|-------|
//! | 1   | `RangeRequest`       | `RangeResponse`      | yes   | yes   |
//! | 2   | `PutRequest`         | `PutResponse`        | yes   | no    |
//! | 3   | `DeleteRangeRequest` | `DeleteRangeResponse`| yes   | no    |
//! | 4   | `TxnRequest`         | `TxnResponse`        | yes   | read-only txns |
//! | 5   | `CompactionRequest`  | `CompactionResponse` | yes   | no    |
//! | 6   | `HashKVRequest`      | `HashKVResponse`     | no    | yes   |
//! | 7   | `StatusRequest`      | `StatusResponse` (only header.revision) | no | yes |
//! | 8   | `WatchCreateRequest` | `WatchResponse` (watch history: header.revision, events or compact_revision) | no | yes |
//! | 9   | compaction step: empty, or a 4-byte big-endian count of work units | one byte: 1 if compaction work remains, 0 if not | yes | no |
//! | 10  | compaction pending: empty | one byte: 1 if compaction work remains, 0 if not | no | yes |
//!
//! A `CompactionRequest` makes the compaction visible at once; the host then
//! applies compaction steps (tag 9, each its own log entry) until one answers
//! 0. See [`mvcc::compact_step`]. A new leader asks with tag 10 whether steps
//! its predecessor began are left.

use prost::Message;

use crate::error::{Error, Result};
use crate::host::{Events, Leases, Store};
use crate::mvcc;
use crate::pb::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, HashKvRequest, PutRequest, RangeRequest, StatusRequest,
    TxnRequest, WatchCreateRequest,
};

pub const TAG_RANGE: u8 = 1;
pub const TAG_PUT: u8 = 2;
pub const TAG_DELETE_RANGE: u8 = 3;
pub const TAG_TXN: u8 = 4;
pub const TAG_COMPACTION: u8 = 5;
pub const TAG_HASH_KV: u8 = 6;
pub const TAG_STATUS: u8 = 7;
pub const TAG_WATCH_HISTORY: u8 = 8;
pub const TAG_COMPACT_STEP: u8 = 9;
pub const TAG_COMPACT_PENDING: u8 = 10;

/// `tag` followed by `msg`'s protobuf encoding.
pub fn encode(tag: u8, msg: &impl Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + msg.encoded_len());
    out.push(tag);
    msg.encode(&mut out).expect("Vec grows");
    out
}

fn split(command: &[u8]) -> Result<(u8, &[u8])> {
    match command.split_first() {
        Some((&tag, body)) => Ok((tag, body)),
        None => Err(Error::BadCommand("empty command".into())),
    }
}

fn decode<M: Message + Default>(name: &str, body: &[u8]) -> Result<M> {
    M::decode(body).map_err(|e| Error::BadCommand(format!("malformed {name}: {e}")))
}

/// The body of a compaction step (tag 9) of `units` work units.
pub fn compact_step_body(units: u32) -> [u8; 4] {
    units.to_be_bytes()
}

fn compact_step_units(body: &[u8]) -> Result<u32> {
    match body.len() {
        0 => Ok(mvcc::COMPACT_STEP_UNITS),
        4 => Ok(u32::from_be_bytes(body.try_into().expect("4 bytes"))),
        n => Err(Error::BadCommand(format!(
            "malformed compaction step: {n} bytes, want 0 or 4"
        ))),
    }
}

/// `apply`: tags 1-5 and 9.
pub fn apply<S, L, E>(s: &mut S, leases: &mut L, events: &mut E, command: &[u8]) -> Result<Vec<u8>>
where
    S: Store + ?Sized,
    L: Leases + ?Sized,
    E: Events + ?Sized,
{
    let (tag, body) = split(command)?;
    Ok(match tag {
        TAG_RANGE => {
            mvcc::range_request(s, &decode::<RangeRequest>("RangeRequest", body)?)?.encode_to_vec()
        }
        TAG_PUT => mvcc::put_request(
            s,
            leases,
            events,
            &decode::<PutRequest>("PutRequest", body)?,
        )?
        .encode_to_vec(),
        TAG_DELETE_RANGE => {
            let d = decode::<DeleteRangeRequest>("DeleteRangeRequest", body)?;
            mvcc::delete_range_request(s, leases, events, &d)?.encode_to_vec()
        }
        TAG_TXN => mvcc::txn_request(
            s,
            leases,
            events,
            &decode::<TxnRequest>("TxnRequest", body)?,
        )?
        .encode_to_vec(),
        TAG_COMPACTION => {
            mvcc::compact_request(s, &decode::<CompactionRequest>("CompactionRequest", body)?)?
                .encode_to_vec()
        }
        TAG_COMPACT_STEP => {
            let more = mvcc::compact_step(s, compact_step_units(body)?)?;
            vec![u8::from(more)]
        }
        other => {
            return Err(Error::BadCommand(format!(
                "kv-mvcc cannot apply command tag {other}"
            )))
        }
    })
}

/// `query`: tags 1, 4 (a txn that only reads), 6, 7, 8 and 10; the store is
/// read-only.
pub fn query<S: Store + ?Sized>(s: &S, request: &[u8]) -> Result<Vec<u8>> {
    let (tag, body) = split(request)?;
    Ok(match tag {
        TAG_RANGE => {
            mvcc::range_request(s, &decode::<RangeRequest>("RangeRequest", body)?)?.encode_to_vec()
        }
        TAG_TXN => mvcc::read_only_txn_request(s, &decode::<TxnRequest>("TxnRequest", body)?)?
            .encode_to_vec(),
        TAG_HASH_KV => mvcc::hash_kv_request(s, &decode::<HashKvRequest>("HashKVRequest", body)?)?
            .encode_to_vec(),
        TAG_STATUS => {
            decode::<StatusRequest>("StatusRequest", body)?;
            mvcc::status_request(s)?.encode_to_vec()
        }
        TAG_WATCH_HISTORY => {
            let w = decode::<WatchCreateRequest>("WatchCreateRequest", body)?;
            mvcc::watch_history(s, &w)?.encode_to_vec()
        }
        TAG_COMPACT_PENDING if body.is_empty() => vec![u8::from(mvcc::compaction_pending(s)?)],
        TAG_COMPACT_PENDING => {
            return Err(Error::BadCommand(
                "malformed compaction-pending query: want an empty body".into(),
            ))
        }
        other => {
            return Err(Error::BadCommand(format!(
                "kv-mvcc cannot answer query tag {other}"
            )))
        }
    })
}

/// `on-lease-revoked`.
pub fn lease_revoked<S, L, E>(
    s: &mut S,
    leases: &mut L,
    events: &mut E,
    lease: i64,
    keys: &[Vec<u8>],
) -> Result<()>
where
    S: Store + ?Sized,
    L: Leases + ?Sized,
    E: Events + ?Sized,
{
    mvcc::lease_revoked(s, leases, events, lease, keys).map(|_| ())
}
