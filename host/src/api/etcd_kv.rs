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

pub struct KvService {
    pub node: Arc<Node>,
    pub max_request_bytes: usize,
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
    fn check_size(&self, msg: &impl Message) -> Result<(), Status> {
        if msg.encoded_len() > self.max_request_bytes {
            return Err(Status::invalid_argument("etcdserver: request is too large"));
        }
        Ok(())
    }

    fn finish<R: WithHeader>(&self, bytes: &[u8]) -> Result<Response<R>, Status> {
        let mut r = R::decode(bytes).map_err(|e| Status::internal(format!("kv machine answered garbage: {e}")))?;
        let h = r.header_mut().get_or_insert_with(ResponseHeader::default);
        h.cluster_id = self.node.cluster_id;
        h.member_id = self.node.id;
        h.raft_term = self.node.term();
        Ok(Response::new(r))
    }

    async fn write<R: WithHeader>(&self, tag: u8, msg: &impl Message) -> Result<Response<R>, Status> {
        self.check_size(msg)?;
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
        self.check_size(&r)?;
        let out = self.node.query(KV_MACHINE, frame(TAG_RANGE, &r), !r.serializable).await.map_err(node_status)?;
        match out {
            Ok(b) => self.finish(&b),
            Err(e) if e.kind == ApplyErrorKind::Rejected => Err(etcd_status(&e.message)),
            Err(e) => Err(apply_status(e)),
        }
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.write(TAG_PUT, &req.into_inner()).await
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        self.write(TAG_DELETE, &req.into_inner()).await
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        self.write(TAG_TXN, &req.into_inner()).await
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        self.write(TAG_COMPACT, &req.into_inner()).await
    }
}
