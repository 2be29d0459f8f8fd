//! Leases: deadlines, keep-alives and expiry (the part that is not replicated).
//!
//! Which leases exist, their TTLs and which keys hang on them is replicated state
//! (`storage::leases`), changed only through the log (`Request::LeaseGrant`,
//! `Request::LeaseRevoke`). Deadlines are not: they depend on wall clocks and on
//! keep-alives, which do not go through the log. Every node tracks a deadline per lease
//! (set when it applies the grant), but only the leader renews deadlines (keep-alives are
//! forwarded to it) and acts on them: [`run_expiry`] proposes `LeaseRevoke` for leases
//! past their deadline. A node that becomes leader first gives every lease a full TTL
//! again (etcd's `Promote`): it never saw the keep-alives its predecessor received.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use openraft::ServerState;
use prost::Message;
use tokio::sync::{watch, Notify};

use crate::api::etcd_kv::KV_MACHINE;
use crate::node::{Node, NodeError};
use crate::proto::peer::{LeaseReply, LeaseRequest};
use crate::raft::link::CallKind;
use crate::storage::leases::{attached_keys, get_lease, LeaseRecord};
use crate::types::{NodeId, Request, Response};

/// etcd's `MaxLeaseTTL`.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
pub const ERR_LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
pub const ERR_LEASE_EXISTS: &str = "etcdserver: lease already exists";
pub const ERR_LEASE_TTL_TOO_LARGE: &str = "etcdserver: too large lease TTL";

/// How often the leader looks for expired leases (etcd: 500 ms).
const EXPIRY_TICK: Duration = Duration::from_millis(500);
/// Revocations proposed per tick at most (etcd: 1000 revocations per second).
const MAX_REVOKES_PER_TICK: usize = 500;
/// Revocations in flight at once.
const REVOKE_CONCURRENCY: usize = 64;

/// etcd's minimum lease TTL in seconds: 3/2 of an election timeout, counted in heartbeat
/// ticks as etcd counts it, rounded up to whole seconds (1000 ms / 100 ms → 2 s).
pub fn min_ttl_secs(election_timeout_ms: u64, heartbeat_ms: u64) -> i64 {
    let hb = heartbeat_ms.max(1);
    let ticks = election_timeout_ms / hb;
    let ms = (3 * ticks / 2) * hb;
    ms.div_ceil(1000) as i64
}

/// A fresh positive lease id, picked by the node that proposes a grant with id 0 (so every
/// replica applies the same id). Random; a collision is refused by apply and retried.
pub fn fresh_id(node: NodeId) -> i64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(node);
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    match (h.finish() & i64::MAX as u64) as i64 {
        0 => 1,
        id => id,
    }
}

#[derive(Debug, Clone, Copy)]
struct Tracked {
    ttl: i64,
    deadline: Instant,
}

/// What a keep-alive found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed for this many seconds (the lease's TTL).
    Renewed(i64),
    NotFound,
    /// Past its deadline: a revocation is on its way.
    Expired,
}

fn ttl_duration(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

/// The deadlines of this node's leases (a mirror of the applied lease table plus the clock).
#[derive(Default)]
pub struct Lessor {
    leases: Mutex<HashMap<i64, Tracked>>,
    revoked: Notify,
}

impl Lessor {
    /// Track exactly `leases`, each with a full TTL from now (startup, snapshot install).
    pub fn reset(&self, leases: &[(i64, LeaseRecord)]) {
        let now = Instant::now();
        let mut m = self.leases.lock().expect("poisoned");
        m.clear();
        for (id, rec) in leases {
            m.insert(
                *id,
                Tracked {
                    ttl: rec.ttl,
                    deadline: now + ttl_duration(rec.ttl),
                },
            );
        }
        drop(m);
        self.revoked.notify_waiters();
    }

    /// A grant was applied.
    pub fn granted(&self, id: i64, ttl: i64) {
        let t = Tracked {
            ttl,
            deadline: Instant::now() + ttl_duration(ttl),
        };
        self.leases.lock().expect("poisoned").insert(id, t);
    }

    /// A revocation was applied.
    pub fn revoked(&self, id: i64) {
        self.leases.lock().expect("poisoned").remove(&id);
        self.revoked.notify_waiters();
    }

    /// This node became the leader: every lease gets a full TTL from now.
    pub fn promote(&self) {
        let now = Instant::now();
        for t in self.leases.lock().expect("poisoned").values_mut() {
            t.deadline = now + ttl_duration(t.ttl);
        }
    }

    /// A keep-alive (on the leader).
    pub fn renew(&self, id: i64) -> Renewal {
        self.renew_at(id, Instant::now())
    }

    fn renew_at(&self, id: i64, now: Instant) -> Renewal {
        match self.leases.lock().expect("poisoned").get_mut(&id) {
            None => Renewal::NotFound,
            Some(t) if t.deadline <= now => Renewal::Expired,
            Some(t) => {
                t.deadline = now + ttl_duration(t.ttl);
                Renewal::Renewed(t.ttl)
            }
        }
    }

    /// Whole seconds left before lease `id`'s deadline (truncated, as etcd reports them).
    pub fn remaining(&self, id: i64) -> Option<i64> {
        self.remaining_at(id, Instant::now())
    }

    fn remaining_at(&self, id: i64, now: Instant) -> Option<i64> {
        let t = *self.leases.lock().expect("poisoned").get(&id)?;
        Some(t.deadline.saturating_duration_since(now).as_secs() as i64)
    }

    pub fn contains(&self, id: i64) -> bool {
        self.leases.lock().expect("poisoned").contains_key(&id)
    }

    /// Up to `max` leases past their deadline, earliest first.
    pub fn expired(&self, max: usize) -> Vec<i64> {
        self.expired_at(max, Instant::now())
    }

    fn expired_at(&self, max: usize, now: Instant) -> Vec<i64> {
        let mut v: Vec<(Instant, i64)> = self
            .leases
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|(_, t)| t.deadline <= now)
            .map(|(id, t)| (t.deadline, *id))
            .collect();
        v.sort();
        v.into_iter().take(max).map(|(_, id)| id).collect()
    }

    /// Wait (at most `timeout`) until lease `id` is no longer tracked; whether it is gone.
    pub async fn wait_revoked(&self, id: i64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.revoked.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.contains(id) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return !self.contains(id);
            }
        }
    }
}

/// Runs for the node's lifetime: promotes the lessor whenever this node starts leading (a
/// new term), and while it leads, proposes the revocation of expired leases every tick.
pub async fn run_expiry(node: Arc<Node>, mut stopped: watch::Receiver<bool>) {
    let mut metrics = node.raft.metrics();
    let mut leading_term: Option<u64> = None;
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let is_tick = tokio::select! {
            _ = tick.tick() => true,
            r = metrics.changed() => { if r.is_err() { return } false }
            _ = stopped.wait_for(|v| *v) => return,
        };
        let (is_leader, term) = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader, m.current_term)
        };
        if !is_leader {
            leading_term = None;
            continue;
        }
        if leading_term != Some(term) {
            leading_term = Some(term);
            node.shared.leases.promote();
            tracing::info!(
                term,
                "leading: every lease gets a full TTL before any expires"
            );
        }
        if is_tick {
            revoke_expired(&node).await;
        }
    }
}

async fn revoke_expired(node: &Node) {
    let ids = node.shared.leases.expired(MAX_REVOKES_PER_TICK);
    if ids.is_empty() {
        return;
    }
    futures::stream::iter(ids)
        .map(|id| async move {
            (
                id,
                node.propose_as_leader(Request::LeaseRevoke {
                    id,
                    timestamp_ms: 0,
                })
                .await,
            )
        })
        .buffer_unordered(REVOKE_CONCURRENCY)
        .for_each(|(id, r)| async move {
            match r {
                Some(Ok((Response::Empty, _))) => {
                    tracing::info!(lease = format!("{id:016x}"), "lease expired: revoked")
                }
                Some(Ok((other, _))) => {
                    tracing::debug!(lease = format!("{id:016x}"), "expiring lease: {other:?}")
                }
                Some(Err(e)) => tracing::warn!(lease = format!("{id:016x}"), "expiring lease: {e}"),
                None => {}
            }
        })
        .await;
}

/// A lease's time to live, as the leader knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTtl {
    /// Whole seconds left.
    pub ttl: i64,
    pub granted_ttl: i64,
    /// Keys the `kv` machine attached (when asked for).
    pub keys: Vec<Vec<u8>>,
}

/// An answer from the leader's side of a lease call.
enum AtLeader<T> {
    Done(T),
    NotLeader,
    Failed(NodeError),
}

impl Node {
    /// etcd's LeaseRenew: renew lease `id` on the leader (forwarded there from a follower).
    /// `None`: no such lease (or it expired and was revoked).
    pub async fn lease_renew(&self, id: i64) -> Result<Option<i64>, NodeError> {
        self.at_leader(LeaseRequest {
            id,
            keys: false,
            renew: true,
        })
        .await
        .map(|r| r.map(|t| t.ttl))
    }

    /// etcd's LeaseTimeToLive, answered by the leader. `None`: no such lease.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<Option<LeaseTtl>, NodeError> {
        self.at_leader(LeaseRequest {
            id,
            keys,
            renew: false,
        })
        .await
    }

    async fn at_leader(&self, req: LeaseRequest) -> Result<Option<LeaseTtl>, NodeError> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let leader = self.leader();
            let answer = match leader {
                None => {
                    self.await_leader_change(None, deadline).await?;
                    continue;
                }
                Some(l) if l == self.id => self.lease_here(&req).await,
                Some(l) => self.lease_remote(l, req).await,
            };
            match answer {
                AtLeader::Done(v) => return Ok(v),
                AtLeader::Failed(e) => return Err(e),
                AtLeader::NotLeader => {
                    if Instant::now() >= deadline {
                        return Err(NodeError::Timeout);
                    }
                    self.await_leader_change(leader, deadline).await?;
                }
            }
        }
    }

    async fn lease_remote(&self, leader: NodeId, req: LeaseRequest) -> AtLeader<Option<LeaseTtl>> {
        let Some(link) = self.peer(leader) else {
            return AtLeader::NotLeader;
        };
        match link.call(CallKind::Lease, req.encode_to_vec(), self.request_timeout).await {
            Ok(reply) => match LeaseReply::decode(reply.as_slice()) {
                Ok(reply) => from_reply(reply),
                Err(e) => AtLeader::Failed(NodeError::Internal(format!("malformed lease reply from the leader: {e}"))),
            },
            Err(s) if s.code() == tonic::Code::Unavailable => AtLeader::NotLeader,
            Err(s) => AtLeader::Failed(NodeError::Internal(format!(
                "lease call to the leader: {}",
                s.message()
            ))),
        }
    }

    /// Serve a lease call on this node, which must be the leader, once it has applied
    /// everything committed (etcd's waitAppliedIndex), so its lease table is current.
    async fn lease_here(&self, req: &LeaseRequest) -> AtLeader<Option<LeaseTtl>> {
        let leases = &self.shared.leases;
        // A keep-alive of a lease this leader knows, while a quorum has acknowledged it
        // recently, needs no barrier: etcd renews on its leader without one too (it only
        // waits for its applied index), and steps down when it loses its quorum, as this
        // check does. An unknown or expired lease takes the barrier below, so a new
        // leader that has not applied a grant yet does not answer "not found".
        if req.renew && self.leads_with_recent_quorum() {
            if let Renewal::Renewed(ttl) = leases.renew(req.id) {
                return AtLeader::Done(Some(LeaseTtl { ttl, granted_ttl: ttl, keys: Vec::new() }));
            }
        }
        // A read barrier (shared with concurrent reads and lease calls: one quorum round
        // serves them all), then leadership is checked again: a node that lost it in the
        // meantime passes the call on.
        match self.read_barrier().await {
            Ok(()) => {}
            Err(NodeError::NoLeader | NodeError::LeaderChanged) => return AtLeader::NotLeader,
            Err(e) => return AtLeader::Failed(e),
        }
        if self.leader() != Some(self.id) {
            return AtLeader::NotLeader;
        }
        if req.renew {
            return match leases.renew(req.id) {
                Renewal::Renewed(ttl) => AtLeader::Done(Some(LeaseTtl {
                    ttl,
                    granted_ttl: ttl,
                    keys: Vec::new(),
                })),
                Renewal::NotFound => AtLeader::Done(None),
                // etcd answers a keep-alive of an expired lease once its revocation is through.
                Renewal::Expired => {
                    if leases.wait_revoked(req.id, self.request_timeout).await {
                        AtLeader::Done(None)
                    } else if self.leader() != Some(self.id) {
                        AtLeader::NotLeader
                    } else {
                        AtLeader::Failed(NodeError::Timeout)
                    }
                }
            };
        }
        let shared = self.shared.clone();
        let (id, want_keys) = (req.id, req.keys);
        let found = tokio::task::spawn_blocking(move || {
            let db = shared.db();
            let Some(rec) = get_lease(&db, &[], id)? else {
                return Ok(None);
            };
            let keys = if want_keys {
                attached_keys(&db, &[], KV_MACHINE, id)?
            } else {
                Vec::new()
            };
            Ok::<_, anyhow::Error>(Some((rec, keys)))
        })
        .await;
        match found {
            Ok(Ok(None)) => AtLeader::Done(None),
            Ok(Ok(Some((rec, keys)))) => {
                let ttl = leases.remaining(id).unwrap_or(rec.ttl);
                AtLeader::Done(Some(LeaseTtl {
                    ttl,
                    granted_ttl: rec.ttl,
                    keys,
                }))
            }
            Ok(Err(e)) => AtLeader::Failed(NodeError::Internal(format!("{e:#}"))),
            Err(e) => AtLeader::Failed(NodeError::Internal(e.to_string())),
        }
    }

    /// Whether this node leads and holds its leader lease ([`crate::raft::lease`]).
    fn leads_with_recent_quorum(&self) -> bool {
        let (leader, term) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.current_leader, m.current_term)
        };
        leader == Some(self.id) && self.holds_lease(term)
    }

    /// The peer side of a lease call forwarded by a follower.
    pub(crate) async fn serve_lease_call(&self, req: LeaseRequest) -> LeaseReply {
        let answer = if self.leader() == Some(self.id) {
            self.lease_here(&req).await
        } else {
            AtLeader::NotLeader
        };
        let mut reply = LeaseReply::default();
        match answer {
            AtLeader::Done(Some(t)) => {
                reply.found = true;
                reply.ttl = t.ttl;
                reply.granted_ttl = t.granted_ttl;
                reply.keys = t.keys;
            }
            AtLeader::Done(None) => {}
            AtLeader::NotLeader => reply.not_leader = true,
            AtLeader::Failed(NodeError::Timeout) => reply.timed_out = true,
            AtLeader::Failed(e) => reply.error = e.to_string(),
        }
        reply
    }
}

fn from_reply(r: LeaseReply) -> AtLeader<Option<LeaseTtl>> {
    if r.not_leader {
        AtLeader::NotLeader
    } else if r.timed_out {
        AtLeader::Failed(NodeError::Timeout)
    } else if !r.error.is_empty() {
        AtLeader::Failed(NodeError::Internal(r.error))
    } else if r.found {
        AtLeader::Done(Some(LeaseTtl {
            ttl: r.ttl,
            granted_ttl: r.granted_ttl,
            keys: r.keys,
        }))
    } else {
        AtLeader::Done(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_ttl_follows_etcd() {
        assert_eq!(min_ttl_secs(1000, 100), 2); // etcd's defaults: 15 ticks × 100 ms = 1.5 s → 2
        assert_eq!(min_ttl_secs(500, 100), 1);
        assert_eq!(min_ttl_secs(5000, 100), 8);
        assert_eq!(min_ttl_secs(1000, 300), 2); // 3 ticks → 4 × 300 ms = 1.2 s → 2
        assert_eq!(min_ttl_secs(0, 0), 0);
    }

    #[test]
    fn fresh_ids_are_positive_and_distinct() {
        let ids: std::collections::HashSet<i64> = (0..1000).map(|_| fresh_id(7)).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|&i| i > 0));
    }

    #[tokio::test]
    async fn deadlines_renew_expire_and_promote() {
        let l = Lessor::default();
        l.granted(1, 10);
        l.granted(2, 3);
        l.granted(3, 2);
        let t0 = Instant::now();
        assert_eq!(l.remaining_at(1, t0 + Duration::from_millis(1)), Some(9)); // truncated, like etcd
        assert_eq!(l.renew(9), Renewal::NotFound);
        assert!(l.expired(10).is_empty());

        let later = t0 + Duration::from_millis(3100);
        assert_eq!(
            l.expired_at(10, later),
            vec![3, 2],
            "earliest deadline first"
        );
        assert_eq!(l.expired_at(1, later), vec![3], "bounded");
        assert_eq!(
            l.renew_at(2, later),
            Renewal::Expired,
            "an expired lease cannot be renewed"
        );
        assert_eq!(l.renew_at(1, later), Renewal::Renewed(10));
        assert_eq!(l.remaining_at(2, later), Some(0));
        assert_eq!(l.remaining_at(1, later + Duration::from_secs(4)), Some(6));

        // A new leader gives every lease a full TTL before expiring any.
        l.promote();
        assert!(l.expired(10).is_empty());
        assert_eq!(l.renew(2), Renewal::Renewed(3));

        l.revoked(2);
        assert!(l.wait_revoked(2, Duration::ZERO).await);
        assert!(!l.wait_revoked(1, Duration::from_millis(10)).await);
        l.reset(&[(5, LeaseRecord { ttl: 60 })]);
        assert!(!l.contains(1) && l.contains(5));
    }
}
