//! The leader's lease: how long this node may act as leader without asking a quorum.
//!
//! openraft 0.9 keeps a leader lease on both sides. A follower that accepted an
//! AppendEntries (a heartbeat included) refuses every vote request for `leader_lease` =
//! `election_timeout_max` after it, so no other leader can be elected in that time. The
//! leader records, for each follower, when it *sent* the last request the follower
//! acknowledged; the latest time a quorum acknowledged is published in its metrics as
//! `millis_since_quorum_ack`. While that time is recent, no other leader exists and this
//! node may serve reads and renew client leases without a round trip (etcd's raft calls
//! this a lease-based read; TiKV and CockroachDB read this way too).
//!
//! The metric is computed when openraft publishes its metrics, not when it is read: if the
//! core stalls (a paused process, a stuck disk) the published age stops growing. So a task
//! watches the metrics and records *when it saw* each value; the age of an acknowledgement
//! is then measured on this node's clock from that moment, and keeps growing while no new
//! metrics arrive.
//!
//! Assumption, as for every lease: clocks of members advance at rates within a factor of
//! the margin below. [`LeaderLease::holds`] is asked with half an election timeout, a
//! quarter of the followers' `leader_lease`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::types::NodeId;

/// When a quorum last acknowledged this node's leadership, as last seen in its metrics.
#[derive(Default)]
pub struct LeaderLease {
    acked: Mutex<Option<Ack>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ack {
    term: u64,
    /// The latest instant (on this node's clock) at which a quorum had acknowledged this
    /// node as leader: no later than the truth, by the time the watcher took to see it.
    at: Instant,
}

impl LeaderLease {
    /// Record what openraft just published, seen at `now`.
    pub fn observe(&self, me: NodeId, m: &openraft::RaftMetrics<NodeId, crate::types::Member>, now: Instant) {
        let ack = match (m.current_leader == Some(me), m.millis_since_quorum_ack) {
            // Whole milliseconds, rounded down by openraft: one more keeps the estimate
            // on the safe side.
            (true, Some(ms)) => now.checked_sub(Duration::from_millis(ms + 1)).map(|at| Ack { term: m.current_term, at }),
            _ => None,
        };
        *self.acked.lock().expect("poisoned") = ack;
    }

    /// Whether a quorum acknowledged this node as leader of `term` less than `within` ago.
    pub fn holds(&self, term: u64, within: Duration, now: Instant) -> bool {
        self.acked
            .lock()
            .expect("poisoned")
            .is_some_and(|a| a.term == term && now.saturating_duration_since(a.at) < within)
    }
}

/// Keep `lease` up to date with node `me`'s metrics until the Raft node shuts down.
pub async fn watch(me: NodeId, lease: std::sync::Weak<LeaderLease>, mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, crate::types::Member>>) {
    loop {
        let Some(l) = lease.upgrade() else { return };
        l.observe(me, &metrics.borrow_and_update(), Instant::now());
        drop(l);
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(leader: Option<NodeId>, term: u64, acked_ms_ago: Option<u64>) -> openraft::RaftMetrics<NodeId, crate::types::Member> {
        let mut m = openraft::RaftMetrics::new_initial(1);
        m.current_leader = leader;
        m.current_term = term;
        m.millis_since_quorum_ack = acked_ms_ago;
        m
    }

    #[test]
    fn the_lease_ages_from_when_the_metrics_were_seen() {
        let lease = LeaderLease::default();
        let t0 = Instant::now();
        lease.observe(1, &metrics(Some(1), 3, Some(100)), t0);
        let window = Duration::from_millis(500);
        assert!(lease.holds(3, window, t0));
        // 101 ms old when seen: it holds until 399 ms later, whatever openraft publishes.
        assert!(lease.holds(3, window, t0 + Duration::from_millis(398)));
        assert!(!lease.holds(3, window, t0 + Duration::from_millis(399)));
        // No new metrics for a long time (a stalled core): the lease is gone.
        assert!(!lease.holds(3, window, t0 + Duration::from_secs(5)));
    }

    #[test]
    fn only_a_leader_of_the_asked_term_holds_it() {
        let lease = LeaderLease::default();
        let now = Instant::now();
        let window = Duration::from_millis(500);
        lease.observe(1, &metrics(Some(1), 3, Some(0)), now);
        assert!(!lease.holds(4, window, now), "a lease of term 3 says nothing about term 4");
        lease.observe(1, &metrics(Some(2), 3, Some(0)), now);
        assert!(!lease.holds(3, window, now), "another node leads");
        lease.observe(1, &metrics(Some(1), 3, None), now);
        assert!(!lease.holds(3, window, now), "no quorum has acknowledged this leadership yet");
        lease.observe(1, &metrics(Some(1), 3, Some(600)), now);
        assert!(!lease.holds(3, window, now), "acknowledged too long ago");
    }
}
