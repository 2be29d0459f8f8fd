//! `Node`: the facade the API services use instead of touching openraft directly.
//!
//! - [`Node::propose`] replicates a [`Request`] and returns what applying it produced,
//!   forwarding to the leader when this node is a follower.
//! - [`Node::read_barrier`] makes a following local read linearizable (read-index: the
//!   leader confirms its leadership, by its lease or with a quorum, then this node waits
//!   until it has applied up to the leader's commit index).
//! - [`Node::query`] runs a machine's read-only `query` on local state.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::proto::peer::{
    raft_peer_server::RaftPeer, Blob, Frame, JoinReply, JoinRequest, LeaseReply, LeaseRequest, MemberCheckReply, MemberCheckRequest,
    ReadIndexRequest, ReadIndexResponse,
};
use crate::config::ReadCheck;
use crate::raft::lease::LeaderLease;
use crate::raft::link::{reply_frame, CallKind, PeerLink};
use crate::raft::network::peer_link;
use crate::raft::state_machine::{InFlight, Shared};
use crate::types::{decode, encode, ApplyError, Member, NodeId, Raft, Request, Response};

#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum NodeError {
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("{0}")]
    Internal(String),
}

/// A follower's forwarded proposal, as answered by the node it reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum ForwardReply {
    Applied { response: Response, index: u64 },
    NotLeader,
    Failed(NodeError),
}

pub struct Node {
    pub id: NodeId,
    pub name: String,
    pub cluster_id: u64,
    pub raft: Raft,
    pub shared: Arc<Shared>,
    pub request_timeout: Duration,
    /// Gathers concurrent `Call`s into one log entry (see [`Batcher`]).
    pub batcher: Batcher,
    /// Gathers concurrent linearizable reads into one read-index round.
    pub read_batcher: ReadBatcher,
    /// Whether a leader may confirm its leadership by its lease (`--linearizable-reads`).
    pub read_check: ReadCheck,
    /// Refuse member changes that leave too few started voters for a quorum
    /// (`--strict-reconfig-check`, see `api::cluster`).
    pub strict_reconfig_check: bool,
    pub lease: Arc<LeaderLease>,
    /// The commit index as openraft reports it ([`crate::raft::log_store::LogStore::commit_index`]).
    pub commit_index: Arc<AtomicU64>,
    pub read_stats: ReadStats,
    /// This member has been in a committed configuration (see [`Node::self_removed`]).
    /// True from the start for a member of the first configuration; a member MemberAdd
    /// added starts with none and may install a snapshot taken before it was added.
    pub was_member: std::sync::atomic::AtomicBool,
}

/// How linearizable reads were confirmed, for `raftvm status`.
#[derive(Default)]
pub struct ReadStats {
    /// Read barriers a leader passed on its lease, without a message.
    pub lease: AtomicU64,
    /// Read-index rounds: a quorum round on a leader, a ReadIndex call on a follower.
    pub rounds: AtomicU64,
}

type BarrierWaiter = tokio::sync::oneshot::Sender<Result<(), NodeError>>;

/// A queue whose receiving end is taken once, by the task that serves it.
pub struct Inbox<T> {
    tx: tokio::sync::mpsc::UnboundedSender<T>,
    rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<T>>>,
}

impl<T> Default for Inbox<T> {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Self { tx, rx: std::sync::Mutex::new(Some(rx)) }
    }
}

impl<T> Inbox<T> {
    fn take_receiver(&self) -> tokio::sync::mpsc::UnboundedReceiver<T> {
        self.rx.lock().expect("poisoned").take().expect("an inbox is served once")
    }
}

/// Reads waiting for a read-index round (see [`Node::read_barrier`]).
pub type ReadBatcher = Inbox<BarrierWaiter>;

/// Rounds run one after another; each serves every read that queued before it began, so
/// its read index is at least the commit index at the time each of them asked.
async fn run_read_batcher(node: std::sync::Weak<Node>, mut rx: tokio::sync::mpsc::UnboundedReceiver<BarrierWaiter>) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        waiters.extend(std::iter::from_fn(|| rx.try_recv().ok()));
        let Some(node) = node.upgrade() else { return };
        let r = node.read_barrier_round().await;
        for w in waiters {
            let _ = w.send(r.clone());
        }
    }
}

/// A `Call` waiting for the batcher, and where its outcome goes.
type Pending = (Request, tokio::sync::oneshot::Sender<ForwardReply>);

/// Most requests in one batch entry, and most payload bytes (a request larger than that
/// goes alone). Keeps an AppendEntries of `max_payload_entries` entries far below the peer
/// message limit.
const BATCH_MAX_REQUESTS: usize = 512;
const BATCH_MAX_BYTES: usize = 1024 * 1024;
/// Batches proposed and not yet applied at a time. openraft 0.9 appends and fsyncs one
/// entry at a time, so proposals that arrive meanwhile wait here and travel together.
const BATCHES_IN_FLIGHT: usize = 2;

/// Fuel a query may burn on an async worker before it is moved to a blocking thread
/// (fuel counts guest instructions; the host reads a query makes are bounded separately,
/// see `Runtime::query_within`). Measured: kv-mvcc's point reads stay far below it.
const INLINE_QUERY_FUEL: u64 = 1_000_000;

/// Group commit for client commands. openraft 0.9's core writes each proposed entry to
/// the log and waits for its fsync before it takes the next, so one entry per command
/// caps a leader at one command per fsync. The batcher instead sends whatever commands
/// arrived while the previous batches were in flight as one `Request::Batch`: on the
/// leader as one log entry, on a follower as one forward to the leader (which proposes
/// it as one entry).
///
/// A command that finds nothing in flight and nothing queued goes out at once from the
/// caller's task (`Node::submit`): the batcher would send it alone anyway, and
/// skipping its task and the batch's task saves two task wake-ups each way, which is
/// most of what a lone client waits for besides the fsync.
#[derive(Default)]
pub struct Batcher {
    inbox: Inbox<Pending>,
    gate: Arc<BatchGate>,
}

/// What the batcher task and the callers that skip it share: the batches in flight and
/// the commands queued.
struct BatchGate {
    /// One permit per batch in flight ([`BATCHES_IN_FLIGHT`]). The batcher task takes one
    /// before it waits for commands, so while it idles the other permits are free.
    slots: Arc<tokio::sync::Semaphore>,
    /// Commands sent to the batcher task and not yet taken by it.
    queued: AtomicUsize,
}

impl Default for BatchGate {
    fn default() -> Self {
        Self { slots: Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT)), queued: AtomicUsize::new(0) }
    }
}

impl BatchGate {
    /// A batch slot for a command to go out alone at once: only when no command waits
    /// for the batcher (it would go first) and a slot is free.
    fn direct(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if self.queued.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.slots.clone().try_acquire_owned().ok()
    }

    /// The slot of the batcher task's next batch.
    async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    fn queue(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    fn take(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

fn payload_len(r: &Request) -> usize {
    match r {
        Request::Call { payload, .. } => payload.len(),
        Request::Batch(requests) => requests.iter().map(payload_len).sum(),
        _ => 0,
    }
}

/// Commands in `r`: a follower's forwarded batch counts each of its commands.
fn command_count(r: &Request) -> usize {
    match r {
        Request::Batch(requests) => requests.len(),
        _ => 1,
    }
}

async fn run_batcher(node: std::sync::Weak<Node>, gate: Arc<BatchGate>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Pending>) {
    let mut carry: Option<Pending> = None;
    loop {
        let Some(slot) = gate.slot().await else { return };
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => {
                    gate.take();
                    p
                }
                None => return,
            },
        };
        let mut bytes = payload_len(&first.0);
        let mut commands = command_count(&first.0);
        let mut batch = vec![first];
        while commands < BATCH_MAX_REQUESTS {
            let Ok(next) = rx.try_recv() else { break };
            gate.take();
            bytes += payload_len(&next.0);
            commands += command_count(&next.0);
            if bytes > BATCH_MAX_BYTES || commands > BATCH_MAX_REQUESTS {
                carry = Some(next);
                break;
            }
            batch.push(next);
        }
        let Some(node) = node.upgrade() else { return };
        tokio::spawn(async move {
            if batch.len() == 1 {
                let (req, reply) = batch.pop().expect("one");
                let _ = reply.send(node.send_to_leader(req).await);
            } else {
                let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                // A forwarded batch joins this one command by command and gets its
                // responses back as a batch.
                let spans: Vec<Option<usize>> = requests
                    .iter()
                    .map(|r| matches!(r, Request::Batch(_)).then(|| command_count(r)))
                    .collect();
                let flat: Vec<Request> = requests
                    .into_iter()
                    .flat_map(|r| match r {
                        Request::Batch(inner) => inner,
                        r => vec![r],
                    })
                    .collect();
                let n = flat.len();
                match node.send_to_leader(Request::Batch(flat)).await {
                    ForwardReply::Applied { response: Response::Batch(rs), index } if rs.len() == n => {
                        let mut rs = rs.into_iter();
                        for (span, reply) in spans.into_iter().zip(replies) {
                            let response = match span {
                                None => rs.next().expect("one response per command"),
                                Some(k) => Response::Batch(rs.by_ref().take(k).collect()),
                            };
                            let _ = reply.send(ForwardReply::Applied { response, index });
                        }
                    }
                    ForwardReply::Applied { response, .. } => {
                        let e = NodeError::Internal(format!("a batch of {n} was answered with {response:?}"));
                        for reply in replies {
                            let _ = reply.send(ForwardReply::Failed(e.clone()));
                        }
                    }
                    other => {
                        for reply in replies {
                            let _ = reply.send(other.clone());
                        }
                    }
                }
            }
            drop(slot);
        });
    }
}

/// Append `req` to the log on this node (the leader) and wait until it is applied.
async fn client_write(raft: &Raft, req: Request) -> ForwardReply {
    match raft.client_write(req).await {
        Ok(r) => ForwardReply::Applied { response: r.data, index: r.log_id.index },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => ForwardReply::NotLeader,
        Err(e) => ForwardReply::Failed(NodeError::Internal(e.to_string())),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Give a command the leader's clock; called on the node that appends it to the log.
fn stamp(mut req: Request) -> Request {
    match &mut req {
        Request::Call { timestamp_ms, .. } | Request::LeaseRevoke { timestamp_ms, .. } => *timestamp_ms = now_ms(),
        Request::Batch(requests) => {
            let now = now_ms();
            for r in requests {
                if let Request::Call { timestamp_ms, .. } = r {
                    *timestamp_ms = now;
                }
            }
        }
        _ => {}
    }
    req
}

impl Node {
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn member(&self, id: NodeId) -> Option<Member> {
        self.raft.metrics().borrow().membership_config.membership().get_node(&id).cloned()
    }

    /// Whether `id` is missing from this member's configuration, that configuration is
    /// committed (so no leader change can bring back one that had `id`), and `id`'s log
    /// (ending at `id_last_index`) does not go past it: `id` was removed. A candidate whose
    /// log goes further may have been added after this member's configuration (this
    /// member lags); it is then asked for its vote as usual.
    pub fn removed_from_config(&self, id: Option<NodeId>, id_last_index: u64) -> bool {
        let Some(id) = id else { return false };
        match self.committed_config_has(id) {
            Some((false, at)) => at >= id_last_index,
            _ => false,
        }
    }

    /// Whether this member was removed: its committed configuration lacks it, and it has
    /// been in one before (`was_member`).
    pub fn self_removed(&self) -> bool {
        match self.committed_config_has(self.id) {
            Some((true, _)) => {
                self.was_member.store(true, Ordering::Relaxed);
                false
            }
            Some((false, _)) => self.was_member.load(Ordering::Relaxed),
            None => false,
        }
    }

    /// Whether this member's configuration has `id`, and the configuration's log index,
    /// if the configuration is committed.
    fn committed_config_has(&self, id: NodeId) -> Option<(bool, u64)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let config = &m.membership_config;
        let at = config.log_id().as_ref()?.index;
        (at <= self.commit_index.load(Ordering::Acquire)).then(|| (config.membership().get_node(&id).is_some(), at))
    }

    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Wait (bounded by `deadline`) until the known leader is not `old`.
    pub(crate) async fn await_leader_change(&self, old: Option<NodeId>, deadline: Instant) -> Result<(), NodeError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(remaining))
            .metrics(|m| m.current_leader != old && m.current_leader.is_some(), "leader change")
            .await
            .map(|_| ())
            .map_err(|_| if old.is_some() { NodeError::Timeout } else { NodeError::NoLeader })
    }

    /// Start gathering concurrent commands and read barriers into batches and tracking the
    /// leader lease (once, when the node is shared).
    pub fn start_tasks(self: &Arc<Self>) {
        tokio::spawn(run_batcher(Arc::downgrade(self), self.batcher.gate.clone(), self.batcher.inbox.take_receiver()));
        tokio::spawn(run_read_batcher(Arc::downgrade(self), self.read_batcher.take_receiver()));
        tokio::spawn(crate::raft::lease::watch(self.id, Arc::downgrade(&self.lease), self.raft.metrics()));
    }

    /// Whether this node leads term `term` and a quorum acknowledged it within half an
    /// election timeout, so no other leader can exist yet (see [`crate::raft::lease`]).
    pub(crate) fn holds_lease(&self, term: u64) -> bool {
        let within = Duration::from_millis(self.raft.config().election_timeout_min / 2);
        self.lease.holds(term, within, Instant::now())
    }

    /// The index a linearizable read may be served at without a read-index round, if this
    /// node leads with its lease held: the commit index, which covers every write any
    /// client has seen acknowledged or watched. `None`: a round is needed.
    fn lease_read_index(&self) -> Option<u64> {
        if self.read_check != ReadCheck::Lease {
            return None;
        }
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        // A new leader's commit index can lag what its predecessor committed until the
        // first entry of its own term is committed (and applied, which is what we see).
        let applied = m.last_applied?;
        if m.current_leader != Some(self.id) || applied.leader_id.term != m.current_term || !self.holds_lease(m.current_term) {
            return None;
        }
        Some(self.commit_index.load(Ordering::Acquire).max(applied.index))
    }

    /// Wait (bounded by `deadline`) until this node has applied `index`.
    async fn wait_applied(&self, index: u64, deadline: Instant, what: &str) -> Result<(), NodeError> {
        if self.raft.metrics().borrow().last_applied.is_some_and(|l| l.index >= index) {
            return Ok(());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), what)
            .await
            .map(|_| ())
            .map_err(|_| NodeError::Timeout)
    }

    /// Propose `req` on this node, which must be the leader.
    async fn propose_local(&self, req: Request) -> ForwardReply {
        match req {
            // A follower's forwarded batch goes through the batcher too: it shares a log
            // entry (one fsync, one replication round) with the commands waiting here.
            Request::Call { .. } | Request::Batch(_) => self.submit(req).await,
            req => client_write(&self.raft, stamp(req)).await,
        }
    }

    /// Hand a `Call` to the batcher and wait for its outcome; with nothing in flight and
    /// nothing queued, send it right away as a batch of one (see [`Batcher`]).
    async fn submit(&self, req: Request) -> ForwardReply {
        if let Some(slot) = self.batcher.gate.direct() {
            let reply = self.send_to_leader(req).await;
            drop(slot);
            return reply;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.batcher.gate.queue();
        if self.batcher.inbox.tx.send((req, tx)).is_err() {
            self.batcher.gate.take();
            return ForwardReply::Failed(NodeError::Internal("the proposal batcher has stopped".into()));
        }
        rx.await.unwrap_or_else(|_| ForwardReply::Failed(NodeError::Internal("the proposal batcher dropped a command".into())))
    }

    /// The batcher's way out: propose on this node if it leads, else forward to the leader.
    async fn send_to_leader(&self, req: Request) -> ForwardReply {
        match self.leader() {
            Some(l) if l == self.id => client_write(&self.raft, stamp(req)).await,
            // The leader could not be reached: it has not seen the command.
            Some(l) => self.forward(l, &req).await.unwrap_or(ForwardReply::NotLeader),
            None => ForwardReply::NotLeader,
        }
    }

    /// Propose `req` only if this node is the leader, for decisions only the leader may
    /// take (expiring a lease: a new leader must not inherit its predecessor's clock).
    /// `None`: this node is not the leader.
    pub async fn propose_as_leader(&self, req: Request) -> Option<Result<(Response, u64), NodeError>> {
        if self.leader() != Some(self.id) {
            return None;
        }
        match self.propose_local(req).await {
            ForwardReply::Applied { response, index } => Some(Ok((response, index))),
            ForwardReply::NotLeader => None,
            ForwardReply::Failed(e) => Some(Err(e)),
        }
    }

    /// Have every other member compile `component` into its cache before it is proposed
    /// (`RaftPeer.Precompile`), each within `timeout`. Best effort: a member that is down,
    /// slow or older compiles when it applies the install, as before. Returns how many
    /// members answered that the component is compiled.
    pub async fn precompile_on_peers(&self, component: &[u8], timeout: Duration) -> usize {
        let peers = other_peer_urls(self.raft.metrics().borrow().membership_config.membership(), self.id);
        let calls = peers.into_iter().map(|url| async move {
            let link = crate::raft::network::peer_link(&url).ok()?;
            let mut req = tonic::Request::new(Blob { data: component.to_vec() });
            req.set_timeout(timeout);
            match link.client().precompile(req).await {
                Ok(_) => Some(()),
                Err(s) => {
                    tracing::debug!(peer = %url, "precompile: {s}");
                    None
                }
            }
        });
        futures::future::join_all(calls).await.into_iter().flatten().count()
    }

    /// Replicate `req` and return what applying it produced (and its log index).
    pub async fn propose(&self, req: Request) -> Result<(Response, u64), NodeError> {
        let _in_flight = InFlight::new(&self.shared.commands_in_flight, 1);
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let leader = self.leader();
            let reply = match leader {
                None => {
                    self.await_leader_change(None, deadline).await?;
                    continue;
                }
                Some(l) if l == self.id => self.propose_local(req.clone()).await,
                Some(_) if matches!(req, Request::Call { .. }) => self.submit(req.clone()).await,
                Some(l) => match self.forward(l, &req).await {
                    Ok(r) => r,
                    // The leader could not be reached: it has not seen the command.
                    Err(()) => ForwardReply::NotLeader,
                },
            };
            match reply {
                ForwardReply::Applied { response, index } => {
                    if leader != Some(self.id) {
                        // The leader applied it; this member answers once it has too, as
                        // etcd's members do: a client then reads its own write here, even
                        // with a serializable read.
                        let left = deadline.saturating_duration_since(Instant::now());
                        let _ = self.raft.wait(Some(left)).applied_index_at_least(Some(index), "a forwarded command").await;
                    }
                    return Ok((response, index));
                }
                ForwardReply::Failed(e) => return Err(e),
                ForwardReply::NotLeader => {
                    if Instant::now() >= deadline {
                        return Err(NodeError::Timeout);
                    }
                    self.await_leader_change(leader, deadline).await?;
                }
            }
        }
    }

    /// The link to member `id`'s peer service (shared by all calls to it), or `None` if
    /// `id` is not a member or its URL is unusable.
    pub(crate) fn peer(&self, id: NodeId) -> Option<Arc<PeerLink>> {
        peer_link(&self.member(id)?.peer_url).ok()
    }

    async fn forward(&self, leader: NodeId, req: &Request) -> Result<ForwardReply, ()> {
        let link = self.peer(leader).ok_or(())?;
        match link.call(CallKind::Forward, encode(req), self.request_timeout).await {
            Ok(reply) => decode(&reply).map_err(|_| ()),
            // Unavailable: nothing reached the leader (connection refused/reset before the
            // request), so retrying elsewhere cannot apply the command twice.
            Err(s) if s.code() == tonic::Code::Unavailable => Err(()),
            Err(s) => Ok(ForwardReply::Failed(NodeError::Internal(format!("forwarding to the leader: {}", s.message())))),
        }
    }

    /// Make the next local read linearizable. A leader holding its lease only waits until
    /// it has applied its commit index ([`Node::lease_read_index`]). Otherwise concurrent
    /// callers share barrier rounds: a caller waits for the first round that starts after
    /// it asked (see [`run_read_batcher`]), so one quorum round (and on a follower one
    /// ReadIndex RPC) serves every read that queued up while the previous round ran.
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        if let Some(index) = self.lease_read_index() {
            self.read_stats.lease.fetch_add(1, Ordering::Relaxed);
            return self.wait_applied(index, Instant::now() + self.request_timeout, "lease read index").await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.read_batcher.tx.send(tx).is_err() {
            return Err(NodeError::Internal("the read barrier batcher has stopped".into()));
        }
        rx.await.unwrap_or_else(|_| Err(NodeError::Internal("the read barrier batcher dropped a read".into())))
    }

    /// One read-index round, for every read queued before it started.
    async fn read_barrier_round(&self) -> Result<(), NodeError> {
        self.read_stats.rounds.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let leader = self.leader();
            match leader {
                None => self.await_leader_change(None, deadline).await?,
                Some(l) if l == self.id => match self.raft.ensure_linearizable().await {
                    Ok(_) => return Ok(()),
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {}
                    Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                        if Instant::now() >= deadline {
                            return Err(NodeError::Timeout);
                        }
                        self.await_leader_change(leader, deadline).await?;
                    }
                    Err(e) => return Err(NodeError::Internal(e.to_string())),
                },
                Some(l) => {
                    let index = match self.remote_read_index(l).await {
                        Some(i) => i,
                        None => {
                            if Instant::now() >= deadline {
                                return Err(NodeError::Timeout);
                            }
                            self.await_leader_change(leader, deadline).await?;
                            continue;
                        }
                    };
                    return self.wait_applied(index, deadline, "read index").await;
                }
            }
            if Instant::now() >= deadline {
                return Err(NodeError::Timeout);
            }
        }
    }

    async fn remote_read_index(&self, leader: NodeId) -> Option<u64> {
        let link = self.peer(leader)?;
        let reply = link.call(CallKind::ReadIndex, Vec::new(), self.request_timeout).await.ok()?;
        ReadIndexResponse::decode(reply.as_slice()).ok().map(|r| r.index)
    }

    /// Run machine `name`'s `query` on local state (after a barrier if linearizable).
    pub async fn query(&self, name: &str, request: Vec<u8>, linearizable: bool) -> Result<Result<Vec<u8>, ApplyError>, NodeError> {
        if linearizable {
            self.read_barrier().await?;
        }
        // Most queries take microseconds: run them right here, on a small fuel slice that
        // bounds how long this async worker can be held (a hop to a blocking thread and
        // back cost ~35 µs per query, a quarter of a serializable range at 1 client). A
        // query that needs more is run again, with the machine's whole budget, on a
        // blocking thread, so a long or hostile query cannot stall the runtime.
        let db = self.shared.db();
        let quick = self.shared.runtime.query_within(name, &db, &request, INLINE_QUERY_FUEL);
        if let Some(r) = quick.map_err(|e| NodeError::Internal(e.to_string()))? {
            return Ok(r);
        }
        tracing::debug!(machine = name, "query needs more than {INLINE_QUERY_FUEL} fuel: rerun on a blocking thread");
        let shared = self.shared.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || shared.runtime.query(&name, &shared.db(), &request))
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?
            .map_err(|e| NodeError::Internal(e.to_string()))
    }
}

/// The peer gRPC service: Raft RPCs plus forwarded proposals, read-index and lease calls,
/// each as a unary call or as a frame on a peer's call stream (see [`crate::raft::link`]).
#[derive(Clone)]
pub struct PeerService {
    pub node: Arc<Node>,
    /// Becomes true when the server stops: call streams end so shutdown does not wait for
    /// peers to close them.
    pub stopped: tokio::sync::watch::Receiver<bool>,
}

/// The peer URLs of every member of `membership` but `me` (voters and learners).
pub fn other_peer_urls(membership: &openraft::Membership<NodeId, Member>, me: NodeId) -> Vec<String> {
    membership.nodes().filter(|(id, _)| **id != me).map(|(_, n)| n.peer_url.clone()).collect()
}

fn bad_blob(e: postcard::Error) -> tonic::Status {
    tonic::Status::invalid_argument(format!("malformed peer message: {e}"))
}

impl PeerService {
    /// Serve one call; `data` and the reply are the bytes of the matching unary call's
    /// request and reply (a `Blob`'s contents, or the protobuf message).
    async fn serve(&self, kind: CallKind, data: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
        match kind {
            CallKind::AppendEntries => {
                let rpc = decode(&data).map_err(bad_blob)?;
                Ok(encode(&self.node.raft.append_entries(rpc).await))
            }
            CallKind::Vote => {
                let rpc: openraft::raft::VoteRequest<NodeId> = decode(&data).map_err(bad_blob)?;
                let candidate_last = rpc.last_log_id.map_or(0, |l| l.index);
                if self.node.removed_from_config(rpc.vote.leader_id().voted_for(), candidate_last) {
                    return Err(crate::raft::network::member_removed());
                }
                Ok(encode(&self.node.raft.vote(rpc).await))
            }
            CallKind::Forward => {
                let request: Request = decode(&data).map_err(bad_blob)?;
                let _in_flight = InFlight::new(&self.node.shared.commands_in_flight, command_count(&request));
                let reply = if self.node.leader() == Some(self.node.id) {
                    self.node.propose_local(request).await
                } else {
                    ForwardReply::NotLeader
                };
                Ok(encode(&reply))
            }
            CallKind::ReadIndex => Ok(self.read_index_here().await?.encode_to_vec()),
            CallKind::Lease => {
                let req = LeaseRequest::decode(data.as_slice())
                    .map_err(|e| tonic::Status::invalid_argument(format!("malformed lease call: {e}")))?;
                Ok(self.node.serve_lease_call(req).await.encode_to_vec())
            }
        }
    }

    async fn serve_blob(&self, kind: CallKind, req: tonic::Request<Blob>) -> Result<tonic::Response<Blob>, tonic::Status> {
        let data = self.serve(kind, req.into_inner().data).await?;
        Ok(tonic::Response::new(Blob { data }))
    }

    async fn read_index_here(&self) -> Result<ReadIndexResponse, tonic::Status> {
        if self.node.leader() != Some(self.node.id) {
            return Err(tonic::Status::unavailable("not the leader"));
        }
        // Through the leader's own read batcher: the ReadIndex calls of every follower and
        // the leader's own linearizable reads share one quorum round. Once a round that
        // started after this call has confirmed leadership and the leader has applied its
        // read index, whatever the leader has applied is committed and not older than
        // anything committed when the call arrived: a valid read index.
        self.node.read_barrier().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let applied = self.node.raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
        Ok(ReadIndexResponse { index: applied })
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(&self, req: tonic::Request<Blob>) -> Result<tonic::Response<Blob>, tonic::Status> {
        self.serve_blob(CallKind::AppendEntries, req).await
    }

    async fn vote(&self, req: tonic::Request<Blob>) -> Result<tonic::Response<Blob>, tonic::Status> {
        self.serve_blob(CallKind::Vote, req).await
    }

    async fn install_snapshot(&self, req: tonic::Request<Blob>) -> Result<tonic::Response<Blob>, tonic::Status> {
        let rpc = decode(&req.into_inner().data).map_err(bad_blob)?;
        let r = self.node.raft.install_snapshot(rpc).await;
        Ok(tonic::Response::new(Blob { data: encode(&r) }))
    }

    async fn forward(&self, req: tonic::Request<Blob>) -> Result<tonic::Response<Blob>, tonic::Status> {
        self.serve_blob(CallKind::Forward, req).await
    }

    async fn read_index(
        &self,
        _req: tonic::Request<ReadIndexRequest>,
    ) -> Result<tonic::Response<ReadIndexResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.read_index_here().await?))
    }

    async fn lease(&self, req: tonic::Request<LeaseRequest>) -> Result<tonic::Response<LeaseReply>, tonic::Status> {
        Ok(tonic::Response::new(self.node.serve_lease_call(req.into_inner()).await))
    }

    /// A module that a member is about to propose an install of, to compile into the cache
    /// now (see `Node::precompile_on_peers`).
    async fn precompile(&self, req: tonic::Request<Blob>) -> Result<tonic::Response<Blob>, tonic::Status> {
        let component = req.into_inner().data;
        if component.len() > crate::runtime::MAX_MODULE_BYTES {
            return Err(tonic::Status::invalid_argument("module over the size limit"));
        }
        let shared = self.node.shared.clone();
        tokio::task::spawn_blocking(move || shared.runtime.precompile(&component))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .map_err(|e| tonic::Status::invalid_argument(format!("{e:#}")))?;
        Ok(tonic::Response::new(Blob::default()))
    }

    /// A learner asking whether it is still a member (see `server::ask_while_learner`): a
    /// member whose committed configuration removed it answers as to a removed voter's
    /// vote request.
    async fn member_check(
        &self,
        req: tonic::Request<MemberCheckRequest>,
    ) -> Result<tonic::Response<MemberCheckReply>, tonic::Status> {
        let req = req.into_inner();
        if self.node.removed_from_config(Some(req.member_id), req.last_log_index) {
            return Err(crate::raft::network::member_removed());
        }
        Ok(tonic::Response::new(MemberCheckReply {}))
    }

    /// The id MemberAdd gave a peer URL, for the member that starts there with
    /// `--initial-cluster-state existing`. Refused once that member has published its
    /// client URLs, that is, once it has started before: a member that lost its data
    /// dir and joined again under the same id would have forgotten its vote (etcd refuses
    /// it the same way).
    async fn join(&self, req: tonic::Request<JoinRequest>) -> Result<tonic::Response<JoinReply>, tonic::Status> {
        let url = req.into_inner().peer_url;
        let config = self.node.raft.metrics().borrow().membership_config.clone();
        let Some(id) = config.membership().nodes().find(|(_, m)| m.peer_url == url).map(|(id, _)| *id) else {
            return Err(tonic::Status::not_found(format!(
                "no member of this cluster has peer URL {url}: add it first (etcdctl member add NAME --peer-urls={url})"
            )));
        };
        let attrs = self.node.shared.db().member_attrs().map_err(|e| tonic::Status::internal(format!("{e:#}")))?;
        if attrs.contains_key(&id) {
            return Err(tonic::Status::failed_precondition(format!("etcdserver: member {id:x} has already been bootstrapped")));
        }
        Ok(tonic::Response::new(JoinReply { member_id: id, cluster_id: self.node.cluster_id }))
    }

    type CallsStream = UnboundedReceiverStream<Result<Frame, tonic::Status>>;

    /// A peer's call stream: every frame is served on a task of its own and answered
    /// with a frame of the same id, in whatever order the calls finish.
    async fn calls(
        &self,
        req: tonic::Request<tonic::Streaming<Frame>>,
    ) -> Result<tonic::Response<Self::CallsStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let service = self.clone();
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = inbound.message() => match f {
                        Ok(Some(f)) => f,
                        _ => break,
                    },
                    _ = stopped.wait_for(|s| *s) => break,
                };
                let (tx, service) = (tx.clone(), service.clone());
                tokio::spawn(async move {
                    let result = match CallKind::from_wire(frame.kind) {
                        Some(kind) => service.serve(kind, frame.data).await,
                        None => Err(tonic::Status::invalid_argument(format!("unknown peer call kind {}", frame.kind))),
                    };
                    let _ = tx.send(Ok(reply_frame(frame.id, result)));
                });
            }
            // The reply stream ends once the calls still running have answered.
        });
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_command_skips_the_batcher_only_when_nothing_is_in_flight_or_queued() {
        let gate = BatchGate::default();
        // The batcher task idles holding the slot of its next batch.
        let batcher_slot = gate.slot().await.expect("open");
        let lone = gate.direct().expect("nothing in flight: the command goes at once");
        // With that one in flight, a second concurrent command waits for the batcher.
        assert!(gate.direct().is_none(), "a batch slot beyond BATCHES_IN_FLIGHT");
        drop(lone);
        // A command already queued goes first: nobody overtakes it.
        gate.queue();
        assert!(gate.direct().is_none(), "overtook a queued command");
        gate.take();
        assert!(gate.direct().is_some());
        // The batcher's own batches count against the same slots.
        let _in_flight = batcher_slot;
        let _next = gate.direct().expect("one slot left");
        assert!(gate.direct().is_none());
        assert_eq!(gate.slots.available_permits(), 0);
    }
}
