//! etcd's `Cluster` service: MemberList, MemberAdd, MemberRemove, MemberUpdate and
//! MemberPromote. Changes run openraft's `change_membership` (joint consensus) on the
//! leader; a follower passes the call once to the leader's published client URL.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Membership};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::etcd_kv::{header, kv_revision};
use super::node_status;
use crate::node::{Node, NodeError};
use crate::raft::state_machine::InFlight;
use crate::proto::etcdserverpb::cluster_client::ClusterClient;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::*;
use crate::types::Member as RaftMember;

/// A Raft configuration: the members' ids, names and peer URLs, and which vote.
type Config = Membership<u64, RaftMember>;

pub struct ClusterService {
    pub node: Arc<Node>,
}

/// Marks a request a follower passed to the leader, so it is passed on at most once.
const FORWARDED: &str = "raftvm-forwarded";
/// How long a membership change may take to commit (its joint and its final config).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

const ERR_MEMBER_NOT_FOUND: &str = "etcdserver: member not found";
const ERR_NOT_ENOUGH_MEMBERS: &str = "etcdserver: re-configuration failed due to not enough started members";
const ERR_PEER_URL_EXISTS: &str = "etcdserver: Peer URLs already exists";
const ERR_NOT_LEARNER: &str = "etcdserver: can only promote a learner member";
const ERR_LEARNER_NOT_READY: &str = "etcdserver: can only promote a learner member which is in sync with leader";
/// A learner may be promoted once it has replicated this share of the leader's log (etcd's
/// readiness rule).
const LEARNER_READY: f64 = 0.9;

impl ClusterService {
    /// Every member of the current configuration, voters and learners, in id order, with
    /// the name and peer URL it joined with and the client URLs it published (none until
    /// it has: etcd lists a member that never started the same way).
    fn members(&self, config: &Config) -> Result<Vec<Member>, Status> {
        let (nodes, voters) = nodes_and_voters(config);
        let attrs = self.published()?;
        Ok(nodes
            .into_iter()
            .map(|(id, m)| Member {
                id,
                // A member MemberAdd added has no name until it starts and publishes one.
                name: if m.name.is_empty() { attrs.get(&id).map(|a| a.name.clone()).unwrap_or_default() } else { m.name },
                peer_ur_ls: vec![m.peer_url],
                client_ur_ls: attrs.get(&id).map(|a| a.client_urls.clone()).unwrap_or_default(),
                is_learner: !voters.contains(&id),
            })
            .collect())
    }

    /// The names and client URLs members published when they started.
    fn published(&self) -> Result<BTreeMap<u64, crate::types::MemberAttrs>, Status> {
        self.node.shared.db().member_attrs().map_err(|e| Status::internal(format!("{e:#}")))
    }

    /// etcd's `--strict-reconfig-check` (on by default): a change to the voters is refused
    /// when, once it is done, the voters that have started (published their name; this
    /// member has) would be too few for a quorum.
    fn check_started_quorum(&self, voters: &BTreeSet<u64>, change: VoterChange) -> Result<(), Status> {
        if !self.node.strict_reconfig_check {
            return Ok(());
        }
        let attrs = self.published()?;
        let is_started = |id: &u64| *id == self.node.id || attrs.contains_key(id);
        let (n, started) = (voters.len(), voters.iter().filter(|id| is_started(id)).count());
        let ok = match change {
            // The new voter has not started: it counts in the quorum, not as started.
            // etcd's one exception: a single started member may add a second voter (how a
            // one-member cluster grows, or one restored from a backup).
            VoterChange::Add => (n == 1 && started == 1) || quorum(n + 1, started),
            // A learner in sync counts as started, as in etcd.
            VoterChange::Promote => quorum(n + 1, started + 1),
            VoterChange::Remove(id) => quorum(n - 1, started - usize::from(is_started(&id))),
        };
        if ok {
            Ok(())
        } else {
            tracing::warn!(voters = n, started, ?change, "refusing a member change: not enough started members");
            Err(Status::failed_precondition(ERR_NOT_ENOUGH_MEMBERS))
        }
    }

    /// Where a call must run: `None` here (this member leads), `Some(leader)` to pass it on.
    fn route(&self, forwarded: bool) -> Result<Option<u64>, Status> {
        match self.node.leader() {
            Some(l) if l == self.node.id => Ok(None),
            Some(_) if forwarded => Err(node_status(NodeError::LeaderChanged)),
            Some(l) => Ok(Some(l)),
            None => Err(node_status(NodeError::NoLeader)),
        }
    }

    /// A client of the leader's Cluster service, at the first client URL it published.
    async fn leader_client(&self, leader: u64) -> Result<ClusterClient<Channel>, Status> {
        let attrs = self.published()?;
        let Some(url) = attrs.get(&leader).and_then(|a| a.client_urls.first()).cloned() else {
            return Err(Status::unavailable(format!(
                "raftvm: the leader ({leader:x}) has not published its client URLs yet; retry, or ask the leader"
            )));
        };
        let channel = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(CHANGE_TIMEOUT + Duration::from_secs(2))
            .connect()
            .await
            .map_err(|_| node_status(NodeError::NoLeader))?;
        Ok(ClusterClient::new(channel))
    }

    /// The leader's answer, with this member's header, as for every other call it answers.
    fn answer_here<T>(&self, mut resp: Response<T>, header_of: impl FnOnce(&mut T) -> &mut Option<ResponseHeader>) -> Response<T> {
        let h = header_of(resp.get_mut());
        let revision = h.map(|h| h.revision).unwrap_or(0);
        *h = Some(header(&self.node, revision));
        resp
    }

    /// Run a membership change on this member, the leader, and wait for it to commit.
    /// Run `change` to its final configuration and return that configuration: what the
    /// answer lists. (The metrics' configuration may not show it yet when the change
    /// returns: openraft publishes them on its own schedule.)
    async fn change(&self, change: ChangeMembers<u64, RaftMember>) -> Result<Config, Status> {
        // Counted in flight, so a leader removing itself answers before it stops.
        let _in_flight = InFlight::new(&self.node.shared.commands_in_flight, 1);
        match tokio::time::timeout(CHANGE_TIMEOUT, self.node.raft.change_membership(change, false)).await {
            Err(_) => Err(node_status(NodeError::Timeout)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(node_status(NodeError::LeaderChanged)),
            Ok(Err(e)) => Err(Status::failed_precondition(format!("etcdserver: {e}"))),
            Ok(Ok(resp)) => resp
                .membership
                .ok_or_else(|| Status::internal("raftvm: a membership change committed no configuration")),
        }
    }

    /// The one peer URL of a MemberAdd or MemberUpdate, checked.
    fn peer_url(urls: Vec<String>) -> Result<String, Status> {
        let [url] = <[String; 1]>::try_from(urls).map_err(|urls| {
            Status::invalid_argument(format!("raftvm: a member has exactly one peer URL, got {}", urls.len()))
        })?;
        crate::config::bind_addr(&url).map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        Ok(url)
    }

    /// An id for a new member: from its peer URL, the cluster and the time, as etcd's, so a
    /// member added again at the same URL gets a new id. Never 0 or an id in use.
    fn new_member_id(&self, peer_url: &str, taken: &BTreeMap<u64, RaftMember>) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        (0u64..)
            .map(|n| {
                let mut h = Sha256::new();
                h.update(peer_url.as_bytes());
                h.update(self.node.cluster_id.to_be_bytes());
                h.update(now.to_be_bytes());
                h.update(n.to_be_bytes());
                u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
            })
            .find(|id| *id != 0 && !taken.contains_key(id))
            .expect("an unused id")
    }

    /// The header and member list (of `config`) every answer of this service carries.
    async fn listing(&self, config: &Config) -> Result<(Option<ResponseHeader>, Vec<Member>), Status> {
        let members = self.members(config)?;
        let revision = kv_revision(&self.node).await;
        Ok((Some(header(&self.node, revision)), members))
    }

    /// The configuration this member knows of (as its metrics last published it).
    fn current_config(&self) -> Config {
        self.node.raft.metrics().borrow().membership_config.membership().clone()
    }

    /// The current configuration's members (in id order) and its voters.
    fn current_nodes(&self) -> (BTreeMap<u64, RaftMember>, BTreeSet<u64>) {
        nodes_and_voters(&self.current_config())
    }
}

/// The request's message, if this member leads; else returns the leader's answer to it
/// (with this member's header), or an error.
macro_rules! on_leader {
    ($svc:expr, $req:expr, $method:ident) => {{
        let fwd = is_forwarded(&$req);
        let req = $req.into_inner();
        if let Some(leader) = $svc.route(fwd)? {
            let resp = $svc.leader_client(leader).await?.$method(forwarded(req)).await?;
            return Ok($svc.answer_here(resp, |r| &mut r.header));
        }
        req
    }};
}

fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

fn forwarded<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    req
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(&self, _req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let (header, members) = self.listing(&self.current_config()).await?;
        Ok(Response::new(MemberListResponse { header, members }))
    }

    /// As etcd: the new member joins the configuration at once, as a voter (counted in
    /// the quorum from now on) or as a learner, under an id chosen here. It is listed
    /// without a name or client URLs until it starts (`serve --initial-cluster-state
    /// existing`), asks a member for that id (`RaftPeer.Join`) and publishes them.
    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        let req = on_leader!(self, req, member_add);
        let url = Self::peer_url(req.peer_ur_ls)?;
        let (nodes, voters) = self.current_nodes();
        if nodes.values().any(|m| m.peer_url == url) {
            return Err(Status::failed_precondition(ERR_PEER_URL_EXISTS));
        }
        if !req.is_learner {
            self.check_started_quorum(&voters, VoterChange::Add)?;
        }
        let id = self.new_member_id(&url, &nodes);
        let node = RaftMember { name: String::new(), peer_url: url.clone() };
        tracing::info!(member = format!("{id:x}"), %url, learner = req.is_learner, "adding a member");
        let change = if req.is_learner {
            ChangeMembers::AddNodes([(id, node)].into())
        } else {
            ChangeMembers::AddVoters([(id, node)].into())
        };
        let config = self.change(change).await?;
        let member = Member { id, name: String::new(), peer_ur_ls: vec![url], client_ur_ls: vec![], is_learner: req.is_learner };
        let (header, members) = self.listing(&config).await?;
        Ok(Response::new(MemberAddResponse { header, member: Some(member), members }))
    }

    /// As etcd: the member leaves the configuration (openraft's joint consensus, on the
    /// leader; a follower passes the call to the leader's client URL) and the answer lists
    /// the members left. The removed member stops itself once it learns of the change
    /// (`server::leave_when_removed`).
    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        let req = on_leader!(self, req, member_remove);
        let id = req.id;
        let (nodes, voters) = self.current_nodes();
        if !nodes.contains_key(&id) {
            return Err(Status::not_found(ERR_MEMBER_NOT_FOUND));
        }
        let change = if !voters.contains(&id) {
            ChangeMembers::RemoveNodes([id].into())
        } else if voters.len() == 1 {
            return Err(Status::failed_precondition(ERR_NOT_ENOUGH_MEMBERS));
        } else {
            self.check_started_quorum(&voters, VoterChange::Remove(id))?;
            ChangeMembers::RemoveVoters([id].into())
        };
        tracing::info!(member = format!("{id:x}"), "removing a member");
        let config = self.change(change).await?;
        let (header, members) = self.listing(&config).await?;
        Ok(Response::new(MemberRemoveResponse { header, members }))
    }

    /// A member's new peer URL (it moved); peers reach it there from the change on.
    async fn member_update(&self, req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        let req = on_leader!(self, req, member_update);
        let url = Self::peer_url(req.peer_ur_ls)?;
        let (nodes, _) = self.current_nodes();
        let Some(current) = nodes.get(&req.id) else {
            return Err(Status::not_found(ERR_MEMBER_NOT_FOUND));
        };
        if nodes.iter().any(|(id, m)| *id != req.id && m.peer_url == url) {
            return Err(Status::failed_precondition(ERR_PEER_URL_EXISTS));
        }
        let config = if current.peer_url != url {
            tracing::info!(member = format!("{:x}", req.id), %url, "updating a member's peer URL");
            let node = RaftMember { name: current.name.clone(), peer_url: url };
            self.change(ChangeMembers::SetNodes([(req.id, node)].into())).await?
        } else {
            self.current_config()
        };
        let (header, members) = self.listing(&config).await?;
        Ok(Response::new(MemberUpdateResponse { header, members }))
    }

    /// A learner becomes a voter, once it has caught up with the leader (etcd's rule: 90%
    /// of the leader's log replicated).
    async fn member_promote(&self, req: Request<MemberPromoteRequest>) -> Result<Response<MemberPromoteResponse>, Status> {
        let req = on_leader!(self, req, member_promote);
        let id = req.id;
        let (nodes, voters) = self.current_nodes();
        if !nodes.contains_key(&id) {
            return Err(Status::not_found(ERR_MEMBER_NOT_FOUND));
        }
        if voters.contains(&id) {
            return Err(Status::failed_precondition(ERR_NOT_LEARNER));
        }
        let (matched, last) = {
            let m = self.node.raft.metrics().borrow().clone();
            let matched = m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map_or(0, |l| l.index);
            (matched, m.last_log_index.unwrap_or(0))
        };
        if (matched as f64) < (last as f64) * LEARNER_READY {
            return Err(Status::failed_precondition(ERR_LEARNER_NOT_READY));
        }
        self.check_started_quorum(&voters, VoterChange::Promote)?;
        tracing::info!(member = format!("{id:x}"), "promoting a learner");
        let config = self.change(ChangeMembers::AddVoterIds([id].into())).await?;
        let (header, members) = self.listing(&config).await?;
        Ok(Response::new(MemberPromoteResponse { header, members }))
    }
}

/// `config`'s members (in id order) and its voters.
fn nodes_and_voters(config: &Config) -> (BTreeMap<u64, RaftMember>, BTreeSet<u64>) {
    (config.nodes().map(|(id, n)| (*id, n.clone())).collect(), config.voter_ids().collect())
}

/// A change to the voters, as the strict reconfiguration check counts it.
#[derive(Debug, Clone, Copy)]
enum VoterChange {
    Add,
    Promote,
    Remove(u64),
}

/// Whether `started` of `voters` voters make a quorum.
fn quorum(voters: usize, started: usize) -> bool {
    started > voters / 2
}

#[cfg(test)]
mod tests {
    use super::quorum;

    #[test]
    fn quorum_of_started_voters() {
        // etcd's examples: 3 voters need 2 started, 4 need 3, 5 need 3.
        assert!(quorum(3, 2) && !quorum(3, 1));
        assert!(quorum(4, 3) && !quorum(4, 2));
        assert!(quorum(5, 3) && !quorum(5, 2));
        assert!(quorum(1, 1) && !quorum(2, 1));
    }
}
