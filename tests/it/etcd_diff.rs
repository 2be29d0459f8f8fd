//! Differential test: the same scripted `etcdserverpb.KV` gRPC requests go to a real
//! etcd 3.4 and to a single-node raftvm, and every response must be identical.
//!
//! * The client is generated from `proto/etcd` by `tests/build.rs` (tonic + protox),
//!   so the test sees every field the wire carries, no client library in between.
//! * Compared: the whole response, field by field, except the top-level
//!   `header.cluster_id`, `header.member_id` and `header.raft_term`, which naturally
//!   differ (only whether each is non-zero is compared). Headers nested in a txn
//!   response are compared in full. For errors: the gRPC code and the message.
//! * The script is split into sections (one `#[test]` each, each with its own fresh
//!   etcd and raftvm), so a difference in one area does not cascade into the others.
//!   Within a section the steps run in order against evolving state; every step runs
//!   even after a mismatch, and the test fails at the end listing every mismatch
//!   (request, etcd's answer, raftvm's answer, line diff). The first mismatch of a
//!   section is the one to look at; later ones may be its consequences.
//! * Adding a case is one line in a section's table: `s(name, request)`, or
//!   `d(name, |c| request)` when it needs a revision observed earlier (`mark(name)`
//!   records etcd's current revision under `name`, `c.m(name)` reads it back, `c.rev`
//!   is etcd's latest revision).
//! * `ETCD_DIFF_VERBOSE=1` prints every request with etcd's answer (run with `--nocapture`).
//! * [`KNOWN_DIFFERENCES`] lists deliberate, documented differences (section, step,
//!   reason): they are still run and printed, but do not fail the test.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use raftvm_tests::etcd::{start_kv_cluster, EtcdServer};
use sha2::{Digest, Sha256};

#[allow(clippy::all, dead_code)]
mod pb {
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
}

use pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::etcdserverpb::kv_client::KvClient;
use pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use pb::etcdserverpb::{request_op, response_op};
use pb::etcdserverpb::{
    Compare, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use pb::mvccpb::KeyValue;

/// Deliberate, documented differences: (section, step name, reason). Keep empty
/// unless raftvm documents the limitation.
const KNOWN_DIFFERENCES: &[(&str, &str, &str)] = &[];

/// etcd's and raftvm's default `--max-request-bytes`.
const MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// How long one request may take before it counts as "no answer".
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Requests and their builders
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
}

impl From<RangeRequest> for Op {
    fn from(r: RangeRequest) -> Op {
        Op::Range(r)
    }
}
impl From<PutRequest> for Op {
    fn from(r: PutRequest) -> Op {
        Op::Put(r)
    }
}
impl From<DeleteRangeRequest> for Op {
    fn from(r: DeleteRangeRequest) -> Op {
        Op::Delete(r)
    }
}
impl From<TxnRequest> for Op {
    fn from(r: TxnRequest) -> Op {
        Op::Txn(r)
    }
}
impl From<CompactionRequest> for Op {
    fn from(r: CompactionRequest) -> Op {
        Op::Compact(r)
    }
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// The range end etcdctl uses for `--prefix` (all keys starting with `p`).
fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn get(k: &str) -> RangeRequest {
    RangeRequest { key: b(k), ..Default::default() }
}
/// `[k, end)`.
fn range(k: &str, end: &str) -> RangeRequest {
    RangeRequest { key: b(k), range_end: b(end), ..Default::default() }
}
/// Every key starting with `p` (`p` empty: every key, as etcdctl sends it).
fn prefix(p: &str) -> RangeRequest {
    if p.is_empty() {
        return range("\0", "\0");
    }
    RangeRequest { key: b(p), range_end: prefix_end(p.as_bytes()), ..Default::default() }
}
/// Every key `>= k` (range_end `"\0"`).
fn from_key(k: &str) -> RangeRequest {
    range(k, "\0")
}
fn all() -> RangeRequest {
    range("\0", "\0")
}

trait RangeExt: Sized {
    fn r(self) -> RangeRequest;
    fn limit(self, n: i64) -> RangeRequest {
        RangeRequest { limit: n, ..self.r() }
    }
    fn rev(self, n: i64) -> RangeRequest {
        RangeRequest { revision: n, ..self.r() }
    }
    fn sort(self, o: SortOrder, t: SortTarget) -> RangeRequest {
        RangeRequest { sort_order: o as i32, sort_target: t as i32, ..self.r() }
    }
    fn serializable(self) -> RangeRequest {
        RangeRequest { serializable: true, ..self.r() }
    }
    fn keys_only(self) -> RangeRequest {
        RangeRequest { keys_only: true, ..self.r() }
    }
    fn count_only(self) -> RangeRequest {
        RangeRequest { count_only: true, ..self.r() }
    }
    fn min_mod(self, n: i64) -> RangeRequest {
        RangeRequest { min_mod_revision: n, ..self.r() }
    }
    fn max_mod(self, n: i64) -> RangeRequest {
        RangeRequest { max_mod_revision: n, ..self.r() }
    }
    fn min_create(self, n: i64) -> RangeRequest {
        RangeRequest { min_create_revision: n, ..self.r() }
    }
    fn max_create(self, n: i64) -> RangeRequest {
        RangeRequest { max_create_revision: n, ..self.r() }
    }
}
impl RangeExt for RangeRequest {
    fn r(self) -> RangeRequest {
        self
    }
}

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest { key: b(k), value: b(v), ..Default::default() }
}
fn put_bytes(k: &[u8], v: Vec<u8>) -> PutRequest {
    PutRequest { key: k.to_vec(), value: v, ..Default::default() }
}

trait PutExt: Sized {
    fn p(self) -> PutRequest;
    fn prev_kv(self) -> PutRequest {
        PutRequest { prev_kv: true, ..self.p() }
    }
    fn lease(self, id: i64) -> PutRequest {
        PutRequest { lease: id, ..self.p() }
    }
    fn ignore_value(self) -> PutRequest {
        PutRequest { ignore_value: true, ..self.p() }
    }
    fn ignore_lease(self) -> PutRequest {
        PutRequest { ignore_lease: true, ..self.p() }
    }
}
impl PutExt for PutRequest {
    fn p(self) -> PutRequest {
        self
    }
}

fn del(k: &str) -> DeleteRangeRequest {
    DeleteRangeRequest { key: b(k), ..Default::default() }
}
fn del_range(k: &str, end: &str) -> DeleteRangeRequest {
    DeleteRangeRequest { key: b(k), range_end: b(end), ..Default::default() }
}
fn del_prefix(p: &str) -> DeleteRangeRequest {
    DeleteRangeRequest { key: b(p), range_end: prefix_end(p.as_bytes()), ..Default::default() }
}

trait DelExt: Sized {
    fn prev_kv(self) -> DeleteRangeRequest;
}
impl DelExt for DeleteRangeRequest {
    fn prev_kv(self) -> DeleteRangeRequest {
        DeleteRangeRequest { prev_kv: true, ..self }
    }
}

fn compact(rev: i64) -> CompactionRequest {
    CompactionRequest { revision: rev, physical: false }
}
fn compact_physical(rev: i64) -> CompactionRequest {
    CompactionRequest { revision: rev, physical: true }
}

/// A txn: `txn(compares, success, failure)`.
fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest { compare, success, failure }
}

/// A request as a txn operation.
fn op(o: impl Into<Op>) -> RequestOp {
    let request = match o.into() {
        Op::Range(r) => request_op::Request::RequestRange(r),
        Op::Put(r) => request_op::Request::RequestPut(r),
        Op::Delete(r) => request_op::Request::RequestDeleteRange(r),
        Op::Txn(r) => request_op::Request::RequestTxn(r),
        Op::Compact(_) => panic!("a compaction is not a txn operation"),
    };
    RequestOp { request: Some(request) }
}

use CompareResult::{Equal as EQ, Greater as GT, Less as LT, NotEqual as NE};

fn cmp(k: &str, result: CompareResult, target: CompareTarget, u: TargetUnion) -> Compare {
    Compare { result: result as i32, target: target as i32, key: b(k), target_union: Some(u), range_end: vec![] }
}
fn c_ver(k: &str, r: CompareResult, v: i64) -> Compare {
    cmp(k, r, CompareTarget::Version, TargetUnion::Version(v))
}
fn c_create(k: &str, r: CompareResult, v: i64) -> Compare {
    cmp(k, r, CompareTarget::Create, TargetUnion::CreateRevision(v))
}
fn c_mod(k: &str, r: CompareResult, v: i64) -> Compare {
    cmp(k, r, CompareTarget::Mod, TargetUnion::ModRevision(v))
}
fn c_val(k: &str, r: CompareResult, v: &str) -> Compare {
    cmp(k, r, CompareTarget::Value, TargetUnion::Value(b(v)))
}
fn c_lease(k: &str, r: CompareResult, v: i64) -> Compare {
    cmp(k, r, CompareTarget::Lease, TargetUnion::Lease(v))
}

trait CmpExt {
    /// Compare every key in `[key, end)`.
    fn end(self, end: &str) -> Compare;
    /// Compare every key with the compare's key as prefix.
    fn prefixed(self) -> Compare;
}
impl CmpExt for Compare {
    fn end(self, end: &str) -> Compare {
        Compare { range_end: b(end), ..self }
    }
    fn prefixed(self) -> Compare {
        let end = prefix_end(&self.key);
        Compare { range_end: end, ..self }
    }
}

// ---------------------------------------------------------------------------
// Steps
// ---------------------------------------------------------------------------

/// What a step's closure sees: etcd's latest revision and the marks recorded so far.
struct Ctx {
    rev: i64,
    marks: BTreeMap<String, i64>,
}

impl Ctx {
    /// The revision recorded by `mark(name)`.
    fn m(&self, name: &str) -> i64 {
        *self.marks.get(name).unwrap_or_else(|| panic!("no mark named {name:?} (marks: {:?})", self.marks))
    }
}

enum Req {
    Fixed(Op),
    Dyn(Box<dyn Fn(&Ctx) -> Op>),
    Mark,
}

struct Step {
    name: String,
    req: Req,
}

/// A step sending `o`.
fn s(name: impl Into<String>, o: impl Into<Op>) -> Step {
    Step { name: name.into(), req: Req::Fixed(o.into()) }
}
/// A step whose request depends on revisions seen so far.
fn d<O: Into<Op>>(name: impl Into<String>, f: impl Fn(&Ctx) -> O + 'static) -> Step {
    Step { name: name.into(), req: Req::Dyn(Box::new(move |c| f(c).into())) }
}
/// Records etcd's current revision as `name` (sends nothing).
fn mark(name: &str) -> Step {
    Step { name: name.into(), req: Req::Mark }
}

// ---------------------------------------------------------------------------
// Outcomes, normalization, rendering
// ---------------------------------------------------------------------------

#[derive(Clone, PartialEq)]
enum Outcome {
    Range(RangeResponse),
    Put(PutResponse),
    Delete(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactionResponse),
    Error { code: tonic::Code, message: String },
}

impl Outcome {
    fn header(&self) -> Option<&ResponseHeader> {
        match self {
            Outcome::Range(r) => r.header.as_ref(),
            Outcome::Put(r) => r.header.as_ref(),
            Outcome::Delete(r) => r.header.as_ref(),
            Outcome::Txn(r) => r.header.as_ref(),
            Outcome::Compact(r) => r.header.as_ref(),
            Outcome::Error { .. } => None,
        }
    }

    fn header_mut(&mut self) -> Option<&mut Option<ResponseHeader>> {
        match self {
            Outcome::Range(r) => Some(&mut r.header),
            Outcome::Put(r) => Some(&mut r.header),
            Outcome::Delete(r) => Some(&mut r.header),
            Outcome::Txn(r) => Some(&mut r.header),
            Outcome::Compact(r) => Some(&mut r.header),
            Outcome::Error { .. } => None,
        }
    }

    /// Replaces the top-level header's cluster_id, member_id and raft_term by 1
    /// if non-zero (they differ between servers; only their presence is compared).
    fn normalized(mut self) -> Outcome {
        if let Some(Some(h)) = self.header_mut() {
            h.cluster_id = h.cluster_id.min(1);
            h.member_id = h.member_id.min(1);
            h.raft_term = h.raft_term.min(1);
        }
        self
    }
}

fn fmt_bytes(v: &[u8]) -> String {
    if v.len() > 64 {
        let head: String = String::from_utf8_lossy(&v[..16]).chars().filter(|c| !c.is_control()).collect();
        return format!("<{} bytes, starts {:?}, sha256 {}>", v.len(), head, &hex::encode(Sha256::digest(v))[..16]);
    }
    match std::str::from_utf8(v) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("0x{}", hex::encode(v)),
    }
}

fn fmt_top_header(h: &Option<ResponseHeader>) -> String {
    match h {
        None => "header: (none)".into(),
        Some(h) => {
            let set = |v: u64| if v != 0 { "set" } else { "ZERO" };
            format!(
                "header: revision={} (cluster_id {}, member_id {}, raft_term {})",
                h.revision,
                set(h.cluster_id),
                set(h.member_id),
                set(h.raft_term)
            )
        }
    }
}

fn fmt_nested_header(h: &Option<ResponseHeader>) -> String {
    match h {
        None => "header: (none)".into(),
        Some(h) => format!(
            "header: revision={} cluster_id={} member_id={} raft_term={}",
            h.revision, h.cluster_id, h.member_id, h.raft_term
        ),
    }
}

fn fmt_kv(kv: &KeyValue) -> String {
    format!(
        "key={} value={} create_revision={} mod_revision={} version={} lease={}",
        fmt_bytes(&kv.key),
        fmt_bytes(&kv.value),
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        kv.lease
    )
}

fn header_line(h: &Option<ResponseHeader>, top: bool) -> String {
    if top {
        fmt_top_header(h)
    } else {
        fmt_nested_header(h)
    }
}

fn render_range(out: &mut String, ind: &str, r: &RangeResponse, top: bool) {
    let _ = writeln!(out, "{ind}RangeResponse");
    let _ = writeln!(out, "{ind}  {}", header_line(&r.header, top));
    let _ = writeln!(out, "{ind}  count={} more={} kvs={}", r.count, r.more, r.kvs.len());
    for (i, kv) in r.kvs.iter().enumerate() {
        let _ = writeln!(out, "{ind}  kvs[{i}]: {}", fmt_kv(kv));
    }
}

fn render_put(out: &mut String, ind: &str, r: &PutResponse, top: bool) {
    let _ = writeln!(out, "{ind}PutResponse");
    let _ = writeln!(out, "{ind}  {}", header_line(&r.header, top));
    match &r.prev_kv {
        None => {
            let _ = writeln!(out, "{ind}  prev_kv: (none)");
        }
        Some(kv) => {
            let _ = writeln!(out, "{ind}  prev_kv: {}", fmt_kv(kv));
        }
    }
}

fn render_delete(out: &mut String, ind: &str, r: &DeleteRangeResponse, top: bool) {
    let _ = writeln!(out, "{ind}DeleteRangeResponse");
    let _ = writeln!(out, "{ind}  {}", header_line(&r.header, top));
    let _ = writeln!(out, "{ind}  deleted={} prev_kvs={}", r.deleted, r.prev_kvs.len());
    for (i, kv) in r.prev_kvs.iter().enumerate() {
        let _ = writeln!(out, "{ind}  prev_kvs[{i}]: {}", fmt_kv(kv));
    }
}

fn render_txn(out: &mut String, ind: &str, r: &TxnResponse, top: bool) {
    let _ = writeln!(out, "{ind}TxnResponse");
    let _ = writeln!(out, "{ind}  {}", header_line(&r.header, top));
    let _ = writeln!(out, "{ind}  succeeded={} responses={}", r.succeeded, r.responses.len());
    let deeper = format!("{ind}    ");
    for (i, ro) in r.responses.iter().enumerate() {
        let _ = writeln!(out, "{ind}  responses[{i}]:");
        match &ro.response {
            None => {
                let _ = writeln!(out, "{deeper}(empty ResponseOp)");
            }
            Some(response_op::Response::ResponseRange(x)) => render_range(out, &deeper, x, false),
            Some(response_op::Response::ResponsePut(x)) => render_put(out, &deeper, x, false),
            Some(response_op::Response::ResponseDeleteRange(x)) => render_delete(out, &deeper, x, false),
            Some(response_op::Response::ResponseTxn(x)) => render_txn(out, &deeper, x, false),
        }
    }
}

fn render(o: &Outcome) -> String {
    let mut out = String::new();
    match o {
        Outcome::Range(r) => render_range(&mut out, "", r, true),
        Outcome::Put(r) => render_put(&mut out, "", r, true),
        Outcome::Delete(r) => render_delete(&mut out, "", r, true),
        Outcome::Txn(r) => render_txn(&mut out, "", r, true),
        Outcome::Compact(r) => {
            let _ = writeln!(out, "CompactionResponse\n  {}", fmt_top_header(&r.header));
        }
        Outcome::Error { code, message } => {
            let _ = writeln!(out, "ERROR code={code:?} message={message:?}");
        }
    }
    out
}

/// Non-default fields of a request, one line (nested txns inline).
fn render_req(o: &Op) -> String {
    fn range_s(r: &RangeRequest) -> String {
        let mut f = vec![format!("key={}", fmt_bytes(&r.key))];
        if !r.range_end.is_empty() {
            f.push(format!("range_end={}", fmt_bytes(&r.range_end)));
        }
        let n = |f: &mut Vec<String>, name: &str, v: i64| {
            if v != 0 {
                f.push(format!("{name}={v}"));
            }
        };
        n(&mut f, "limit", r.limit);
        n(&mut f, "revision", r.revision);
        if r.sort_order != 0 || r.sort_target != 0 {
            let o = SortOrder::try_from(r.sort_order).map(|x| format!("{x:?}")).unwrap_or(r.sort_order.to_string());
            let t = SortTarget::try_from(r.sort_target).map(|x| format!("{x:?}")).unwrap_or(r.sort_target.to_string());
            f.push(format!("sort_order={o} sort_target={t}"));
        }
        for (name, on) in [("serializable", r.serializable), ("keys_only", r.keys_only), ("count_only", r.count_only)] {
            if on {
                f.push(name.into());
            }
        }
        n(&mut f, "min_mod_revision", r.min_mod_revision);
        n(&mut f, "max_mod_revision", r.max_mod_revision);
        n(&mut f, "min_create_revision", r.min_create_revision);
        n(&mut f, "max_create_revision", r.max_create_revision);
        format!("Range{{{}}}", f.join(", "))
    }
    fn put_s(r: &PutRequest) -> String {
        let mut f = vec![format!("key={}", fmt_bytes(&r.key)), format!("value={}", fmt_bytes(&r.value))];
        if r.lease != 0 {
            f.push(format!("lease={}", r.lease));
        }
        for (name, on) in [("prev_kv", r.prev_kv), ("ignore_value", r.ignore_value), ("ignore_lease", r.ignore_lease)] {
            if on {
                f.push(name.into());
            }
        }
        format!("Put{{{}}}", f.join(", "))
    }
    fn del_s(r: &DeleteRangeRequest) -> String {
        let mut f = vec![format!("key={}", fmt_bytes(&r.key))];
        if !r.range_end.is_empty() {
            f.push(format!("range_end={}", fmt_bytes(&r.range_end)));
        }
        if r.prev_kv {
            f.push("prev_kv".into());
        }
        format!("DeleteRange{{{}}}", f.join(", "))
    }
    fn cmp_s(c: &Compare) -> String {
        let r = CompareResult::try_from(c.result).map(|x| format!("{x:?}")).unwrap_or(c.result.to_string());
        let t = CompareTarget::try_from(c.target).map(|x| format!("{x:?}")).unwrap_or(c.target.to_string());
        let v = match &c.target_union {
            None => "(none)".to_string(),
            Some(TargetUnion::Version(v)) => format!("version:{v}"),
            Some(TargetUnion::CreateRevision(v)) => format!("create_revision:{v}"),
            Some(TargetUnion::ModRevision(v)) => format!("mod_revision:{v}"),
            Some(TargetUnion::Value(v)) => format!("value:{}", fmt_bytes(v)),
            Some(TargetUnion::Lease(v)) => format!("lease:{v}"),
        };
        let end = if c.range_end.is_empty() { String::new() } else { format!(" range_end={}", fmt_bytes(&c.range_end)) };
        format!("{t}({}{end}) {r} {v}", fmt_bytes(&c.key))
    }
    fn ops_s(ops: &[RequestOp]) -> String {
        if ops.len() > 6 {
            let first: Vec<String> = ops[..3].iter().map(reqop_s).collect();
            return format!("[{}, ... {} ops in all]", first.join(", "), ops.len());
        }
        format!("[{}]", ops.iter().map(reqop_s).collect::<Vec<_>>().join(", "))
    }
    fn reqop_s(o: &RequestOp) -> String {
        match &o.request {
            None => "(empty RequestOp)".into(),
            Some(request_op::Request::RequestRange(r)) => range_s(r),
            Some(request_op::Request::RequestPut(r)) => put_s(r),
            Some(request_op::Request::RequestDeleteRange(r)) => del_s(r),
            Some(request_op::Request::RequestTxn(r)) => txn_s(r),
        }
    }
    fn txn_s(t: &TxnRequest) -> String {
        let cmps = if t.compare.len() > 6 {
            format!("[{} compares: {}, ...]", t.compare.len(), cmp_s(&t.compare[0]))
        } else {
            format!("[{}]", t.compare.iter().map(cmp_s).collect::<Vec<_>>().join(" AND "))
        };
        format!("Txn{{if {cmps} then {} else {}}}", ops_s(&t.success), ops_s(&t.failure))
    }
    match o {
        Op::Range(r) => range_s(r),
        Op::Put(r) => put_s(r),
        Op::Delete(r) => del_s(r),
        Op::Txn(t) => txn_s(t),
        Op::Compact(c) => format!("Compact{{revision={}, physical={}}}", c.revision, c.physical),
    }
}

/// Line diff (LCS) of two renderings: ` ` both, `-` etcd only, `+` raftvm only.
fn line_diff(a: &str, b: &str) -> String {
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut l = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            l[i][j] = if a[i] == b[j] { l[i + 1][j + 1] + 1 } else { l[i + 1][j].max(l[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            let _ = writeln!(out, "  {}", a[i]);
            i += 1;
            j += 1;
        } else if j < m && (i == n || l[i][j + 1] >= l[i + 1][j]) {
            let _ = writeln!(out, "+ {}", b[j]);
            j += 1;
        } else {
            let _ = writeln!(out, "- {}", a[i]);
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Running a section
// ---------------------------------------------------------------------------

type Client = KvClient<tonic::transport::Channel>;

async fn connect(url: String) -> Client {
    let ch = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("endpoint url")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    KvClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

async fn send(c: &mut Client, o: &Op) -> Outcome {
    let call = async {
        let r = match o.clone() {
            Op::Range(r) => c.range(r).await.map(|x| Outcome::Range(x.into_inner())),
            Op::Put(r) => c.put(r).await.map(|x| Outcome::Put(x.into_inner())),
            Op::Delete(r) => c.delete_range(r).await.map(|x| Outcome::Delete(x.into_inner())),
            Op::Txn(r) => c.txn(r).await.map(|x| Outcome::Txn(x.into_inner())),
            Op::Compact(r) => c.compact(r).await.map(|x| Outcome::Compact(x.into_inner())),
        };
        r.unwrap_or_else(|st| Outcome::Error { code: st.code(), message: st.message().to_string() })
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(o) => o,
        Err(_) => Outcome::Error {
            code: tonic::Code::DeadlineExceeded,
            message: format!("[test] no answer within {CALL_TIMEOUT:?}"),
        },
    }
}

struct Mismatch {
    index: usize,
    name: String,
    request: String,
    etcd: String,
    raftvm: String,
    diff: String,
    known: Option<&'static str>,
}

fn run_section(section: &str, steps: Vec<Step>) {
    let etcd = EtcdServer::start();
    let cluster = start_kv_cluster(1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let mismatches = rt.block_on(async {
        let mut ce = connect(etcd.client_url()).await;
        let mut cr = connect(cluster.node(0).client_url()).await;
        let mut ctx = Ctx { rev: 1, marks: BTreeMap::new() };
        let verbose = std::env::var_os("ETCD_DIFF_VERBOSE").is_some_and(|v| !v.is_empty());
        let mut mismatches = Vec::new();
        let mut sent = 0;
        for (index, step) in steps.iter().enumerate() {
            let o = match &step.req {
                Req::Mark => {
                    ctx.marks.insert(step.name.clone(), ctx.rev);
                    continue;
                }
                Req::Fixed(o) => o.clone(),
                Req::Dyn(f) => f(&ctx),
            };
            sent += 1;
            let e = send(&mut ce, &o).await;
            let r = send(&mut cr, &o).await;
            // The reference must stay valid: a crashed etcd answers with transport errors.
            etcd.assert_running(&format!("step #{index} {:?} of section {section}: {}", step.name, render_req(&o)));
            if let Some(h) = e.header() {
                ctx.rev = h.revision;
            }
            let (e, r) = (e.normalized(), r.normalized());
            if verbose {
                let tag = if e == r { "same" } else { "DIFFERENT" };
                eprintln!("--- {section} #{index} {:?} [{tag}]\n  request: {}\n{}", step.name, render_req(&o), render(&e));
            }
            if e != r {
                let (es, rs) = (render(&e), render(&r));
                let known = KNOWN_DIFFERENCES
                    .iter()
                    .find(|(sec, name, _)| *sec == section && *name == step.name)
                    .map(|(_, _, why)| *why);
                let m = Mismatch {
                    index,
                    name: step.name.clone(),
                    request: render_req(&o),
                    diff: line_diff(&es, &rs),
                    etcd: es,
                    raftvm: rs,
                    known,
                };
                eprintln!("{}", fmt_mismatch(section, &m));
                mismatches.push(m);
            }
        }
        eprintln!(
            "[etcd_diff] section {section}: {sent} requests, {} mismatches ({} known)",
            mismatches.len(),
            mismatches.iter().filter(|m| m.known.is_some()).count()
        );
        mismatches
    });
    let unexpected: Vec<&Mismatch> = mismatches.iter().filter(|m| m.known.is_none()).collect();
    if !unexpected.is_empty() {
        let mut report = format!(
            "section {section}: raftvm differs from etcd 3.4 in {} step(s) (the first is the one to look at; \
             later ones may follow from it):\n",
            unexpected.len()
        );
        for m in &unexpected {
            report.push_str(&fmt_mismatch(section, m));
        }
        // The report says everything: shut the servers down first, so their (large)
        // files are not kept as they would be after a crash or a timeout.
        drop(cluster);
        drop(etcd);
        panic!("{report}");
    }
}

fn fmt_mismatch(section: &str, m: &Mismatch) -> String {
    let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
    format!(
        "\n=== {section} #{} {:?}{}\n  request: {}\n  etcd:\n{}  raftvm:\n{}  diff (- etcd, + raftvm):\n{}",
        m.index,
        m.name,
        m.known.map(|w| format!(" [known difference: {w}]")).unwrap_or_default(),
        m.request,
        indent(&m.etcd),
        indent(&m.raftvm),
        indent(&m.diff)
    )
}

// ---------------------------------------------------------------------------
// The sections
// ---------------------------------------------------------------------------

const SORT_TARGETS: [SortTarget; 5] =
    [SortTarget::Key, SortTarget::Version, SortTarget::Create, SortTarget::Mod, SortTarget::Value];
const SORT_ORDERS: [SortOrder; 3] = [SortOrder::None, SortOrder::Ascend, SortOrder::Descend];

/// Range: single key, ranges, prefixes, from-key, limit/more/count, revisions, sorting,
/// serializable, keys_only, count_only, mod/create revision filters.
#[test]
fn diff_range() {
    let mut t = vec![
        s("get on an empty store", get("a")),
        s("range everything on an empty store", all()),
        s("count_only on an empty store", all().count_only()),
        // Data. Versions, create and mod revisions and values are chosen so that every sort
        // target has ties and differs from key order.
        s("put a", put("a", "3")),
        s("put b", put("b", "1")),
        mark("after b"),
        s("put c", put("c", "2")),
        s("put ab", put("ab", "1")),
        s("put abc", put("abc", "9")),
        s("put b again", put("b", "5")),
        s("put a again", put("a", "0")),
        mark("after a again"),
        s("put a third time", put("a", "7")),
        s("put d", put("d", "")),
        s("put zz", put("zz", "2")),
        s("put key with a NUL byte", put("a\0b", "nul")),
        s("put unicode key", put("ключ", "значение")),
        // Single keys and ranges.
        s("get a", get("a")),
        s("get missing key", get("nope")),
        s("get key with NUL", get("a\0b")),
        s("get unicode key", get("ключ")),
        s("range [a, c)", range("a", "c")),
        s("range [a, b)", range("a", "b")),
        s("range [b, b) is empty", range("b", "b")),
        s("range with end before key", range("c", "a")),
        s("range [a, a\\0) is exactly a", range("a", "a\0")),
        s("prefix a", prefix("a")),
        s("prefix ab", prefix("ab")),
        s("prefix with no match", prefix("q")),
        s("prefix '' (everything)", prefix("")),
        s("from key b", from_key("b")),
        s("from key after every key", from_key("zzz")),
        s("key \\0 to end \\0 (everything)", all()),
        // limit / more / count
        s("limit 1", all().limit(1)),
        s("limit 3", all().limit(3)),
        s("limit = count", all().limit(10)),
        s("limit > count", all().limit(100)),
        s("limit -1 (no limit)", all().limit(-1)),
        s("limit on single key", get("a").limit(1)),
        s("limit on prefix", prefix("a").limit(2)),
        // revisions
        d("get a at an old revision", |c| get("a").rev(c.m("after a again"))),
        d("range everything at an old revision", |c| all().rev(c.m("after b"))),
        d("count_only at an old revision", |c| all().rev(c.m("after b")).count_only()),
        d("limit at an old revision", |c| all().rev(c.m("after a again")).limit(2)),
        d("get a key created later, at an old revision", |c| get("zz").rev(c.m("after b"))),
        s("revision 1 (before any write)", all().rev(1)),
        d("revision = current", |c| all().rev(c.rev)),
        d("revision = current + 1 (future)", |c| get("a").rev(c.rev + 1)),
        d("revision far in the future", |c| all().rev(c.rev + 1000)),
        s("negative revision (latest)", all().rev(-5)),
        // serializable, keys_only, count_only
        s("serializable get", get("a").serializable()),
        s("serializable range", all().serializable()),
        d("serializable at old revision", |c| all().serializable().rev(c.m("after b"))),
        s("keys_only", all().keys_only()),
        s("keys_only prefix", prefix("a").keys_only()),
        s("count_only", all().count_only()),
        s("count_only with limit", all().count_only().limit(2)),
        s("count_only and keys_only", all().count_only().keys_only()),
        s("keys_only with limit", all().keys_only().limit(2)),
        // sorting with limit
        s("sort MOD DESCEND limit 2", all().sort(SortOrder::Descend, SortTarget::Mod).limit(2)),
        s("sort VALUE ASCEND limit 3", all().sort(SortOrder::Ascend, SortTarget::Value).limit(3)),
        s("sort KEY DESCEND limit 1", all().sort(SortOrder::Descend, SortTarget::Key).limit(1)),
        s("sort KEY ASCEND limit 2", all().sort(SortOrder::Ascend, SortTarget::Key).limit(2)),
        s("sort VERSION DESCEND keys_only", all().sort(SortOrder::Descend, SortTarget::Version).keys_only()),
        s("sort CREATE DESCEND count_only", all().sort(SortOrder::Descend, SortTarget::Create).count_only()),
        s("sort on prefix by VALUE DESCEND", prefix("a").sort(SortOrder::Descend, SortTarget::Value)),
        d("sort at old revision", |c| all().rev(c.m("after a again")).sort(SortOrder::Descend, SortTarget::Mod)),
        s("unknown sort order 7", all().sort(SortOrder::None, SortTarget::Key).sort_raw(7, 0)),
        // (No unknown sort *target*: etcd 3.4 dereferences a nil sorter and crashes.)
        // mod / create revision filters
        s("min_mod_revision 5", all().min_mod(5)),
        s("max_mod_revision 5", all().max_mod(5)),
        s("min_create_revision 4", all().min_create(4)),
        s("max_create_revision 4", all().max_create(4)),
        s("min and max mod revision", all().min_mod(4).max_mod(8)),
        s("min and max create revision", all().min_create(3).max_create(5)),
        s("min_mod above everything", all().min_mod(1000)),
        s("min_mod with limit (count semantics)", all().min_mod(5).limit(2)),
        s("max_create with limit", all().max_create(4).limit(1)),
        s("min_mod with count_only", all().min_mod(5).count_only()),
        s("min_mod with keys_only", all().min_mod(5).keys_only()),
        s("min_create with sort", all().min_create(3).sort(SortOrder::Descend, SortTarget::Value)),
        s("negative min_mod_revision", all().min_mod(-3)),
        d("filters at an old revision", |c| all().rev(c.m("after a again")).min_mod(3)),
    ];
    for target in SORT_TARGETS {
        for order in SORT_ORDERS {
            t.push(s(format!("sort {order:?} by {target:?}"), all().sort(order, target)));
        }
    }
    run_section("range", t);
}

trait RangeRaw {
    fn sort_raw(self, order: i32, target: i32) -> RangeRequest;
}
impl RangeRaw for RangeRequest {
    fn sort_raw(self, order: i32, target: i32) -> RangeRequest {
        RangeRequest { sort_order: order, sort_target: target, ..self }
    }
}

/// Put: prev_kv, ignore_value, ignore_lease, leases, and their errors.
#[test]
fn diff_put() {
    run_section(
        "put",
        vec![
            s("put new key", put("k", "v1")),
            s("put same key", put("k", "v2")),
            s("put with prev_kv", put("k", "v3").prev_kv()),
            s("put new key with prev_kv", put("k2", "x").prev_kv()),
            s("put empty value", put("k3", "")),
            s("put empty value with prev_kv over existing", put("k", "").prev_kv()),
            s("put back a value", put("k", "v4")),
            s("ignore_value keeps the value", put("k", "").ignore_value()),
            s("get after ignore_value", get("k")),
            s("ignore_value with prev_kv", put("k", "").ignore_value().prev_kv()),
            s("ignore_value with a value", put("k", "x").ignore_value()),
            s("ignore_value on missing key", put("missing", "").ignore_value()),
            s("ignore_lease on existing key", put("k", "v5").ignore_lease()),
            s("ignore_lease with prev_kv", put("k", "v6").ignore_lease().prev_kv()),
            s("ignore_lease with a lease", put("k", "v").ignore_lease().lease(42)),
            s("ignore_lease on missing key", put("missing", "v").ignore_lease()),
            s("ignore_value and ignore_lease", put("k", "").ignore_value().ignore_lease()),
            s("ignore_value and ignore_lease with prev_kv", put("k", "").ignore_value().ignore_lease().prev_kv()),
            s("ignore_value with value and ignore_lease with lease", put("k", "x").ignore_value().ignore_lease().lease(1)),
            s("lease that does not exist", put("k", "v").lease(12345)),
            s("negative lease that does not exist", put("k", "v").lease(-7)),
            s("lease on missing key with ignore_value", put("missing", "").ignore_value().lease(999)),
            s("get after failed puts", get("k")),
            s("empty key", put("", "v")),
            s("empty key with ignore_value", put("", "").ignore_value()),
            s("binary key and value", put_bytes(&[0xff, 0x00, 0xfe], vec![0, 1, 2, 0xff])),
            s("get binary key", RangeRequest { key: vec![0xff, 0x00, 0xfe], ..Default::default() }),
            s("key of 1000 bytes", put(&"x".repeat(1000), "long")),
            s("value of 100 KiB", put_bytes(b"big", vec![b'v'; 100 * 1024])),
            s("overwrite big value with prev_kv", put("big", "small").prev_kv()),
            s("many versions 1", put("ver", "1")),
            s("many versions 2", put("ver", "2")),
            s("many versions 3", put("ver", "3").prev_kv()),
            s("everything", all()),
        ],
    );
}

/// DeleteRange: single key, range, prefix, from-key, everything; prev_kv; deleted count.
#[test]
fn diff_delete_range() {
    let mut t: Vec<Step> = ["a", "b", "c", "d", "da", "db", "dc", "e", "f", "g"]
        .iter()
        .map(|k| s(format!("put {k}"), put(k, &format!("val-{k}"))))
        .collect();
    t.extend([
        s("put b again", put("b", "b2")),
        s("delete missing key", del("nope")),
        s("delete missing key with prev_kv", del("nope").prev_kv()),
        s("delete a with prev_kv", del("a").prev_kv()),
        s("delete a again", del("a").prev_kv()),
        s("delete b without prev_kv", del("b")),
        s("delete range [c, da) with prev_kv", del_range("c", "da").prev_kv()),
        s("delete empty range", del_range("x", "y").prev_kv()),
        s("delete range with end before key", del_range("g", "a").prev_kv()),
        s("delete prefix d with prev_kv", del_prefix("d").prev_kv()),
        s("range after deletes", all()),
        s("delete from key f with prev_kv", del_range("f", "\0").prev_kv()),
        s("recreate a", put("a", "again")),
        s("get recreated a", get("a")),
        s("put x", put("x", "1")),
        s("delete everything with prev_kv", del_range("\0", "\0").prev_kv()),
        s("delete everything on empty store", del_range("\0", "\0").prev_kv()),
        s("empty key", del("")),
        s("empty key with range end", del_range("", "z")),
        s("range after everything deleted", all()),
        s("put after delete-all", put("a", "3")),
        s("get a", get("a").rev(0)),
    ]);
    run_section("delete", t);
}

/// Txn: compares on every target with every operator, with range_end, on missing keys;
/// success/failure branches; nested txns; duplicate keys; too many ops; errors inside.
#[test]
fn diff_txn() {
    let mut t = vec![
        s("put k1", put("k1", "v1")),
        mark("k1 created"),
        s("put k1 again", put("k1", "v1b")),
        mark("k1 modified"),
        s("put k2", put("k2", "v2")),
        s("put r/a", put("r/a", "1")),
        s("put r/b", put("r/b", "1")),
        s("put r/c", put("r/c", "2")),
        s("empty txn", txn(vec![], vec![], vec![])),
        s("no compares, success put", txn(vec![], vec![op(put("t1", "x"))], vec![op(put("t1", "y"))])),
        // version
        s("version = 2", txn(vec![c_ver("k1", EQ, 2)], vec![op(get("k1"))], vec![op(get("k2"))])),
        s("version = 1 (false)", txn(vec![c_ver("k1", EQ, 1)], vec![op(get("k1"))], vec![op(get("k2"))])),
        s("version != 1", txn(vec![c_ver("k1", NE, 1)], vec![op(get("k1"))], vec![])),
        s("version < 3", txn(vec![c_ver("k1", LT, 3)], vec![op(get("k1"))], vec![])),
        s("version > 2 (false)", txn(vec![c_ver("k1", GT, 2)], vec![], vec![op(get("k1"))])),
        // create / mod
        d("create = its revision", |c| txn(vec![c_create("k1", EQ, c.m("k1 created"))], vec![op(get("k1"))], vec![])),
        d("create > its revision (false)", |c| {
            txn(vec![c_create("k1", GT, c.m("k1 created"))], vec![op(put("k1", "no"))], vec![op(get("k2"))])
        }),
        d("create < later revision", |c| txn(vec![c_create("k1", LT, c.m("k1 modified"))], vec![op(get("k1"))], vec![])),
        d("create != its revision (false)", |c| txn(vec![c_create("k1", NE, c.m("k1 created"))], vec![], vec![op(get("k1"))])),
        d("mod = its revision", |c| txn(vec![c_mod("k1", EQ, c.m("k1 modified"))], vec![op(get("k1"))], vec![])),
        d("mod != its revision (false)", |c| txn(vec![c_mod("k1", NE, c.m("k1 modified"))], vec![], vec![])),
        s("mod > 0", txn(vec![c_mod("k1", GT, 0)], vec![op(put("k1", "v1c"))], vec![])),
        s("mod < 1 (false)", txn(vec![c_mod("k1", LT, 1)], vec![], vec![op(get("k1"))])),
        // value
        s("value = v1c", txn(vec![c_val("k1", EQ, "v1c")], vec![op(put("k1", "v1d").prev_kv())], vec![])),
        s("value = wrong (false)", txn(vec![c_val("k1", EQ, "nope")], vec![op(put("k1", "bad"))], vec![op(get("k1"))])),
        s("value != v1d (false)", txn(vec![c_val("k1", NE, "v1d")], vec![], vec![op(get("k1"))])),
        s("value < w", txn(vec![c_val("k1", LT, "w")], vec![op(get("k1"))], vec![])),
        s("value > v1 (prefix is less)", txn(vec![c_val("k1", GT, "v1")], vec![op(get("k1"))], vec![])),
        s("value > v1e (false)", txn(vec![c_val("k1", GT, "v1e")], vec![], vec![])),
        s("value = empty on non-empty", txn(vec![c_val("k1", EQ, "")], vec![], vec![])),
        // lease
        s("lease = 0", txn(vec![c_lease("k1", EQ, 0)], vec![op(get("k1"))], vec![])),
        s("lease != 0 (false)", txn(vec![c_lease("k1", NE, 0)], vec![], vec![op(get("k1"))])),
        s("lease > 0 (false)", txn(vec![c_lease("k1", GT, 0)], vec![], vec![])),
        s("lease < 5", txn(vec![c_lease("k1", LT, 5)], vec![], vec![])),
        // missing keys
        s("missing key: version = 0", txn(vec![c_ver("missing", EQ, 0)], vec![op(put("m1", "created"))], vec![])),
        s("missing key: version > 0 (false)", txn(vec![c_ver("missing", GT, 0)], vec![], vec![])),
        s("missing key: create = 0", txn(vec![c_create("missing", EQ, 0)], vec![], vec![])),
        s("missing key: mod < 5", txn(vec![c_mod("missing", LT, 5)], vec![], vec![])),
        s("missing key: lease = 0", txn(vec![c_lease("missing", EQ, 0)], vec![], vec![])),
        s("missing key: value = ''", txn(vec![c_val("missing", EQ, "")], vec![], vec![])),
        s("missing key: value != x", txn(vec![c_val("missing", NE, "x")], vec![], vec![])),
        s("missing key: value < x", txn(vec![c_val("missing", LT, "x")], vec![], vec![])),
        // compares over ranges
        s("range compare: all versions = 1", txn(vec![c_ver("r/", EQ, 1).prefixed()], vec![op(prefix("r/"))], vec![])),
        s("range compare: all values = 1 (false)", txn(vec![c_val("r/", EQ, "1").prefixed()], vec![], vec![op(get("r/c"))])),
        s("range compare: values < 3", txn(vec![c_val("r/", LT, "3").prefixed()], vec![], vec![])),
        s("range compare [r/a, r/c): values = 1", txn(vec![c_val("r/a", EQ, "1").end("r/c")], vec![], vec![])),
        s("range compare from key r/b: mod > 0", txn(vec![c_mod("r/b", GT, 0).end("\0")], vec![], vec![])),
        s("range compare over empty range: version = 0", txn(vec![c_ver("q/", EQ, 0).prefixed()], vec![], vec![])),
        s("range compare over empty range: value = ''", txn(vec![c_val("q/", EQ, "").prefixed()], vec![], vec![])),
        s("range compare over empty range: create > 0", txn(vec![c_create("q/", GT, 0).prefixed()], vec![], vec![])),
        // several compares
        s("two compares, both true", txn(vec![c_ver("k1", GT, 0), c_val("k2", EQ, "v2")], vec![op(get("k2"))], vec![])),
        s("two compares, second false", txn(vec![c_ver("k1", GT, 0), c_val("k2", EQ, "no")], vec![], vec![op(get("k2"))])),
        s("same key compared twice", txn(vec![c_ver("k1", GT, 0), c_ver("k1", LT, 100)], vec![], vec![])),
        // ops and their responses
        s(
            "success: put, range, delete, range",
            txn(
                vec![c_ver("k2", EQ, 1)],
                vec![op(put("t2", "a").prev_kv()), op(prefix("t")), op(del("t1").prev_kv()), op(prefix("t").count_only())],
                vec![],
            ),
        ),
        s(
            "failure: delete range and put",
            txn(vec![c_ver("k2", EQ, 9)], vec![op(put("never", "x"))], vec![op(del_prefix("t").prev_kv()), op(put("t3", "z"))]),
        ),
        s("read-only txn", txn(vec![], vec![op(get("k1")), op(prefix("r/").keys_only()), op(all().count_only())], vec![])),
        s("range ops with options", txn(vec![], vec![op(all().limit(2).sort(SortOrder::Descend, SortTarget::Mod))], vec![])),
        d("range at an old revision in a txn", |c| txn(vec![], vec![op(get("k1").rev(c.m("k1 created")))], vec![])),
        d("range at a future revision in a txn", |c| txn(vec![], vec![op(get("k1").rev(c.rev + 10))], vec![])),
        s("serializable range in a txn", txn(vec![], vec![op(get("k1").serializable())], vec![])),
        s("put with ignore_value in a txn", txn(vec![], vec![op(put("k1", "").ignore_value().prev_kv())], vec![])),
        s("delete of a missing key in a txn", txn(vec![], vec![op(del("missing"))], vec![])),
        s("write then read same key", txn(vec![], vec![op(put("w", "1")), op(get("w")), op(put("w2", "2"))], vec![])),
        // nested
        s(
            "nested txn",
            txn(
                vec![c_ver("k1", GT, 0)],
                vec![
                    op(put("n1", "a")),
                    op(txn(vec![c_val("n1", EQ, "a")], vec![op(put("n2", "b")), op(get("n1"))], vec![op(put("n3", "c"))])),
                    op(get("n2")),
                ],
                vec![],
            ),
        ),
        s(
            "nested txn, inner failure",
            txn(vec![], vec![op(txn(vec![c_val("n1", EQ, "zzz")], vec![op(put("n4", "no"))], vec![op(get("n1")), op(put("n5", "e"))]))], vec![]),
        ),
        s(
            "doubly nested txn",
            txn(vec![], vec![op(txn(vec![], vec![op(txn(vec![c_ver("n5", EQ, 1)], vec![op(del("n5").prev_kv())], vec![]))], vec![]))], vec![]),
        ),
        s("nested empty txn", txn(vec![], vec![op(txn(vec![], vec![], vec![]))], vec![])),
        // duplicate keys
        s("duplicate put", txn(vec![], vec![op(put("dup", "1")), op(put("dup", "2"))], vec![])),
        s("duplicate put in failure branch", txn(vec![c_ver("k1", EQ, 999)], vec![], vec![op(put("dup", "1")), op(put("dup", "2"))])),
        s("put and delete of the same key", txn(vec![], vec![op(put("dup", "1")), op(del("dup"))], vec![])),
        s("delete then put of the same key", txn(vec![], vec![op(del("dup")), op(put("dup", "1"))], vec![])),
        s("put inside a deleted range", txn(vec![], vec![op(del_prefix("du")), op(put("dup", "1"))], vec![])),
        s("two deletes of the same key", txn(vec![], vec![op(del("dup")), op(del("dup"))], vec![])),
        s("put and range of the same key", txn(vec![], vec![op(put("dup", "1")), op(get("dup"))], vec![])),
        s("same key in success and failure", txn(vec![], vec![op(put("dup2", "1"))], vec![op(put("dup2", "2"))])),
        s("duplicate put across nesting", txn(vec![], vec![op(put("dup3", "1")), op(txn(vec![], vec![op(put("dup3", "2"))], vec![]))], vec![])),
        s(
            "same key in nested success and failure",
            txn(vec![], vec![op(txn(vec![], vec![op(put("dup4", "1"))], vec![op(put("dup4", "2"))]))], vec![]),
        ),
        s(
            "put in two sibling nested txns",
            txn(vec![], vec![op(txn(vec![], vec![op(put("dup5", "1"))], vec![])), op(txn(vec![], vec![op(put("dup5", "2"))], vec![]))], vec![]),
        ),
        // errors inside txns abort everything
        s("lease not found inside txn", txn(vec![], vec![op(put("ab1", "x")), op(put("ab2", "y").lease(777))], vec![])),
        s("ignore_value on missing key inside txn", txn(vec![], vec![op(put("ab1", "x")), op(put("ab3", "").ignore_value())], vec![])),
        s("ignore_value with value inside txn", txn(vec![], vec![op(put("ab1", "x").ignore_value())], vec![])),
        s("ignore_lease with lease inside txn", txn(vec![], vec![op(put("k1", "x").ignore_lease().lease(3))], vec![])),
        s("nothing was written", prefix("ab")),
        s("empty RequestOp", txn(vec![], vec![RequestOp { request: None }], vec![])),
        s("empty RequestOp in untaken branch", txn(vec![], vec![], vec![RequestOp { request: None }])),
        s("empty key in compare", txn(vec![c_ver("", EQ, 0)], vec![], vec![])),
        s("empty key in put op", txn(vec![], vec![op(put("", "x"))], vec![])),
        s("empty key in range op", txn(vec![], vec![op(get(""))], vec![])),
        s("empty key in delete op", txn(vec![], vec![op(del(""))], vec![])),
        s("empty key in nested failure", txn(vec![], vec![op(txn(vec![], vec![], vec![op(put("", "x"))]))], vec![])),
        // too many operations
        s("128 puts", txn(vec![], puts("many/", 128), vec![])),
        s("129 puts", txn(vec![], puts("many2/", 129), vec![])),
        s("129 ranges", txn(vec![], (0..129).map(|i| op(get(&format!("k{i}")))).collect(), vec![])),
        s("129 puts in failure", txn(vec![], vec![], puts("many3/", 129))),
        s("128 compares", txn(vec![c_ver("k1", GT, 0); 128], vec![op(get("k1"))], vec![])),
        s("129 compares", txn(vec![c_ver("k1", GT, 0); 129], vec![], vec![])),
        s("nested budget: 100 + nested 27", nested_budget(100, 27)),
        s("nested budget: 100 + nested 28", nested_budget(100, 28)),
        s("nested budget: 100 + nested 29", nested_budget(100, 29)),
        s("nested 128 inside 1", txn(vec![], vec![op(txn(vec![], puts("nest/", 128), vec![]))], vec![])),
        s("nested 127 inside 1", txn(vec![], vec![op(txn(vec![], puts("nest2/", 127), vec![]))], vec![])),
        s("final state", all().keys_only()),
        s("final count", all().count_only()),
    ];
    t.push(s("final values of k*", prefix("k")));
    run_section("txn", t);
}

/// `n` distinct puts `<prefix><i>` as txn operations.
fn puts(prefix: &str, n: usize) -> Vec<RequestOp> {
    (0..n).map(|i| op(put(&format!("{prefix}{i:03}"), "v"))).collect()
}

/// A txn with `outer` puts plus one nested txn holding `inner` puts.
fn nested_budget(outer: usize, inner: usize) -> TxnRequest {
    let mut ops = puts(&format!("nb{outer}-{inner}/o"), outer);
    ops.push(op(txn(vec![], puts(&format!("nb{outer}-{inner}/i"), inner), vec![])));
    txn(vec![], ops, vec![])
}

/// Compaction (logical and physical), then reads at, below and above the compacted
/// revision; compaction errors.
#[test]
fn diff_compaction() {
    run_section(
        "compaction",
        vec![
            s("compact 0 on a fresh store", compact(0)),
            s("compact future on a fresh store", compact(5)),
            s("put c=1", put("c", "1")),
            mark("r1"),
            s("put c=2", put("c", "2")),
            mark("r2"),
            s("put o=1", put("o", "1")),
            s("put c=3", put("c", "3")),
            mark("r3"),
            s("delete c", del("c")),
            mark("r4"),
            s("put c=5", put("c", "5")),
            mark("r5"),
            s("put o=2", put("o", "2")),
            d("get c at r1", |c| get("c").rev(c.m("r1"))),
            d("get c at r2", |c| get("c").rev(c.m("r2"))),
            d("get c at r4 (deleted)", |c| get("c").rev(c.m("r4"))),
            d("everything at r3", |c| all().rev(c.m("r3"))),
            d("compact at r3", |c| compact(c.m("r3"))),
            d("get c at r1 (compacted)", |c| get("c").rev(c.m("r1"))),
            d("get c at r2 (compacted)", |c| get("c").rev(c.m("r2"))),
            d("count_only at r2 (compacted)", |c| all().rev(c.m("r2")).count_only()),
            d("serializable at r2 (compacted)", |c| all().rev(c.m("r2")).serializable()),
            d("get c at r3 (= compacted revision)", |c| get("c").rev(c.m("r3"))),
            d("everything at r3 after compaction", |c| all().rev(c.m("r3"))),
            d("get c at r4", |c| get("c").rev(c.m("r4"))),
            s("get c latest", get("c")),
            s("everything latest", all()),
            d("compact at r2 again (below)", |c| compact(c.m("r2"))),
            d("compact at r3 again (same)", |c| compact(c.m("r3"))),
            s("compact 0 after compaction", compact(0)),
            s("compact -1 after compaction", compact(-1)),
            d("compact in the future", |c| compact(c.rev + 1)),
            d("compact far in the future", |c| compact(c.rev + 1000)),
            d("txn range below compaction", |c| txn(vec![], vec![op(get("c").rev(c.m("r2")))], vec![])),
            d("txn range at compaction", |c| txn(vec![], vec![op(get("c").rev(c.m("r3")))], vec![])),
            d("physical compact at r5", |c| compact_physical(c.m("r5"))),
            d("get c at r4 after physical compaction", |c| get("c").rev(c.m("r4"))),
            d("get c at r5 after physical compaction", |c| get("c").rev(c.m("r5"))),
            s("o after physical compaction", get("o")),
            s("put after compaction", put("c", "6").prev_kv()),
            s("delete after compaction", del("o").prev_kv()),
            d("compact at current revision (physical)", |c| compact_physical(c.rev)),
            d("read at current revision after full compaction", |c| all().rev(c.rev)),
            s("everything at the end", all()),
        ],
    );
}

/// Empty keys and request size limits.
#[test]
fn diff_limits() {
    let just_below = MAX_REQUEST_BYTES - 64;
    run_section(
        "limits",
        vec![
            s("range empty key", get("")),
            s("range empty key with range_end", range("", "z")),
            s("range empty key with range_end \\0", range("", "\0")),
            s("put empty key", put("", "v")),
            s("delete empty key", del("")),
            s("delete empty key with range_end \\0", del_range("", "\0")),
            s("put 1 MiB value", put_bytes(b"big", vec![b'a'; 1 << 20])),
            s("get 1 MiB value", get("big").keys_only()),
            s("put value of max-request-bytes - 64 request bytes", put_value_of_request_size(b"big2", just_below)),
            s("put 1.6 MiB value (too large)", put_bytes(b"big3", vec![b'c'; 1600 * 1024])),
            s("txn with a 1.6 MiB put (too large)", txn(vec![], vec![op(put_bytes(b"big3", vec![b'c'; 1600 * 1024]))], vec![])),
            s("txn of puts of 1.6 MiB in all (too large)", txn(vec![], (0..4).map(|i| op(put_bytes(format!("p{i}").as_bytes(), vec![b'd'; 400 * 1024]))).collect(), vec![])),
            s("nothing too large was written", all().keys_only()),
            s("range with a 1.6 MiB key", RangeRequest { key: vec![b'k'; 1600 * 1024], ..Default::default() }),
            s("read-only txn with a 1.6 MiB key", txn(vec![], vec![op(RangeRequest { key: vec![b'k'; 1600 * 1024], ..Default::default() })], vec![])),
            s("delete with a 1.6 MiB key (too large)", DeleteRangeRequest { key: vec![b'k'; 1600 * 1024], ..Default::default() }),
            s("put request of exactly max-request-bytes", put_value_of_request_size(b"edge", MAX_REQUEST_BYTES)),
            s("put 2.5 MiB value (beyond the gRPC limit)", put_bytes(b"big4", vec![b'e'; 2560 * 1024])),
            s("keys at the end", all().keys_only()),
        ],
    );
}

/// A put of `key` whose encoded `PutRequest` is exactly `size` bytes.
fn put_value_of_request_size(key: &[u8], size: usize) -> PutRequest {
    use prost::Message;
    let mut n = size;
    loop {
        let r = put_bytes(key, vec![b'b'; n]);
        match r.encoded_len().cmp(&size) {
            std::cmp::Ordering::Equal => return r,
            std::cmp::Ordering::Greater => n -= 1,
            std::cmp::Ordering::Less => {
                // Length prefixes are varints: a smaller value can shrink the prefix by a
                // byte; pad the key instead.
                let mut k = key.to_vec();
                k.resize(key.len() + size - r.encoded_len(), b'_');
                let r2 = put_bytes(&k, vec![b'b'; n]);
                assert_eq!(r2.encoded_len(), size);
                return r2;
            }
        }
    }
}
