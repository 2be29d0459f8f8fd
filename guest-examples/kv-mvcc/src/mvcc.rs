//! etcd v3.4's MVCC key-value semantics over a [`Store`].
//!
//! The functions here follow etcd's `etcdserver/apply.go` (request-level
//! semantics), `etcdserver/api/v3rpc/key.go` (request validation) and
//! `mvcc/kvstore*.go` (revisions) rule for rule; comments name the rule where
//! etcd's behaviour is surprising. Records are laid out as described in
//! [`crate::layout`].

use std::cmp::Ordering;
use std::collections::BTreeSet;

use prost::Message;

use crate::crc32c::Crc32c;
use crate::error::{Error, Result};
use crate::host::{Events, Leases, Store};
use crate::layout::{self, CompactTodo, IndexEntry, Rev};
use crate::pb::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    response_op::Response,
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    HashKvRequest, HashKvResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, ResponseOp, StatusResponse, TxnRequest, TxnResponse, WatchCreateRequest,
    WatchResponse,
};
use crate::pb::mvccpb::{event::EventType, Event, KeyValue};

/// Entries fetched per `scan` call when paging.
const PAGE: u32 = 256;

/// Events after which a watch-history answer ends (with the rest of the
/// revision that reached it): bounds the work of one query.
pub const WATCH_HISTORY_EVENTS: usize = 1000;

/// Revision-index rows after which a watch-history answer ends the same way:
/// a narrow watch far behind a busy store would otherwise scan every change
/// since its start in one query.
pub const WATCH_HISTORY_ROWS: usize = 10_000;

/// Encoded event bytes after which a watch-history answer ends the same way:
/// 1,000 events of 1.5 MiB values would not fit the guest's memory, nor a
/// client's default gRPC message limit (4 MiB in most clients).
pub const WATCH_HISTORY_BYTES: usize = 3 * 1024 * 1024;

/// Value of an `h/` record for a delete. A put's record is an encoded
/// `KeyValue` without its key (the store key has it); its create_revision is
/// never 0, so the encoding is never empty and starts with a field tag, never
/// with a zero byte: one `0x00` byte cannot be mistaken for a put.
const TOMBSTONE: &[u8] = &[0];

fn read_i64<S: Store + ?Sized>(s: &S, key: &[u8], default: i64) -> Result<i64> {
    match s.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_slice()
            .try_into()
            .map(i64::from_be_bytes)
            .map_err(|_| {
                Error::Corrupt(format!(
                    "{} is {} bytes",
                    String::from_utf8_lossy(key),
                    v.len()
                ))
            }),
    }
}

/// The store's current revision: 1 for an empty store, as etcd.
pub fn current_rev<S: Store + ?Sized>(s: &S) -> Result<i64> {
    read_i64(s, layout::META_REV, 1)
}

/// The revision of the last compaction; -1 if never compacted, as etcd.
pub fn compacted_rev<S: Store + ?Sized>(s: &S) -> Result<i64> {
    read_i64(s, layout::META_COMPACT, -1)
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// What a read sees: the current revision (and, read only when a past
/// revision is asked for, the compacted one: most requests never need it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub cur: i64,
}

impl View {
    pub fn of<S: Store + ?Sized>(s: &S) -> Result<View> {
        Ok(View {
            cur: current_rev(s)?,
        })
    }

    /// The compacted revision (no request changes it while another reads).
    pub fn compacted<S: Store + ?Sized>(&self, s: &S) -> Result<i64> {
        compacted_rev(s)
    }
}

/// The upper end of a key range, decoded from etcd's `range_end`.
#[derive(Debug, Clone, Copy)]
enum End<'a> {
    /// Empty `range_end`: only `key`.
    Single,
    /// `"\0"`: every key >= `key`.
    Unbounded,
    /// `[key, end)`.
    Until(&'a [u8]),
}

fn end_of(range_end: &[u8]) -> End<'_> {
    match range_end {
        [] => End::Single,
        [0] => End::Unbounded,
        e => End::Until(e),
    }
}

impl End<'_> {
    /// Whether `k` is in the range that starts at `key` and ends here.
    fn covers(self, key: &[u8], k: &[u8]) -> bool {
        match self {
            End::Single => k == key,
            End::Unbounded => k >= key,
            End::Until(e) => key <= k && k < e,
        }
    }
}

struct RangeOpts {
    /// <= 0: latest.
    rev: i64,
    /// <= 0: all.
    limit: i64,
    count_only: bool,
    /// Whether the caller needs values (latest reads can skip fetching them).
    need_value: bool,
}

struct Found {
    kvs: Vec<KeyValue>,
    /// Number of keys in the range at the revision, regardless of `limit`.
    count: i64,
}

fn corrupt_kv(what: &[u8]) -> Error {
    Error::Corrupt(format!(
        "undecodable record {:?}",
        String::from_utf8_lossy(what)
    ))
}

fn missing_hist(key: &[u8]) -> Error {
    Error::Corrupt(format!(
        "missing history record for {:?}",
        String::from_utf8_lossy(key)
    ))
}

/// Decodes an `h/` record value of `key`; `None` for a tombstone.
fn decode_hist(key: &[u8], v: &[u8]) -> Result<Option<KeyValue>> {
    if v == TOMBSTONE {
        return Ok(None);
    }
    let mut kv = KeyValue::decode(v).map_err(|_| corrupt_kv(key))?;
    kv.key = key.to_vec();
    Ok(Some(kv))
}

fn index_entry<S: Store + ?Sized>(s: &S, key: &[u8]) -> Result<Option<IndexEntry>> {
    match s.get(&layout::index_key(key)) {
        None => Ok(None),
        Some(v) => IndexEntry::decode(&v)
            .map(Some)
            .ok_or_else(|| corrupt_kv(key)),
    }
}

/// The latest key-value of a live key, from its index entry (and its `h/`
/// record when the value is needed).
fn load_kv<S: Store + ?Sized>(
    s: &S,
    key: &[u8],
    ie: &IndexEntry,
    need_value: bool,
) -> Result<KeyValue> {
    if !need_value {
        return Ok(KeyValue {
            key: key.to_vec(),
            create_revision: ie.create_revision,
            mod_revision: ie.modified.main,
            version: ie.version,
            value: Vec::new(),
            lease: ie.lease,
        });
    }
    let hk = layout::hist_key(key, ie.modified);
    let v = s.get(&hk).ok_or_else(|| missing_hist(key))?;
    decode_hist(key, &v)?.ok_or_else(|| corrupt_kv(key))
}

/// State of `key` at revision `rev` from the history (`None`: absent).
fn kv_at<S: Store + ?Sized>(s: &S, key: &[u8], rev: i64) -> Result<Option<KeyValue>> {
    let lo = layout::hist_prefix(key);
    let hi = layout::hist_key(key, Rev::new(rev + 1, 0));
    match s.scan(&lo, &hi, true, 1).into_iter().next() {
        None => Ok(None),
        Some((_, v)) => decode_hist(key, &v),
    }
}

/// The watch event of a put: the new key-value, key included.
fn put_event(kv: KeyValue) -> Event {
    Event {
        r#type: EventType::Put as i32,
        kv: Some(kv),
        prev_kv: None,
    }
}

/// The watch event of a delete: only the key and the delete's revision, as
/// etcd's watchers see it.
fn delete_event(key: Vec<u8>, rev: i64) -> Event {
    Event {
        r#type: EventType::Delete as i32,
        kv: Some(KeyValue {
            key,
            mod_revision: rev,
            ..Default::default()
        }),
        prev_kv: None,
    }
}

/// Calls `f` on every entry of `[start, end)` in key order, paging.
fn for_each<S: Store + ?Sized>(
    s: &S,
    start: Vec<u8>,
    end: &[u8],
    mut f: impl FnMut(Vec<u8>, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let mut start = start;
    loop {
        if !end.is_empty() && start.as_slice() >= end {
            return Ok(());
        }
        let page = s.scan(&start, end, false, PAGE);
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        let mut next = last.clone();
        next.push(0);
        for (k, v) in page {
            f(k, v)?;
        }
        start = next;
    }
}

/// etcd's `storeTxnRead.rangeKeys`: the keys of `[key, end)` at `o.rev`.
fn range_keys<S: Store + ?Sized>(
    s: &S,
    view: View,
    key: &[u8],
    end: End,
    o: RangeOpts,
) -> Result<Found> {
    let mut rev = o.rev;
    if rev > view.cur {
        return Err(Error::FutureRev);
    }
    if rev <= 0 {
        rev = view.cur;
    }
    // The compacted revision is never above the current one.
    if rev < view.cur && rev < view.compacted(s)? {
        return Err(Error::Compacted);
    }
    let mut found = Found {
        kvs: Vec::new(),
        count: 0,
    };
    let wants_more =
        |found: &Found| !o.count_only && (o.limit <= 0 || (found.kvs.len() as i64) < o.limit);
    if let End::Until(e) = end {
        if e <= key {
            return Ok(found);
        }
    }

    if rev == view.cur {
        // Latest: the index holds exactly the live keys.
        match end {
            End::Single => {
                if let Some(ie) = index_entry(s, key)? {
                    found.count = 1;
                    if wants_more(&found) {
                        found.kvs.push(load_kv(s, key, &ie, o.need_value)?);
                    }
                }
            }
            End::Unbounded | End::Until(_) => {
                let stop = match end {
                    End::Until(e) => layout::index_key(e),
                    _ => layout::INDEX_END.to_vec(),
                };
                for_each(s, layout::index_key(key), &stop, |k, v| {
                    found.count += 1;
                    if wants_more(&found) {
                        let user_key = &k[layout::INDEX.len()..];
                        let ie = IndexEntry::decode(&v).ok_or_else(|| corrupt_kv(user_key))?;
                        found.kvs.push(load_kv(s, user_key, &ie, o.need_value)?);
                    }
                    Ok(())
                })?;
            }
        }
        return Ok(found);
    }

    // A past revision: each key's newest history record at or below `rev`.
    match end {
        End::Single => {
            if let Some(kv) = kv_at(s, key, rev)? {
                found.count = 1;
                if wants_more(&found) {
                    found.kvs.push(kv);
                }
            }
        }
        End::Unbounded | End::Until(_) => {
            let stop = match end {
                End::Until(e) => layout::hist_prefix(e),
                _ => layout::HIST_END.to_vec(),
            };
            let mut start = layout::hist_prefix(key);
            // One step per distinct key: find it, read its state, skip past it.
            while start < stop {
                let Some((hk, _)) = s.scan(&start, &stop, false, 1).into_iter().next() else {
                    break;
                };
                let (user_key, _) = layout::parse_hist_key(&hk).ok_or_else(|| corrupt_kv(&hk))?;
                if let Some(kv) = kv_at(s, &user_key, rev)? {
                    found.count += 1;
                    if wants_more(&found) {
                        found.kvs.push(kv);
                    }
                }
                start = layout::hist_after(&user_key);
            }
        }
    }
    Ok(found)
}

/// etcd's `checkRangeRequest` (gRPC-level validation).
fn check_range_request(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// etcd's `checkPutRequest`.
fn check_put_request(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

/// etcd's `checkDeleteRequest`.
fn check_delete_request(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// A Range (top level, in a txn, or a query). `view.cur` is the revision the
/// response reports.
pub(crate) fn range<S: Store + ?Sized>(
    s: &S,
    view: View,
    r: &RangeRequest,
) -> Result<RangeResponse> {
    let mut limit = r.limit;
    if r.sort_order != SortOrder::None as i32
        || r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
    {
        // Fetch everything; sort and truncate afterwards.
        limit = 0;
    }
    if limit > 0 {
        // One extra for `more`; Go's int64 wraps on overflow, so must we.
        limit = limit.wrapping_add(1);
    }
    let need_value = !r.keys_only || r.sort_target == SortTarget::Value as i32;
    let Found { mut kvs, count } = range_keys(
        s,
        view,
        &r.key,
        end_of(&r.range_end),
        RangeOpts {
            rev: r.revision,
            limit,
            count_only: r.count_only,
            need_value,
        },
    )?;

    // Filters prune `kvs` but not `count` (etcd's rule).
    if r.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= r.max_mod_revision);
    }
    if r.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= r.min_mod_revision);
    }
    if r.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= r.max_create_revision);
    }
    if r.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= r.min_create_revision);
    }

    // etcd: a target other than KEY with order NONE sorts ascending; results
    // are otherwise already in key order. The sort is stable, so ties keep key
    // order (etcd's sort.Sort is not stable in general but is on <= 12 items).
    let mut order = r.sort_order;
    if r.sort_target != SortTarget::Key as i32 && order == SortOrder::None as i32 {
        order = SortOrder::Ascend as i32;
    }
    if order != SortOrder::None as i32 {
        let cmp: Option<fn(&KeyValue, &KeyValue) -> Ordering> =
            match SortTarget::try_from(r.sort_target) {
                Ok(SortTarget::Key) => Some(|a, b| a.key.cmp(&b.key)),
                Ok(SortTarget::Version) => Some(|a, b| a.version.cmp(&b.version)),
                Ok(SortTarget::Create) => Some(|a, b| a.create_revision.cmp(&b.create_revision)),
                Ok(SortTarget::Mod) => Some(|a, b| a.mod_revision.cmp(&b.mod_revision)),
                Ok(SortTarget::Value) => Some(|a, b| a.value.cmp(&b.value)),
                Err(_) => None,
            };
        if let Some(cmp) = cmp {
            if order == SortOrder::Ascend as i32 {
                kvs.sort_by(cmp);
            } else if order == SortOrder::Descend as i32 {
                kvs.sort_by(|a, b| cmp(b, a));
            }
        }
    }

    let mut more = false;
    if r.limit > 0 && kvs.len() as i64 > r.limit {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header: header(view.cur),
        kvs,
        more,
        count,
    })
}

/// A write request in progress: one main revision, sub-revisions per change.
pub(crate) struct Writer<'a, S: ?Sized, L: ?Sized, E: ?Sized> {
    pub s: &'a mut S,
    pub leases: &'a mut L,
    pub events: &'a mut E,
    begin: i64,
    changes: i64,
}

impl<'a, S: Store + ?Sized, L: Leases + ?Sized, E: Events + ?Sized> Writer<'a, S, L, E> {
    pub fn new(s: &'a mut S, leases: &'a mut L, events: &'a mut E) -> Result<Self> {
        let View { cur } = View::of(s)?;
        Ok(Writer {
            s,
            leases,
            events,
            begin: cur,
            changes: 0,
        })
    }

    /// What reads inside this request see (etcd's `storeTxnWrite.Range`).
    pub fn view(&self) -> View {
        View {
            cur: self.begin + i64::from(self.changes > 0),
        }
    }

    fn next(&self) -> Rev {
        Rev::new(self.begin + 1, self.changes)
    }

    fn emit(&mut self, key: &[u8], ev: Event) {
        self.events.emit(key, &ev.encode_to_vec());
    }

    /// etcd's `storeTxnWrite.put`; returns the response revision.
    fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<i64> {
        let rev = self.next();
        let prev_ie = index_entry(self.s, key)?;
        let (create_revision, version) = match &prev_ie {
            Some(ie) => (ie.create_revision, ie.version + 1),
            None => (rev.main, 1),
        };
        // The history record leaves the key out: the store key holds it.
        let mut kv = KeyValue {
            key: Vec::new(),
            create_revision,
            mod_revision: rev.main,
            version,
            value,
            lease,
        };
        self.s.set(&layout::hist_key(key, rev), &kv.encode_to_vec());
        kv.key = key.to_vec();
        self.s.set(&layout::rev_key(rev), key);
        self.s.set(
            &layout::index_key(key),
            &IndexEntry {
                modified: rev,
                create_revision,
                version,
                lease,
            }
            .encode(),
        );
        let old = prev_ie.map_or(0, |ie| ie.lease);
        if old != 0 && old != lease {
            self.leases.detach(old, key);
        }
        if lease != 0 && lease != old {
            self.leases.attach(lease, key);
        }
        self.emit(key, put_event(kv));
        self.changes += 1;
        Ok(rev.main)
    }

    /// etcd's `storeTxnWrite.delete` of one live key, `prev` its current kv.
    fn delete(&mut self, prev: KeyValue, detach: bool) {
        let rev = self.next();
        let key = prev.key.clone();
        self.s.set(&layout::hist_key(&key, rev), TOMBSTONE);
        self.s.set(&layout::rev_key(rev), &key);
        self.s.remove(&layout::index_key(&key));
        if detach && prev.lease != 0 {
            self.leases.detach(prev.lease, &key);
        }
        self.emit(&key, delete_event(key.clone(), rev.main));
        self.changes += 1;
    }

    /// etcd's `storeTxnWrite.DeleteRange`: the deleted key-values and the
    /// response revision (unchanged when nothing was written so far).
    fn delete_range(&mut self, key: &[u8], end: End, need_values: bool) -> Result<(Vec<KeyValue>, i64)> {
        let opts = RangeOpts {
            rev: 0,
            limit: 0,
            count_only: false,
            need_value: need_values,
        };
        let Found { kvs, .. } = range_keys(self.s, self.view(), key, end, opts)?;
        for kv in &kvs {
            self.delete(kv.clone(), true);
        }
        let rev = if !kvs.is_empty() || self.changes > 0 {
            self.begin + 1
        } else {
            self.begin
        };
        Ok((kvs, rev))
    }

    /// Ends the request: records the new revision if anything changed and
    /// returns the store revision after the request.
    pub fn finish(self) -> i64 {
        if self.changes > 0 {
            self.s
                .set(layout::META_REV, &(self.begin + 1).to_be_bytes());
            self.begin + 1
        } else {
            self.begin
        }
    }
}

/// A Put. `top_level`: not inside a txn (a txn checks leases beforehand).
pub(crate) fn put<S, L, E>(
    w: &mut Writer<S, L, E>,
    p: &PutRequest,
    top_level: bool,
) -> Result<PutResponse>
where
    S: Store + ?Sized,
    L: Leases + ?Sized,
    E: Events + ?Sized,
{
    let mut value = p.value.clone();
    let mut lease = p.lease;
    if top_level && lease != 0 && !w.leases.is_live(lease) {
        return Err(Error::LeaseNotFound);
    }
    let mut prev = None;
    if p.ignore_value || p.ignore_lease || p.prev_kv {
        let opts = RangeOpts {
            rev: 0,
            limit: 0,
            count_only: false,
            need_value: true,
        };
        prev = range_keys(w.s, w.view(), &p.key, End::Single, opts)?
            .kvs
            .into_iter()
            .next();
    }
    if (p.ignore_value || p.ignore_lease) && prev.is_none() {
        return Err(Error::KeyNotFound);
    }
    if let Some(prev) = &prev {
        if p.ignore_value {
            value = prev.value.clone();
        }
        if p.ignore_lease {
            lease = prev.lease;
        }
    }
    let revision = w.put(&p.key, value, lease)?;
    Ok(PutResponse {
        header: header(revision),
        prev_kv: if p.prev_kv { prev } else { None },
    })
}

pub(crate) fn delete_range<S, L, E>(
    w: &mut Writer<S, L, E>,
    d: &DeleteRangeRequest,
) -> Result<DeleteRangeResponse>
where
    S: Store + ?Sized,
    L: Leases + ?Sized,
    E: Events + ?Sized,
{
    let (deleted, revision) = w.delete_range(&d.key, end_of(&d.range_end), d.prev_kv)?;
    Ok(DeleteRangeResponse {
        header: header(revision),
        deleted: deleted.len() as i64,
        prev_kvs: if d.prev_kv { deleted } else { Vec::new() },
    })
}

// ------------------------------------------------------------------ txn

/// etcd's `checkTxnRequest` without its op budget (the host checks
/// `--max-txn-ops` before proposing, as etcd's gRPC layer does): empty keys
/// and empty ops, recursively.
fn check_txn_request(r: &TxnRequest) -> Result<()> {
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(Request::RequestRange(x)) => check_range_request(x)?,
            Some(Request::RequestPut(x)) => check_put_request(x)?,
            Some(Request::RequestDeleteRange(x)) => check_delete_request(x)?,
            Some(Request::RequestTxn(x)) => check_txn_request(x)?,
            // etcd: "empty op / nil entry".
            None => return Err(Error::KeyNotFound),
        }
    }
    Ok(())
}

/// Whether every op of `r` (and of its nested txns) only reads: etcd's
/// `isTxnReadonly`.
pub fn txn_is_read_only(r: &TxnRequest) -> bool {
    r.success
        .iter()
        .chain(&r.failure)
        .all(|op| match &op.request {
            Some(Request::RequestRange(_)) | None => true,
            Some(Request::RequestTxn(t)) => txn_is_read_only(t),
            _ => false,
        })
}

/// A deleted interval as etcd's `adt.StringAffineInterval`: `[begin, end)`
/// compared bytewise. A single-key delete is `[key, key+"\0")`. A `"\0"`
/// range end ("every key >= key") is taken literally, so such a delete
/// overlaps no put: etcd 3.4 behaves so, and so does kv-mvcc.
struct Interval {
    begin: Vec<u8>,
    end: Vec<u8>,
}

impl Interval {
    fn contains(&self, k: &[u8]) -> bool {
        self.begin.as_slice() <= k && k < self.end.as_slice()
    }
}

fn intersects(dels: &[Interval], k: &[u8]) -> bool {
    dels.iter().any(|d| d.contains(k))
}

/// etcd's `checkIntervals`: no key may be put twice, nor put and deleted, in
/// one txn (then/else branches of one nested txn may put the same key).
fn check_intervals(ops: &[RequestOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<Interval>)> {
    let mut dels = Vec::new();
    for op in ops {
        if let Some(Request::RequestDeleteRange(d)) = &op.request {
            let end = if d.range_end.is_empty() {
                let mut e = d.key.clone();
                e.push(0);
                e
            } else {
                d.range_end.clone()
            };
            dels.push(Interval {
                begin: d.key.clone(),
                end,
            });
        }
    }
    let mut puts = BTreeSet::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || intersects(&dels, k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in puts_else {
            if puts.contains(&k) && !puts_then.contains(&k) {
                return Err(Error::DuplicateKey);
            }
            if intersects(&dels, &k) {
                return Err(Error::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || intersects(&dels, &p.key) {
            return Err(Error::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

/// Which branch a txn takes, and the same for each nested txn of that branch,
/// all decided on the state before the txn (etcd's `compareToPath`).
struct Path {
    succeeded: bool,
    nested: Vec<Path>,
}

fn compare_to_path<S: Store + ?Sized>(s: &S, view: View, r: &TxnRequest) -> Path {
    let succeeded = r.compare.iter().all(|c| apply_compare(s, view, c));
    let ops = if succeeded { &r.success } else { &r.failure };
    let nested = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestTxn(t)) => Some(compare_to_path(s, view, t)),
            _ => None,
        })
        .collect();
    Path { succeeded, nested }
}

/// etcd's `applyCompare`: every key of the range must satisfy the compare; a
/// missing key compares as a zero KeyValue, except that VALUE fails.
fn apply_compare<S: Store + ?Sized>(s: &S, view: View, c: &Compare) -> bool {
    let need_value = c.target == CompareTarget::Value as i32;
    let opts = RangeOpts {
        rev: 0,
        limit: 0,
        count_only: false,
        need_value,
    };
    let Ok(found) = range_keys(s, view, &c.key, end_of(&c.range_end), opts) else {
        return false;
    };
    if found.kvs.is_empty() {
        if need_value {
            return false;
        }
        return compare_kv(c, &KeyValue::default());
    }
    found.kvs.iter().all(|kv| compare_kv(c, kv))
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use TargetUnion as U;
    // A target_union holding another field reads as this field's zero value, as
    // etcd's generated getters do.
    let u = c.target_union.as_ref();
    let result = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Value) => kv.value.as_slice().cmp(match u {
            Some(U::Value(v)) => v.as_slice(),
            _ => &[],
        }),
        Ok(CompareTarget::Create) => kv.create_revision.cmp(&match u {
            Some(U::CreateRevision(x)) => *x,
            _ => 0,
        }),
        Ok(CompareTarget::Mod) => kv.mod_revision.cmp(&match u {
            Some(U::ModRevision(x)) => *x,
            _ => 0,
        }),
        Ok(CompareTarget::Version) => kv.version.cmp(&match u {
            Some(U::Version(x)) => *x,
            _ => 0,
        }),
        Ok(CompareTarget::Lease) => kv.lease.cmp(&match u {
            Some(U::Lease(x)) => *x,
            _ => 0,
        }),
        Err(_) => Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => result == Ordering::Equal,
        Ok(CompareResult::NotEqual) => result != Ordering::Equal,
        Ok(CompareResult::Greater) => result == Ordering::Greater,
        Ok(CompareResult::Less) => result == Ordering::Less,
        Err(_) => true,
    }
}

/// etcd's `checkRequests`: `f` on every non-txn op of the taken branches.
fn check_requests(
    r: &TxnRequest,
    path: &Path,
    f: &mut dyn FnMut(&RequestOp) -> Result<()>,
) -> Result<()> {
    let ops = if path.succeeded {
        &r.success
    } else {
        &r.failure
    };
    let mut nested = path.nested.iter();
    for op in ops {
        if let Some(Request::RequestTxn(t)) = &op.request {
            let p = nested.next().expect("a path per nested txn");
            check_requests(t, p, f)?;
            continue;
        }
        f(op)?;
    }
    Ok(())
}

fn apply_ops<S, L, E>(w: &mut Writer<S, L, E>, r: &TxnRequest, path: &Path) -> Result<TxnResponse>
where
    S: Store + ?Sized,
    L: Leases + ?Sized,
    E: Events + ?Sized,
{
    let ops = if path.succeeded {
        &r.success
    } else {
        &r.failure
    };
    let mut nested = path.nested.iter();
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(Request::RequestRange(x)) => {
                Some(Response::ResponseRange(range(w.s, w.view(), x)?))
            }
            Some(Request::RequestPut(x)) => Some(Response::ResponsePut(put(w, x, false)?)),
            Some(Request::RequestDeleteRange(x)) => {
                Some(Response::ResponseDeleteRange(delete_range(w, x)?))
            }
            Some(Request::RequestTxn(x)) => {
                let p = nested.next().expect("a path per nested txn");
                Some(Response::ResponseTxn(apply_ops(w, x, p)?))
            }
            None => None,
        };
        responses.push(ResponseOp { response });
    }
    // Nested txn responses carry an empty header, as etcd's do.
    Ok(TxnResponse {
        header: Some(ResponseHeader::default()),
        succeeded: path.succeeded,
        responses,
    })
}

/// A Txn. The caller finishes the writer.
pub(crate) fn txn<S, L, E>(w: &mut Writer<S, L, E>, r: &TxnRequest) -> Result<TxnResponse>
where
    S: Store + ?Sized,
    L: Leases + ?Sized,
    E: Events + ?Sized,
{
    check_txn_request(r)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;

    let view = w.view();
    let path = compare_to_path(w.s, view, r);
    {
        let (s, leases) = (&*w.s, &*w.leases);
        check_requests(r, &path, &mut |op| {
            let Some(Request::RequestPut(p)) = &op.request else {
                return Ok(());
            };
            if p.ignore_value || p.ignore_lease {
                let opts = RangeOpts {
                    rev: 0,
                    limit: 0,
                    count_only: false,
                    need_value: false,
                };
                if range_keys(s, view, &p.key, End::Single, opts)?
                    .kvs
                    .is_empty()
                {
                    return Err(Error::KeyNotFound);
                }
            }
            if p.lease != 0 && !leases.is_live(p.lease) {
                return Err(Error::LeaseNotFound);
            }
            Ok(())
        })?;
    }
    check_requests(r, &path, &mut |op| {
        let Some(Request::RequestRange(x)) = &op.request else {
            return Ok(());
        };
        // etcd's checkRequestRange; note a negative revision below the
        // compacted one (-1 when never compacted) counts as compacted here.
        match x.revision {
            0 => Ok(()),
            rev if rev > view.cur => Err(Error::FutureRev),
            rev if rev < view.compacted(&*w.s)? => Err(Error::Compacted),
            _ => Ok(()),
        }
    })?;

    let mut resp = apply_ops(w, r, &path)?;
    resp.header = header(w.view().cur);
    Ok(resp)
}

// ------------------------------------------------------------------ top level

/// A top-level Range (applied through the log or answered as a query).
pub fn range_request<S: Store + ?Sized>(s: &S, r: &RangeRequest) -> Result<RangeResponse> {
    check_range_request(r)?;
    range(s, View::of(s)?, r)
}

pub fn put_request<S, L, E>(
    s: &mut S,
    leases: &mut L,
    events: &mut E,
    p: &PutRequest,
) -> Result<PutResponse>
where
    S: Store + ?Sized,
    L: Leases + ?Sized,
    E: Events + ?Sized,
{
    check_put_request(p)?;
    let mut w = Writer::new(s, leases, events)?;
    let resp = put(&mut w, p, true)?;
    w.finish();
    Ok(resp)
}

pub fn delete_range_request<S, L, E>(
    s: &mut S,
    leases: &mut L,
    events: &mut E,
    d: &DeleteRangeRequest,
) -> Result<DeleteRangeResponse>
where
    S: Store + ?Sized,
    L: Leases + ?Sized,
    E: Events + ?Sized,
{
    check_delete_request(d)?;
    let mut w = Writer::new(s, leases, events)?;
    let resp = delete_range(&mut w, d)?;
    w.finish();
    Ok(resp)
}

pub fn txn_request<S, L, E>(
    s: &mut S,
    leases: &mut L,
    events: &mut E,
    r: &TxnRequest,
) -> Result<TxnResponse>
where
    S: Store + ?Sized,
    L: Leases + ?Sized,
    E: Events + ?Sized,
{
    let mut w = Writer::new(s, leases, events)?;
    let resp = txn(&mut w, r)?;
    w.finish();
    Ok(resp)
}

/// A read-only txn answered from a read-only store, as etcd serves those
/// without raft: the same code path as an applied txn, over a store that
/// refuses writes (none can happen: `r` was checked to only read).
pub fn read_only_txn_request<S: Store + ?Sized>(s: &S, r: &TxnRequest) -> Result<TxnResponse> {
    if !txn_is_read_only(r) {
        return Err(Error::BadCommand(
            "kv-mvcc can only answer a read-only txn as a query".into(),
        ));
    }
    txn_request(&mut ReadOnly(s), &mut ReadOnly(s), &mut ReadOnly(s), r)
}

/// The environment of a read-only txn: reads go to the store; the write half
/// of each trait is unreachable for a txn that only reads.
struct ReadOnly<'a, S: ?Sized>(&'a S);

impl<S: Store + ?Sized> Store for ReadOnly<'_, S> {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key)
    }
    fn set(&mut self, _: &[u8], _: &[u8]) {
        unreachable!("a read-only txn wrote")
    }
    fn remove(&mut self, _: &[u8]) {
        unreachable!("a read-only txn removed")
    }
    fn scan(&self, start: &[u8], end: &[u8], reverse: bool, limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.0.scan(start, end, reverse, limit)
    }
}

impl<S: ?Sized> Leases for ReadOnly<'_, S> {
    fn is_live(&self, _: i64) -> bool {
        unreachable!("a read-only txn checked a lease")
    }
    fn attach(&mut self, _: i64, _: &[u8]) {
        unreachable!("a read-only txn attached a lease")
    }
    fn detach(&mut self, _: i64, _: &[u8]) {
        unreachable!("a read-only txn detached a lease")
    }
}

impl<S: ?Sized> Events for ReadOnly<'_, S> {
    fn emit(&mut self, _: &[u8], _: &[u8]) {
        unreachable!("a read-only txn emitted an event")
    }
}

/// Compaction at `c.revision`: from now on reads below it fail, and history
/// at or below it is to be removed except the newest version of each key
/// that is live there. The removal is left to [`compact_step`], which the
/// host runs in log entries of their own until it reports no more work, so
/// no single command has to remove an unbounded history. Does not change the
/// revision. `physical` is the host's business (whether it answers before or
/// after the steps).
pub fn compact_request<S: Store + ?Sized>(
    s: &mut S,
    c: &CompactionRequest,
) -> Result<CompactionResponse> {
    let cur = current_rev(s)?;
    let compacted = compacted_rev(s)?;
    let rev = c.revision;
    if rev <= compacted {
        return Err(Error::Compacted);
    }
    if rev > cur {
        return Err(Error::FutureRev);
    }
    // The walk over `r/` starts at the previous compacted revision, whose
    // surviving changes kept their `r/` records, and goes up to `rev`. Work
    // still pending from the previous compaction goes on from where it
    // stopped (every key it passed was compacted to the previous revision, and
    // each that changed since has an `r/` record ahead), but no later than
    // that revision: so the store ends the same however compactions and steps
    // interleave.
    let from = Rev::new(compacted.max(0), 0);
    let todo = match compact_todo(s)? {
        Some(t) => CompactTodo {
            target: rev,
            next: t.next.min(from),
            key: t.key,
        },
        None => CompactTodo {
            target: rev,
            next: from,
            key: None,
        },
    };
    s.set(layout::META_COMPACT_TODO, &todo.encode());
    s.set(layout::META_COMPACT, &rev.to_be_bytes());
    Ok(CompactionResponse {
        header: header(cur),
    })
}

fn compact_todo<S: Store + ?Sized>(s: &S) -> Result<Option<CompactTodo>> {
    s.get(layout::META_COMPACT_TODO)
        .map(|v| CompactTodo::decode(&v).ok_or_else(|| corrupt_kv(layout::META_COMPACT_TODO)))
        .transpose()
}

/// Work units a compaction step does unless told otherwise: one per record it
/// reads, plus one per [`COMPACT_VALUE_UNIT`] bytes of value.
pub const COMPACT_STEP_UNITS: u32 = 1_000;

/// Value bytes that cost a compaction step one more unit.
const COMPACT_VALUE_UNIT: usize = 64 * 1024;

/// History records a compaction step reads per `scan`: values come along,
/// and 32 of etcd's largest (1.5 MiB) fit any memory budget.
const COMPACT_PAGE: u32 = 32;

/// One bounded step of the physical compaction [`compact_request`] left:
/// about `units` work units (at least one record), then it stops and records
/// where. Returns whether work remains. Deterministic, as everything applied.
///
/// Every reader gets the same answers before, during and after the steps:
/// reads at a revision R at or above the compacted one C see each key's
/// newest record at or below R, and a key's records are removed oldest
/// first with a tombstone last, so that record is never uncovered early.
/// HashKV and watch history, which read records at or below C, skip those
/// compaction will remove ([`hash_kv_request`], [`watch_history`]).
pub fn compact_step<S: Store + ?Sized>(s: &mut S, units: u32) -> Result<bool> {
    let Some(mut todo) = compact_todo(s)? else {
        return Ok(false);
    };
    let mut left = u64::from(units.max(1));
    let more = compact_some(s, &mut todo, &mut left)?;
    if more {
        s.set(layout::META_COMPACT_TODO, &todo.encode());
    } else {
        s.remove(layout::META_COMPACT_TODO);
    }
    Ok(more)
}

/// Whether a compaction left work for [`compact_step`]s.
pub fn compaction_pending<S: Store + ?Sized>(s: &S) -> Result<bool> {
    Ok(compact_todo(s)?.is_some())
}

/// The body of [`compact_step`]: advances `todo` while `left` lasts; false
/// once every key is done.
///
/// The `r/` records from the previous compaction's revision on are walked in
/// order: each names a key to compact (its `h/` records), and is removed when
/// the walk passes it unless it is at the compacted revision and its change
/// survives (watch history reads `r/` from the compacted revision on, nothing
/// reads below it). So `r/` loses records only behind the walk: a later `scan`
/// never has to step over a run of deleted records (a RocksDB scan over
/// 200,000 of them took ~0.4 s), and `h/` records are removed per key.
fn compact_some<S: Store + ?Sized>(s: &mut S, todo: &mut CompactTodo, left: &mut u64) -> Result<bool> {
    // Keys done in this step: their later `r/` records need no compaction.
    let mut done = BTreeSet::new();
    if let Some(key) = todo.key.take() {
        if !compact_key(s, &key, todo.target, left)? {
            todo.key = Some(key);
            return Ok(true);
        }
        done.insert(key);
    }
    let hi = layout::rev_key(Rev::new(todo.target + 1, 0));
    loop {
        if *left == 0 {
            return Ok(true);
        }
        let limit = PAGE.min(u32::try_from(*left).unwrap_or(u32::MAX));
        let page = s.scan(&layout::rev_key(todo.next), &hi, false, limit);
        if page.is_empty() {
            return Ok(false);
        }
        for (rk, key) in page {
            let r = layout::parse_rev_key(&rk).ok_or_else(|| corrupt_kv(&rk))?;
            *left = left.saturating_sub(1);
            if !done.contains(&key) {
                if !compact_key(s, &key, todo.target, left)? {
                    // The walk goes on from this record once the key is done.
                    todo.next = r;
                    todo.key = Some(key);
                    return Ok(true);
                }
                done.insert(key.clone());
            }
            if r.main < todo.target || s.get(&layout::hist_key(&key, r)).is_none() {
                s.remove(&rk);
            }
            todo.next = Rev::new(r.main, r.sub + 1);
            if *left == 0 {
                return Ok(true);
            }
        }
    }
}

/// Removes `key`'s history (`h/`) at or below `target` except its newest
/// record there if that is a put, oldest first. False if `left` ran out
/// before.
fn compact_key<S: Store + ?Sized>(s: &mut S, key: &[u8], target: i64, left: &mut u64) -> Result<bool> {
    let above = layout::hist_key(key, Rev::new(target + 1, 0));
    let mut from = layout::hist_prefix(key);
    // The newest record read so far: removed once a newer one shows up.
    let mut newest: Option<(Vec<u8>, bool)> = None;
    loop {
        // Two records at least, even with nothing `left`, so that every call
        // removes one or finishes the key.
        let limit = COMPACT_PAGE.min(u32::try_from(*left).unwrap_or(u32::MAX)).max(2);
        let page = s.scan(&from, &above, false, limit);
        let full = page.len() == limit as usize;
        for (hk, v) in page {
            *left = left.saturating_sub(1 + (v.len() / COMPACT_VALUE_UNIT) as u64);
            if let Some((older, _)) = newest.replace((hk, v == TOMBSTONE)) {
                s.remove(&older);
            }
        }
        if !full {
            break;
        }
        if *left == 0 {
            return Ok(false);
        }
        let Some((last, _)) = &newest else { break };
        from = last.clone();
        from.push(0);
    }
    if let Some((hk, true)) = newest {
        s.remove(&hk);
    }
    Ok(true)
}

/// HashKV: a CRC-32C over every history record (store key and value) at or
/// below the revision (0: latest), in store order, leaving out the records
/// at or below the compacted revision that compaction removes (they may still
/// be there while [`compact_step`]s run). Equal on replicas that applied the
/// same log up to the revision, however far their compaction steps got.
pub fn hash_kv_request<S: Store + ?Sized>(s: &S, r: &HashKvRequest) -> Result<HashKvResponse> {
    let cur = current_rev(s)?;
    let compacted = compacted_rev(s)?;
    let mut rev = r.revision;
    if rev > 0 && rev <= compacted {
        return Err(Error::Compacted);
    }
    if rev > 0 && rev > cur {
        return Err(Error::FutureRev);
    }
    if rev == 0 {
        rev = cur;
    }
    let mut h = Crc32c::new();
    // A key's newest record at or below the compacted revision so far, with
    // its user key: it survives compaction if it stays the newest and is a put.
    let mut kept: Option<(Vec<u8>, Vec<u8>, Vec<u8>)> = None;
    fn hash_kept(h: &mut Crc32c, kept: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>) {
        if let Some((_, k, v)) = kept.filter(|(_, _, v)| v != TOMBSTONE) {
            h.update(&k);
            h.update(&v);
        }
    }
    for_each(s, layout::HIST.to_vec(), layout::HIST_END, |k, v| {
        let (key, r) = layout::parse_hist_key(&k).ok_or_else(|| corrupt_kv(&k))?;
        if r.main <= compacted {
            // An older record of the same key in `kept` is one compaction removes.
            if kept.as_ref().is_some_and(|(kk, _, _)| *kk != key) {
                hash_kept(&mut h, kept.take());
            }
            kept = Some((key, k, v));
            return Ok(());
        }
        hash_kept(&mut h, kept.take());
        if r.main <= rev {
            h.update(&k);
            h.update(&v);
        }
        Ok(())
    })?;
    hash_kept(&mut h, kept);
    Ok(HashKvResponse {
        header: header(cur),
        hash: h.finish(),
        compact_revision: compacted,
    })
}

/// Watch history: the events of revisions `r.start_revision` (<= 0: the
/// current one + 1) and on for the keys of `r.key`/`r.range_end`, each as its
/// write emitted it, plus `prev_kv` if `r.prev_kv` (the key at the revision
/// before the event's, where etcd's watch server reads it). For a watch that
/// starts in the past or fell behind; live events come from `events.emit`.
///
/// `header.revision` is the last revision the answer covers: the current one,
/// or the revision in which the events reached [`WATCH_HISTORY_EVENTS`] or
/// [`WATCH_HISTORY_BYTES`], or the rows scanned reached [`WATCH_HISTORY_ROWS`]
/// (a revision is never split; the host asks again from the next one). A start below the compacted revision
/// answers only `compact_revision`.
pub fn watch_history<S: Store + ?Sized>(s: &S, r: &WatchCreateRequest) -> Result<WatchResponse> {
    let cur = current_rev(s)?;
    let start = if r.start_revision <= 0 {
        cur + 1
    } else {
        r.start_revision
    };
    let answer = |events, covered| WatchResponse {
        header: header(covered),
        events,
        ..Default::default()
    };
    if start > cur {
        return Ok(answer(Vec::new(), cur));
    }
    let compacted = compacted_rev(s)?;
    // As etcd: a watch from the compacted revision C itself is served with
    // what compaction kept of C (its puts that are still their key's newest
    // version; C's deletes are gone, and so are the versions before C that
    // prev_kv would show).
    if start < compacted {
        return Ok(WatchResponse {
            header: header(cur),
            compact_revision: compacted,
            ..Default::default()
        });
    }
    // etcd's watch reads an empty key as "\0" (the host normalises it too).
    let key: &[u8] = if r.key.is_empty() { &[0] } else { &r.key };
    let end = end_of(&r.range_end);
    let mut events = Vec::new();
    // The revision in which `events` or `scanned` reached its cap.
    let mut full_at = None;
    let mut scanned = 0;
    let mut bytes = 0;
    let mut from = layout::rev_key(Rev::new(start, 0));
    let to = layout::rev_key(Rev::new(cur + 1, 0));
    loop {
        let page = s.scan(&from, &to, false, PAGE);
        let Some((last, _)) = page.last() else {
            return Ok(answer(events, cur));
        };
        let mut next = last.clone();
        next.push(0);
        for (rk, k) in page {
            let rev = layout::parse_rev_key(&rk).ok_or_else(|| corrupt_kv(&rk))?;
            if let Some(full) = full_at {
                if rev.main > full {
                    return Ok(answer(events, full));
                }
            }
            scanned += 1;
            if scanned == WATCH_HISTORY_ROWS {
                full_at = full_at.or(Some(rev.main));
            }
            if !end.covers(key, &k) {
                continue;
            }
            // At the compacted revision, a change compaction removes may
            // have lost its history record before its `r/` record.
            let v = match s.get(&layout::hist_key(&k, rev)) {
                Some(v) => v,
                None if rev.main <= compacted => continue,
                None => return Err(missing_hist(&k)),
            };
            // At the compacted revision, only a put that is its key's newest
            // record there survives compaction (a txn can put a key, then
            // delete it).
            if rev.main <= compacted && (v == TOMBSTONE || !newest_at(s, &k, rev, compacted)) {
                continue;
            }
            let mut ev = match decode_hist(&k, &v)? {
                Some(kv) => put_event(kv),
                None => delete_event(k.clone(), rev.main),
            };
            // Below the compacted revision there is no previous version (some
            // may not be removed yet).
            if r.prev_kv && rev.main > compacted {
                ev.prev_kv = kv_at(s, &k, rev.main - 1)?;
            }
            bytes += ev.encoded_len();
            events.push(ev);
            if events.len() >= WATCH_HISTORY_EVENTS || bytes >= WATCH_HISTORY_BYTES {
                full_at = full_at.or(Some(rev.main));
            }
        }
        from = next;
    }
}

/// Whether `key` has no history record after `rev` at or below `upto`.
fn newest_at<S: Store + ?Sized>(s: &S, key: &[u8], rev: Rev, upto: i64) -> bool {
    let mut after = layout::hist_key(key, rev);
    after.push(0);
    let above = layout::hist_key(key, Rev::new(upto + 1, 0));
    s.scan(&after, &above, false, 1).is_empty()
}

pub fn status_request<S: Store + ?Sized>(s: &S) -> Result<StatusResponse> {
    Ok(StatusResponse {
        header: header(current_rev(s)?),
        ..Default::default()
    })
}

/// The host revoked (or let expire) `lease`: delete the keys still attached
/// to it, in key order, all at one revision (etcd's `Lessor.Revoke`). Keys
/// that are gone or now carry another lease are skipped. The revoked lease
/// itself is not detached from (the host is dropping it).
pub fn lease_revoked<S, L, E>(
    s: &mut S,
    leases: &mut L,
    events: &mut E,
    lease: i64,
    keys: &[Vec<u8>],
) -> Result<i64>
where
    S: Store + ?Sized,
    L: Leases + ?Sized,
    E: Events + ?Sized,
{
    let keys: BTreeSet<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    let mut w = Writer::new(s, leases, events)?;
    for key in keys {
        let Some(ie) = index_entry(w.s, key)? else {
            continue;
        };
        if ie.lease != lease {
            continue;
        }
        let kv = load_kv(w.s, key, &ie, true)?;
        w.delete(kv, false);
    }
    Ok(w.finish())
}
