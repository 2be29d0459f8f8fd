//! etcd's `--auto-compaction-mode` / `--auto-compaction-retention`: the leader proposes
//! `Compact` requests to the kv machine (its history is then removed in steps, see
//! `api::etcd_kv::compact_kv`).
//!
//! - `revision`: every check interval (etcd: 5 minutes), compact to `current - retention`.
//! - `periodic`: keep `retention` worth of history. The current revision is sampled every
//!   `retention / 10` (at most hourly); the compactor compacts to the newest sample that is
//!   at least `retention` old.
//!
//! Whatever the flags, [`finish_pending`] runs the compaction steps a previous leader left
//! (they stop with the node that drives them).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use openraft::ServerState;
use tokio::sync::watch;

use crate::api::etcd_kv::{compact_kv, finish_compaction, kv_compaction_pending, kv_revision};
use crate::node::Node;
use crate::proto::etcdserverpb::CompactionRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Revision { keep: i64, every: Duration },
    Periodic { retention: Duration },
}

/// Parse etcd's flags. Retention "0" disables auto-compaction (`None`).
pub fn policy(mode: &str, retention: &str, revision_check: Duration) -> Result<Option<Policy>> {
    let retention = retention.trim();
    match mode {
        "revision" => {
            let keep: i64 = retention.parse().with_context(|| format!("--auto-compaction-retention {retention:?}: not a revision count"))?;
            Ok((keep > 0).then_some(Policy::Revision { keep, every: revision_check }))
        }
        "periodic" => {
            // etcd: a bare number is hours; otherwise a Go duration like "30m" or "1h".
            let d = match retention.parse::<u64>() {
                Ok(h) => Duration::from_secs(h * 3600),
                Err(_) => humantime::parse_duration(retention)
                    .with_context(|| format!("--auto-compaction-retention {retention:?}: not a duration"))?,
            };
            Ok((!d.is_zero()).then_some(Policy::Periodic { retention: d }))
        }
        other => bail!("--auto-compaction-mode must be 'periodic' or 'revision', got {other:?}"),
    }
}

async fn current_revision(node: &Node) -> Option<i64> {
    Some(kv_revision(node).await).filter(|&r| r > 0)
}

async fn compact(node: &Arc<Node>, revision: i64) {
    // Physical: the next check waits until this compaction's history is gone.
    match compact_kv(node, &CompactionRequest { revision, physical: true }).await {
        Ok(_) => tracing::info!(revision, "auto-compacted"),
        // Already compacted that far (a new leader's first check, say).
        Err(e) if e.code() == tonic::Code::OutOfRange => tracing::debug!(revision, "auto-compaction: {}", e.message()),
        Err(e) => tracing::warn!(revision, "auto-compaction: {}", e.message()),
    }
}

/// Runs for the node's lifetime; acts only while this node is the leader.
pub async fn run(node: Arc<Node>, policy: Policy, mut stopped: watch::Receiver<bool>) {
    let tick = match policy {
        Policy::Revision { every, .. } => every,
        Policy::Periodic { retention } => (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600)),
    };
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut last_compacted = 0i64;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stopped.wait_for(|v| *v) => return,
        }
        if node.raft.metrics().borrow().state != ServerState::Leader {
            samples.clear();
            continue;
        }
        let Some(rev) = current_revision(&node).await else { continue };
        let target = match policy {
            Policy::Revision { keep, .. } => rev - keep,
            Policy::Periodic { retention } => {
                let now = Instant::now();
                samples.push_back((now, rev));
                let mut target = 0;
                while let Some(&(t, r)) = samples.front() {
                    if now.duration_since(t) >= retention {
                        target = r;
                        samples.pop_front();
                    } else {
                        break;
                    }
                }
                target
            }
        };
        if target > last_compacted && target > 1 {
            compact(&node, target).await;
            last_compacted = target;
        }
    }
}

/// Whenever this node starts leading a term, it asks the kv machine whether compaction
/// steps are left (a compaction answered without `physical` whose steps stopped with the
/// node that drove them) and runs them. Runs for the node's lifetime.
pub async fn finish_pending(node: Arc<Node>, mut stopped: watch::Receiver<bool>) {
    let mut metrics = node.raft.metrics();
    let mut checked: Option<u64> = None;
    loop {
        let (leading, term) = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader, m.current_term)
        };
        if leading && checked != Some(term) {
            match kv_compaction_pending(&node).await {
                Ok(pending) => {
                    checked = Some(term);
                    if pending {
                        tracing::info!(term, "finishing the compaction steps a previous leader left");
                        if let Err(e) = finish_compaction(&node).await {
                            tracing::warn!("compaction steps stopped again: {}", e.message());
                        }
                    }
                }
                // The read barrier failed (leadership not confirmed yet, or lost): ask
                // again after a pause (a retry back-off).
                Err(e) => {
                    tracing::debug!("checking for pending compaction steps: {}", e.message());
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        _ = stopped.wait_for(|v| *v) => return,
                    }
                }
            }
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            _ = stopped.wait_for(|v| *v) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcd_flags() {
        let five = Duration::from_secs(300);
        assert_eq!(policy("periodic", "0", five).unwrap(), None);
        assert_eq!(policy("periodic", "1", five).unwrap(), Some(Policy::Periodic { retention: Duration::from_secs(3600) }));
        assert_eq!(policy("periodic", "30m", five).unwrap(), Some(Policy::Periodic { retention: Duration::from_secs(1800) }));
        assert_eq!(policy("revision", "1000", five).unwrap(), Some(Policy::Revision { keep: 1000, every: five }));
        assert!(policy("revision", "1h", five).is_err());
        assert!(policy("hourly", "1", five).is_err());
    }
}
