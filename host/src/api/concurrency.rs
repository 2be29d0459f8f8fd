//! etcd's Lock (`v3lockpb`) and Election (`v3electionpb`) services.
//!
//! etcd serves both with its client library's concurrency recipes (a mutex and an election
//! over keys under a prefix, ordered by create revision) running against its own KV, Lease
//! and Watch APIs. Here the same recipes run against the in-process KV and Lease services,
//! so the keys, values, leases and revisions are exactly those a client-side recipe
//! (`etcdctl lock`, `etcdctl elect`, any client's mutex) makes, and the two interoperate.
//!
//! - A holder's key is `<name>/<lease in hex>`, attached to that lease; the caller that
//!   passes lease 0 gets a fresh lease of 60 s (etcd's session default), which nobody
//!   keeps alive, as in etcd.
//! - The holder of a lock (the leader of an election) is the key under the prefix with the
//!   lowest create revision; a waiter waits until every key created before its own is
//!   deleted (unlocked, resigned, or its lease expired).
//! - Waiting uses the committed-events broadcast the Watch service uses: subscribe, then
//!   read, then wait for the delete event, so no deletion is missed.
//! - A caller that goes away while waiting (its RPC canceled) has its key deleted, as
//!   etcd's recipe does on a canceled wait.

use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Request, Response, Status};

use super::etcd_kv::{header, KvService, KV_MACHINE};
use super::etcd_lease::LeaseService;
use crate::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::etcdserverpb::kv_server::Kv;
use crate::proto::etcdserverpb::lease_server::Lease;
use crate::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use crate::proto::etcdserverpb::response_op::Response as OpResponse;
use crate::proto::etcdserverpb::{
    request_op, Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};
use crate::proto::v3electionpb::election_server::Election;
use crate::proto::v3electionpb::*;
use crate::proto::v3lockpb::lock_server::Lock;
use crate::proto::v3lockpb::*;
use crate::raft::state_machine::CommittedEvents;

/// TTL of the lease granted for a caller that passes none (etcd's default session TTL).
const SESSION_TTL: i64 = 60;

const ERR_NOT_LEADER: &str = "election: not leader";
const ERR_NO_LEADER: &str = "election: no leader";
const ERR_MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";
const ERR_SESSION_EXPIRED: &str = "concurrency: session expired";

/// Which kv events (key, event) a waiter wakes up for.
type EventFilter = dyn Fn(&[u8], &Event) -> bool + Send + Sync;

/// The recipes, over the services a client would use.
#[derive(Clone)]
pub struct Recipes {
    pub kv: KvService,
    pub lease: LeaseService,
    /// Set when the server stops: waits and Observe streams end.
    pub stopped: watch::Receiver<bool>,
}

fn op(r: request_op::Request) -> RequestOp {
    RequestOp { request: Some(r) }
}

/// The prefix of lock or election `name`.
fn prefix_of(name: &[u8]) -> Vec<u8> {
    [name, b"/"].concat()
}

/// The key under `prefix` created first (`sort` ascending) or last, at most `max_create`.
fn by_create(prefix: &[u8], order: SortOrder, max_create: i64) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: crate::storage::prefix_end(prefix),
        sort_order: order as i32,
        sort_target: SortTarget::Create as i32,
        limit: 1,
        max_create_revision: max_create,
        ..Default::default()
    }
}

fn create_revision_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        key: key.to_vec(),
        target: CompareTarget::Create as i32,
        result: CompareResult::Equal as i32,
        target_union: Some(TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

/// A holder's key: `<name>/<lease in hex>`.
fn holder_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    [prefix, format!("{lease:x}").as_bytes()].concat()
}

fn get(key: &[u8]) -> RangeRequest {
    RangeRequest { key: key.to_vec(), ..Default::default() }
}

fn put_op(key: &[u8], value: &[u8], lease: i64) -> RequestOp {
    op(request_op::Request::RequestPut(PutRequest { key: key.to_vec(), value: value.to_vec(), lease, ..Default::default() }))
}

fn range_of(r: &TxnResponse, i: usize) -> Option<&RangeResponse> {
    match r.responses.get(i)?.response.as_ref()? {
        OpResponse::ResponseRange(rr) => Some(rr),
        _ => None,
    }
}

impl Recipes {
    async fn txn(&self, t: TxnRequest) -> Result<TxnResponse, Status> {
        Ok(Kv::txn(&self.kv, Request::new(t)).await?.into_inner())
    }

    async fn range(&self, r: RangeRequest) -> Result<RangeResponse, Status> {
        Ok(Kv::range(&self.kv, Request::new(r)).await?.into_inner())
    }

    async fn delete(&self, key: &[u8]) -> Result<ResponseHeader, Status> {
        let r = DeleteRangeRequest { key: key.to_vec(), ..Default::default() };
        Ok(Kv::delete_range(&self.kv, Request::new(r)).await?.into_inner().header.unwrap_or_default())
    }

    /// The caller's lease, or a fresh one of [`SESSION_TTL`] for lease 0.
    async fn session_lease(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let g = LeaseGrantRequest { ttl: SESSION_TTL, id: 0 };
        Ok(Lease::lease_grant(&self.lease, Request::new(g)).await?.into_inner().id)
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<CommittedEvents>> {
        self.kv.node.shared.events.subscribe()
    }

    /// Wait on `live` for a kv event `wanted` accepts, or until events were missed (the
    /// broadcast lagged). Either way the caller reads the state again.
    async fn next_event(&self, live: &mut broadcast::Receiver<Arc<CommittedEvents>>, wanted: impl Fn(&[u8], &Event) -> bool) -> Result<(), Status> {
        let mut stopped = self.stopped.clone();
        loop {
            let c = tokio::select! {
                r = live.recv() => r,
                _ = stopped.wait_for(|s| *s) => return Err(Status::unavailable("the server is stopping")),
            };
            match c {
                Ok(c) if c.machine == KV_MACHINE => {
                    let hit = c.events.iter().any(|(k, bytes)| Event::decode(bytes.as_slice()).is_ok_and(|e| wanted(k, &e)));
                    if hit {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                Err(broadcast::error::RecvError::Closed) => return Err(Status::unavailable("the server is stopping")),
            }
        }
    }

    /// Wait until no key under `prefix` has a create revision at most `max_create` (etcd's
    /// `waitDeletes`); the header of the read that found none.
    async fn wait_deletes(&self, prefix: &[u8], max_create: i64) -> Result<ResponseHeader, Status> {
        loop {
            // Subscribe before reading: a delete after the read is then on the broadcast.
            let mut live = self.subscribe();
            let r = self.range(by_create(prefix, SortOrder::Descend, max_create)).await?;
            let Some(last) = r.kvs.into_iter().next() else {
                return Ok(r.header.unwrap_or_default());
            };
            let is_delete = |k: &[u8], e: &Event| k == last.key.as_slice() && e.r#type == EventType::Delete as i32;
            self.next_event(&mut live, is_delete).await?;
        }
    }

    /// Delete `key` if the caller goes away before `disarm` (a canceled RPC drops its
    /// future; the delete then runs on its own task).
    fn cleanup_guard(&self, key: &[u8], only_if_created_at: Option<i64>) -> Cleanup {
        Cleanup { recipes: Some(self.clone()), key: key.to_vec(), created_at: only_if_created_at }
    }

    /// etcd's `Mutex.Lock`.
    async fn lock(&self, name: &[u8], lease: i64) -> Result<LockResponse, Status> {
        let lease = self.session_lease(lease).await?;
        let prefix = prefix_of(name);
        let key = holder_key(&prefix, lease);
        let first = op(request_op::Request::RequestRange(by_create(&prefix, SortOrder::Ascend, 0)));
        let t = TxnRequest {
            compare: vec![create_revision_is(&key, 0)],
            success: vec![put_op(&key, b"", lease), first.clone()],
            failure: vec![op(request_op::Request::RequestRange(get(&key))), first],
        };
        // Whatever happens from here, a caller that gives up leaves no key behind: armed
        // before the txn, since a caller can give up while the txn is being applied (after
        // the key became visible to others). etcd's Mutex unlocks on any error likewise.
        let guard = self.cleanup_guard(&key, None);
        let r = self.txn(t).await?;
        let mine = if r.succeeded {
            r.header.as_ref().map_or(0, |h| h.revision)
        } else {
            range_of(&r, 0).and_then(|rr| rr.kvs.first()).map(|kv| kv.create_revision).ok_or_else(|| Status::internal("lock key vanished in its txn"))?
        };
        let owner = range_of(&r, 1).and_then(|rr| rr.kvs.first()).map(|kv| kv.create_revision);
        let header = if owner == Some(mine) {
            r.header.unwrap_or_default()
        } else {
            let header = self.wait_deletes(&prefix, mine - 1).await?;
            // The lease may have expired while waiting, taking the key with it.
            let held = self.range(get(&key)).await?;
            if held.kvs.first().map(|kv| kv.create_revision) != Some(mine) {
                return Err(Status::unknown(ERR_SESSION_EXPIRED));
            }
            header
        };
        guard.disarm();
        Ok(LockResponse { header: Some(header), key })
    }

    /// etcd's `Election.Campaign`.
    async fn campaign(&self, name: &[u8], lease: i64, value: &[u8]) -> Result<CampaignResponse, Status> {
        let lease = self.session_lease(lease).await?;
        let prefix = prefix_of(name);
        let key = holder_key(&prefix, lease);
        let t = TxnRequest {
            compare: vec![create_revision_is(&key, 0)],
            success: vec![put_op(&key, value, lease)],
            failure: vec![op(request_op::Request::RequestRange(get(&key)))],
        };
        let r = self.txn(t).await?;
        let header = r.header.unwrap_or_default();
        let rev = if r.succeeded {
            header.revision
        } else {
            let kv = range_of(&r, 0).and_then(|rr| rr.kvs.first()).ok_or_else(|| Status::internal("leader key vanished in its txn"))?;
            if kv.value != value {
                let me = LeaderKey { name: name.to_vec(), key: key.clone(), rev: kv.create_revision, lease };
                if let Err(e) = self.proclaim(&me, value).await {
                    let _ = self.resign(&me).await;
                    return Err(e);
                }
            }
            kv.create_revision
        };
        let guard = self.cleanup_guard(&key, Some(rev));
        self.wait_deletes(&prefix, rev - 1).await?;
        guard.disarm();
        Ok(CampaignResponse { header: Some(header), leader: Some(LeaderKey { name: name.to_vec(), key, rev, lease }) })
    }

    /// etcd's `Election.Proclaim`: a new value, only while `leader` still leads.
    async fn proclaim(&self, leader: &LeaderKey, value: &[u8]) -> Result<ResponseHeader, Status> {
        let t = TxnRequest {
            compare: vec![create_revision_is(&leader.key, leader.rev)],
            success: vec![put_op(&leader.key, value, leader.lease)],
            failure: Vec::new(),
        };
        let r = self.txn(t).await?;
        if !r.succeeded {
            return Err(Status::unknown(ERR_NOT_LEADER));
        }
        Ok(r.header.unwrap_or_default())
    }

    /// etcd's `Election.Resign`: delete the leader key if it is still this leadership's.
    async fn resign(&self, leader: &LeaderKey) -> Result<ResponseHeader, Status> {
        let delete = DeleteRangeRequest { key: leader.key.clone(), ..Default::default() };
        let t = TxnRequest {
            compare: vec![create_revision_is(&leader.key, leader.rev)],
            success: vec![op(request_op::Request::RequestDeleteRange(delete))],
            failure: Vec::new(),
        };
        Ok(self.txn(t).await?.header.unwrap_or_default())
    }

    /// The current leader of the election with prefix `prefix`, if any, and the header.
    async fn leader_of(&self, prefix: &[u8]) -> Result<(ResponseHeader, Option<KeyValue>), Status> {
        let r = self.range(by_create(prefix, SortOrder::Ascend, 0)).await?;
        Ok((r.header.unwrap_or_default(), r.kvs.into_iter().next()))
    }

    /// etcd's `Election.Observe`: the leader now and after every change of leader or of
    /// its value, until the client goes away or the server stops.
    async fn observe(self, prefix: Vec<u8>, tx: mpsc::Sender<Result<LeaderResponse, Status>>) {
        let mut last: Option<KeyValue> = None;
        loop {
            let mut live = self.subscribe();
            let leader = match self.leader_of(&prefix).await {
                Ok((_, l)) => l,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let wanted: Box<EventFilter> = match leader {
                // No leader: the next put under the prefix may make one.
                None => {
                    let p = prefix.clone();
                    Box::new(move |k, e| k.starts_with(&p) && e.r#type == EventType::Put as i32)
                }
                Some(kv) => {
                    if last.as_ref() != Some(&kv) {
                        last = Some(kv.clone());
                        let r = LeaderResponse { header: Some(header(&self.kv.node, kv.mod_revision)), kv: Some(kv.clone()) };
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                    // Any change to the leader key: a new value, or its deletion.
                    Box::new(move |k, _| k == kv.key.as_slice())
                }
            };
            let wait = tokio::select! {
                s = self.next_event(&mut live, wanted) => s,
                _ = tx.closed() => return,
            };
            if let Err(e) = wait {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

/// See [`Recipes::cleanup_guard`].
struct Cleanup {
    recipes: Option<Recipes>,
    key: Vec<u8>,
    /// Delete only if the key still has this create revision (an election's leader key).
    created_at: Option<i64>,
}

impl Cleanup {
    fn disarm(mut self) {
        self.recipes = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(r) = self.recipes.take() else { return };
        let key = std::mem::take(&mut self.key);
        let created_at = self.created_at;
        tokio::spawn(async move {
            let result = match created_at {
                Some(rev) => r.resign(&LeaderKey { key: key.clone(), rev, ..Default::default() }).await,
                None => r.delete(&key).await,
            };
            if let Err(e) = result {
                tracing::warn!(key = %String::from_utf8_lossy(&key), "removing an abandoned lock or campaign key: {}", e.message());
            }
        });
    }
}

pub struct LockService(pub Recipes);

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.0.lock(&r.name, r.lease).await?))
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let header = self.0.delete(&req.into_inner().key).await?;
        Ok(Response::new(UnlockResponse { header: Some(header) }))
    }
}

pub struct ElectionService(pub Recipes);

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(&self, req: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.0.campaign(&r.name, r.lease, &r.value).await?))
    }

    async fn proclaim(&self, req: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let r = req.into_inner();
        let leader = r.leader.ok_or_else(|| Status::unknown(ERR_MISSING_LEADER_KEY))?;
        Ok(Response::new(ProclaimResponse { header: Some(self.0.proclaim(&leader, &r.value).await?) }))
    }

    async fn leader(&self, req: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let (header, kv) = self.0.leader_of(&prefix_of(&req.into_inner().name)).await?;
        let kv = kv.ok_or_else(|| Status::unknown(ERR_NO_LEADER))?;
        Ok(Response::new(LeaderResponse { header: Some(header), kv: Some(kv) }))
    }

    type ObserveStream = Stream<LeaderResponse>;

    async fn observe(&self, req: Request<LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.0.clone().observe(prefix_of(&req.into_inner().name), tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn resign(&self, req: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let leader = req.into_inner().leader.ok_or_else(|| Status::unknown(ERR_MISSING_LEADER_KEY))?;
        Ok(Response::new(ResignResponse { header: Some(self.0.resign(&leader).await?) }))
    }
}
