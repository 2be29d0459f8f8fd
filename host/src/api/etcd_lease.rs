//! etcd's `etcdserverpb.Lease` service.
//!
//! Grants and revocations go through the log (`Request::LeaseGrant`/`LeaseRevoke`), so the
//! lease table is the same on every replica; keep-alives and time-to-live questions are
//! answered by the leader, which alone tracks deadlines (see `lessor`); a follower forwards
//! them. Errors and their gRPC codes are etcd's.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::etcd_kv::{header, kv_revision};
use super::{etcd_status, kv_error_status, node_status};
use crate::lessor::{fresh_id, ERR_LEASE_EXISTS, ERR_LEASE_TTL_TOO_LARGE, MAX_LEASE_TTL};
use crate::node::Node;
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::*;
use crate::storage::leases::list_leases;
use crate::types::{Request as LogRequest, Response as LogResponse};

/// Grants of a node-chosen id retried after an id collision.
const GRANT_ATTEMPTS: usize = 3;

#[derive(Clone)]
pub struct LeaseService {
    pub node: Arc<Node>,
    /// etcd's minimum TTL in seconds (see `lessor::min_ttl_secs`).
    pub min_ttl: i64,
    /// Set when the server stops: open keep-alive streams end.
    pub stopped: watch::Receiver<bool>,
    /// `--quota-backend-bytes`: etcd refuses grants under NOSPACE too.
    pub quota: Arc<crate::api::quota::Quota>,
}

/// A response header with the `kv` machine's current revision (0 if it has none yet).
async fn header_now(node: &Node) -> ResponseHeader {
    header(node, kv_revision(node).await)
}

/// The header after a command applied at log `index` (on the leader): a follower that
/// proposed it through the leader first applies it itself, so the revision it reports
/// includes the command (as etcd's does). If that takes too long, the header is the
/// current one.
async fn header_after(node: &Node, index: u64) -> ResponseHeader {
    let _ = node
        .raft
        .wait(Some(node.request_timeout))
        .applied_index_at_least(Some(index), "the proposed lease command")
        .await;
    header_now(node).await
}

fn log_result(resp: LogResponse) -> Result<(), Status> {
    match resp {
        LogResponse::Empty => Ok(()),
        LogResponse::Failed(e) => Err(kv_error_status(e)),
        other => Err(Status::internal(format!(
            "unexpected apply result {other:?}"
        ))),
    }
}

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let r = req.into_inner();
        self.quota.check(crate::api::quota::LEASE_GRANT_COST).await?;
        if r.ttl > MAX_LEASE_TTL {
            return Err(etcd_status(ERR_LEASE_TTL_TOO_LARGE));
        }
        // etcd's lessor raises a short TTL to the minimum; here the proposer does, so the
        // replicated grant carries the final TTL.
        let ttl = r.ttl.max(self.min_ttl);
        for _ in 0..GRANT_ATTEMPTS {
            let id = if r.id == 0 {
                fresh_id(self.node.id)
            } else {
                r.id
            };
            let (resp, index) = self
                .node
                .propose(LogRequest::LeaseGrant { id, ttl })
                .await
                .map_err(node_status)?;
            match log_result(resp) {
                Ok(()) => {
                    let header = Some(header_after(&self.node, index).await);
                    return Ok(Response::new(LeaseGrantResponse {
                        header,
                        id,
                        ttl,
                        error: String::new(),
                    }));
                }
                Err(s) if r.id == 0 && s.message() == ERR_LEASE_EXISTS => continue,
                Err(s) => return Err(s),
            }
        }
        Err(etcd_status(ERR_LEASE_EXISTS))
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let id = req.into_inner().id;
        let (resp, index) = self
            .node
            .propose(LogRequest::LeaseRevoke {
                id,
                timestamp_ms: 0,
            })
            .await
            .map_err(node_status)?;
        log_result(resp)?;
        Ok(Response::new(LeaseRevokeResponse {
            header: Some(header_after(&self.node, index).await),
        }))
    }

    type LeaseKeepAliveStream = Stream<LeaseKeepAliveResponse>;

    /// One response per request, in order. An unknown (or expired and revoked) lease gets
    /// TTL 0, as etcd answers; a failure to reach a leader ends the stream with the error
    /// (clients open a new one).
    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = req.into_inner();
        let node = self.node.clone();
        let mut stopped = self.stopped.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let r = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(r)) => r,
                        _ => return,
                    },
                    _ = stopped.wait_for(|v| *v) => return,
                };
                let out = match node.lease_renew(r.id).await {
                    Ok(ttl) => Ok(LeaseKeepAliveResponse {
                        header: Some(header_now(&node).await),
                        id: r.id,
                        ttl: ttl.unwrap_or(0),
                    }),
                    Err(e) => Err(node_status(e)),
                };
                let failed = out.is_err();
                if tx.send(out).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    /// etcd answers an unknown lease with TTL -1 (not an error).
    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let r = req.into_inner();
        let found = self
            .node
            .lease_time_to_live(r.id, r.keys)
            .await
            .map_err(node_status)?;
        let header = Some(header_now(&self.node).await);
        Ok(Response::new(match found {
            Some(t) => LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: t.ttl,
                granted_ttl: t.granted_ttl,
                keys: t.keys,
            },
            None => LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        }))
    }

    async fn lease_leases(
        &self,
        _req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.node.read_barrier().await.map_err(node_status)?;
        let db = self.node.shared.db();
        let leases = tokio::task::spawn_blocking(move || list_leases(&db))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(header_now(&self.node).await),
            leases: leases
                .into_iter()
                .map(|(id, _)| LeaseStatus { id })
                .collect(),
        }))
    }
}
