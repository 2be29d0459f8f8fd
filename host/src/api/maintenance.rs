//! etcd's `Maintenance` service: status, alarms (NOSPACE), hash/hashKV, defragment, snapshot.

use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status};

use super::etcd_kv::{header, kv_query, kv_revision, TAG_HASH_KV};
use super::node_status;
use crate::node::Node;
use crate::storage::backup;
use crate::proto::etcdserverpb::maintenance_server::Maintenance;
use crate::proto::etcdserverpb::*;
use crate::types::Request as LogRequest;

/// The etcd API level raftvm speaks; clients gate features on the major.minor.
pub const ETCD_API_VERSION: &str = "3.4.0";

/// Bytes of the snapshot per stream message (etcd's).
const SNAPSHOT_CHUNK: usize = 32 * 1024;

pub struct MaintenanceService {
    pub node: Arc<Node>,
}

impl MaintenanceService {

    fn revision(&self, h: Option<ResponseHeader>) -> i64 {
        h.map(|h| h.revision).unwrap_or(0)
    }
}

type Stream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let r = req.into_inner();
        let action = alarm_request::AlarmAction::try_from(r.action).unwrap_or(alarm_request::AlarmAction::Get);
        if action != alarm_request::AlarmAction::Get {
            let activate = action == alarm_request::AlarmAction::Activate;
            self.node
                .propose(LogRequest::Alarm { activate, member_id: r.member_id, alarm: r.alarm })
                .await
                .map_err(node_status)?;
        } else {
            self.node.read_barrier().await.map_err(node_status)?;
        }
        let alarms = if action == alarm_request::AlarmAction::Get {
            let active = self.node.shared.db().alarms().map_err(|e| Status::internal(format!("{e:#}")))?;
            active.into_iter().map(|(member_id, alarm)| AlarmMember { member_id, alarm }).collect()
        } else {
            // As etcd: the alarm that was raised or cleared.
            vec![AlarmMember { member_id: r.member_id, alarm: r.alarm }]
        };
        Ok(Response::new(AlarmResponse { header: Some(header(&self.node, 0)), alarms }))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let revision = kv_revision(&self.node).await;
        let m = self.node.raft.metrics().borrow().clone();
        let db = self.node.shared.db();
        let size = db.size().unwrap_or(0) as i64;
        let errors = db
            .alarms()
            .unwrap_or_default()
            .into_iter()
            .map(|(member, a)| format!("memberID:{member} alarm:{} ", AlarmType::try_from(a).map(|t| t.as_str_name()).unwrap_or("?")))
            .collect();
        Ok(Response::new(StatusResponse {
            header: Some(header(&self.node, revision)),
            version: ETCD_API_VERSION.to_string(),
            db_size: size,
            leader: m.current_leader.unwrap_or(0),
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            errors,
            db_size_in_use: size,
            is_learner: false,
        }))
    }

    async fn defragment(&self, _req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        let db = self.node.shared.db();
        tokio::task::spawn_blocking(move || db.defragment())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        Ok(Response::new(DefragmentResponse { header: Some(header(&self.node, 0)) }))
    }

    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let db = self.node.shared.db();
        let h = tokio::task::spawn_blocking(move || db.hashes())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        let bytes = hex::decode(&h.store).map_err(|e| Status::internal(e.to_string()))?;
        let hash = u32::from_be_bytes(bytes[..4].try_into().expect("sha256 has 32 bytes"));
        Ok(Response::new(HashResponse { header: Some(header(&self.node, 0)), hash }))
    }

    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let mut r: HashKvResponse = kv_query(&self.node, TAG_HASH_KV, &req.into_inner(), false).await?;
        let rev = self.revision(r.header.take());
        r.header = Some(header(&self.node, rev));
        Ok(Response::new(r))
    }

    type SnapshotStream = Stream<SnapshotResponse>;

    /// As etcd: this member's current state, streamed in 32 KiB chunks, then the sha256 of
    /// what came before (see [`backup`]). Not linearizable, as in etcd: it is the state this
    /// member has applied.
    async fn snapshot(&self, _req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let revision = kv_revision(&self.node).await;
        let db = self.node.shared.db();
        let scratch = backup::scratch_dir(self.node.shared.data_dir());
        let file = tokio::task::spawn_blocking(move || backup::create(&db, &scratch))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        let reader = tokio::fs::File::open(&file.path).await.map_err(|e| Status::internal(e.to_string()))?;
        let header = header(&self.node, revision);
        let total = file.len + backup::HASH_LEN as u64;
        tracing::info!(bytes = total, "sending a snapshot");
        // The file goes when the stream ends or the client goes away.
        let state = (file, reader, 0u64);
        let stream = futures::stream::unfold(Some(state), move |state| {
            async move {
                let (file, mut reader, sent) = state?;
                let blob = if sent < file.len {
                    let mut buf = vec![0u8; SNAPSHOT_CHUNK.min((file.len - sent) as usize)];
                    if let Err(e) = reader.read_exact(&mut buf).await {
                        return Some((Err(Status::internal(format!("reading the snapshot: {e}"))), None));
                    }
                    buf
                } else {
                    file.sha256.to_vec()
                };
                let sent = sent + blob.len() as u64;
                let remaining_bytes = total - sent;
                let msg = SnapshotResponse { header: Some(header), remaining_bytes, blob };
                Some((Ok(msg), (remaining_bytes > 0).then_some((file, reader, sent))))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn move_leader(&self, _req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(Status::unimplemented("raftvm: move-leader is not implemented yet"))
    }
}
