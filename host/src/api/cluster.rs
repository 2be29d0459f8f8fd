//! etcd's `Cluster` service: MemberList and MemberRemove. Adding members is not offered:
//! a raftvm cluster's members come from `--initial-cluster` at bootstrap.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use tonic::{Request, Response, Status};

use super::etcd_kv::{header, kv_revision};
use super::node_status;
use crate::node::{Node, NodeError};
use crate::raft::state_machine::InFlight;
use crate::proto::etcdserverpb::cluster_client::ClusterClient;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::*;

pub struct ClusterService {
    pub node: Arc<Node>,
}

fn unsupported(what: &str) -> Status {
    Status::unimplemented(format!("raftvm: {what} is not supported: members come from --initial-cluster"))
}

/// Marks a request a follower passed to the leader, so it is passed on at most once.
const FORWARDED: &str = "raftvm-forwarded";
/// How long a membership change may take to commit (its joint and its final config).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

const ERR_MEMBER_NOT_FOUND: &str = "etcdserver: member not found";
const ERR_NOT_ENOUGH_MEMBERS: &str = "etcdserver: re-configuration failed due to not enough started members";

impl ClusterService {
    /// Every member of the current configuration, voters and learners, in id order, with
    /// the name and peer URL it joined with and the client URLs it published (none until
    /// it has: etcd lists a member that never started the same way).
    fn members(&self) -> Result<Vec<Member>, Status> {
        let config = self.node.raft.metrics().borrow().membership_config.clone();
        let attrs = self.node.shared.db().member_attrs().map_err(|e| Status::internal(format!("{e:#}")))?;
        let membership = config.membership();
        let voters: std::collections::BTreeSet<_> = membership.voter_ids().collect();
        let mut members: Vec<Member> = membership
            .nodes()
            .map(|(id, m)| Member {
                id: *id,
                name: m.name.clone(),
                peer_ur_ls: vec![m.peer_url.clone()],
                client_ur_ls: attrs.get(id).map(|a| a.client_urls.clone()).unwrap_or_default(),
                is_learner: !voters.contains(id),
            })
            .collect();
        members.sort_by_key(|m| m.id);
        Ok(members)
    }

    /// Pass a MemberRemove to the leader, at the first client URL it published.
    async fn remove_through(&self, leader: u64, id: u64) -> Result<Response<MemberRemoveResponse>, Status> {
        let attrs = self.node.shared.db().member_attrs().map_err(|e| Status::internal(format!("{e:#}")))?;
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
        let mut req = Request::new(MemberRemoveRequest { id });
        req.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        let mut resp = ClusterClient::new(channel).member_remove(req).await?;
        // The header is this member's, as for every other call it answers.
        let revision = resp.get_ref().header.map(|h| h.revision).unwrap_or(0);
        resp.get_mut().header = Some(header(&self.node, revision));
        Ok(resp)
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(&self, _req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let members = self.members()?;
        let revision = kv_revision(&self.node).await;
        Ok(Response::new(MemberListResponse { header: Some(header(&self.node, revision)), members }))
    }

    async fn member_add(&self, _req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        Err(unsupported("MemberAdd"))
    }

    /// As etcd: the member leaves the configuration (openraft's joint consensus, on the
    /// leader; a follower passes the call to the leader's client URL) and the answer lists
    /// the members left. The removed member stops itself once it learns of the change
    /// (`server::leave_when_removed`).
    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        let forwarded = req.metadata().contains_key(FORWARDED);
        let id = req.into_inner().id;
        match self.node.leader() {
            Some(l) if l == self.node.id => {}
            Some(_) if forwarded => return Err(node_status(NodeError::LeaderChanged)),
            Some(l) => return self.remove_through(l, id).await,
            None => return Err(node_status(NodeError::NoLeader)),
        }
        let config = self.node.raft.metrics().borrow().membership_config.clone();
        let membership = config.membership();
        if membership.get_node(&id).is_none() {
            return Err(Status::not_found(ERR_MEMBER_NOT_FOUND));
        }
        let voters: BTreeSet<_> = membership.voter_ids().collect();
        let change = if !voters.contains(&id) {
            ChangeMembers::RemoveNodes([id].into())
        } else if voters.len() == 1 {
            return Err(Status::failed_precondition(ERR_NOT_ENOUGH_MEMBERS));
        } else {
            ChangeMembers::RemoveVoters([id].into())
        };
        tracing::info!(member = format!("{id:x}"), "removing a member");
        // Counted in flight, so a leader removing itself answers before it stops.
        let _in_flight = InFlight::new(&self.node.shared.commands_in_flight, 1);
        match tokio::time::timeout(CHANGE_TIMEOUT, self.node.raft.change_membership(change, false)).await {
            Err(_) => return Err(node_status(NodeError::Timeout)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                return Err(node_status(NodeError::LeaderChanged))
            }
            Ok(Err(e)) => return Err(Status::failed_precondition(format!("etcdserver: {e}"))),
            Ok(Ok(_)) => {}
        }
        let members = self.members()?;
        let revision = kv_revision(&self.node).await;
        Ok(Response::new(MemberRemoveResponse { header: Some(header(&self.node, revision)), members }))
    }

    async fn member_update(&self, _req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(unsupported("MemberUpdate"))
    }

    async fn member_promote(&self, _req: Request<MemberPromoteRequest>) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(unsupported("MemberPromote"))
    }
}
