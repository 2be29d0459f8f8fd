//! etcd's space quota (`--quota-backend-bytes`), checked before writes that add data: Put,
//! Txn with a put, LeaseGrant. While a NOSPACE alarm is active, or when a request would
//! take the store past the quota (which raises the alarm cluster-wide), such requests are
//! refused. Reads, deletes and compactions still work, so an operator can free space and
//! disarm.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;

use super::{etcd_status, node_status};
use crate::node::Node;
use crate::proto::etcdserverpb::AlarmType;
use crate::storage::StateDb;
use crate::types::Request as LogRequest;

const NOSPACE: i32 = AlarmType::Nospace as i32;
const ERR_NOSPACE: &str = "etcdserver: mvcc: database space exceeded";

/// How stale the store size used by the check may be: reading it is a handful of RocksDB
/// property lookups, too many for every write.
const SIZE_MAX_AGE: Duration = Duration::from_millis(100);

/// What etcd charges a LeaseGrant against the quota (its `leaseOverhead`).
pub const LEASE_GRANT_COST: usize = 64;

pub struct Quota {
    node: Arc<Node>,
    /// Resolved quota in bytes; 0 = none.
    bytes: u64,
    /// The store size last measured, and when.
    size: Mutex<Option<(Instant, u64)>>,
}

impl Quota {
    pub fn new(node: Arc<Node>, bytes: u64) -> Self {
        Self { node, bytes, size: Mutex::new(None) }
    }

    /// Refuse a request that adds `request_bytes` when the space is exhausted.
    pub async fn check(&self, request_bytes: usize) -> Result<(), Status> {
        let db = self.node.shared.db();
        let alarms = db.alarms().map_err(|e| Status::internal(format!("{e:#}")))?;
        if alarms.iter().any(|(_, a)| *a == NOSPACE) {
            return Err(etcd_status(ERR_NOSPACE));
        }
        if self.bytes > 0 {
            let size = self.store_size(&db)?;
            if size + request_bytes as u64 > self.bytes {
                tracing::warn!(size, quota = self.bytes, "backend quota exceeded: raising NOSPACE alarm");
                let raise = LogRequest::Alarm { activate: true, member_id: self.node.id, alarm: NOSPACE };
                self.node.propose(raise).await.map_err(node_status)?;
                return Err(etcd_status(ERR_NOSPACE));
            }
        }
        Ok(())
    }

    fn store_size(&self, db: &StateDb) -> Result<u64, Status> {
        let mut cache = self.size.lock().expect("poisoned");
        match *cache {
            Some((at, size)) if at.elapsed() < SIZE_MAX_AGE => Ok(size),
            _ => {
                let size = db.size().map_err(|e| Status::internal(format!("{e:#}")))?;
                *cache = Some((Instant::now(), size));
                Ok(size)
            }
        }
    }
}
