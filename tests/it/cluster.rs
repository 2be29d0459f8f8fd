//! Replication, fail-over, catch-up and restart of real `raftvm` clusters.

use std::time::{Duration, Instant};

use raftvm_tests::{guest, poll_until, Cluster};

const REG: &str = "reg";

/// Asserts `module list` on node `i` shows `name` with the sha256 and size of `file`
/// (polls: the listing is local state and a follower may lag briefly).
#[track_caller]
fn assert_listed(c: &Cluster, i: usize, name: &str, file: &std::path::Path) {
    let sha = raftvm_tests::sha256_file(file);
    let size = std::fs::metadata(file).unwrap().len();
    poll_until(Duration::from_secs(10), &format!("{name} in `module list` of {}", c.node(i).name), || {
        let list = c.module_list(i);
        match list.iter().find(|m| m.name == name) {
            Some(m) if m.sha256 == sha && m.size == size => Ok(()),
            Some(m) => Err(format!("listed with wrong sha/size: {m:?}, want sha256={sha} size={size}")),
            None => Err(format!("not listed: {list:?}")),
        }
    });
}

/// A fresh 3-node cluster from `--initial-cluster` elects exactly one leader.
#[test]
fn three_nodes_elect_one_leader() {
    let c = Cluster::start(3);
    let leader = c.leader();
    let st: Vec<_> = (0..3).map(|i| c.status(i).expect("status")).collect();
    let mut ids: Vec<&str> = st.iter().map(|s| s.member_id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "member ids must be distinct: {st:?}");
    for (i, s) in st.iter().enumerate() {
        assert_eq!(s.name, format!("n{}", i + 1), "{s:?}");
        assert_eq!(s.is_leader, i == leader, "{st:?}");
        assert_eq!(s.leader_id, st[leader].member_id, "{st:?}");
        assert!(s.term >= 1 && s.last_log_index >= s.applied_index, "{s:?}");
    }
    // `status` over several endpoints returns one object per endpoint.
    let out = c.raftvm_at(&c.endpoints(), &["status", "-w", "json"]);
    let v: Vec<raftvm_tests::Status> = serde_json::from_str(out.ok()).expect("status JSON");
    assert_eq!(v.len(), 3, "{out:?}");
}

/// Test 1: install via n1, write via n2, linearizable read via n3; every node lists the module.
#[test]
fn three_nodes_replicate_install_call_query() {
    let file = guest("register-rust");
    let c = Cluster::start(3);
    c.install_ok(0, REG, &file);

    assert_eq!(c.call(1, REG, "set greeting hello").ok(), "OK");
    // Linearizable by default: must see the write just acknowledged through another node.
    assert_eq!(c.query(2, REG, "get greeting").ok(), "hello");
    assert_eq!(c.call(2, REG, "incr n 5").ok(), "5");
    assert_eq!(c.query(0, REG, "get n").ok(), "5");
    assert_eq!(c.query(1, REG, "count").ok(), "2");

    // (The host may list built-in machines too; only `reg` is ours.)
    for i in 0..3 {
        assert_listed(&c, i, REG, &file);
        let list = c.module_list(i);
        assert_eq!(list.iter().filter(|m| m.name == REG).count(), 1, "{list:?}");
        assert_eq!(list, c.module_list(0), "nodes list different modules");
    }
    let h = c.assert_converged(Duration::from_secs(20));
    assert!(h.machines.contains_key(REG), "hash report has no entry for {REG}: {h:?}");

    // Removal replicates too.
    c.raftvm(0, &["module", "remove", REG]).ok();
    for i in 0..3 {
        poll_until(Duration::from_secs(10), "module removal to replicate", || {
            let list = c.module_list(i);
            if list.iter().any(|m| m.name == REG) {
                Err(format!("{list:?}"))
            } else {
                Ok(())
            }
        });
    }
    c.call(1, REG, "set greeting again").err();
}

/// A one-node cluster works on its own.
#[test]
fn single_node_cluster() {
    let file = guest("register-rust");
    let c = Cluster::start(1);
    let st = c.status(0).expect("status");
    assert!(st.is_leader, "the only node must lead: {st:?}");
    assert_eq!(st.name, "n1");
    c.install_ok(0, REG, &file);
    assert_eq!(c.call(0, REG, "set a 1").ok(), "OK");
    assert_eq!(c.call(0, REG, "incr a 41").ok(), "42");
    assert_eq!(c.query(0, REG, "get a").ok(), "42");
    assert_eq!(c.query_serializable(0, REG, "get a").ok(), "42");
    let st2 = c.status(0).expect("status");
    assert!(st2.applied_index > st.applied_index, "{st:?} -> {st2:?}");
    assert!(st2.last_log_index >= st2.applied_index, "{st2:?}");
}

/// Five nodes tolerate two failures (and the leader is not one of them here).
#[test]
fn five_nodes_survive_two_follower_failures() {
    let file = guest("register-rust");
    let c = Cluster::start(5);
    c.install_everywhere(0, REG, &file);
    let leader = c.leader();
    let followers: Vec<usize> = (0..5).filter(|&i| i != leader).collect();
    c.kill(followers[0]);
    c.kill(followers[1]);
    for k in 0..10 {
        let via = [leader, followers[2], followers[3]][k % 3];
        assert_eq!(c.call(via, REG, &format!("incr x {k}")).ok(), ((0..=k).sum::<usize>()).to_string());
    }
    assert_eq!(c.query(followers[3], REG, "get x").ok(), "45");
    c.restart(followers[0]);
    c.restart(followers[1]);
    poll_until(Duration::from_secs(30), "restarted followers to serve the write", || {
        let out = c.query_serializable(followers[1], REG, "get x");
        if out.success() && out.out() == "45" {
            Ok(())
        } else {
            Err(format!("{out:?}"))
        }
    });
    c.assert_converged(Duration::from_secs(30));
}

/// Test 2: a follower killed with SIGKILL misses > 200 entries (with a small
/// snapshot count, so the leader purges that part of its log) and catches up
/// after a restart, to the same state hash.
#[test]
fn killed_follower_catches_up_through_snapshot() {
    let file = guest("register-rust");
    let c = Cluster::builder(3).snapshot_count(50).start();
    c.install_everywhere(0, REG, &file);
    assert_eq!(c.call(0, REG, "set before kill").ok(), "OK");
    let leader = c.leader();
    let victim = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    // Make sure the victim has state from before (so recovery starts from a non-empty dir).
    poll_until(Duration::from_secs(10), "victim to apply the first write", || {
        let out = c.query_serializable(victim, REG, "get before");
        if out.success() && out.out() == "kill" {
            Ok(())
        } else {
            Err(format!("{out:?}"))
        }
    });
    let before = c.status(victim).expect("victim status");
    c.kill(victim);

    const N: usize = 220;
    for k in 1..=N {
        let via = if k.is_multiple_of(2) { leader } else { other };
        assert_eq!(c.call(via, REG, "incr counter 1").ok(), k.to_string());
        if k.is_multiple_of(10) {
            assert_eq!(c.call(via, REG, &format!("set key{k} value{k}")).ok(), "OK");
        }
    }
    assert_eq!(c.call(leader, REG, "del before").ok(), "1");
    let leader_st = c.status(leader).expect("leader status");
    assert!(
        leader_st.applied_index >= before.applied_index + N as u64,
        "leader applied {} entries since the kill, want >= {N}: before={before:?} now={leader_st:?}",
        leader_st.applied_index - before.applied_index
    );

    c.restart(victim);
    let t0 = Instant::now();
    poll_until(Duration::from_secs(90), "restarted follower to catch up with the leader", || {
        let v = c.status(victim)?;
        let l = c.status(leader)?;
        if v.applied_index >= l.applied_index {
            Ok(())
        } else {
            Err(format!("victim {v:?} leader {l:?}"))
        }
    });
    eprintln!("follower caught up in {:?}", t0.elapsed());
    // Informational (log wording is the host's business): did it go through a snapshot?
    let log = c.node(victim).log_contents();
    let snapshot_lines: Vec<&str> =
        log.lines().filter(|l| !l.starts_with("=====") && l.to_lowercase().contains("snapshot")).collect();
    eprintln!("victim log lines mentioning snapshots: {}", snapshot_lines.len());
    for l in snapshot_lines.iter().take(5) {
        eprintln!("  {l}");
    }

    let h = c.assert_converged(Duration::from_secs(30));
    assert!(h.applied_index >= leader_st.applied_index, "{h:?} vs {leader_st:?}");
    // Its local (serializable) state is the real thing, not just the same hash.
    assert_eq!(c.query_serializable(victim, REG, "get counter").ok(), N.to_string());
    assert_eq!(c.query_serializable(victim, REG, "get key200").ok(), "value200");
    c.query_serializable(victim, REG, "get before").err();
    assert_eq!(c.query_serializable(victim, REG, "count").ok(), (1 + N / 10).to_string());
    assert_eq!(c.query(victim, REG, "get counter").ok(), N.to_string());
    // The victim also knows the module (installed before it died; reinstalled from the snapshot).
    assert_listed(&c, victim, REG, &file);
}

/// What the test believes the `reg` machine holds: every acknowledged write.
#[derive(Default)]
struct Acked {
    sets: Vec<(String, String)>,
    counter: u64,
}

impl Acked {
    #[track_caller]
    fn write(&mut self, c: &Cluster, via: usize, k: usize) {
        if k.is_multiple_of(2) {
            let (key, val) = (format!("k{k}"), format!("v{k}"));
            assert_eq!(c.call(via, REG, &format!("set {key} {val}")).ok(), "OK");
            self.sets.push((key, val));
        } else {
            let out = c.call(via, REG, &format!("incr ctr {k}"));
            self.counter += k as u64;
            assert_eq!(out.ok(), self.counter.to_string());
        }
    }

    #[track_caller]
    fn verify(&self, c: &Cluster, nodes: &[usize]) {
        for (j, (key, val)) in self.sets.iter().enumerate() {
            let via = nodes[j % nodes.len()];
            assert_eq!(c.query(via, REG, &format!("get {key}")).ok(), val, "acknowledged write lost");
        }
        for &via in nodes {
            assert_eq!(c.query(via, REG, "get ctr").ok(), self.counter.to_string(), "acknowledged incr lost");
        }
    }
}

/// Test 3: SIGKILL the leader; a new leader takes writes within 10 s; nothing
/// acknowledged is lost, also across a full stop/restart of all nodes.
#[test]
fn leader_failover_and_full_restart_keep_acknowledged_writes() {
    let file = guest("register-rust");
    let c = Cluster::start(3);
    c.install_everywhere(0, REG, &file);
    let mut acked = Acked::default();
    for k in 0..30 {
        acked.write(&c, k % 3, k);
    }

    let old = c.leader();
    let old_status = c.status(old).expect("leader status");
    let survivors: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    c.kill(old);
    let killed_at = Instant::now();

    // Bounded retry loop of idempotent writes until one is acknowledged.
    let mut attempt = 0usize;
    let mut failures = Vec::new();
    let recovered = loop {
        let via = survivors[attempt % 2];
        let val = format!("after{attempt}");
        // Short per-attempt timeout: a request stuck on the dead leader is retried.
        let out = c.raftvm(via, &["call", REG, &format!("set probe {val}"), "--command-timeout", "3s"]);
        if out.success() {
            assert_eq!(out.out(), "OK", "{out:?}");
            acked.sets.push(("probe".into(), val));
            break killed_at.elapsed();
        }
        failures.push(out);
        attempt += 1;
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "no write acknowledged within 10 s of killing the leader; {} attempts, last: {:?}",
            failures.len(),
            failures.last()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("writes resumed {recovered:?} after killing the leader ({} failed attempts)", failures.len());
    assert!(recovered < Duration::from_secs(10), "took {recovered:?}");

    let new = c.wait_for_leader(Duration::from_secs(10));
    assert_ne!(new, old);
    let new_status = c.status(new).expect("new leader status");
    assert!(new_status.term > old_status.term, "term must grow: {old_status:?} -> {new_status:?}");

    for k in 30..50 {
        acked.write(&c, survivors[k % 2], k);
    }
    acked.verify(&c, &survivors);

    // The old leader comes back as a follower and catches up.
    c.restart(old);
    poll_until(Duration::from_secs(30), "old leader to catch up", || {
        let out = c.query_serializable(old, REG, "get ctr");
        if out.success() && out.out() == acked.counter.to_string() {
            Ok(())
        } else {
            Err(format!("{out:?}"))
        }
    });
    let before_restart = c.assert_converged(Duration::from_secs(30));

    // Stop everything, start everything: state is recovered from the data dirs.
    c.stop_all();
    assert!(c.running().is_empty());
    for i in 0..3 {
        c.restart(i);
    }
    c.wait_for_leader(Duration::from_secs(60));
    acked.verify(&c, &[0, 1, 2]);
    assert_eq!(
        c.query(0, REG, "count").ok(),
        (acked.sets.iter().map(|s| &s.0).collect::<std::collections::BTreeSet<_>>().len() + 1).to_string()
    );
    let after = c.assert_converged(Duration::from_secs(30));
    assert!(after.applied_index >= before_restart.applied_index, "{before_restart:?} -> {after:?}");
    assert_eq!(
        after.machines.get(REG),
        before_restart.machines.get(REG),
        "the machine's state changed across a restart without writes"
    );
    // And the cluster still takes writes.
    acked.write(&c, 1, 51);
    acked.verify(&c, &[2]);
}
