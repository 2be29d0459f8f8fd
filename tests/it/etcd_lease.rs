//! etcd's Lease service on raftvm:
//! * `etcdctl lease ...` (and `put --lease`) against a real etcd 3.4 and against a 3-node
//!   raftvm cluster (commands rotate over the members), outputs compared modulo lease ids
//!   and the TTL countdown;
//! * expiry: keys attached to a lease nobody keeps alive disappear on every member, not
//!   before the TTL, and the members' states stay identical;
//! * keep-alives through a follower keep a lease alive for several TTLs, also across a
//!   SIGKILL of the leader (the new leader gives every lease a fresh TTL), and the lease
//!   expires once they stop;
//! * a leader cut off from its quorum (followers frozen) stops renewing leases;
//! * the lease table travels in snapshots: a member that catches up through one knows the
//!   leases and their keys.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use raftvm_tests::etcd::{etcdctl, start_kv_cluster, wait_kv_module, EtcdServer, EtcdctlProcess};
use raftvm_tests::{poll_until, Cluster, CmdOutput};

/// The lease id in `lease <hex> granted with TTL(<n>s)`.
#[track_caller]
fn granted_id(out: &CmdOutput) -> String {
    let text = out.ok();
    let id = text
        .strip_prefix("lease ")
        .and_then(|r| r.split(' ').next());
    match id {
        Some(id) if text.contains(" granted with TTL(") => id.to_string(),
        _ => panic!("unexpected `lease grant` output: {out:?}"),
    }
}

/// The TTL in `lease <hex> granted with TTL(<n>s)`.
fn granted_ttl(out: &CmdOutput) -> i64 {
    let t = out.ok();
    let n = t
        .split("TTL(")
        .nth(1)
        .and_then(|r| r.strip_suffix("s)"))
        .unwrap_or_else(|| panic!("{out:?}"));
    n.parse().unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

// ---------------------------------------------------------------------------
// Differential test against etcd
// ---------------------------------------------------------------------------

/// Lease ids captured on one server: placeholder name → id.
#[derive(Default)]
struct Ids(BTreeMap<String, i64>);

impl Ids {
    fn capture(&mut self, name: &str, out: &CmdOutput) {
        let hex = granted_id(out);
        self.0.insert(
            name.to_string(),
            i64::from_str_radix(&hex, 16).expect("hex lease id"),
        );
    }

    /// `{A}` → A's id in hex, as etcdctl takes it.
    fn fill(&self, s: &str) -> String {
        let mut s = s.to_string();
        for (name, id) in &self.0 {
            s = s.replace(&format!("{{{name}}}"), &format!("{id:x}"));
        }
        s
    }

    fn name_of(&self, id: i64) -> Option<&str> {
        self.0
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(k, _)| k.as_str())
    }
}

/// `remaining(Ns)` is a countdown: accept anything within 3 s of the granted TTL.
fn normalize_remaining(line: &str) -> String {
    let Some((head, rest)) = line.split_once(", remaining(") else {
        return line.to_string();
    };
    let Some((n, tail)) = rest.split_once("s)") else {
        return line.to_string();
    };
    let granted: Option<i64> = head
        .split("TTL(")
        .nth(1)
        .and_then(|g| g.strip_suffix("s)"))
        .and_then(|g| g.parse().ok());
    let ok = match (granted, n.parse::<i64>()) {
        (Some(g), Ok(n)) => n <= g && n >= g - 3,
        _ => false,
    };
    format!(
        "{head}, remaining({}s){tail}",
        if ok { "<countdown>" } else { n }
    )
}

/// etcd lists keys and leases in map order: sort them.
fn sort_bracketed_keys(line: &str) -> String {
    let Some((head, rest)) = line.split_once("attached keys([") else {
        return line.to_string();
    };
    let Some((keys, tail)) = rest.split_once("])") else {
        return line.to_string();
    };
    let mut ks: Vec<&str> = keys.split(' ').filter(|k| !k.is_empty()).collect();
    ks.sort();
    format!("{head}attached keys([{}]){tail}", ks.join(" "))
}

fn normalize_json(v: &mut serde_json::Value, ids: &Ids) {
    use serde_json::Value;
    if let Value::Array(a) = v {
        a.iter_mut().for_each(|x| normalize_json(x, ids));
        return;
    }
    let Value::Object(m) = v else { return };
    let granted = m.get("granted-ttl").and_then(Value::as_i64);
    for (k, x) in m.iter_mut() {
        match k.as_str() {
            "cluster_id" | "member_id" | "raft_term" if x.as_u64() != Some(0) => {
                *x = "<nonzero>".into()
            }
            "id" | "ID" | "lease" => {
                let id = x.as_i64().unwrap_or(0);
                if let Some(name) = ids.name_of(id) {
                    *x = format!("<{name}>").into();
                } else if k == "ID" && id > 0 {
                    // A lease granted by this very command (not captured).
                    *x = "<new>".into();
                }
            }
            "ttl" => {
                if let (Some(g), Some(t)) = (granted, x.as_i64()) {
                    if g > 0 && t <= g && t >= g - 3 {
                        *x = "<countdown>".into();
                    }
                }
            }
            "keys" => {
                if let Value::Array(a) = x {
                    a.sort_by_key(|k| k.to_string());
                }
            }
            "leases" => {
                if let Value::Array(a) = x {
                    a.iter_mut().for_each(|l| normalize_json(l, ids));
                    a.sort_by_key(|l| l.to_string());
                }
            }
            _ => normalize_json(x, ids),
        }
    }
}

/// Exit code, stdout and stderr of one etcdctl run, with this server's lease ids replaced
/// by their placeholder names, countdowns blurred, and map-ordered lists sorted. The
/// client library's JSON log lines on stderr (timestamps) are dropped.
fn comparable(out: &CmdOutput, ids: &Ids) -> (Option<i32>, String, String) {
    let mut text = out.stdout.clone();
    for (name, id) in &ids.0 {
        text = text.replace(&format!("{id:016x}"), &format!("<{name}>"));
    }
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(mut v) if v.is_object() => {
                normalize_json(&mut v, ids);
                v.to_string()
            }
            _ => sort_bracketed_keys(&normalize_remaining(l)),
        })
        .collect();
    // `lease list`: "found N leases", then one id per line in map order.
    if lines.first().is_some_and(|l| l.starts_with("found ")) {
        lines[1..].sort();
    }
    let stderr = out
        .stderr
        .lines()
        .filter(|l| !l.trim_start().starts_with("{\"level\""))
        .collect::<Vec<_>>()
        .join("\n");
    (out.code, lines.join("\n"), stderr)
}

struct Step {
    ok: bool,
    args: &'static [&'static str],
    stdin: &'static str,
    /// Capture the granted lease id under this name.
    capture: Option<&'static str>,
}

const fn step(ok: bool, args: &'static [&'static str]) -> Step {
    Step {
        ok,
        args,
        stdin: "",
        capture: None,
    }
}

const fn grant(name: &'static str, args: &'static [&'static str]) -> Step {
    Step {
        ok: true,
        args,
        stdin: "",
        capture: Some(name),
    }
}

#[test]
fn etcdctl_lease_matches_etcd() {
    let etcd = EtcdServer::start();
    let cluster = start_kv_cluster(3);
    let script = [
        grant("A", &["lease", "grant", "60"]),
        grant("B", &["lease", "grant", "100"]),
        step(true, &["put", "k1", "v1", "--lease", "{A}"]),
        step(true, &["put", "k2", "v2", "--lease={A}"]),
        step(true, &["put", "k3", "v3", "--lease", "{A}"]),
        step(true, &["put", "k4", "v4", "--lease", "{B}"]),
        // A plain put detaches a key; a put under another lease moves it.
        step(true, &["put", "k2", "v2b"]),
        step(true, &["put", "k3", "v3b", "--lease", "{B}"]),
        Step {
            ok: true,
            args: &["txn", "-i"],
            stdin: "\nput t1 x --lease={B}\n\n\n",
            capture: None,
        },
        step(true, &["get", "k1", "-w", "json"]),
        step(true, &["get", "", "--prefix", "-w", "json"]),
        step(true, &["lease", "timetolive", "{A}"]),
        step(true, &["lease", "timetolive", "{A}", "--keys"]),
        step(true, &["lease", "timetolive", "{B}", "--keys"]),
        step(
            true,
            &["lease", "timetolive", "{B}", "--keys", "-w", "json"],
        ),
        step(true, &["lease", "list"]),
        step(true, &["lease", "list", "-w", "json"]),
        step(true, &["lease", "keep-alive", "--once", "{A}"]),
        step(
            true,
            &["lease", "keep-alive", "--once", "{B}", "-w", "json"],
        ),
        // Unknown leases.
        step(true, &["lease", "timetolive", "1234abcd"]),
        step(
            true,
            &["lease", "timetolive", "1234abcd", "--keys", "-w", "json"],
        ),
        step(false, &["lease", "keep-alive", "--once", "1234abcd"]),
        step(false, &["lease", "revoke", "1234abcd"]),
        step(false, &["put", "x", "y", "--lease", "1234abcd"]),
        step(false, &["put", "x", "y", "--lease", "zz"]),
        // TTL bounds (the minimum is below, at the end: those leases expire in 2 s).
        step(false, &["lease", "grant", "9000000001"]),
        step(false, &["lease", "grant", "9223372036854775807"]),
        step(false, &["lease", "grant", "abc"]),
        grant("C", &["lease", "grant", "9000000000"]),
        step(true, &["lease", "timetolive", "{C}", "-w", "json"]),
        // Revocation deletes the attached keys (not the detached or moved ones).
        step(true, &["lease", "revoke", "{A}"]),
        step(true, &["get", "", "--prefix"]),
        step(false, &["lease", "revoke", "{A}"]),
        step(true, &["lease", "timetolive", "{A}", "--keys"]),
        step(false, &["put", "k5", "v", "--lease", "{A}"]),
        step(true, &["lease", "revoke", "{B}", "-w", "json"]),
        step(true, &["get", "", "--prefix", "-w", "json"]),
        step(true, &["lease", "list"]),
        step(true, &["lease", "revoke", "{C}"]),
        // TTLs below the minimum get the minimum (2 s with etcd's default timing).
        grant("D", &["lease", "grant", "1"]),
        grant("E", &["lease", "grant", "0"]),
        grant("F", &["lease", "grant", "--", "-5"]),
        step(true, &["lease", "grant", "2", "-w", "json"]),
    ];
    let (mut etcd_ids, mut raft_ids) = (Ids::default(), Ids::default());
    let verbose = std::env::var_os("ETCD_DIFF_VERBOSE").is_some_and(|v| !v.is_empty());
    let mut mismatches = Vec::new();
    for (i, s) in script.iter().enumerate() {
        let member = i % 3;
        let e_args: Vec<String> = s.args.iter().map(|a| etcd_ids.fill(a)).collect();
        let e_args: Vec<&str> = e_args.iter().map(String::as_str).collect();
        let e = etcdctl(&etcd.endpoint(), &e_args, &etcd_ids.fill(s.stdin));
        assert_eq!(
            e.success(),
            s.ok,
            "script error: unexpected result from the real etcd: {e:?}"
        );
        let r_args: Vec<String> = s.args.iter().map(|a| raft_ids.fill(a)).collect();
        let r_args: Vec<&str> = r_args.iter().map(String::as_str).collect();
        let r = etcdctl(&cluster.endpoint(member), &r_args, &raft_ids.fill(s.stdin));
        if let Some(name) = s.capture {
            etcd_ids.capture(name, &e);
            if r.success() {
                raft_ids.capture(name, &r);
            }
        }
        let (ce, cr) = (comparable(&e, &etcd_ids), comparable(&r, &raft_ids));
        if verbose {
            eprintln!(
                "--- #{i} {} [{}]\n{:?}",
                e.cmdline,
                if ce == cr { "same" } else { "DIFFERENT" },
                ce
            );
        }
        if ce != cr {
            mismatches.push(format!(
                "#{i} etcdctl {}\n  etcd:   {ce:?}\n  raftvm ({}): {cr:?}",
                s.args.join(" "),
                cluster.node(member).name
            ));
        }
    }
    cluster.assert_converged(Duration::from_secs(20));
    drop(cluster);
    drop(etcd);
    assert!(
        mismatches.is_empty(),
        "etcdctl output differs between etcd and raftvm in {} of {} commands:\n{}",
        mismatches.len(),
        script.len(),
        mismatches.join("\n\n")
    );
}

// ---------------------------------------------------------------------------
// Expiry and keep-alive on a cluster
// ---------------------------------------------------------------------------

/// Keys under `prefix` as a linearizable read through member `i` sees them.
fn keys_at(c: &Cluster, i: usize, prefix: &str) -> Result<Vec<String>, String> {
    let out = etcdctl(
        &c.endpoint(i),
        &["get", prefix, "--prefix", "--keys-only"],
        "",
    );
    if !out.success() {
        return Err(format!("{out:?}"));
    }
    Ok(out
        .stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Polls until every member in `members` shows exactly `want` under `prefix`.
fn wait_keys(
    c: &Cluster,
    members: &[usize],
    prefix: &str,
    want: &[&str],
    timeout: Duration,
    what: &str,
) {
    poll_until(timeout, what, || {
        for &i in members {
            let got = keys_at(c, i, prefix)?;
            if got != want {
                return Err(format!("member {}: {got:?}", c.node(i).name));
            }
        }
        Ok(())
    });
}

/// Asserts, for `how_long`, that every member in `members` keeps showing `want` under
/// `prefix` (and that `keeper`, if any, keeps running).
fn hold(
    c: &Cluster,
    members: &[usize],
    prefix: &str,
    want: &[&str],
    how_long: Duration,
    keeper: Option<&mut EtcdctlProcess>,
) {
    let start = Instant::now();
    let mut keeper = keeper;
    while start.elapsed() < how_long {
        for &i in members {
            let got = keys_at(c, i, prefix)
                .unwrap_or_else(|e| panic!("reading through {}: {e}", c.node(i).name));
            assert_eq!(
                got,
                want,
                "member {} after {:?}",
                c.node(i).name,
                start.elapsed()
            );
        }
        if let Some(k) = keeper.as_deref_mut() {
            assert_running(k);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `etcdctl lease keep-alive ID` running against one endpoint (killed on drop).
fn keep_alive(endpoint: &str, id: &str) -> EtcdctlProcess {
    EtcdctlProcess::spawn(endpoint, &["lease", "keep-alive", id])
}

#[track_caller]
fn assert_running(keeper: &mut EtcdctlProcess) {
    if let Some(st) = keeper.exited() {
        panic!("`etcdctl lease keep-alive` exited with {st}: {keeper:?}");
    }
}

#[test]
fn unrenewed_lease_expires_on_every_member() {
    let c = start_kv_cluster(3);
    let leader = c.leader();
    let f = (leader + 1) % 3;
    let t0 = Instant::now();
    // Asked for 1 s through a follower: etcd's minimum (2 s) applies.
    let out = etcdctl(&c.endpoint(f), &["lease", "grant", "1"], "");
    let id = granted_id(&out);
    assert_eq!(granted_ttl(&out), 2, "{out:?}");
    etcdctl(&c.endpoint(f), &["put", "exp/keep", "plain"], "").ok();
    // Each put through another member; a put succeeding proves the lease was live.
    for i in 0..3 {
        etcdctl(
            &c.endpoint(i),
            &["put", &format!("exp/k{i}"), "v", "--lease", &id],
            "",
        )
        .ok();
    }
    wait_keys(
        &c,
        &[0, 1, 2],
        "exp/",
        &["exp/keep"],
        Duration::from_secs(20),
        "leased keys to expire on every member",
    );
    let gone_after = t0.elapsed();
    assert!(
        gone_after >= Duration::from_secs(2),
        "keys were gone {gone_after:?} after the grant, before its 2 s TTL"
    );
    for i in 0..3 {
        let ttl = etcdctl(&c.endpoint(i), &["lease", "timetolive", &id], "");
        assert_eq!(ttl.ok(), format!("lease {id} already expired"));
        assert_eq!(
            etcdctl(&c.endpoint(i), &["lease", "list"], "").ok(),
            "found 0 leases"
        );
    }
    let h = c.assert_converged(Duration::from_secs(20));
    eprintln!("expired after {gone_after:?}; converged at {h:?}");
}

#[test]
fn keep_alive_through_a_follower_survives_leader_failover() {
    const TTL: u64 = 5;
    let c = start_kv_cluster(3);
    let leader = c.leader();
    let f = (leader + 1) % 3;
    let g = (leader + 2) % 3;
    let id = granted_id(&etcdctl(
        &c.endpoint(f),
        &["lease", "grant", &TTL.to_string()],
        "",
    ));
    etcdctl(&c.endpoint(f), &["put", "ka/key", "v", "--lease", &id], "").ok();
    let mut keeper = keep_alive(&c.endpoint(f), &id);

    // Several TTLs with keep-alives reaching the leader only through the follower.
    hold(
        &c,
        &[0, 1, 2],
        "ka/",
        &["ka/key"],
        Duration::from_secs(3 * TTL),
        Some(&mut keeper),
    );
    let ttl = etcdctl(&c.endpoint(g), &["lease", "timetolive", &id], "");
    assert!(
        ttl.ok()
            .starts_with(&format!("lease {id} granted with TTL({TTL}s), remaining(")),
        "{ttl:?}"
    );

    // The leader dies; the new one gives the lease a fresh TTL and takes the keep-alives.
    c.kill(leader);
    let new_leader = c.wait_for_leader(Duration::from_secs(30));
    eprintln!(
        "leader {} killed; new leader {}",
        c.node(leader).name,
        c.node(new_leader).name
    );
    hold(
        &c,
        &[f, g],
        "ka/",
        &["ka/key"],
        Duration::from_secs(2 * TTL),
        Some(&mut keeper),
    );

    // No more keep-alives: it expires.
    assert_running(&mut keeper);
    let printed = keeper.finish().stdout;
    let stopped = Instant::now();
    assert!(
        printed.contains(&format!("lease {id} keepalived with TTL({TTL})")),
        "{printed}"
    );
    wait_keys(
        &c,
        &[f, g],
        "ka/",
        &[],
        Duration::from_secs(TTL + 20),
        "the lease to expire after keep-alives stopped",
    );
    // The last keep-alive was at most TTL/3 before they stopped.
    assert!(
        stopped.elapsed() >= Duration::from_secs(TTL) / 2,
        "expired {:?} after the last keep-alive",
        stopped.elapsed()
    );
    assert_eq!(
        etcdctl(&c.endpoint(g), &["lease", "timetolive", &id], "").ok(),
        format!("lease {id} already expired")
    );
    c.assert_converged(Duration::from_secs(20));
}

/// A leader renews leases without a quorum round while a quorum has acknowledged it
/// recently (as etcd's does); cut off from its quorum it must stop renewing, and renew
/// again once the followers are back.
#[test]
fn a_leader_cut_off_from_its_quorum_stops_renewing_leases() {
    let c = start_kv_cluster(3);
    let leader = c.leader();
    let ep = c.endpoint(leader);
    let id = granted_id(&etcdctl(&ep, &["lease", "grant", "60"], ""));
    let keep_alive = || etcdctl(&ep, &["--command-timeout", "2s", "lease", "keep-alive", "--once", &id], "");
    let renewed = format!("lease {id} keepalived with TTL(60)");
    assert!(keep_alive().ok().contains(&renewed));

    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &f in &followers {
        c.pause(f);
    }
    // Renewals may go on for the freshness window (half an election timeout); then they
    // must fail, every time.
    poll_until(Duration::from_secs(20), "a keep-alive at the cut-off leader to fail", || {
        let out = keep_alive();
        if out.success() { Err(out.out().to_string()) } else { Ok(()) }
    });
    let again = keep_alive();
    assert!(!again.success(), "renewed without a quorum: {again:?}");

    for &f in &followers {
        c.resume(f);
    }
    poll_until(Duration::from_secs(30), "keep-alives to work again", || {
        let out = keep_alive();
        if out.success() && out.out().contains(&renewed) { Ok(()) } else { Err(format!("{out:?}")) }
    });
}

/// A member that was down while a lease was granted and keys attached catches up through
/// a snapshot (small --snapshot-count); the lease table came with it: the states are
/// identical, and revoking the lease through that member deletes the keys everywhere.
#[test]
fn lease_table_travels_in_snapshots() {
    let c = Cluster::builder(3).snapshot_count(50).start();
    for i in 0..3 {
        wait_kv_module(&c, i, Duration::from_secs(60));
    }
    let leader = c.leader();
    let victim = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    c.kill(victim);
    let id = granted_id(&etcdctl(
        &c.endpoint(leader),
        &["lease", "grant", "600"],
        "",
    ));
    for k in 0..3 {
        etcdctl(
            &c.endpoint(other),
            &["put", &format!("snap/l{k}"), "v", "--lease", &id],
            "",
        )
        .ok();
    }
    // Enough entries for the leader to snapshot (every 50) and purge its log past the
    // grant (it keeps 50 entries behind a snapshot).
    for k in 0..200 {
        etcdctl(&c.endpoint(leader), &["put", &format!("fill/{k}"), "x"], "").ok();
    }
    c.restart(victim);
    let h = c.assert_converged(Duration::from_secs(90));
    eprintln!("converged after restart: {h:?}");
    // The driver's log line (raft::state_machine): the catch-up went through a snapshot.
    assert!(
        c.node(victim).log_contents().contains("installed snapshot"),
        "the victim caught up without a snapshot"
    );

    // Its own state (`lease list` reads it after a read barrier) has the lease.
    let ttl = etcdctl(
        &c.endpoint(victim),
        &["lease", "timetolive", &id, "--keys"],
        "",
    );
    assert!(
        ttl.ok()
            .ends_with("attached keys([snap/l0 snap/l1 snap/l2])"),
        "{ttl:?}"
    );
    assert_eq!(
        etcdctl(&c.endpoint(victim), &["lease", "list"], "").ok(),
        format!("found 1 leases\n{id}")
    );
    etcdctl(&c.endpoint(victim), &["lease", "revoke", &id], "").ok();
    wait_keys(
        &c,
        &[0, 1, 2],
        "snap/",
        &[],
        Duration::from_secs(20),
        "revoked keys to disappear",
    );
    c.assert_converged(Duration::from_secs(30));
}
