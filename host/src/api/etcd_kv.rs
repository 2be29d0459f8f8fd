//! etcd's `etcdserverpb.KV` service on top of the `kv` machine (guest-examples/kv-mvcc).
//!
//! Each request travels to the guest as one tag byte plus the request's protobuf bytes;
//! the guest answers with the matching response message. Writes go through the log,
//! ranges through `query` (linearizable via read-index unless `serializable`). The host
//! fills the header fields only it knows: cluster id, member id and raft term.

use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::{apply_status, etcd_status, node_status};
use crate::node::Node;
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::*;
use crate::types::{ApplyErrorKind, Request as LogRequest, Response as LogResponse};

/// The machine that serves etcd's key space.
pub const KV_MACHINE: &str = "kv";

const TAG_RANGE: u8 = 1;
const TAG_PUT: u8 = 2;
const TAG_DELETE: u8 = 3;
const TAG_TXN: u8 = 4;
const TAG_COMPACT: u8 = 5;

/// What etcd's gRPC server accepts on top of --max-request-bytes.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

pub struct KvService {
    pub node: Arc<Node>,
    pub max_request_bytes: usize,
    /// `--quota-backend-bytes` (resolved; 0 = no quota).
    pub quota_bytes: u64,
}

/// A response header as this member reports it.
pub fn header(node: &Node, revision: i64) -> ResponseHeader {
    ResponseHeader { cluster_id: node.cluster_id, member_id: node.id, revision, raft_term: node.term() }
}

const NOSPACE: i32 = AlarmType::Nospace as i32;
const ERR_NOSPACE: &str = "etcdserver: mvcc: database space exceeded";

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

fn frame(tag: u8, msg: &impl Message) -> Vec<u8> {
    let mut b = Vec::with_capacity(1 + msg.encoded_len());
    b.push(tag);
    msg.encode(&mut b).expect("Vec grows as needed");
    b
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

    fn finish<R: WithHeader>(&self, bytes: &[u8]) -> Result<Response<R>, Status> {
        let mut r = R::decode(bytes).map_err(|e| Status::internal(format!("kv machine answered garbage: {e}")))?;
        let revision = r.header_mut().as_ref().map(|h| h.revision).unwrap_or(0);
        *r.header_mut() = Some(header(&self.node, revision));
        Ok(Response::new(r))
    }

    /// etcd's space quota: while a NOSPACE alarm is active, or when this write would take
    /// the store past the quota (which raises the alarm), new data is refused. Reads,
    /// deletes and compactions still work, so an operator can free space and disarm.
    async fn check_quota(&self, request_bytes: usize) -> Result<(), Status> {
        let db = self.node.shared.db();
        let alarms = db.alarms().map_err(|e| Status::internal(format!("{e:#}")))?;
        if alarms.iter().any(|(_, a)| *a == NOSPACE) {
            return Err(etcd_status(ERR_NOSPACE));
        }
        if self.quota_bytes > 0 {
            let size = db.size().map_err(|e| Status::internal(format!("{e:#}")))?;
            if size + request_bytes as u64 > self.quota_bytes {
                tracing::warn!(size, quota = self.quota_bytes, "backend quota exceeded: raising NOSPACE alarm");
                let raise = LogRequest::Alarm { activate: true, member_id: self.node.id, alarm: NOSPACE };
                self.node.propose(raise).await.map_err(node_status)?;
                return Err(etcd_status(ERR_NOSPACE));
            }
        }
        Ok(())
    }

    /// Replicate a write. `raft_limited`: whether etcd would size-check it as a raft
    /// request (it serves read-only txns without raft, so those have no such limit).
    async fn write<R: WithHeader>(&self, tag: u8, msg: &impl Message, raft_limited: bool) -> Result<Response<R>, Status> {
        self.check_grpc_size(msg)?;
        if raft_limited {
            self.check_raft_size(msg)?;
        }
        let call = LogRequest::Call { machine: KV_MACHINE.to_string(), payload: frame(tag, msg), timestamp_ms: 0 };
        let (resp, _) = self.node.propose(call).await.map_err(node_status)?;
        match resp {
            LogResponse::Output(b) => self.finish(&b),
            LogResponse::Failed(e) if e.kind == ApplyErrorKind::Rejected => Err(etcd_status(&e.message)),
            LogResponse::Failed(e) => Err(apply_status(e)),
            other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = req.into_inner();
        self.check_grpc_size(&r)?;
        let out = self.node.query(KV_MACHINE, frame(TAG_RANGE, &r), !r.serializable).await.map_err(node_status)?;
        match out {
            Ok(b) => self.finish(&b),
            Err(e) if e.kind == ApplyErrorKind::Rejected => Err(etcd_status(&e.message)),
            Err(e) => Err(apply_status(e)),
        }
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = req.into_inner();
        self.check_quota(r.encoded_len()).await?;
        self.write(TAG_PUT, &r, true).await
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        self.write(TAG_DELETE, &req.into_inner(), true).await
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let r = req.into_inner();
        if txn_has_put(&r) {
            self.check_quota(r.encoded_len()).await?;
        }
        let raft_limited = !txn_is_read_only(&r);
        self.write(TAG_TXN, &r, raft_limited).await
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        self.write(TAG_COMPACT, &req.into_inner(), true).await
    }
}
