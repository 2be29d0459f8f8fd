//! Helpers shared by the integration tests: typed wrappers around the tagged
//! command encoding of an in-memory node.
#![allow(dead_code)]

use kv_mvcc::command::{self, encode};
use kv_mvcc::host::MemNode;
use kv_mvcc::pb::etcdserverpb::*;
use kv_mvcc::pb::mvccpb::{Event, KeyValue};
use prost::Message;

pub fn apply<M: Message + Default>(
    n: &mut MemNode,
    tag: u8,
    req: &impl Message,
) -> Result<M, String> {
    n.apply(&encode(tag, req))
        .map(|b| M::decode(b.as_slice()).expect("response decodes"))
}

pub fn query<M: Message + Default>(n: &MemNode, tag: u8, req: &impl Message) -> Result<M, String> {
    n.query(&encode(tag, req))
        .map(|b| M::decode(b.as_slice()).expect("response decodes"))
}

pub fn range(n: &mut MemNode, r: RangeRequest) -> Result<RangeResponse, String> {
    let via_apply: Result<RangeResponse, String> = apply(n, command::TAG_RANGE, &r);
    // A query must answer exactly as apply does.
    let via_query: Result<RangeResponse, String> = query(n, command::TAG_RANGE, &r);
    assert_eq!(via_apply, via_query, "apply and query disagree on {r:?}");
    via_apply
}

pub fn get(n: &mut MemNode, key: &str) -> RangeResponse {
    range(
        n,
        RangeRequest {
            key: key.into(),
            ..Default::default()
        },
    )
    .unwrap()
}

pub fn put_req(n: &mut MemNode, p: PutRequest) -> Result<PutResponse, String> {
    apply(n, command::TAG_PUT, &p)
}

pub fn put(n: &mut MemNode, key: &str, value: &str) -> PutResponse {
    put_req(
        n,
        PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        },
    )
    .unwrap()
}

pub fn del_req(n: &mut MemNode, d: DeleteRangeRequest) -> Result<DeleteRangeResponse, String> {
    apply(n, command::TAG_DELETE_RANGE, &d)
}

pub fn del(n: &mut MemNode, key: &str) -> DeleteRangeResponse {
    del_req(
        n,
        DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        },
    )
    .unwrap()
}

pub fn txn(n: &mut MemNode, t: TxnRequest) -> Result<TxnResponse, String> {
    apply(n, command::TAG_TXN, &t)
}

/// A Compact as the host runs it: the request, then compaction steps of the
/// default size until none is left.
pub fn compact(n: &mut MemNode, revision: i64) -> Result<CompactionResponse, String> {
    let r = compact_only(n, revision)?;
    compact_steps(n, None);
    Ok(r)
}

/// The Compact request alone: the physical work stays pending.
pub fn compact_only(n: &mut MemNode, revision: i64) -> Result<CompactionResponse, String> {
    apply(
        n,
        command::TAG_COMPACTION,
        &CompactionRequest {
            revision,
            physical: false,
        },
    )
}

/// One compaction step of `units` (the default if `None`): whether work remains.
pub fn compact_step(n: &mut MemNode, units: Option<u32>) -> bool {
    let mut cmd = vec![command::TAG_COMPACT_STEP];
    if let Some(u) = units {
        cmd.extend_from_slice(&command::compact_step_body(u));
    }
    match n.apply(&cmd).expect("a compaction step applies").as_slice() {
        [0] => false,
        [1] => true,
        other => panic!("compaction step answered {other:?}"),
    }
}

/// Compaction steps until none is left; how many ran (the last reports none).
/// Of two steps in a row, even of one unit, one passes an `r/` record or
/// removes a record, so there are at most four per record.
pub fn compact_steps(n: &mut MemNode, units: Option<u32>) -> usize {
    let bound = 4 * n.store.map.len() + 2;
    let mut steps = 1;
    while compact_step(n, units) {
        steps += 1;
        assert!(steps <= bound, "compaction steps of {units:?} units make no progress");
    }
    steps
}

pub fn hash_kv(n: &MemNode, revision: i64) -> Result<HashKvResponse, String> {
    query(n, command::TAG_HASH_KV, &HashKvRequest { revision })
}

pub fn status_rev(n: &MemNode) -> i64 {
    let s: StatusResponse = query(n, command::TAG_STATUS, &StatusRequest {}).unwrap();
    s.header.unwrap().revision
}

pub fn rev_of(h: &Option<ResponseHeader>) -> i64 {
    h.as_ref().expect("header present").revision
}

pub fn events(n: &MemNode) -> Vec<(Vec<u8>, Event)> {
    n.events
        .events
        .iter()
        .map(|(k, e)| (k.clone(), Event::decode(e.as_slice()).unwrap()))
        .collect()
}

pub fn op_put(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })),
    }
}

pub fn op_del(key: &str, range_end: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.into(),
                range_end: range_end.into(),
                ..Default::default()
            },
        )),
    }
}

pub fn op_get(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

pub fn op_txn(t: TxnRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestTxn(t)),
    }
}

pub fn cmp(key: &str, result: compare::CompareResult, target: compare::TargetUnion) -> Compare {
    let t = match &target {
        compare::TargetUnion::Version(_) => compare::CompareTarget::Version,
        compare::TargetUnion::CreateRevision(_) => compare::CompareTarget::Create,
        compare::TargetUnion::ModRevision(_) => compare::CompareTarget::Mod,
        compare::TargetUnion::Value(_) => compare::CompareTarget::Value,
        compare::TargetUnion::Lease(_) => compare::CompareTarget::Lease,
    };
    Compare {
        result: result as i32,
        target: t as i32,
        key: key.into(),
        target_union: Some(target),
        range_end: Vec::new(),
    }
}

pub fn keys(r: &RangeResponse) -> Vec<String> {
    r.kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect()
}

pub fn kv(key: &str, value: &str, create: i64, modr: i64, version: i64, lease: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
        create_revision: create,
        mod_revision: modr,
        version,
        lease,
    }
}

/// Whether `k` is in etcd's range `key`/`end` (empty `end`: only `key`; `"\0"`: every
/// key from `key` on).
pub fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    match end {
        [] => k == key,
        [0] => k >= key,
        e => key <= k && k < e,
    }
}
