//! etcd's `Cluster` service: MemberList. Membership changes are not offered: a raftvm
//! cluster's members are fixed at bootstrap (`--initial-cluster`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::etcd_kv::{header, kv_revision};
use crate::node::Node;
use crate::proto::etcdserverpb::cluster_server::Cluster;
use crate::proto::etcdserverpb::*;

pub struct ClusterService {
    pub node: Arc<Node>,
}

fn unsupported(what: &str) -> Status {
    Status::unimplemented(format!("raftvm: {what} is not supported: members are fixed by --initial-cluster"))
}

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

    async fn member_remove(&self, _req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(unsupported("MemberRemove"))
    }

    async fn member_update(&self, _req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(unsupported("MemberUpdate"))
    }

    async fn member_promote(&self, _req: Request<MemberPromoteRequest>) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(unsupported("MemberPromote"))
    }
}
