//! Property test of the built-in kv-mvcc *component* through the host runtime (no Raft).
//!
//! Random sequences of Put / DeleteRange / Txn / Compact (and its steps) / Range / HashKV (and a few
//! malformed commands) run three ways, and every answer must agree:
//!
//! * (a) the compiled component `raftvm::server::DEFAULT_KV_MODULE` in the host
//!   [`Runtime`], over a temporary RocksDB [`StateDb`], applied in batches of 1..=5
//!   commands (each batch one [`PendingBatch`] committed with [`StateDb::commit`], so the
//!   command overlay, the batch overlay and the committed store are all read through);
//! * (b) the native kv-mvcc library over its in-memory `MemNode`;
//! * (c) a deliberately naive model of etcd v3.4's MVCC store that keeps a full copy of
//!   the key space for every revision (a compact re-implementation of the one in
//!   `guest-examples/kv-mvcc/tests/model.rs`, with no live leases: nothing here grants
//!   one, so `leases.is-live` is false for every id).
//!
//! Checked, per command: (a) and (b) return the same bytes (response or error message),
//! the decoded response equals the model's in every field, the emitted watch events are
//! byte-identical between (a) and (b) and equal the model's; a command the guest rejects
//! leaves the batch overlay and the committed state (`StateDb::hashes`) unchanged, and a
//! read leaves the overlay unchanged. Range runs through both `apply` (tag 1, sees the
//! uncommitted batch) and `query` (tag 1, sees only committed state, so it is checked
//! against (b) and (c) as of the last commit). Per commit: the committed machine store
//! equals (b)'s `MemStore` record for record, `hashes().machines["kv"]` equals the same
//! hash computed over (b)'s store, and `Status` reports the model's revision. At the end
//! every revision is read back through both paths.
//!
//! 256 cases by default; `PROPTEST_CASES=N` for more.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kv_mvcc::command::{self, encode};
use kv_mvcc::error::*;
use kv_mvcc::host::{MemNode, MemStore};
use kv_mvcc::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kv_mvcc::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use kv_mvcc::pb::etcdserverpb::request_op::Request;
use kv_mvcc::pb::etcdserverpb::response_op::Response;
use kv_mvcc::pb::etcdserverpb::*;
use kv_mvcc::pb::mvccpb::{event::EventType, Event, KeyValue};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use prost::Message;
use raftvm::runtime::{ApplyContext, Runtime, DEFAULT_FUEL, DEFAULT_MEMORY_BYTES};
use raftvm::server::DEFAULT_KV_MODULE;
use raftvm::storage::{machine_prefix, prefix_end, ModuleRecord, PendingBatch, StateDb, StateHashes};
use raftvm::types::ApplyErrorKind;
use sha2::{Digest, Sha256};

const MACHINE: &str = "kv";

type Map = BTreeMap<Vec<u8>, KeyValue>;
type Res<T> = Result<T, String>;

// ============================================================================ the model

/// `states[r]` is the whole key space at revision `r` (`states[0]` unused, `states[1]`
/// the empty store). No lease is live.
#[derive(Debug, Clone)]
struct Model {
    states: Vec<Map>,
    compacted: i64,
}

fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    match end {
        [] => k == key,
        [0] => k >= key,
        e => key <= k && k < e,
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision, ..Default::default() })
}

/// One write request being applied to the model.
struct Work<'a> {
    m: &'a Model,
    work: Map,
    changed: bool,
    events: Vec<(Vec<u8>, Event)>,
}

/// What a finished request leaves: its revision, the new state if it changed anything,
/// and its events.
type Done = (i64, Option<Map>, Vec<(Vec<u8>, Event)>);

impl<'a> Work<'a> {
    fn new(m: &'a Model) -> Self {
        Work { m, work: m.latest().clone(), changed: false, events: Vec::new() }
    }

    fn cur(&self) -> i64 {
        self.m.cur() + i64::from(self.changed)
    }

    fn state(&self, rev: i64) -> &Map {
        if rev == self.cur() {
            &self.work
        } else {
            &self.m.states[rev as usize]
        }
    }

    fn range(&self, r: &RangeRequest) -> Res<RangeResponse> {
        let cur = self.cur();
        let mut rev = r.revision;
        if rev > cur {
            return Err(FUTURE_REV.into());
        }
        if rev <= 0 {
            rev = cur;
        }
        if rev < self.m.compacted {
            return Err(COMPACTED.into());
        }
        let all: Vec<KeyValue> =
            self.state(rev).values().filter(|kv| in_range(&kv.key, &r.key, &r.range_end)).cloned().collect();
        let count = all.len() as i64;
        let sorting_or_filtering = r.sort_order != 0
            || r.min_mod_revision != 0
            || r.max_mod_revision != 0
            || r.min_create_revision != 0
            || r.max_create_revision != 0;
        let mut kvs = if r.count_only {
            vec![]
        } else if r.limit > 0 && !sorting_or_filtering && r.limit < i64::MAX {
            // etcd fetches limit+1 keys in key order, then sorts/filters those.
            all.into_iter().take(r.limit as usize + 1).collect()
        } else {
            all
        };
        kvs.retain(|kv| r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision);
        kvs.retain(|kv| r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision);
        kvs.retain(|kv| r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision);
        kvs.retain(|kv| r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision);
        let order = if r.sort_order == 0 && r.sort_target != 0 { SortOrder::Ascend as i32 } else { r.sort_order };
        if order == SortOrder::Ascend as i32 || order == SortOrder::Descend as i32 {
            let key = |kv: &KeyValue| -> (i64, Vec<u8>) {
                match SortTarget::try_from(r.sort_target).unwrap() {
                    SortTarget::Key => (0, kv.key.clone()),
                    SortTarget::Version => (kv.version, vec![]),
                    SortTarget::Create => (kv.create_revision, vec![]),
                    SortTarget::Mod => (kv.mod_revision, vec![]),
                    SortTarget::Value => (0, kv.value.clone()),
                }
            };
            if order == SortOrder::Ascend as i32 {
                kvs.sort_by_key(key);
            } else {
                kvs.sort_by_key(|kv| std::cmp::Reverse(key(kv)));
            }
        }
        let more = r.limit > 0 && kvs.len() as i64 > r.limit;
        if more {
            kvs.truncate(r.limit as usize);
        }
        if r.keys_only {
            kvs.iter_mut().for_each(|kv| kv.value.clear());
        }
        Ok(RangeResponse { header: header(cur), kvs, more, count })
    }

    fn put_kv(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> i64 {
        let rev = self.m.cur() + 1;
        let prev = self.work.get(key).cloned();
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value,
            lease,
        };
        self.events.push((key.to_vec(), Event { r#type: EventType::Put as i32, kv: Some(kv.clone()), prev_kv: None }));
        self.work.insert(key.to_vec(), kv);
        self.changed = true;
        rev
    }

    fn put(&mut self, p: &PutRequest, top_level: bool) -> Res<PutResponse> {
        if top_level && p.lease != 0 {
            return Err(LEASE_NOT_FOUND.into()); // no lease is live
        }
        let prev = self.work.get(&p.key).cloned();
        if (p.ignore_value || p.ignore_lease) && prev.is_none() {
            return Err(KEY_NOT_FOUND.into());
        }
        let value = if p.ignore_value { prev.as_ref().unwrap().value.clone() } else { p.value.clone() };
        let lease = if p.ignore_lease { prev.as_ref().unwrap().lease } else { p.lease };
        let rev = self.put_kv(&p.key, value, lease);
        Ok(PutResponse { header: header(rev), prev_kv: if p.prev_kv { prev } else { None } })
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let rev = self.m.cur() + 1;
        let keys: Vec<Vec<u8>> = self.work.keys().filter(|k| in_range(k, &d.key, &d.range_end)).cloned().collect();
        let mut gone = Vec::new();
        for k in keys {
            let prev = self.work.remove(&k).expect("live key");
            let kv = KeyValue { key: k.clone(), mod_revision: rev, ..Default::default() };
            self.events
                .push((k, Event { r#type: EventType::Delete as i32, kv: Some(kv), prev_kv: None }));
            self.changed = true;
            gone.push(prev);
        }
        DeleteRangeResponse {
            header: header(self.cur()),
            deleted: gone.len() as i64,
            prev_kvs: if d.prev_kv { gone } else { vec![] },
        }
    }

    /// Ends the request: records the new revision (if any) in the model.
    fn commit(self) -> Done {
        let cur = self.cur();
        (cur, self.changed.then_some(self.work), self.events)
    }
}

// ---- etcd's txn rules

fn check_op(op: &RequestOp) -> Res<()> {
    match &op.request {
        None => Err(KEY_NOT_FOUND.into()),
        Some(Request::RequestRange(r)) if r.key.is_empty() => Err(EMPTY_KEY.into()),
        Some(Request::RequestDeleteRange(d)) if d.key.is_empty() => Err(EMPTY_KEY.into()),
        Some(Request::RequestPut(p)) => {
            if p.key.is_empty() {
                Err(EMPTY_KEY.into())
            } else if p.ignore_value && !p.value.is_empty() {
                Err(VALUE_PROVIDED.into())
            } else if p.ignore_lease && p.lease != 0 {
                Err(LEASE_PROVIDED.into())
            } else {
                Ok(())
            }
        }
        Some(Request::RequestTxn(t)) => check_txn(t),
        _ => Ok(()),
    }
}

fn check_txn(t: &TxnRequest) -> Res<()> {
    if t.compare.iter().any(|c| c.key.is_empty()) {
        return Err(EMPTY_KEY.into());
    }
    t.success.iter().chain(&t.failure).try_for_each(check_op)
}

type Dels = Vec<(Vec<u8>, Vec<u8>)>;

/// Events as the host hands them over: (key, encoded event) pairs.
type RawEvents = Vec<(Vec<u8>, Vec<u8>)>;

fn deleted(dels: &Dels, k: &[u8]) -> bool {
    dels.iter().any(|(b, e)| b.as_slice() <= k && k < e.as_slice())
}

/// etcd's `checkIntervals`: the keys a list of ops puts and the ranges it deletes, or
/// "duplicate key".
fn intervals(ops: &[RequestOp]) -> Res<(BTreeSet<Vec<u8>>, Dels)> {
    let dup = || Err(DUPLICATE_KEY.to_string());
    let mut dels: Dels = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) if d.range_end.is_empty() => {
                Some((d.key.clone(), [d.key.as_slice(), &[0]].concat()))
            }
            Some(Request::RequestDeleteRange(d)) => Some((d.key.clone(), d.range_end.clone())),
            _ => None,
        })
        .collect();
    let mut puts = BTreeSet::new();
    for op in ops {
        if let Some(Request::RequestTxn(t)) = &op.request {
            let (then_puts, then_dels) = intervals(&t.success)?;
            let (else_puts, else_dels) = intervals(&t.failure)?;
            for k in &then_puts {
                if puts.contains(k) || deleted(&dels, k) {
                    return dup();
                }
                puts.insert(k.clone());
            }
            for k in &else_puts {
                if (puts.contains(k) && !then_puts.contains(k)) || deleted(&dels, k) {
                    return dup();
                }
                puts.insert(k.clone());
            }
            dels.extend(then_dels);
            dels.extend(else_dels);
        }
    }
    for op in ops {
        if let Some(Request::RequestPut(p)) = &op.request {
            if puts.contains(&p.key) || deleted(&dels, &p.key) {
                return dup();
            }
            puts.insert(p.key.clone());
        }
    }
    Ok((puts, dels))
}

fn compare_holds(state: &Map, c: &Compare) -> bool {
    let kvs: Vec<&KeyValue> = state.values().filter(|kv| in_range(&kv.key, &c.key, &c.range_end)).collect();
    let target = CompareTarget::try_from(c.target).unwrap();
    if kvs.is_empty() && target == CompareTarget::Value {
        return false;
    }
    let zero = KeyValue::default();
    let kvs = if kvs.is_empty() { vec![&zero] } else { kvs };
    kvs.into_iter().all(|kv| {
        let ord = match (target, &c.target_union) {
            (CompareTarget::Value, Some(TargetUnion::Value(v))) => kv.value.cmp(v),
            (CompareTarget::Value, _) => kv.value.cmp(&vec![]),
            (CompareTarget::Version, Some(TargetUnion::Version(x))) => kv.version.cmp(x),
            (CompareTarget::Create, Some(TargetUnion::CreateRevision(x))) => kv.create_revision.cmp(x),
            (CompareTarget::Mod, Some(TargetUnion::ModRevision(x))) => kv.mod_revision.cmp(x),
            (CompareTarget::Lease, Some(TargetUnion::Lease(x))) => kv.lease.cmp(x),
            (CompareTarget::Version, _) => kv.version.cmp(&0),
            (CompareTarget::Create, _) => kv.create_revision.cmp(&0),
            (CompareTarget::Mod, _) => kv.mod_revision.cmp(&0),
            (CompareTarget::Lease, _) => kv.lease.cmp(&0),
        };
        match CompareResult::try_from(c.result).unwrap() {
            CompareResult::Equal => ord.is_eq(),
            CompareResult::NotEqual => ord.is_ne(),
            CompareResult::Greater => ord.is_gt(),
            CompareResult::Less => ord.is_lt(),
        }
    })
}

/// The branch each (nested) txn takes: compares are all judged on the state before the txn.
fn taken<'t>(pre: &Map, t: &'t TxnRequest) -> (bool, &'t [RequestOp]) {
    let ok = t.compare.iter().all(|c| compare_holds(pre, c));
    (ok, if ok { &t.success } else { &t.failure })
}

fn pre_checks(pre: &Map, t: &TxnRequest, f: &dyn Fn(&RequestOp) -> Res<()>) -> Res<()> {
    for op in taken(pre, t).1 {
        match &op.request {
            Some(Request::RequestTxn(n)) => pre_checks(pre, n, f)?,
            _ => f(op)?,
        }
    }
    Ok(())
}

fn apply_txn(w: &mut Work, pre: &Map, t: &TxnRequest) -> Res<TxnResponse> {
    let (succeeded, ops) = taken(pre, t);
    let mut responses = vec![];
    for op in ops {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => Response::ResponseRange(w.range(r)?),
            Some(Request::RequestPut(p)) => Response::ResponsePut(w.put(p, false)?),
            Some(Request::RequestDeleteRange(d)) => Response::ResponseDeleteRange(w.delete(d)),
            Some(Request::RequestTxn(n)) => Response::ResponseTxn(apply_txn(w, pre, n)?),
            None => unreachable!("rejected by check_txn"),
        };
        responses.push(ResponseOp { response: Some(response) });
    }
    Ok(TxnResponse { header: Some(ResponseHeader::default()), succeeded, responses })
}

/// A model answer: the response and the events it emitted.
type Answer<T> = Res<(T, Vec<(Vec<u8>, Event)>)>;

impl Model {
    fn new() -> Self {
        Model { states: vec![Map::new(), Map::new()], compacted: -1 }
    }

    fn cur(&self) -> i64 {
        self.states.len() as i64 - 1
    }

    fn latest(&self) -> &Map {
        self.states.last().unwrap()
    }

    fn record(&mut self, done: Done) -> (i64, Vec<(Vec<u8>, Event)>) {
        self.states.extend(done.1);
        (done.0, done.2)
    }

    fn range(&self, r: &RangeRequest) -> Res<RangeResponse> {
        if r.key.is_empty() {
            return Err(EMPTY_KEY.into());
        }
        Work::new(self).range(r)
    }

    fn put(&mut self, p: &PutRequest) -> Answer<PutResponse> {
        check_op(&RequestOp { request: Some(Request::RequestPut(p.clone())) })?;
        let mut w = Work::new(self);
        let resp = w.put(p, true)?;
        let done = w.commit();
        Ok((resp, self.record(done).1))
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> Answer<DeleteRangeResponse> {
        if d.key.is_empty() {
            return Err(EMPTY_KEY.into());
        }
        let mut w = Work::new(self);
        let resp = w.delete(d);
        let done = w.commit();
        Ok((resp, self.record(done).1))
    }

    fn txn(&mut self, t: &TxnRequest) -> Answer<TxnResponse> {
        check_txn(t)?;
        intervals(&t.success)?;
        intervals(&t.failure)?;
        let pre = self.latest().clone();
        pre_checks(&pre, t, &|op| match &op.request {
            Some(Request::RequestPut(p)) => {
                if (p.ignore_value || p.ignore_lease) && !pre.contains_key(&p.key) {
                    return Err(KEY_NOT_FOUND.into());
                }
                if p.lease != 0 {
                    return Err(LEASE_NOT_FOUND.into()); // no lease is live
                }
                Ok(())
            }
            _ => Ok(()),
        })?;
        let (cur, compacted) = (self.cur(), self.compacted);
        pre_checks(&pre, t, &|op| match &op.request {
            Some(Request::RequestRange(r)) if r.revision != 0 && r.revision > cur => Err(FUTURE_REV.into()),
            Some(Request::RequestRange(r)) if r.revision != 0 && r.revision < compacted => Err(COMPACTED.into()),
            _ => Ok(()),
        })?;
        let mut w = Work::new(self);
        let mut resp = apply_txn(&mut w, &pre, t)?;
        let done = w.commit();
        let (rev, events) = self.record(done);
        resp.header = header(rev);
        Ok((resp, events))
    }

    fn compact(&mut self, rev: i64) -> Answer<CompactionResponse> {
        if rev <= self.compacted {
            return Err(COMPACTED.into());
        }
        if rev > self.cur() {
            return Err(FUTURE_REV.into());
        }
        self.compacted = rev;
        Ok((CompactionResponse { header: header(self.cur()) }, vec![]))
    }

    /// HashKV's header and compact_revision (the hash itself is checked against (b)).
    fn hash_kv(&self, rev: i64) -> Res<(Option<ResponseHeader>, i64)> {
        if rev > 0 && rev <= self.compacted {
            Err(COMPACTED.into())
        } else if rev > self.cur() {
            Err(FUTURE_REV.into())
        } else {
            Ok((header(self.cur()), self.compacted))
        }
    }
}

// ============================================================================ generators

#[derive(Debug, Clone)]
enum Op {
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Range(RangeRequest),
    Txn(TxnRequest),
    /// The Compact request alone; its history is removed by ...
    Compact(i64),
    /// ... compaction steps of this many work units (which change no answer).
    CompactStep(u32),
    HashKv(i64),
    /// Raw bytes given to both `apply` and `query` (malformed or misplaced commands).
    Raw(Vec<u8>),
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![b"a".to_vec(), b"ab".to_vec(), b"b".to_vec(), b"b\0".to_vec(), b"c".to_vec()])
}

fn key_or_empty() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![30 => key(), 1 => Just(vec![])]
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![4 => Just(vec![]), 2 => Just(vec![0]), 3 => key(), 1 => Just(b"d".to_vec())]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![vec![], b"x".to_vec(), b"y".to_vec(), b"zz".to_vec()])
}

/// Mostly no lease; the others are not live (nothing in this test grants one).
fn lease() -> impl Strategy<Value = i64> {
    prop_oneof![12 => Just(0i64), 1 => Just(1), 1 => Just(7)]
}

/// Latest (0), negative (= latest), or an explicit revision, possibly compacted or future.
fn revision() -> impl Strategy<Value = i64> {
    prop_oneof![3 => Just(0i64), 3 => -1i64..16]
}

fn sometimes(p: f64) -> impl Strategy<Value = bool> {
    prop::bool::weighted(p)
}

fn put_req() -> impl Strategy<Value = PutRequest> {
    (key_or_empty(), value(), lease(), any::<bool>(), sometimes(0.15), sometimes(0.15)).prop_map(
        |(key, value, lease, prev_kv, ignore_value, ignore_lease)| {
            // Mostly well-formed ignore_* requests, sometimes not.
            let value = if ignore_value && value.len() > 1 { vec![] } else { value };
            let lease = if ignore_lease && lease == 1 { 0 } else { lease };
            PutRequest { key, value, lease, prev_kv, ignore_value, ignore_lease }
        },
    )
}

fn delete_req() -> impl Strategy<Value = DeleteRangeRequest> {
    (key_or_empty(), range_end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

fn filter() -> impl Strategy<Value = i64> {
    prop_oneof![6 => Just(0i64), 1 => 1i64..12]
}

fn range_req() -> impl Strategy<Value = RangeRequest> {
    (
        (key_or_empty(), range_end(), prop_oneof![3 => Just(0i64), 3 => 1i64..4, 1 => Just(i64::MAX)], revision()),
        (0i32..3, 0i32..5, sometimes(0.2), sometimes(0.2), any::<bool>()),
        (filter(), filter(), filter(), filter()),
    )
        .prop_map(|((key, range_end, limit, revision), (so, st, keys_only, count_only, serializable), f)| {
            RangeRequest {
                key,
                range_end,
                limit,
                revision,
                sort_order: so,
                sort_target: st,
                serializable,
                keys_only,
                count_only,
                min_mod_revision: f.0,
                max_mod_revision: f.1,
                min_create_revision: f.2,
                max_create_revision: f.3,
            }
        })
}

fn compare() -> impl Strategy<Value = Compare> {
    (key_or_empty(), prop_oneof![4 => Just(vec![]), 1 => range_end()], 0i32..5, 0i32..4, 0i64..8, value()).prop_map(
        |(key, range_end, target, result, n, v)| {
            let target_union = Some(match CompareTarget::try_from(target).unwrap() {
                CompareTarget::Version => TargetUnion::Version(n % 4),
                CompareTarget::Create => TargetUnion::CreateRevision(n),
                CompareTarget::Mod => TargetUnion::ModRevision(n),
                CompareTarget::Value => TargetUnion::Value(v),
                CompareTarget::Lease => TargetUnion::Lease(n % 3),
            });
            Compare { result, target, key, target_union, range_end }
        },
    )
}

fn request_op(depth: u32) -> BoxedStrategy<RequestOp> {
    let leaf = prop_oneof![
        3 => range_req().prop_map(|r| RequestOp { request: Some(Request::RequestRange(r)) }),
        4 => put_req().prop_map(|p| RequestOp { request: Some(Request::RequestPut(p)) }),
        2 => delete_req().prop_map(|d| RequestOp { request: Some(Request::RequestDeleteRange(d)) }),
        1 => Just(RequestOp { request: None }),
    ];
    if depth == 0 {
        leaf.boxed()
    } else {
        prop_oneof![
            6 => leaf,
            1 => txn_req(depth - 1).prop_map(|t| RequestOp { request: Some(Request::RequestTxn(t)) }),
        ]
        .boxed()
    }
}

fn txn_req(depth: u32) -> BoxedStrategy<TxnRequest> {
    (
        prop::collection::vec(compare(), 0..3),
        prop::collection::vec(request_op(depth), 0..4),
        prop::collection::vec(request_op(depth), 0..4),
    )
        .prop_map(|(compare, success, failure)| TxnRequest { compare, success, failure })
        .boxed()
}

fn raw() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![
        vec![],                                                       // empty command
        vec![0],                                                      // unknown tag
        vec![9, 1, 2],                                                // malformed compaction step
        vec![11],                                                     // unknown tag
        encode(command::TAG_HASH_KV, &HashKvRequest { revision: 0 }), // query-only tag in apply
        encode(command::TAG_STATUS, &StatusRequest {}),               // query-only tag in apply
        encode(command::TAG_PUT, &PutRequest { key: b"a".to_vec(), value: b"q".to_vec(), ..Default::default() }), // apply-only tag in query
        vec![command::TAG_PUT, 0x0a, 0x05, b'a'], // truncated protobuf
        vec![command::TAG_RANGE, 0xff],           // bad protobuf
        vec![command::TAG_TXN, 0x12, 0x02, 0x0a], // truncated nested message
    ])
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => put_req().prop_map(Op::Put),
        2 => delete_req().prop_map(Op::Delete),
        4 => range_req().prop_map(Op::Range),
        4 => txn_req(2).prop_map(Op::Txn),
        1 => (-1i64..16).prop_map(Op::Compact),
        1 => (1u32..4).prop_map(Op::CompactStep),
        1 => (-1i64..16).prop_map(Op::HashKv),
        1 => raw().prop_map(Op::Raw),
    ]
}

/// The ops, and the batch sizes (1..=5 commands per committed batch, used cyclically).
fn case() -> impl Strategy<Value = (Vec<Op>, Vec<usize>)> {
    (prop::collection::vec(op(), 1..40), prop::collection::vec(1usize..=5, 1..12))
}

// ============================================================================ the harness

/// Outcome counters over a whole run, printed at the end (the property is not vacuous).
#[derive(Default)]
struct Stats {
    ok_writes: AtomicUsize,
    rejected: AtomicUsize,
    range_apply: AtomicUsize,
    range_query_stale: AtomicUsize,
    events: AtomicUsize,
    commits: AtomicUsize,
    past_reads: AtomicUsize,
    compactions: AtomicUsize,
}

static STATS: Stats = Stats {
    ok_writes: AtomicUsize::new(0),
    rejected: AtomicUsize::new(0),
    range_apply: AtomicUsize::new(0),
    range_query_stale: AtomicUsize::new(0),
    events: AtomicUsize::new(0),
    commits: AtomicUsize::new(0),
    past_reads: AtomicUsize::new(0),
    compactions: AtomicUsize::new(0),
};

/// Rejections by message (first 48 characters).
static REJECTIONS: std::sync::Mutex<BTreeMap<String, usize>> = std::sync::Mutex::new(BTreeMap::new());

fn bump(c: &AtomicUsize) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, TestCaseError> {
    M::decode(bytes).map_err(|e| fail(format!("response does not decode: {e}")))
}

/// Decodes an `ok` answer, keeps an error message as it is.
fn decode_res<M: Message + Default>(r: Res<Vec<u8>>) -> Result<Res<M>, TestCaseError> {
    match r {
        Ok(bytes) => Ok(Ok(decode(&bytes)?)),
        Err(e) => Ok(Err(e)),
    }
}

fn decode_events(events: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<(Vec<u8>, Event)>, TestCaseError> {
    events.iter().map(|(k, e)| Ok((k.clone(), decode::<Event>(e)?))).collect()
}

/// The per-machine hash `StateDb::hashes` computes, over a store given as a map.
fn machine_hash(map: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let mut h = Sha256::new();
    for (k, v) in map {
        h.update((k.len() as u32).to_be_bytes());
        h.update(k);
        h.update((v.len() as u32).to_be_bytes());
        h.update(v);
    }
    hex::encode(h.finalize())
}

struct Harness<'r> {
    rt: &'r Runtime,
    _dir: tempfile::TempDir,
    db: Arc<StateDb>,
    batch: PendingBatch,
    index: u64,
    /// (b): the native library, live (sees the uncommitted batch, like `apply`) ...
    native: MemNode,
    /// ... and as of the last commit (what `query` sees).
    native_committed: MemStore,
    /// (c): the model, live and as of the last commit.
    model: Model,
    model_committed: Model,
}

impl<'r> Harness<'r> {
    fn new(rt: &'r Runtime) -> Result<Self, TestCaseError> {
        let dir = tempfile::tempdir().map_err(|e| fail(e.to_string()))?;
        let db = Arc::new(StateDb::open(&dir.path().join("state")).map_err(|e| fail(format!("{e:#}")))?);
        Ok(Harness {
            rt,
            _dir: dir,
            db,
            batch: PendingBatch::default(),
            index: 1,
            native: MemNode::new(),
            native_committed: MemStore::default(),
            model: Model::new(),
            model_committed: Model::new(),
        })
    }

    fn hashes(&self) -> Result<StateHashes, TestCaseError> {
        self.db.hashes().map_err(|e| fail(format!("{e:#}")))
    }

    /// (a) `apply`, and (b) `apply` on the native node; both must give the same bytes (or
    /// error message) and the same events. A rejection must leave the state untouched.
    /// Returns the raw answer and the events.
    fn apply_both(&mut self, cmd: &[u8]) -> Result<(Res<Vec<u8>>, RawEvents), TestCaseError> {
        self.index += 1;
        let ctx = ApplyContext { index: self.index, term: 1, timestamp_ms: 1_000 * self.index };
        let overlay_before = self.batch.data.map.clone();
        let hashes_before = self.hashes()?;
        let guest = self
            .rt
            .apply(MACHINE, &self.db, &mut self.batch.data, ctx, cmd)
            .map_err(|f| fail(format!("host fault: {f}")))?;
        let guest = match guest {
            Ok((out, effects)) => Ok((out, effects.events)),
            Err(e) => {
                prop_assert_eq!(
                    e.kind,
                    ApplyErrorKind::Rejected,
                    "guest failed other than by rejecting: {}",
                    e.message
                );
                prop_assert_eq!(&self.batch.data.map, &overlay_before, "a rejected command changed the batch overlay");
                prop_assert_eq!(self.hashes()?, hashes_before, "a rejected command changed the committed state");
                bump(&STATS.rejected);
                *REJECTIONS.lock().unwrap().entry(e.message.chars().take(48).collect()).or_default() += 1;
                Err(e.message)
            }
        };
        let events_before = self.native.events.events.len();
        let native = self.native.apply(cmd);
        let native_events = self.native.events.events[events_before..].to_vec();
        match (guest, native) {
            (Ok((g, ge)), Ok(n)) => {
                prop_assert_eq!(&g, &n, "apply: guest and native responses differ (bytes)");
                prop_assert_eq!(&ge, &native_events, "apply: guest and native events differ (bytes)");
                Ok((Ok(g), ge))
            }
            (Err(g), Err(n)) => {
                prop_assert_eq!(&g, &n, "apply: guest and native errors differ");
                prop_assert!(native_events.is_empty());
                Ok((Err(g), vec![]))
            }
            (g, n) => Err(fail(format!("apply: guest answered {g:?}, native {n:?}"))),
        }
    }

    /// (a) `query` (committed state), and (b) `query` on the native store as of the last commit.
    fn query_both(&self, req: &[u8]) -> Result<Res<Vec<u8>>, TestCaseError> {
        let guest = self.rt.query(MACHINE, &self.db, req).map_err(|f| fail(format!("host fault: {f}")))?;
        let guest = guest.map_err(|e| {
            assert_eq!(e.kind, ApplyErrorKind::Rejected, "query failed other than by rejecting: {}", e.message);
            e.message
        });
        let native = command::query(&self.native_committed, req).map_err(|e| e.message());
        prop_assert_eq!(&guest, &native, "query: guest and native answers differ");
        Ok(guest)
    }

    /// Checks a write's answer: same as the model's, response and events.
    fn check_write<M: Message + Default + PartialEq + std::fmt::Debug>(
        &mut self,
        tag: u8,
        req: &impl Message,
        want: Answer<M>,
    ) -> Result<(), TestCaseError> {
        let (got, events) = self.apply_both(&encode(tag, req))?;
        let got = match got {
            Ok(bytes) => Ok((decode::<M>(&bytes)?, decode_events(&events)?)),
            Err(e) => Err(e),
        };
        if got.is_ok() {
            bump(&STATS.ok_writes);
            STATS.events.fetch_add(events.len(), Ordering::Relaxed);
        }
        prop_assert_eq!(got, want, "guest vs model");
        Ok(())
    }

    /// A Range through `apply` (live state) and through `query` (committed state).
    fn range(&mut self, r: &RangeRequest) -> Result<(), TestCaseError> {
        let cmd = encode(command::TAG_RANGE, r);
        let overlay_before = self.batch.data.map.clone();
        let (got, events) = self.apply_both(&cmd)?;
        prop_assert!(events.is_empty(), "a range emitted events");
        prop_assert_eq!(&self.batch.data.map, &overlay_before, "a range wrote to the store");
        let got = decode_res::<RangeResponse>(got)?;
        prop_assert_eq!(&got, &self.model.range(r), "range via apply: guest vs model");
        bump(&STATS.range_apply);
        if r.revision > 0 && r.revision < self.model.cur() && got.is_ok() {
            bump(&STATS.past_reads);
        }

        let got_q = decode_res::<RangeResponse>(self.query_both(&cmd)?)?;
        prop_assert_eq!(&got_q, &self.model_committed.range(r), "range via query: guest vs committed model");
        if self.model_committed.cur() != self.model.cur() {
            bump(&STATS.range_query_stale);
        }
        Ok(())
    }

    fn hash_kv(&self, rev: i64) -> Result<(), TestCaseError> {
        let got = self.query_both(&encode(command::TAG_HASH_KV, &HashKvRequest { revision: rev }))?;
        let got = decode_res::<HashKvResponse>(got)?.map(|h| (h.header, h.compact_revision));
        prop_assert_eq!(got, self.model_committed.hash_kv(rev), "hash_kv({}): guest vs committed model", rev);
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Put(p) => {
                let want = self.model.put(p);
                self.check_write::<PutResponse>(command::TAG_PUT, p, want)
            }
            Op::Delete(d) => {
                let want = self.model.delete(d);
                self.check_write::<DeleteRangeResponse>(command::TAG_DELETE_RANGE, d, want)
            }
            Op::Txn(t) => {
                let want = self.model.txn(t);
                self.check_write::<TxnResponse>(command::TAG_TXN, t, want)
            }
            Op::Compact(rev) => {
                let want = self.model.compact(*rev);
                if want.is_ok() {
                    bump(&STATS.compactions);
                }
                let req = CompactionRequest { revision: *rev, physical: false };
                self.check_write::<CompactionResponse>(command::TAG_COMPACTION, &req, want)
            }
            Op::Range(r) => self.range(r),
            Op::CompactStep(units) => {
                let mut cmd = vec![command::TAG_COMPACT_STEP];
                cmd.extend_from_slice(&command::compact_step_body(*units));
                let (got, events) = self.apply_both(&cmd)?;
                prop_assert!(matches!(got.as_deref(), Ok([0] | [1])), "compaction step answered {:?}", got);
                prop_assert!(events.is_empty());
                Ok(())
            }
            Op::HashKv(rev) => self.hash_kv(*rev),
            Op::Raw(bytes) => {
                let (got, events) = self.apply_both(bytes)?;
                prop_assert!(got.is_err() || bytes.first() == Some(&command::TAG_PUT), "raw apply accepted: {:?}", got);
                prop_assert!(events.is_empty() || bytes.first() == Some(&command::TAG_PUT));
                if let Ok(got) = &got {
                    // The one well-formed raw command (a put of "a"), applied to the model too.
                    let p = PutRequest::decode(&bytes[1..]).unwrap();
                    let (resp, want_events) = self.model.put(&p).map_err(fail)?;
                    prop_assert_eq!(decode::<PutResponse>(got)?, resp);
                    prop_assert_eq!(decode_events(&events)?, want_events);
                }
                // HashKV and Status are valid queries (both answers already compared).
                let q = self.query_both(bytes)?;
                let query_tag = matches!(bytes.first(), Some(&(command::TAG_HASH_KV | command::TAG_STATUS)));
                prop_assert!(q.is_err() || query_tag, "raw query accepted: {:?}", q);
                Ok(())
            }
        }
    }

    /// Commit the batch; the committed machine store must then equal (b)'s store.
    fn commit(&mut self) -> Result<(), TestCaseError> {
        let batch = std::mem::take(&mut self.batch);
        self.db.commit(batch).map_err(|e| fail(format!("{e:#}")))?;
        bump(&STATS.commits);
        self.native_committed = self.native.store.clone();
        self.model_committed = self.model.clone();

        let prefix = machine_prefix(MACHINE);
        let rows =
            self.db.scan_data(&prefix, &prefix_end(&prefix), false, usize::MAX).map_err(|e| fail(format!("{e:#}")))?;
        let committed: BTreeMap<Vec<u8>, Vec<u8>> =
            rows.into_iter().map(|(k, v)| (k[prefix.len()..].to_vec(), v)).collect();
        prop_assert_eq!(&committed, &self.native.store.map, "committed guest store differs from the native store");
        let hashes = self.hashes()?;
        // (`hashes` lists a machine once it has data or a module record; no record here.)
        let want = (!self.native.store.map.is_empty()).then(|| machine_hash(&self.native.store.map));
        prop_assert_eq!(hashes.machines.get(MACHINE), want.as_ref(), "StateDb::hashes of the machine");
        let status = self.query_both(&encode(command::TAG_STATUS, &StatusRequest {}))?.map_err(fail)?;
        let status = decode::<StatusResponse>(&status)?;
        prop_assert_eq!(status.header.map(|h| h.revision), Some(self.model.cur()), "status revision");
        Ok(())
    }
}

fn run(rt: &Runtime, ops: &[Op], batches: &[usize]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(rt)?;
    let mut sizes = batches.iter().cycle();
    let mut left = *sizes.next().unwrap();
    for (i, op) in ops.iter().enumerate() {
        h.step(op).map_err(|e| fail(format!("step {i}: {op:?}: {e}")))?;
        left -= 1;
        if left == 0 {
            h.commit().map_err(|e| fail(format!("commit after step {i}: {e}")))?;
            left = *sizes.next().unwrap();
        }
    }
    h.commit()?;

    // Every revision (and one past the end) reads back as the model has it, through both
    // paths.
    for rev in 0..=h.model.cur() + 1 {
        let all = RangeRequest { key: vec![0], range_end: vec![0], revision: rev, ..Default::default() };
        h.range(&all).map_err(|e| fail(format!("full read at revision {rev}: {e}")))?;
    }
    let mid = h.model.cur() / 2;
    h.hash_kv(0)?;
    h.hash_kv(mid)?;
    Ok(())
}

fn runtime() -> (tempfile::TempDir, Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::new(&dir.path().join("cache")).unwrap();
    let wasm = rt.validate(DEFAULT_KV_MODULE).expect("built-in kv module validates");
    let record = ModuleRecord::for_component(MACHINE.into(), &wasm, DEFAULT_FUEL, DEFAULT_MEMORY_BYTES, 1);
    rt.load(record, &wasm).unwrap();
    (dir, rt)
}

#[test]
fn kv_guest_matches_native_and_model() {
    let (_dir, rt) = runtime();
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let config = ProptestConfig { cases, source_file: Some(file!()), ..ProptestConfig::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |(ops, batches)| run(&rt, &ops, &batches));
    let s = &STATS;
    eprintln!(
        "kv_guest_prop: {cases} cases: {} successful writes ({} events), {} rejections, {} ranges via apply \
         ({} at a past revision), {} ranges via query while a batch was pending, {} compactions, {} commits",
        s.ok_writes.load(Ordering::Relaxed),
        s.events.load(Ordering::Relaxed),
        s.rejected.load(Ordering::Relaxed),
        s.range_apply.load(Ordering::Relaxed),
        s.past_reads.load(Ordering::Relaxed),
        s.range_query_stale.load(Ordering::Relaxed),
        s.compactions.load(Ordering::Relaxed),
        s.commits.load(Ordering::Relaxed),
    );
    eprintln!("kv_guest_prop: rejections: {:?}", REJECTIONS.lock().unwrap());
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The generators reach the interesting outcomes (model only, fast).
#[test]
fn generators_cover_outcomes() {
    use proptest::strategy::ValueTree;
    let mut runner = TestRunner::deterministic();
    let mut seen = BTreeSet::new();
    for _ in 0..300 {
        let (ops, _) = case().new_tree(&mut runner).unwrap().current();
        let mut m = Model::new();
        for op in &ops {
            let outcome = match op {
                Op::Put(p) => m.put(p).map(|_| "put"),
                Op::Delete(d) => m.delete(d).map(|_| "delete"),
                Op::Range(r) => m.range(r).map(|_| if r.revision > 0 { "past range" } else { "range" }),
                Op::Txn(t) => m.txn(t).map(|(r, _)| {
                    if r.responses.iter().any(|o| matches!(o.response, Some(Response::ResponseTxn(_)))) {
                        seen.insert("nested txn".to_string());
                    }
                    if r.succeeded {
                        "txn success branch"
                    } else {
                        "txn failure branch"
                    }
                }),
                Op::Compact(rev) => m.compact(*rev).map(|_| "compact"),
                Op::HashKv(_) | Op::Raw(_) | Op::CompactStep(_) => Ok("other"),
            };
            seen.insert(match outcome {
                Ok(what) => what.to_string(),
                Err(e) => e,
            });
        }
    }
    for want in [
        EMPTY_KEY,
        KEY_NOT_FOUND,
        VALUE_PROVIDED,
        LEASE_PROVIDED,
        DUPLICATE_KEY,
        COMPACTED,
        FUTURE_REV,
        LEASE_NOT_FOUND,
        "put",
        "delete",
        "range",
        "past range",
        "compact",
        "nested txn",
        "txn success branch",
        "txn failure branch",
    ] {
        assert!(seen.contains(want), "generators never produced {want:?}; saw {seen:?}");
    }
}
