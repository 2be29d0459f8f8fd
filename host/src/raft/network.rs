//! Raft RPCs between nodes over tonic, on each member's peer URL.
//!
//! openraft's messages travel postcard-encoded inside a `Blob`; a remote `RaftError` comes
//! back inside the reply so openraft sees it as a remote error, while a transport failure
//! becomes `Unreachable` (openraft backs off and retries).

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::AnyError;
use tonic::transport::{Channel, Endpoint};

use crate::proto::peer::raft_peer_client::RaftPeerClient;
use crate::proto::peer::Blob;
use crate::raft::link::{CallKind, PeerLink};
use crate::raft::log_store::Durable;
use crate::types::{decode, encode, Member, NodeId, TypeConfig};

/// Largest gRPC message between peers: a module install (up to 32 MiB) and snapshot
/// chunks fit.
pub const MAX_PEER_MESSAGE: usize = 64 * 1024 * 1024;
/// Most bytes of entries one AppendEntries carries, unless a single entry is larger on its
/// own (a module install). openraft counts entries, not bytes, and gives every
/// AppendEntries one heartbeat interval (100 ms by default) before it cancels and sends
/// the same entries again: a follower that missed a few module installs would otherwise
/// be sent all of them in one call, too large to arrive within that time, on every retry
/// (and over MAX_PEER_MESSAGE). Commands are at most `--max-request-bytes` each, and
/// batches of them about 1 MiB, so ordinary replication never comes near this.
const APPEND_BUDGET: usize = 8 * 1024 * 1024;
// An AppendEntries carrying the largest install alone fits in a peer message.
const _: () = assert!(crate::runtime::MAX_MODULE_BYTES + 64 * 1024 < MAX_PEER_MESSAGE);

pub fn peer_client(url: &str) -> anyhow::Result<RaftPeerClient<Channel>> {
    let ch = Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        // A peer whose host vanished leaves a half-open connection (and call stream) behind:
        // pings find it, so calls fail over to a fresh connection instead of timing out on
        // the dead one until TCP gives up.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(RaftPeerClient::new(ch).max_decoding_message_size(MAX_PEER_MESSAGE).max_encoding_message_size(MAX_PEER_MESSAGE))
}

/// The link to the peer at `url`, shared by every call to it: Raft RPCs, forwarded
/// proposals, read-index and lease calls all use one HTTP/2 connection per peer (and one
/// call stream on it, see [`PeerLink`]) instead of connecting per request. (A lazy
/// channel reconnects by itself after a failure; a broken call stream is reopened by the
/// next call.)
pub fn peer_link(url: &str) -> anyhow::Result<Arc<PeerLink>> {
    static LINKS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Arc<PeerLink>>>> =
        std::sync::OnceLock::new();
    let mut links = LINKS.get_or_init(Default::default).lock().expect("poisoned");
    if let Some(l) = links.get(url) {
        return Ok(l.clone());
    }
    let l = Arc::new(PeerLink::new(peer_client(url)?));
    links.insert(url.to_string(), l.clone());
    Ok(l)
}

/// What a member answers to a vote request from a member its committed configuration no
/// longer has: the sender learns that it was removed (it may never receive the entry that
/// removed it, since the leader stops replicating to it).
pub const ERR_MEMBER_REMOVED: &str = "raftvm: the member has been permanently removed from the cluster";

/// How a member tells a caller that the caller was removed (see [`ERR_MEMBER_REMOVED`]).
pub fn member_removed() -> tonic::Status {
    tonic::Status::failed_precondition(ERR_MEMBER_REMOVED)
}

/// Whether a peer's answer is [`member_removed`].
pub fn is_member_removed(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition && status.message() == ERR_MEMBER_REMOVED
}

#[derive(Clone)]
pub struct Network {
    /// Set when a peer answers [`ERR_MEMBER_REMOVED`] (see `server::leave_when_removed`).
    pub removed: Arc<tokio::sync::watch::Sender<bool>>,
    /// How far this member's raft log is synced (see [`PeerConn::append_entries`]).
    pub durable: Durable,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConn;

    /// On the channel shared by every call to that peer. openraft asks for a client not
    /// only per replication stream but per leadership check (every read-index round) and
    /// per election: a channel of its own each time cost a TCP connect and an HTTP/2
    /// handshake per round (measured: linearizable range on a 3-node leader, 1 client,
    /// 2 connects per read). A heartbeat does not queue behind a large AppendEntries: calls
    /// over 256 KiB go as unary calls on HTTP/2 streams of their own (see [`PeerLink`]).
    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        PeerConn {
            target,
            link: peer_link(&node.peer_url).map_err(|e| e.to_string()),
            removed: self.removed.clone(),
            durable: self.durable.clone(),
        }
    }
}

pub struct PeerConn {
    target: NodeId,
    link: Result<Arc<PeerLink>, String>,
    removed: Arc<tokio::sync::watch::Sender<bool>>,
    durable: Durable,
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Append,
    Vote,
    Snapshot,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, Member, RaftError<NodeId, E>>;

impl PeerConn {
    async fn call<Req, Resp, E>(
        &mut self,
        which: Which,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: serde::Serialize,
        Resp: for<'a> serde::Deserialize<'a>,
        E: std::error::Error + for<'a> serde::Deserialize<'a>,
    {
        self.call_encoded(which, encode(req), option).await
    }

    async fn call_encoded<Resp, E>(&mut self, which: Which, data: Vec<u8>, option: &RPCOption) -> Result<Resp, RpcErr<E>>
    where
        Resp: for<'a> serde::Deserialize<'a>,
        E: std::error::Error + for<'a> serde::Deserialize<'a>,
    {
        let link = match &self.link {
            Ok(l) => l,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&AnyError::error(e.clone())))),
        };
        let reply = match which {
            Which::Append => link.call(CallKind::AppendEntries, data, option.hard_ttl()).await,
            Which::Vote => link.call(CallKind::Vote, data, option.hard_ttl()).await,
            // Snapshot chunks are large: unary, so they do not queue in front of heartbeats.
            Which::Snapshot => {
                let mut request = tonic::Request::new(Blob { data });
                request.set_timeout(option.hard_ttl());
                link.client().install_snapshot(request).await.map(|r| r.into_inner().data)
            }
        };
        let data = match reply {
            Ok(d) => d,
            Err(status) => {
                if is_member_removed(&status) {
                    self.removed.send_replace(true);
                }
                let err = AnyError::error(format!("{which:?} to node {:x}: {status}", self.target));
                return Err(match status.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                        RPCError::Unreachable(Unreachable::new(&err))
                    }
                    _ => RPCError::Network(NetworkError::new(&err)),
                });
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&data).map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e.to_string()))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let data = encode(&rpc);
        if data.len() > APPEND_BUDGET && rpc.entries.len() > 1 {
            // Ask openraft for fewer entries per call (see APPEND_BUDGET); one entry alone
            // always goes.
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(entries_that_fit(&rpc.entries))));
        }
        // A leader's appends may be synced after replication started ("Leader appends" in
        // `raft::log_store`). Nothing this call tells the follower, or tells openraft
        // back, may run ahead of this member's disk: the commit index it carries waits
        // for the sync here, and so does the acknowledgement of entries the sync has not
        // covered yet, so openraft counts no follower for them before the leader's own
        // copy is safe. Without deferred appends both waits end at once.
        let commit = rpc.leader_commit.map_or(0, |c| c.index);
        if !self.durable.wait(commit, option.hard_ttl()).await {
            return Err(not_synced(commit));
        }
        let resp = self.call_encoded(Which::Append, data, &option).await?;
        let acked = acked_index(&rpc, &resp);
        if !self.durable.wait(acked, option.hard_ttl()).await {
            return Err(not_synced(acked));
        }
        Ok(resp)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call(Which::Snapshot, &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call(Which::Vote, &rpc, &option).await
    }
}

/// The last index a follower's answer to `rpc` tells openraft it holds (0: none).
fn acked_index(rpc: &AppendEntriesRequest<TypeConfig>, resp: &AppendEntriesResponse<NodeId>) -> u64 {
    let acked = match resp {
        AppendEntriesResponse::Success => rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id),
        AppendEntriesResponse::PartialSuccess(upto) => *upto,
        AppendEntriesResponse::Conflict | AppendEntriesResponse::HigherVote(_) => None,
    };
    acked.map_or(0, |l| l.index)
}

fn not_synced(index: u64) -> RpcErr {
    let e = AnyError::error(format!("the local raft log was not synced up to entry {index} in time"));
    RPCError::Network(NetworkError::new(&e))
}

/// How many of `entries` (more than one), from the first, to send in the next call: those
/// that fit in [`APPEND_BUDGET`], at least one, and always fewer than all of them, so that
/// openraft's next call is smaller even when the entries alone fit and only the request
/// around them tipped it over.
fn entries_that_fit(entries: &[crate::types::Entry]) -> u64 {
    let mut size = 0;
    let fit = entries
        .iter()
        .take_while(|e| {
            size += encode(e).len();
            size <= APPEND_BUDGET
        })
        .count();
    fit.clamp(1, entries.len().saturating_sub(1).max(1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Entry, LogId, Request};
    use openraft::{CommittedLeaderId, EntryPayload};

    fn install(index: u64, bytes: usize) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Request::InstallModule {
                name: format!("m{index}"),
                wasm: vec![7; bytes],
                fuel: 1,
                memory_bytes: 1,
            }),
        }
    }

    #[test]
    fn large_entries_are_split_across_append_entries() {
        let mib = 1024 * 1024;
        // Module installs go one per call; the commands before one go ahead of it.
        let big: Vec<Entry> = (1..=3).map(|i| install(i, 30 * mib)).collect();
        assert_eq!(entries_that_fit(&big), 1);
        let mixed: Vec<Entry> = (1..=3).map(|i| install(i, 1000)).chain([install(4, 3 * mib), install(5, 6 * mib)]).collect();
        assert_eq!(entries_that_fit(&mixed), 4);
        // 32 batches of 200 KiB fit in one call (and are never asked to split).
        let small: Vec<Entry> = (1..=32).map(|i| install(i, 200 * 1024)).collect();
        assert!(encode(&small).len() < APPEND_BUDGET);
        // Entries that fit only without the request around them: still fewer next time.
        let edge = APPEND_BUDGET / 2 - 64;
        let tight = [install(1, edge), install(2, edge)];
        assert!(tight.iter().map(|e| encode(e).len()).sum::<usize>() <= APPEND_BUDGET);
        assert_eq!(entries_that_fit(&tight), 1);
    }

    #[test]
    fn an_ack_covers_what_the_follower_says_it_holds() {
        let id = |i| LogId::new(CommittedLeaderId::new(1, 1), i);
        let rpc = |prev: Option<u64>, entries: Vec<Entry>| AppendEntriesRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(1, 1),
            prev_log_id: prev.map(id),
            entries,
            leader_commit: None,
        };
        let with_two = rpc(Some(4), vec![install(5, 1), install(6, 1)]);
        assert_eq!(acked_index(&with_two, &AppendEntriesResponse::Success), 6);
        assert_eq!(acked_index(&with_two, &AppendEntriesResponse::PartialSuccess(Some(id(5)))), 5);
        assert_eq!(acked_index(&with_two, &AppendEntriesResponse::Conflict), 0);
        assert_eq!(acked_index(&with_two, &AppendEntriesResponse::HigherVote(openraft::Vote::new(2, 2))), 0);
        // A heartbeat's ack vouches for the entry it matched.
        assert_eq!(acked_index(&rpc(Some(4), vec![]), &AppendEntriesResponse::Success), 4);
        assert_eq!(acked_index(&rpc(None, vec![]), &AppendEntriesResponse::Success), 0);
    }
}
