//! Property test: random sequences of Put / DeleteRange / Range / Txn /
//! Compact / lease revocation / HashKV against a deliberately naive model of
//! etcd v3.4's MVCC store, which keeps a full copy of the key space for every
//! revision. Every response field, every error, every watch event, the lease
//! attachments and, at the end, a read of every revision and the watch
//! history from every revision must agree.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use kv_mvcc::command;
use kv_mvcc::error::*;
use kv_mvcc::host::MemNode;
use kv_mvcc::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kv_mvcc::pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use kv_mvcc::pb::etcdserverpb::request_op::Request;
use kv_mvcc::pb::etcdserverpb::response_op::Response;
use kv_mvcc::pb::etcdserverpb::*;
use kv_mvcc::pb::mvccpb::{event::EventType, Event, KeyValue};
use proptest::prelude::*;

type Map = BTreeMap<Vec<u8>, KeyValue>;
type Res<T> = Result<T, String>;

const LIVE_AT_START: [i64; 2] = [1, 2];

/// The model: `states[r]` is the whole key space at revision `r`
/// (`states[0]` is unused, `states[1]` the empty store).
#[derive(Debug, Clone)]
struct Model {
    states: Vec<Map>,
    compacted: i64,
    live: BTreeSet<i64>,
    events: Vec<(Vec<u8>, Event)>,
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// One write request being applied to the model.
struct Work<'a> {
    m: &'a Model,
    work: Map,
    changed: bool,
    events: Vec<(Vec<u8>, Event)>,
}

impl<'a> Work<'a> {
    fn new(m: &'a Model) -> Self {
        Work {
            m,
            work: m.states[m.cur() as usize].clone(),
            changed: false,
            events: Vec::new(),
        }
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
        let all: Vec<KeyValue> = self
            .state(rev)
            .values()
            .filter(|kv| in_range(&kv.key, &r.key, &r.range_end))
            .cloned()
            .collect();
        let count = all.len() as i64;
        let sorting_or_filtering = r.sort_order != 0
            || r.min_mod_revision != 0
            || r.max_mod_revision != 0
            || r.min_create_revision != 0
            || r.max_create_revision != 0;
        let mut kvs = if r.count_only {
            vec![]
        } else if r.limit > 0 && !sorting_or_filtering && r.limit < i64::MAX {
            all.into_iter().take(r.limit as usize + 1).collect()
        } else {
            all
        };
        kvs.retain(|kv| r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision);
        kvs.retain(|kv| r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision);
        kvs.retain(|kv| r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision);
        kvs.retain(|kv| r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision);
        let order = if r.sort_order == 0 && r.sort_target != 0 {
            1
        } else {
            r.sort_order
        };
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
        Ok(RangeResponse {
            header: header(cur),
            kvs,
            more,
            count,
        })
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
        self.events.push((
            key.to_vec(),
            Event {
                r#type: EventType::Put as i32,
                kv: Some(kv.clone()),
                // Events carry no prev_kv: a watcher that wants it reads mod_revision - 1.
                prev_kv: None,
            },
        ));
        self.work.insert(key.to_vec(), kv);
        self.changed = true;
        rev
    }

    fn delete_keys(&mut self, keys: Vec<Vec<u8>>) -> Vec<KeyValue> {
        let rev = self.m.cur() + 1;
        let mut gone = Vec::new();
        for k in keys {
            let prev = self.work.remove(&k).expect("live key");
            let kv = KeyValue {
                key: k.clone(),
                mod_revision: rev,
                ..Default::default()
            };
            self.events.push((
                k,
                Event {
                    r#type: EventType::Delete as i32,
                    kv: Some(kv),
                    prev_kv: None,
                },
            ));
            self.changed = true;
            gone.push(prev);
        }
        gone
    }

    fn put(&mut self, p: &PutRequest, top_level: bool) -> Res<PutResponse> {
        if top_level && p.lease != 0 && !self.m.live.contains(&p.lease) {
            return Err(LEASE_NOT_FOUND.into());
        }
        let prev = self.work.get(&p.key).cloned();
        if (p.ignore_value || p.ignore_lease) && prev.is_none() {
            return Err(KEY_NOT_FOUND.into());
        }
        let value = if p.ignore_value {
            prev.as_ref().unwrap().value.clone()
        } else {
            p.value.clone()
        };
        let lease = if p.ignore_lease {
            prev.as_ref().unwrap().lease
        } else {
            p.lease
        };
        let rev = self.put_kv(&p.key, value, lease);
        Ok(PutResponse {
            header: header(rev),
            prev_kv: if p.prev_kv { prev } else { None },
        })
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let keys: Vec<Vec<u8>> = self
            .work
            .keys()
            .filter(|k| in_range(k, &d.key, &d.range_end))
            .cloned()
            .collect();
        let gone = self.delete_keys(keys);
        DeleteRangeResponse {
            header: header(self.cur()),
            deleted: gone.len() as i64,
            prev_kvs: if d.prev_kv { gone } else { vec![] },
        }
    }

    /// Ends the request: what the model must record.
    fn done(self) -> Done {
        Done {
            cur: self.cur(),
            state: if self.changed { Some(self.work) } else { None },
            events: self.events,
        }
    }
}

struct Done {
    cur: i64,
    state: Option<Map>,
    events: Vec<(Vec<u8>, Event)>,
}

impl Done {
    fn commit(self, m: &mut Model) -> i64 {
        m.events.extend(self.events);
        m.states.extend(self.state);
        self.cur
    }
}

// ---- txn rules, written straight from etcd's description

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

fn deleted(dels: &Dels, k: &[u8]) -> bool {
    dels.iter()
        .any(|(b, e)| b.as_slice() <= k && k < e.as_slice())
}

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
    let kvs: Vec<&KeyValue> = state
        .values()
        .filter(|kv| in_range(&kv.key, &c.key, &c.range_end))
        .collect();
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
            (CompareTarget::Create, Some(TargetUnion::CreateRevision(x))) => {
                kv.create_revision.cmp(x)
            }
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

/// The ops of the branch each (nested) txn takes, judged on `pre`.
fn taken<'t>(pre: &Map, t: &'t TxnRequest) -> (bool, &'t [RequestOp]) {
    let ok = t.compare.iter().all(|c| compare_holds(pre, c));
    (ok, if ok { &t.success } else { &t.failure })
}

fn pre_checks(
    m: &Model,
    pre: &Map,
    t: &TxnRequest,
    f: &dyn Fn(&Model, &Map, &RequestOp) -> Res<()>,
) -> Res<()> {
    for op in taken(pre, t).1 {
        match &op.request {
            Some(Request::RequestTxn(n)) => pre_checks(m, pre, n, f)?,
            _ => f(m, pre, op)?,
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
        responses.push(ResponseOp {
            response: Some(response),
        });
    }
    Ok(TxnResponse {
        header: Some(ResponseHeader::default()),
        succeeded,
        responses,
    })
}

impl Model {
    fn new() -> Self {
        Model {
            states: vec![Map::new(), Map::new()],
            compacted: -1,
            live: LIVE_AT_START.into(),
            events: vec![],
        }
    }

    fn cur(&self) -> i64 {
        self.states.len() as i64 - 1
    }

    fn latest(&self) -> &Map {
        self.states.last().unwrap()
    }

    fn range(&self, r: &RangeRequest) -> Res<RangeResponse> {
        if r.key.is_empty() {
            return Err(EMPTY_KEY.into());
        }
        Work::new(self).range(r)
    }

    fn put(&mut self, p: &PutRequest) -> Res<PutResponse> {
        check_op(&RequestOp {
            request: Some(Request::RequestPut(p.clone())),
        })?;
        let mut w = Work::new(self);
        let resp = w.put(p, true)?;
        w.done().commit(self);
        Ok(resp)
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> Res<DeleteRangeResponse> {
        if d.key.is_empty() {
            return Err(EMPTY_KEY.into());
        }
        let mut w = Work::new(self);
        let resp = w.delete(d);
        w.done().commit(self);
        Ok(resp)
    }

    fn txn(&mut self, t: &TxnRequest) -> Res<TxnResponse> {
        check_txn(t)?;
        intervals(&t.success)?;
        intervals(&t.failure)?;
        let pre = self.latest().clone();
        pre_checks(self, &pre, t, &|m, pre, op| match &op.request {
            Some(Request::RequestPut(p)) => {
                if (p.ignore_value || p.ignore_lease) && !pre.contains_key(&p.key) {
                    return Err(KEY_NOT_FOUND.into());
                }
                if p.lease != 0 && !m.live.contains(&p.lease) {
                    return Err(LEASE_NOT_FOUND.into());
                }
                Ok(())
            }
            _ => Ok(()),
        })?;
        pre_checks(self, &pre, t, &|m, _, op| match &op.request {
            Some(Request::RequestRange(r)) if r.revision != 0 && r.revision > m.cur() => {
                Err(FUTURE_REV.into())
            }
            Some(Request::RequestRange(r)) if r.revision != 0 && r.revision < m.compacted => {
                Err(COMPACTED.into())
            }
            _ => Ok(()),
        })?;
        let mut w = Work::new(self);
        let mut resp = apply_txn(&mut w, &pre, t)?;
        resp.header = header(w.done().commit(self));
        Ok(resp)
    }

    fn compact(&mut self, rev: i64) -> Res<CompactionResponse> {
        if rev <= self.compacted {
            return Err(COMPACTED.into());
        }
        if rev > self.cur() {
            return Err(FUTURE_REV.into());
        }
        self.compacted = rev;
        Ok(CompactionResponse {
            header: header(self.cur()),
        })
    }

    fn revoke(&mut self, lease: i64) {
        let keys: Vec<Vec<u8>> = self
            .latest()
            .values()
            .filter(|kv| kv.lease == lease)
            .map(|kv| kv.key.clone())
            .collect();
        if self.live.contains(&lease) {
            let mut w = Work::new(self);
            w.delete_keys(keys);
            w.done().commit(self);
            self.live.remove(&lease);
        }
    }

    /// Watch history: the events from the start revision on, with prev_kv
    /// the key at the revision before; nothing from history below the
    /// compacted revision. At the compacted revision itself only what
    /// compaction keeps, as etcd: a key's last event there if it is a put,
    /// without prev_kv. (Never more events than the cap here.)
    fn watch(&self, r: &WatchCreateRequest) -> WatchResponse {
        let start = if r.start_revision <= 0 {
            self.cur() + 1
        } else {
            r.start_revision
        };
        if start < self.compacted {
            return WatchResponse {
                header: header(self.cur()),
                compact_revision: self.compacted,
                ..Default::default()
            };
        }
        let key = if r.key.is_empty() {
            vec![0]
        } else {
            r.key.clone()
        };
        let rev_of = |e: &Event| e.kv.as_ref().unwrap().mod_revision;
        let kept_at_compaction = |i: usize| {
            let (k, e) = &self.events[i];
            let later_same = self.events[i + 1..]
                .iter()
                .any(|(k2, e2)| k2 == k && rev_of(e2) == rev_of(e));
            e.r#type == EventType::Put as i32 && !later_same
        };
        let events = self
            .events
            .iter()
            .enumerate()
            .filter(|(i, (k, e))| {
                let rev = rev_of(e);
                rev >= start
                    && in_range(k, &key, &r.range_end)
                    && (rev != self.compacted || kept_at_compaction(*i))
            })
            .map(|(_, (k, e))| {
                let rev = rev_of(e);
                Event {
                    prev_kv: r
                        .prev_kv
                        .then(|| self.states[rev as usize - 1].get(k).cloned())
                        .flatten()
                        .filter(|_| rev > self.compacted),
                    ..e.clone()
                }
            })
            .collect();
        WatchResponse {
            header: header(self.cur()),
            events,
            ..Default::default()
        }
    }

    fn attachments(&self) -> BTreeMap<i64, BTreeSet<Vec<u8>>> {
        let mut out: BTreeMap<i64, BTreeSet<Vec<u8>>> = BTreeMap::new();
        for kv in self.latest().values().filter(|kv| kv.lease != 0) {
            out.entry(kv.lease).or_default().insert(kv.key.clone());
        }
        out
    }
}

// ---------------------------------------------------------------- generators

#[derive(Debug, Clone)]
enum Op {
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Range(RangeRequest),
    Txn(TxnRequest),
    /// The Compact request alone (its physical work stays pending) ...
    Compact(i64),
    /// ... and a compaction step of this many work units.
    CompactStep(u32),
    Revoke(i64),
    HashKv(i64),
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![
        b"a".to_vec(),
        b"ab".to_vec(),
        b"b".to_vec(),
        b"b\0".to_vec(),
        b"c".to_vec(),
    ])
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

fn lease() -> impl Strategy<Value = i64> {
    prop_oneof![6 => Just(0i64), 2 => Just(1), 2 => Just(2), 1 => Just(3)]
}

fn revision() -> impl Strategy<Value = i64> {
    prop_oneof![3 => Just(0i64), 3 => -1i64..16]
}

fn sometimes(p: f64) -> impl Strategy<Value = bool> {
    prop::bool::weighted(p)
}

fn put_req() -> impl Strategy<Value = PutRequest> {
    (
        key_or_empty(),
        value(),
        lease(),
        any::<bool>(),
        sometimes(0.15),
        sometimes(0.15),
    )
        .prop_map(|(key, value, lease, prev_kv, ignore_value, ignore_lease)| {
            // Mostly well-formed ignore_* requests, sometimes not.
            let value = if ignore_value && value.len() > 1 {
                vec![]
            } else {
                value
            };
            let lease = if ignore_lease && lease == 2 { 0 } else { lease };
            PutRequest {
                key,
                value,
                lease,
                prev_kv,
                ignore_value,
                ignore_lease,
            }
        })
}

fn delete_req() -> impl Strategy<Value = DeleteRangeRequest> {
    (key_or_empty(), range_end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| {
        DeleteRangeRequest {
            key,
            range_end,
            prev_kv,
        }
    })
}

fn filter() -> impl Strategy<Value = i64> {
    prop_oneof![6 => Just(0i64), 1 => 1i64..12]
}

fn range_req() -> impl Strategy<Value = RangeRequest> {
    (
        (
            key_or_empty(),
            range_end(),
            prop_oneof![3 => Just(0i64), 3 => 1i64..4, 1 => Just(i64::MAX)],
            revision(),
        ),
        (
            0i32..3,
            0i32..5,
            sometimes(0.2),
            sometimes(0.2),
            any::<bool>(),
        ),
        (filter(), filter(), filter(), filter()),
    )
        .prop_map(
            |(
                (key, range_end, limit, revision),
                (so, st, keys_only, count_only, serializable),
                f,
            )| {
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
            },
        )
}

fn compare() -> impl Strategy<Value = Compare> {
    (
        key_or_empty(),
        prop_oneof![4 => Just(vec![]), 1 => range_end()],
        0i32..5,
        0i32..4,
        0i64..8,
        value(),
    )
        .prop_map(|(key, range_end, target, result, n, v)| {
            let target_union = Some(match CompareTarget::try_from(target).unwrap() {
                CompareTarget::Version => TargetUnion::Version(n % 4),
                CompareTarget::Create => TargetUnion::CreateRevision(n),
                CompareTarget::Mod => TargetUnion::ModRevision(n),
                CompareTarget::Value => TargetUnion::Value(v),
                CompareTarget::Lease => TargetUnion::Lease(n % 3),
            });
            Compare {
                result,
                target,
                key,
                target_union,
                range_end,
            }
        })
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
        prop_oneof![6 => leaf, 1 => txn_req(depth - 1).prop_map(|t| RequestOp { request: Some(Request::RequestTxn(t)) })]
            .boxed()
    }
}

fn txn_req(depth: u32) -> BoxedStrategy<TxnRequest> {
    (
        prop::collection::vec(compare(), 0..3),
        prop::collection::vec(request_op(depth), 0..4),
        prop::collection::vec(request_op(depth), 0..4),
    )
        .prop_map(|(compare, success, failure)| TxnRequest {
            compare,
            success,
            failure,
        })
        .boxed()
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => put_req().prop_map(Op::Put),
        2 => delete_req().prop_map(Op::Delete),
        3 => range_req().prop_map(Op::Range),
        4 => txn_req(2).prop_map(Op::Txn),
        1 => (-1i64..16).prop_map(Op::Compact),
        1 => (1u32..4).prop_map(Op::CompactStep),
        1 => (1i64..=2).prop_map(Op::Revoke),
        1 => (-1i64..16).prop_map(Op::HashKv),
    ]
}

// ---------------------------------------------------------------- the property

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut node = MemNode::new();
    node.leases.live.extend(LIVE_AT_START);
    let mut model = Model::new();

    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Put(p) => prop_assert_eq!(
                put_req_node(&mut node, p),
                model.put(p),
                "step {}: {:?}",
                i,
                op
            ),
            Op::Delete(d) => prop_assert_eq!(
                del_req(&mut node, d.clone()),
                model.delete(d),
                "step {}: {:?}",
                i,
                op
            ),
            Op::Range(r) => prop_assert_eq!(
                range(&mut node, r.clone()),
                model.range(r),
                "step {}: {:?}",
                i,
                op
            ),
            Op::Txn(t) => prop_assert_eq!(
                txn(&mut node, t.clone()),
                model.txn(t),
                "step {}: {:?}",
                i,
                op
            ),
            Op::Compact(rev) => {
                prop_assert_eq!(compact_only(&mut node, *rev), model.compact(*rev), "step {}", i)
            }
            // Changes no answer (checked by every read that follows).
            Op::CompactStep(units) => {
                compact_step(&mut node, Some(*units));
            }
            Op::Revoke(lease) => {
                node.revoke(*lease).map_err(TestCaseError::fail)?;
                model.revoke(*lease);
            }
            Op::HashKv(rev) => {
                let got = hash_kv(&node, *rev).map(|h| (h.header, h.compact_revision));
                let want = if *rev > 0 && *rev <= model.compacted {
                    Err(COMPACTED.to_string())
                } else if *rev > model.cur() {
                    Err(FUTURE_REV.to_string())
                } else {
                    Ok((header(model.cur()), model.compacted))
                };
                prop_assert_eq!(got, want, "step {}: {:?}", i, op);
            }
        }
        prop_assert_eq!(status_rev(&node), model.cur(), "revision after step {}", i);
        prop_assert_eq!(
            &events(&node),
            &model.events,
            "events after step {}: {:?}",
            i,
            op
        );
        prop_assert_eq!(
            &node.leases.attached,
            &model.attachments(),
            "leases after step {}",
            i
        );
        prop_assert_eq!(&node.leases.live, &model.live);
    }

    // Compaction work may be pending: every reader skips what it will remove.
    check_history(&mut node, &model)?;
    let pending_hash = hash_kv(&node, 0);
    compact_steps(&mut node, Some(1));
    check_history(&mut node, &model)?;
    prop_assert_eq!(hash_kv(&node, 0), pending_hash, "HashKV changed with compaction steps");
    // Hashes are a function of the history: a node replaying the same
    // successful commands from scratch agrees.
    let mut replay = MemNode::new();
    replay.leases.live.extend(LIVE_AT_START);
    for op in ops {
        match op {
            Op::Put(p) => {
                let _ = put_req_node(&mut replay, p);
            }
            Op::Delete(d) => {
                let _ = del_req(&mut replay, d.clone());
            }
            Op::Txn(t) => {
                let _ = txn(&mut replay, t.clone());
            }
            // All of the physical work at once, where `node` took it in steps.
            Op::Compact(rev) => {
                let _ = compact(&mut replay, *rev);
            }
            Op::Revoke(lease) => replay.revoke(*lease).map_err(TestCaseError::fail)?,
            Op::Range(_) | Op::HashKv(_) | Op::CompactStep(_) => {}
        }
    }
    prop_assert_eq!(replay.store.map.clone(), node.store.map.clone());
    prop_assert_eq!(hash_kv(&replay, 0), hash_kv(&node, 0));
    Ok(())
}

/// Every revision reads back as the model has it, and so does watch history.
fn check_history(node: &mut MemNode, model: &Model) -> Result<(), TestCaseError> {
    // Every revision reads back as the model has it (or fails the same way).
    for rev in 0..=model.cur() + 1 {
        let all = RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision: rev,
            ..Default::default()
        };
        prop_assert_eq!(
            range(node, all.clone()),
            model.range(&all),
            "full read at revision {}",
            rev
        );
    }
    // Watch history from every start revision, over a few ranges.
    for start in -1..=model.cur() + 1 {
        for (key, range_end) in [
            (&b"a"[..], &b""[..]),
            (b"b\0", b""),
            (b"a", b"b"),
            (b"b", b"\0"),
            (b"", b"\0"),
        ] {
            for prev_kv in [false, true] {
                let w = WatchCreateRequest {
                    key: key.to_vec(),
                    range_end: range_end.to_vec(),
                    start_revision: start,
                    prev_kv,
                    ..Default::default()
                };
                prop_assert_eq!(
                    query(node, command::TAG_WATCH_HISTORY, &w),
                    Ok(model.watch(&w)),
                    "watch history {:?}",
                    w
                );
            }
        }
    }
    Ok(())
}

fn put_req_node(n: &mut MemNode, p: &PutRequest) -> Res<PutResponse> {
    apply(n, command::TAG_PUT, p)
}

proptest! {
    // 400 cases by default (a few seconds); PROPTEST_CASES=N for more.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400),
        ..ProptestConfig::default()
    })]

    #[test]
    fn kv_mvcc_matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops)?;
    }
}

/// The generators do reach the interesting outcomes (so the property is not
/// vacuous): successes and each kind of error.
#[test]
fn generators_cover_outcomes() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = BTreeSet::new();
    for _ in 0..300 {
        let ops = prop::collection::vec(op(), 1..40)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut m = Model::new();
        for op in &ops {
            let outcome = match op {
                Op::Put(p) => m.put(p).map(|_| ()),
                Op::Delete(d) => m.delete(d).map(|_| ()),
                Op::Range(r) => m.range(r).map(|_| ()),
                Op::Txn(t) => m.txn(t).map(|r| {
                    if r.responses
                        .iter()
                        .any(|o| matches!(o.response, Some(Response::ResponseTxn(_))))
                    {
                        seen.insert("nested txn".to_string());
                    }
                    if !r.succeeded {
                        seen.insert("txn failure branch".to_string());
                    }
                }),
                Op::Compact(rev) => m.compact(*rev).map(|_| ()),
                Op::Revoke(l) => {
                    m.revoke(*l);
                    Ok(())
                }
                Op::HashKv(_) | Op::CompactStep(_) => Ok(()),
            };
            seen.insert(match outcome {
                Ok(()) => format!("ok {}", op.name()),
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
        "nested txn",
        "txn failure branch",
    ] {
        assert!(
            seen.contains(want),
            "generators never produced {want:?}; saw {seen:?}"
        );
    }
    assert!(
        seen.iter().filter(|s| s.starts_with("ok ")).count() >= 5,
        "{seen:?}"
    );
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Put(_) => "put",
            Op::Delete(_) => "delete",
            Op::Range(_) => "range",
            Op::Txn(_) => "txn",
            Op::Compact(_) => "compact",
            Op::CompactStep(_) => "compaction step",
            Op::Revoke(_) => "revoke",
            Op::HashKv(_) => "hash",
        }
    }
}
