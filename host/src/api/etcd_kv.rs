//! etcd's `etcdserverpb.KV` service on top of the `kv` machine (guest-examples/kv-mvcc).
//!
//! Each request travels to the guest as one tag byte plus the request's protobuf bytes;
//! the guest answers with the matching response message. Writes go through the log;
//! ranges and txns that only read go through `query`, as etcd serves them without raft
//! (linearizable via read-index unless serializable). The host checks what etcd checks
//! in its gRPC layer (sizes, `--max-txn-ops`, the quota) and fills the header fields
//! only it knows: cluster id, member id and raft term.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::quota::Quota;
use super::{etcd_status, kv_error_status, node_status};
use crate::node::Node;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::*;
use crate::types::{ApplyError, ApplyErrorKind, Request as LogRequest, Response as LogResponse};

/// The machine that serves etcd's key space.
pub const KV_MACHINE: &str = "kv";

// The kv machine's command tags (guest-examples/kv-mvcc/src/command.rs).
pub const TAG_RANGE: u8 = 1;
pub(crate) const TAG_PUT: u8 = 2;
pub(crate) const TAG_DELETE: u8 = 3;
pub(crate) const TAG_TXN: u8 = 4;
pub(crate) const TAG_COMPACT: u8 = 5;
pub(crate) const TAG_COMPACT_STEP: u8 = 9;
const TAG_COMPACT_PENDING: u8 = 10;
pub const TAG_HASH_KV: u8 = 6;
pub const TAG_STATUS: u8 = 7;

/// What etcd's gRPC server accepts on top of --max-request-bytes.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

#[derive(Clone)]
pub struct KvService {
    pub node: Arc<Node>,
    pub max_request_bytes: usize,
    /// `--max-txn-ops`.
    pub max_txn_ops: usize,
    /// `--quota-backend-bytes`, shared with the Lease service.
    pub quota: Arc<Quota>,
}

/// A response header as this member reports it.
pub fn header(node: &Node, revision: i64) -> ResponseHeader {
    ResponseHeader { cluster_id: node.cluster_id, member_id: node.id, revision, raft_term: node.term() }
}

const ERR_TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";
const ERR_EMPTY_KEY: &str = "etcdserver: key is not provided";
const ERR_KEY_NOT_FOUND: &str = "etcdserver: key not found";
const ERR_VALUE_PROVIDED: &str = "etcdserver: value is provided";
const ERR_LEASE_PROVIDED: &str = "etcdserver: lease is provided";

/// etcd's `checkTxnRequest`, in its order: the op budget (the widest of compares,
/// success and failure; a nested txn gets what its parent's widest list leaves), empty
/// compare keys, then each op's own checks. The guest repeats all but the budget when it
/// applies the txn; checking here keeps etcd's error precedence, where the budget of a
/// nested txn is judged only after its parent's keys.
fn check_txn_request(t: &TxnRequest, max_ops: usize) -> Result<(), &'static str> {
    let opc = t.compare.len().max(t.success.len()).max(t.failure.len());
    if opc > max_ops {
        return Err(ERR_TOO_MANY_OPS);
    }
    if t.compare.iter().any(|c| c.key.is_empty()) {
        return Err(ERR_EMPTY_KEY);
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) if r.key.is_empty() => return Err(ERR_EMPTY_KEY),
            Some(request_op::Request::RequestDeleteRange(d)) if d.key.is_empty() => return Err(ERR_EMPTY_KEY),
            Some(request_op::Request::RequestPut(p)) => {
                if p.key.is_empty() {
                    return Err(ERR_EMPTY_KEY);
                }
                if p.ignore_value && !p.value.is_empty() {
                    return Err(ERR_VALUE_PROVIDED);
                }
                if p.ignore_lease && p.lease != 0 {
                    return Err(ERR_LEASE_PROVIDED);
                }
            }
            Some(request_op::Request::RequestTxn(n)) => check_txn_request(n, max_ops - opc)?,
            Some(_) => {}
            None => return Err(ERR_KEY_NOT_FOUND),
        }
    }
    Ok(())
}

/// etcd's `isTxnSerializable`: every range in the txn (and its nested txns) is.
fn txn_is_serializable(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match &op.request {
        Some(request_op::Request::RequestRange(r)) => r.serializable,
        Some(request_op::Request::RequestTxn(t)) => txn_is_serializable(t),
        _ => true,
    })
}

/// A txn whose branches (and nested txns) only read.
fn txn_is_read_only(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match &op.request {
        Some(request_op::Request::RequestRange(_)) | None => true,
        Some(request_op::Request::RequestTxn(t)) => txn_is_read_only(t),
        _ => false,
    })
}

/// Whether a txn may write new data (etcd's capped applier refuses those under NOSPACE).
fn txn_has_put(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match &op.request {
        Some(request_op::Request::RequestPut(_)) => true,
        Some(request_op::Request::RequestTxn(t)) => txn_has_put(t),
        _ => false,
    })
}

/// Responses that carry a header the host completes.
pub trait WithHeader: Message + Default {
    fn header_mut(&mut self) -> &mut Option<ResponseHeader>;
}

macro_rules! with_header {
    ($($t:ty),*) => {$(
        impl WithHeader for $t {
            fn header_mut(&mut self) -> &mut Option<ResponseHeader> { &mut self.header }
        }
    )*};
}
with_header!(RangeResponse, PutResponse, DeleteRangeResponse, TxnResponse, CompactionResponse);

/// A kv command or query: its tag, then the protobuf message.
pub(crate) fn frame(tag: u8, msg: &impl Message) -> Vec<u8> {
    let mut b = Vec::with_capacity(1 + msg.encoded_len());
    b.push(tag);
    msg.encode(&mut b).expect("Vec grows as needed");
    b
}

/// Run the `kv` machine's `query` for `msg` under `tag` on local state (after a read-index
/// barrier if `linearizable`) and decode its answer. The header is the guest's (revision
/// only).
pub async fn kv_query<R: Message + Default>(node: &Node, tag: u8, msg: &impl Message, linearizable: bool) -> Result<R, Status> {
    match node.query(KV_MACHINE, frame(tag, msg), linearizable).await.map_err(node_status)? {
        Ok(out) => R::decode(out.as_slice()).map_err(|e| Status::internal(format!("kv machine answered garbage: {e}"))),
        Err(e) => Err(kv_error_status(e)),
    }
}

/// Work units of a compaction step (kv-mvcc's default): about one record read each. A
/// unit cost 8,000–16,000 fuel when removing deleted keys (measured), so a step stays
/// under ~16M fuel and holds the apply loop ~10–15 ms (release build), much as etcd's
/// compaction batches of 1,000 keys hold its backend.
const COMPACT_STEP_UNITS: u32 = 1_000;

/// Propose a kv command and decode its answer.
async fn propose_kv<R: Message + Default>(node: &Node, tag: u8, msg: &impl Message) -> Result<R, Status> {
    let out = propose_kv_raw(node, frame(tag, msg)).await?.map_err(kv_error_status)?;
    R::decode(out.as_slice()).map_err(|e| Status::internal(format!("kv machine answered garbage: {e}")))
}

/// Propose a kv command: the guest's bytes or its error.
async fn propose_kv_raw(node: &Node, payload: Vec<u8>) -> Result<Result<Vec<u8>, ApplyError>, Status> {
    let call = LogRequest::Call { machine: KV_MACHINE.to_string(), payload, timestamp_ms: 0 };
    match node.propose(call).await.map_err(node_status)?.0 {
        LogResponse::Output(b) => Ok(Ok(b)),
        LogResponse::Failed(e) => Ok(Err(e)),
        other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
    }
}

/// etcd's Compact on the kv machine. The compaction itself is one log entry: reads below
/// `r.revision` fail from then on. Removing the history is left to compaction steps
/// ([`finish_compaction`]), each a log entry of bounded work, so no history is too long
/// to compact within the module's budget. As in etcd, `physical` answers once the history
/// is gone; otherwise the steps run after the answer.
pub async fn compact_kv(node: &Arc<Node>, r: &CompactionRequest) -> Result<CompactionResponse, Status> {
    let resp = propose_kv::<CompactionResponse>(node, TAG_COMPACT, r).await?;
    if r.physical {
        finish_compaction(node).await?;
    } else {
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = finish_compaction(&node).await {
                tracing::warn!("compaction steps stopped, the next compaction goes on: {}", e.message());
            }
        });
    }
    Ok(resp)
}

/// Proposes kv compaction steps until one reports that no work is left. A step that runs
/// out of fuel or memory changed nothing; it is retried at half the size (steps grow back
/// after that). A kv module from before compaction steps compacts in the request itself
/// and refuses the step's tag: nothing to do then.
pub async fn finish_compaction(node: &Node) -> Result<(), Status> {
    let mut units = COMPACT_STEP_UNITS;
    loop {
        let mut step = vec![TAG_COMPACT_STEP];
        step.extend_from_slice(&units.to_be_bytes());
        match propose_kv_raw(node, step).await? {
            Ok(more) if more.as_slice() == [1] => units = units.saturating_mul(2).min(COMPACT_STEP_UNITS),
            Ok(done) if done.as_slice() == [0] => return Ok(()),
            Ok(other) => return Err(Status::internal(format!("kv compaction step answered {other:?}"))),
            Err(e) if e.kind == ApplyErrorKind::Rejected && e.message.contains("cannot apply command tag") => return Ok(()),
            Err(e) if matches!(e.kind, ApplyErrorKind::OutOfFuel | ApplyErrorKind::OutOfMemory) && units > 1 => {
                units /= 2;
            }
            Err(e) => return Err(kv_error_status(e)),
        }
    }
}

/// Whether the kv machine has compaction steps left (after a read-index barrier). No kv
/// machine, or one from before compaction steps, has none.
pub async fn kv_compaction_pending(node: &Node) -> Result<bool, Status> {
    match node.query(KV_MACHINE, vec![TAG_COMPACT_PENDING], true).await.map_err(node_status)? {
        Ok(out) => Ok(out == [1]),
        Err(e) if e.kind == ApplyErrorKind::NoSuchMachine => Ok(false),
        Err(e) if e.kind == ApplyErrorKind::Rejected && e.message.contains("cannot answer query tag") => Ok(false),
        Err(e) => Err(kv_error_status(e)),
    }
}

/// The `kv` machine's current revision, after a read-index barrier if `linearizable`.
async fn kv_status_revision(node: &Node, linearizable: bool) -> Result<i64, Status> {
    let status = kv_query::<StatusResponse>(node, TAG_STATUS, &StatusRequest {}, linearizable).await?;
    Ok(status.header.map_or(0, |h| h.revision))
}

/// The `kv` machine's current revision on this node (0 before it is installed).
pub async fn kv_revision(node: &Node) -> i64 {
    kv_status_revision(node, false).await.unwrap_or(0)
}

impl KvService {
    /// etcd's two size limits. gRPC refuses any message over `--max-request-bytes` plus
    /// 512 KiB with grpc-go's own error; requests that go through raft are refused from
    /// `--max-request-bytes` on, measured on etcd's internal raft request, which wraps the
    /// request in a field (1-byte tag + length) next to a request header (13 bytes: a
    /// 10-byte varint id in a 1-byte-tagged, 1-byte-length field).
    fn check_grpc_size(&self, msg: &impl Message) -> Result<(), Status> {
        let len = msg.encoded_len();
        let max = self.max_request_bytes + GRPC_OVERHEAD_BYTES;
        if len > max {
            return Err(Status::resource_exhausted(format!("grpc: received message larger than max ({len} vs. {max})")));
        }
        Ok(())
    }

    fn check_raft_size(&self, msg: &impl Message) -> Result<(), Status> {
        let len = msg.encoded_len();
        let internal = 13 + 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if internal > self.max_request_bytes {
            return Err(Status::invalid_argument("etcdserver: request is too large"));
        }
        Ok(())
    }

    /// Complete the header of the guest's answer with what only the host knows.
    fn finish<R: WithHeader>(&self, mut r: R) -> Response<R> {
        let revision = r.header_mut().as_ref().map(|h| h.revision).unwrap_or(0);
        *r.header_mut() = Some(header(&self.node, revision));
        Response::new(r)
    }

    /// Replicate a write.
    async fn write<R: WithHeader>(&self, tag: u8, msg: &impl Message) -> Result<Response<R>, Status> {
        self.check_grpc_size(msg)?;
        self.check_raft_size(msg)?;
        Ok(self.finish(propose_kv(&self.node, tag, msg).await?))
    }

    /// Answer a read from local state, after a read-index barrier if `linearizable`.
    async fn read<R: WithHeader>(&self, tag: u8, msg: &impl Message, linearizable: bool) -> Result<Response<R>, Status> {
        self.check_grpc_size(msg)?;
        Ok(self.finish(kv_query(&self.node, tag, msg, linearizable).await?))
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = req.into_inner();
        self.read(TAG_RANGE, &r, !r.serializable).await
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = req.into_inner();
        self.quota.check(r.encoded_len()).await?;
        self.write(TAG_PUT, &r).await
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        self.write(TAG_DELETE, &req.into_inner()).await
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let r = req.into_inner();
        // etcd's order: the quota interceptor, the gRPC layer's checks, then the server,
        // which serves read-only txns without raft (so without its raft size limit).
        if txn_has_put(&r) {
            self.quota.check(r.encoded_len()).await?;
        }
        check_txn_request(&r, self.max_txn_ops).map_err(etcd_status)?;
        if txn_is_read_only(&r) {
            return self.read(TAG_TXN, &r, !txn_is_serializable(&r)).await;
        }
        self.write(TAG_TXN, &r).await
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let r = req.into_inner();
        self.check_grpc_size(&r)?;
        self.check_raft_size(&r)?;
        Ok(self.finish(compact_kv(&self.node, &r).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(key: &str) -> RequestOp {
        RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest { key: key.into(), ..Default::default() })) }
    }

    fn put(key: &str) -> RequestOp {
        RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key: key.into(), ..Default::default() })) }
    }

    fn nested(outer: usize, inner: usize) -> TxnRequest {
        let t = TxnRequest { success: (0..inner).map(|i| put(&format!("n{i}"))).collect(), ..Default::default() };
        let mut success: Vec<_> = (0..outer).map(|i| get(&format!("g{i}"))).collect();
        success.push(RequestOp { request: Some(request_op::Request::RequestTxn(t)) });
        TxnRequest { success, ..Default::default() }
    }

    #[test]
    fn op_budget_is_per_level_and_shrinks_with_nesting() {
        let flat = |n: usize| TxnRequest { failure: (0..n).map(|i| put(&format!("k{i}"))).collect(), ..Default::default() };
        assert_eq!(check_txn_request(&flat(128), 128), Ok(()));
        assert_eq!(check_txn_request(&flat(129), 128), Err(ERR_TOO_MANY_OPS));
        assert_eq!(check_txn_request(&flat(5), 4), Err(ERR_TOO_MANY_OPS));
        // 99 gets + the nested txn = 100 ops at the top: the nested one may have 28.
        assert_eq!(check_txn_request(&nested(99, 28), 128), Ok(()));
        assert_eq!(check_txn_request(&nested(99, 29), 128), Err(ERR_TOO_MANY_OPS));
    }

    #[test]
    fn errors_come_in_etcds_order() {
        // A parent's empty compare key is reported before its nested txn's budget.
        let mut t = nested(99, 29);
        t.compare.push(Compare { key: Vec::new(), ..Default::default() });
        assert_eq!(check_txn_request(&t, 128), Err(ERR_EMPTY_KEY));
        let empty_op = TxnRequest { success: vec![RequestOp { request: None }], ..Default::default() };
        assert_eq!(check_txn_request(&empty_op, 128), Err(ERR_KEY_NOT_FOUND));
        let ignore = PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ignore_value: true, ..Default::default() };
        let t = TxnRequest {
            success: vec![RequestOp { request: Some(request_op::Request::RequestPut(ignore)) }],
            ..Default::default()
        };
        assert_eq!(check_txn_request(&t, 128), Err(ERR_VALUE_PROVIDED));
    }

    #[test]
    fn read_only_and_serializable_txns() {
        let mut t = nested(2, 0);
        assert!(txn_is_read_only(&t));
        assert!(!txn_is_serializable(&t));
        for op in &mut t.success {
            if let Some(request_op::Request::RequestRange(r)) = &mut op.request {
                r.serializable = true;
            }
        }
        assert!(txn_is_serializable(&t));
        assert!(!txn_is_read_only(&nested(2, 1)));
    }
}
