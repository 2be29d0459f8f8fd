//! etcd's own clients against a 3-node raftvm cluster:
//! * the Rust `etcd-client` crate, one client per member: writes through one member are
//!   visible to linearizable reads on every member; compare-and-swap txns (also racing
//!   from all members at once); delete by prefix; leases (grant, put with a lease,
//!   time-to-live, keep-alive stream, revoke);
//! * `etcdctl` 3.4 with the flags people use, each command run against a real etcd and
//!   against raftvm (rotating over the members), comparing exit code, stdout and stderr
//!   (`-w json` ids normalized).
//! * the Python `etcd3` package (tests/python/test_etcd3.py, run by pytest).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};
use raftvm_tests::etcd::{etcdctl, etcdctl_stderr_lines, normalize_etcdctl_line, start_kv_cluster, EtcdServer};
use raftvm_tests::CmdOutput;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

async fn connect(url: &str) -> Client {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(10))
        .with_timeout(Duration::from_secs(15));
    Client::connect([url], Some(opts)).await.unwrap_or_else(|e| panic!("etcd-client connect {url}: {e}"))
}

async fn get_str(c: &mut Client, key: &str) -> Option<String> {
    let r = c.get(key, None).await.unwrap_or_else(|e| panic!("get {key}: {e}"));
    assert!(r.kvs().len() <= 1, "{r:?}");
    r.kvs().first().map(|kv| kv.value_str().expect("utf-8 value").to_string())
}

/// One client per member; writes rotate over the members, every write is read back
/// linearizably through every member right after it is acknowledged.
#[test]
fn etcd_client_crate_on_three_members() {
    let cluster = start_kv_cluster(3);
    let urls: Vec<String> = (0..3).map(|i| cluster.node(i).client_url()).collect();
    runtime().block_on(async {
        let mut cs = Vec::new();
        for u in &urls {
            cs.push(connect(u).await);
        }

        // --- writes via one member, linearizable reads on every member ---
        for round in 0..9usize {
            let w = round % 3;
            let (key, val) = (format!("lin/k{}", round % 4), format!("v{round}"));
            let put = cs[w].put(key.as_str(), val.as_str(), None).await.expect("put");
            let rev = put.header().expect("put header").revision();
            for (r, c) in cs.iter_mut().enumerate() {
                let got = c.get(key.as_str(), None).await.expect("get");
                let kv = got.kvs().first().unwrap_or_else(|| panic!("round {round}: {key} missing on member {r}"));
                assert_eq!(
                    kv.value_str().unwrap(),
                    val,
                    "round {round}: linearizable read via member {r} after a write via member {w} saw a stale value"
                );
                assert_eq!(kv.mod_revision(), rev, "round {round} member {r}");
                assert!(got.header().unwrap().revision() >= rev, "round {round} member {r}: {got:?}");
            }
        }
        // Prefix reads agree on every member, and so do their header revisions (no writes in between).
        let mut views = Vec::new();
        for c in cs.iter_mut() {
            let r = c.get("lin/", Some(GetOptions::new().with_prefix())).await.expect("get prefix");
            let kvs: Vec<(String, String, i64, i64, i64)> = r
                .kvs()
                .iter()
                .map(|kv| {
                    (kv.key_str().unwrap().into(), kv.value_str().unwrap().into(), kv.create_revision(), kv.mod_revision(), kv.version())
                })
                .collect();
            views.push((r.header().unwrap().revision(), kvs));
        }
        assert_eq!(views[0].1.len(), 4, "{views:?}");
        assert!(views.iter().all(|v| *v == views[0]), "members disagree: {views:#?}");
        let ks: Vec<&str> = views[0].1.iter().map(|kv| kv.0.as_str()).collect();
        assert_eq!(ks, ["lin/k0", "lin/k1", "lin/k2", "lin/k3"]);
        let k0 = &views[0].1[0];
        assert_eq!((k0.1.as_str(), k0.4), ("v8", 3), "lin/k0 was written in rounds 0, 4, 8: {k0:?}");

        // --- compare-and-swap ---
        cs[0].put("cas/lock", "free", None).await.expect("put lock");
        let take = |who: &str| {
            Txn::new()
                .when([Compare::value("cas/lock", CompareOp::Equal, "free")])
                .and_then([TxnOp::put("cas/lock", who, Some(PutOptions::new().with_prev_key()))])
                .or_else([TxnOp::get("cas/lock", None)])
        };
        let r = cs[1].txn(take("m1")).await.expect("txn");
        assert!(r.succeeded(), "{r:?}");
        match r.op_responses().as_slice() {
            [TxnOpResponse::Put(p)] => assert_eq!(p.prev_key().map(|kv| kv.value_str().unwrap()), Some("free")),
            other => panic!("unexpected responses {other:?}"),
        }
        let r = cs[2].txn(take("m2")).await.expect("txn");
        assert!(!r.succeeded(), "second CAS must fail: {r:?}");
        match r.op_responses().as_slice() {
            [TxnOpResponse::Get(g)] => assert_eq!(g.kvs()[0].value_str().unwrap(), "m1"),
            other => panic!("unexpected responses {other:?}"),
        }
        assert_eq!(get_str(&mut cs[0], "cas/lock").await.as_deref(), Some("m1"));
        // CAS on version and mod revision.
        let kv = cs[0].get("cas/lock", None).await.unwrap().kvs()[0].clone();
        let stale = Txn::new()
            .when([Compare::mod_revision("cas/lock", CompareOp::Equal, kv.mod_revision() - 1)])
            .and_then([TxnOp::put("cas/lock", "stale", None)]);
        assert!(!cs[1].txn(stale).await.unwrap().succeeded());
        let fresh = Txn::new()
            .when([
                Compare::mod_revision("cas/lock", CompareOp::Equal, kv.mod_revision()),
                Compare::version("cas/lock", CompareOp::Equal, kv.version()),
                Compare::create_revision("cas/lock", CompareOp::Less, kv.mod_revision()),
            ])
            .and_then([TxnOp::put("cas/lock", "released", None)]);
        assert!(cs[2].txn(fresh).await.unwrap().succeeded());
        assert_eq!(get_str(&mut cs[1], "cas/lock").await.as_deref(), Some("released"));

        // A counter incremented with optimistic CAS from all three members at once:
        // no increment may be lost.
        cs[0].put("cas/counter", "0", None).await.unwrap();
        const PER_MEMBER: usize = 8;
        let mut tasks = Vec::new();
        for (m, c) in cs.iter().enumerate() {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = 0;
                let mut attempts = 0;
                while done < PER_MEMBER {
                    attempts += 1;
                    assert!(attempts < 500, "member {m}: CAS never succeeds");
                    let r = c.get("cas/counter", None).await.expect("get counter");
                    let kv = &r.kvs()[0];
                    let n: u64 = kv.value_str().unwrap().parse().unwrap();
                    let t = Txn::new()
                        .when([Compare::mod_revision("cas/counter", CompareOp::Equal, kv.mod_revision())])
                        .and_then([TxnOp::put("cas/counter", (n + 1).to_string(), None)]);
                    if c.txn(t).await.expect("txn").succeeded() {
                        done += 1;
                    }
                }
                attempts
            }));
        }
        for t in tasks {
            t.await.expect("CAS task");
        }
        for (m, c) in cs.iter_mut().enumerate() {
            assert_eq!(get_str(c, "cas/counter").await, Some((3 * PER_MEMBER).to_string()), "member {m}");
        }

        // --- delete by prefix ---
        for i in 0..5 {
            cs[i % 3].put(format!("del/p{i}"), format!("x{i}"), None).await.unwrap();
        }
        cs[0].put("del/q", "keep", None).await.unwrap();
        cs[0].put("del", "keep-too", None).await.unwrap();
        let r = cs[1]
            .delete("del/p", Some(DeleteOptions::new().with_prefix().with_prev_key()))
            .await
            .expect("delete prefix");
        assert_eq!(r.deleted(), 5, "{r:?}");
        let mut prev: Vec<(String, String)> =
            r.prev_kvs().iter().map(|kv| (kv.key_str().unwrap().into(), kv.value_str().unwrap().into())).collect();
        prev.sort();
        assert_eq!(prev, (0..5).map(|i| (format!("del/p{i}"), format!("x{i}"))).collect::<Vec<_>>());
        for (m, c) in cs.iter_mut().enumerate() {
            let r = c.get("del", Some(GetOptions::new().with_prefix())).await.unwrap();
            let keys: Vec<&str> = r.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
            assert_eq!(keys, ["del", "del/q"], "member {m}");
        }
        let r = cs[2].delete("del/p", Some(DeleteOptions::new().with_prefix())).await.unwrap();
        assert_eq!(r.deleted(), 0);
    });
    cluster.assert_converged(Duration::from_secs(20));
}

/// The error etcd-client returns for a failed call: (gRPC code name, message).
/// etcd's Cluster.MemberList: every member with its id (the member id of its response
/// headers), name, peer URL and published client URLs, through etcdctl (`member list`,
/// and the `--cluster` forms of `endpoint health` and `endpoint status`, which dial the
/// client URLs it lists) and the Rust client, which also adds and removes a learner.
#[test]
fn member_list_on_three_members() {
    let cluster = start_kv_cluster(3);
    let mut want: Vec<(u64, String, String, String)> = (0..3)
        .map(|i| {
            let n = cluster.node(i);
            let status = etcdctl(&n.endpoint(), &["endpoint", "status", "-w", "json"], "");
            let status: serde_json::Value = serde_json::from_str(status.ok()).expect("status json");
            let id = status[0]["Status"]["header"]["member_id"].as_u64().expect("member id");
            (id, n.name.clone(), n.peer_url(), n.client_url())
        })
        .collect();
    want.sort();
    let listed = |i: usize| -> Vec<(u64, String, String, String)> {
        let out = etcdctl(&cluster.endpoint(i), &["member", "list", "-w", "json"], "");
        let v: serde_json::Value = serde_json::from_str(out.ok()).expect("member list json");
        let mut got: Vec<_> = v["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| {
                assert_eq!(m["isLearner"].as_bool(), None, "etcdctl omits false: {m}");
                let urls = |f: &str| m[f].as_array().map(|a| a.iter().map(|u| u.as_str().unwrap().to_string()).collect::<Vec<_>>());
                let (peer, client) = (urls("peerURLs").expect("peerURLs"), urls("clientURLs").unwrap_or_default());
                assert_eq!(peer.len(), 1, "{m}");
                (m["ID"].as_u64().expect("ID"), m["name"].as_str().unwrap_or("").to_string(), peer[0].clone(), client.join(","))
            })
            .collect();
        got.sort();
        got
    };
    // Each member publishes its client URLs through the log after it starts.
    raftvm_tests::poll_until(Duration::from_secs(20), "every member's client URLs", || {
        let got = listed(0);
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?} vs {want:?}"))
        }
    });
    for i in 1..3 {
        assert_eq!(listed(i), want, "member list through member {i}");
    }
    let table = etcdctl(&cluster.endpoint(1), &["member", "list"], "");
    for (id, name, peer, client) in &want {
        assert!(table.ok().contains(&format!("{id:x}, started, {name}, {peer}, {client}, false")), "{table:?}");
    }
    let health = etcdctl(&cluster.endpoint(0), &["endpoint", "health", "--cluster"], "");
    assert_eq!(health.stderr.matches("is healthy").count() + health.stdout.matches("is healthy").count(), 3, "{health:?}");
    // The calls etcd's client makes to one named member send its URL as the HTTP/2
    // :authority (`api::authority`): with the client URLs from the member list, and with
    // an http:// endpoint given by hand.
    let status = etcdctl(&cluster.endpoint(2), &["endpoint", "status", "--cluster", "-w", "json"], "");
    let status: serde_json::Value = serde_json::from_str(status.ok()).expect("status json");
    let mut endpoints: Vec<_> = status.as_array().expect("array").iter().map(|e| e["Endpoint"].as_str().unwrap().to_string()).collect();
    endpoints.sort();
    let mut clients: Vec<_> = want.iter().map(|w| w.3.clone()).collect();
    clients.sort();
    assert_eq!(endpoints, clients);
    let url = cluster.node(1).client_url();
    for cmd in [&["endpoint", "status"][..], &["endpoint", "hashkv"], &["defrag"]] {
        let out = etcdctl(&url, cmd, "");
        assert!(out.success() && out.stdout.starts_with(&url) || out.stdout.contains(&format!("[{url}]")), "{cmd:?}: {out:?}");
    }
    // A peer URL already in use is refused with etcd's error.
    let dup = etcdctl(&cluster.endpoint(0), &["member", "add", "x", "--peer-urls", &want[1].2], "");
    assert!(dup.err().contains("etcdserver: Peer URLs already exists"), "{dup:?}");

    runtime().block_on(async {
        let mut c = connect(&cluster.node(1).client_url()).await;
        let r = c.member_list().await.expect("member_list");
        let mut got: Vec<_> = r
            .members()
            .iter()
            .map(|m| (m.id(), m.name().to_string(), m.peer_urls().join(","), m.client_urls().join(",")))
            .collect();
        got.sort();
        assert_eq!(got, want);
        assert!(r.members().iter().all(|m| !m.is_learner()));

        // The Rust client adds a learner (never started: it only joins the list), sees
        // it listed as one, and removes it.
        let opts = etcd_client::MemberAddOptions::new().with_is_learner();
        let added = c.member_add(["http://127.0.0.1:1"], Some(opts)).await.expect("member_add");
        let m = added.member().expect("the added member");
        assert!(m.is_learner() && m.name().is_empty() && m.client_urls().is_empty(), "{m:?}");
        assert_eq!(added.member_list().len(), 4);
        let id = m.id();
        let left = c.member_remove(id).await.expect("member_remove");
        assert_eq!(left.members().len(), 3);
        assert!(left.members().iter().all(|m| m.id() != id));
    });
}

fn grpc_error<T: std::fmt::Debug>(r: Result<T, etcd_client::Error>) -> (String, String) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => (format!("{:?}", s.code()), s.message().to_string()),
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

/// Leases through etcd-client, each call on another member: grant (chosen and given ids),
/// puts under a lease, time-to-live with keys, the lease list, the keep-alive stream, and
/// revocation, which deletes the attached keys everywhere; then etcd's answers for a lease
/// that is gone.
#[test]
fn etcd_client_crate_leases() {
    let cluster = start_kv_cluster(3);
    let urls: Vec<String> = (0..3).map(|i| cluster.node(i).client_url()).collect();
    runtime().block_on(async {
        let mut cs = Vec::new();
        for u in &urls {
            cs.push(connect(u).await);
        }
        let g = cs[0].lease_grant(30, None).await.expect("grant");
        let id = g.id();
        assert!(id > 0 && g.ttl() == 30, "{g:?}");
        let fixed = cs[1].lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x7777))).await.expect("grant with id");
        assert_eq!((fixed.id(), fixed.ttl()), (0x7777, 60));
        let dup = cs[2].lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x7777))).await;
        assert_eq!(grpc_error(dup), ("FailedPrecondition".into(), "etcdserver: lease already exists".into()));

        cs[1].put("lease/a", "1", Some(PutOptions::new().with_lease(id))).await.expect("put a");
        cs[2].put("lease/b", "2", Some(PutOptions::new().with_lease(id))).await.expect("put b");
        cs[0].put("lease/c", "3", Some(PutOptions::new().with_lease(0x7777))).await.expect("put c");
        for (m, c) in cs.iter_mut().enumerate() {
            let r = c.get("lease/a", None).await.expect("get");
            assert_eq!(r.kvs()[0].lease(), id, "member {m}");
        }
        let t = cs[2].lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys())).await.expect("ttl");
        assert_eq!((t.id(), t.granted_ttl()), (id, 30));
        assert!((25..=30).contains(&t.ttl()), "{t:?}");
        let mut keys = t.keys().to_vec();
        keys.sort();
        assert_eq!(keys, [b"lease/a".to_vec(), b"lease/b".to_vec()]);
        let mut listed: Vec<i64> = cs[1].leases().await.expect("leases").leases().iter().map(|l| l.id()).collect();
        listed.sort();
        let mut want = vec![id, 0x7777];
        want.sort();
        assert_eq!(listed, want);

        // The keep-alive stream, on every member (followers forward to the leader).
        let mut streams = Vec::new();
        for c in cs.iter_mut() {
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await.expect("keep-alive stream");
            keeper.keep_alive().await.expect("send keep-alive");
            let r = stream.message().await.expect("keep-alive reply").expect("stream open");
            assert_eq!((r.id(), r.ttl()), (id, 30), "{r:?}");
            streams.push((keeper, stream));
        }

        cs[2].lease_revoke(id).await.expect("revoke");
        for (m, c) in cs.iter_mut().enumerate() {
            let r = c.get("lease/", Some(GetOptions::new().with_prefix())).await.expect("get prefix");
            let keys: Vec<&str> = r.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
            assert_eq!(keys, ["lease/c"], "member {m}");
        }
        // Gone: keep-alive answers TTL 0, time-to-live -1, revoke and put NotFound.
        let (keeper, stream) = &mut streams[1];
        keeper.keep_alive().await.expect("send keep-alive");
        let r = stream.message().await.expect("keep-alive reply").expect("stream open");
        assert_eq!((r.id(), r.ttl()), (id, 0));
        let t = cs[0].lease_time_to_live(id, None).await.expect("ttl of a revoked lease");
        assert_eq!((t.ttl(), t.granted_ttl()), (-1, 0));
        let not_found = ("NotFound".to_string(), "etcdserver: requested lease not found".to_string());
        assert_eq!(grpc_error(cs[1].lease_revoke(id).await), not_found);
        assert_eq!(grpc_error(cs[2].put("lease/d", "4", Some(PutOptions::new().with_lease(id))).await), not_found);
        let big = cs[0].lease_grant(9_000_000_001, None).await;
        assert_eq!(grpc_error(big), ("OutOfRange".into(), "etcdserver: too large lease TTL".into()));
        cs[0].lease_revoke(0x7777).await.expect("revoke fixed");
        assert!(cs[1].leases().await.expect("leases").leases().is_empty());
    });
    cluster.assert_converged(Duration::from_secs(20));
}

// ---------------------------------------------------------------------------
// etcdctl
// ---------------------------------------------------------------------------

/// What is compared of an etcdctl run: exit code, stdout (ids normalized), stderr
/// without the client library's log lines.
fn comparable(out: &CmdOutput) -> (Option<i32>, String, String) {
    let stdout = out.stdout.lines().map(normalize_etcdctl_line).collect::<Vec<_>>().join("\n");
    let stderr = etcdctl_stderr_lines(&out.stderr).collect::<Vec<_>>().join("\n");
    (out.code, stdout, stderr)
}

/// The same `etcdctl` commands against a real etcd and against raftvm (each command on
/// the next member), comparing exit code, stdout and stderr. `ETCD_DIFF_VERBOSE=1`
/// prints every command with etcd's output.
#[test]
fn etcdctl_matches_etcd() {
    let etcd = EtcdServer::start();
    let cluster = start_kv_cluster(3);
    // (succeeds on etcd?, args, stdin). Revisions are the same on both sides: both start
    // at revision 1 and see the same writes. (etcdctl 3.4 has no `get --count-only`:
    // the count is checked through `-w json`.)
    let txn_cas = "value(\"b\") = \"22\"\nversion(\"b\") = \"2\"\nmod(\"b\") > \"2\"\ncreate(\"b\") = \"3\"\n\nput x 1\nget b\ndel c\n\nput y 2\n\n";
    let txn_fail = "value(\"b\") = \"nope\"\nversion(\"a\") < \"5\"\n\nput x 2\n\nput y 3\nget y\ndel nope\n\n";
    let txn_cmp_ops = "mod(\"x\") != \"0\"\ncreate(\"x\") > \"1\"\nvalue(\"x\") > \"0\"\nversion(\"y\") != \"0\"\n\nget x --prefix\nput z 9 --prev-kv\n\n\n";
    let script: Vec<(bool, Vec<&str>, &str)> = vec![
        (true, vec!["put", "a", "1"], ""),
        (true, vec!["put", "b", "2"], ""),
        (true, vec!["put", "c", "3"], ""),
        (true, vec!["put", "ab", "4"], ""),
        (true, vec!["put", "abc", "5"], ""),
        (true, vec!["put", "b", "22"], ""),
        (true, vec!["put", "d", ""], ""),
        (true, vec!["put", "--", "-dash", "neg"], ""),
        (true, vec!["get", "a"], ""),
        (true, vec!["get", "nope"], ""),
        (true, vec!["get", "a", "c"], ""),
        (true, vec!["get", "a", "--prefix"], ""),
        (true, vec!["get", "a", "--prefix", "--limit", "2"], ""),
        (true, vec!["get", "", "--prefix", "--limit", "3", "-w", "json"], ""),
        (true, vec!["get", "b", "--from-key"], ""),
        (true, vec!["get", "", "--prefix", "--sort-by", "MODIFY", "--order", "DESCEND"], ""),
        (true, vec!["get", "", "--prefix", "--sort-by", "VALUE", "--order", "ASCEND"], ""),
        (true, vec!["get", "", "--prefix", "--sort-by", "VERSION", "--order", "DESCEND"], ""),
        (true, vec!["get", "", "--prefix", "--sort-by", "CREATE", "--order", "ASCEND"], ""),
        (true, vec!["get", "", "--prefix", "--sort-by", "KEY", "--order", "DESCEND", "--limit", "2"], ""),
        (true, vec!["get", "", "--prefix", "--order", "DESCEND"], ""),
        (true, vec!["get", "a", "--prefix", "--keys-only"], ""),
        (true, vec!["get", "a", "--prefix", "--print-value-only"], ""),
        (true, vec!["get", "", "--prefix", "--keys-only", "-w", "json"], ""),
        (true, vec!["get", "b", "--rev", "3"], ""),
        (true, vec!["get", "b", "--rev", "3", "-w", "json"], ""),
        (true, vec!["get", "", "--prefix", "--rev", "4", "--print-value-only"], ""),
        (false, vec!["get", "b", "--rev", "1000"], ""),
        (true, vec!["get", "a", "-w", "json"], ""),
        (true, vec!["get", "b", "-w", "fields"], ""),
        (true, vec!["get", "", "--prefix", "--consistency", "s", "--keys-only"], ""),
        (true, vec!["get", "a", "--prefix", "--hex"], ""),
        (true, vec!["put", "e", "5", "--prev-kv"], ""),
        (true, vec!["put", "e", "6", "--prev-kv"], ""),
        (true, vec!["put", "e", "7", "--prev-kv", "-w", "json"], ""),
        (true, vec!["put", "e", "--ignore-value"], ""),
        (false, vec!["put", "missing", "--ignore-value"], ""),
        (false, vec!["put", "e", "8", "--lease", "1234abcd"], ""),
        (true, vec!["get", "e", "-w", "json"], ""),
        (true, vec!["txn", "-i"], txn_cas),
        (true, vec!["txn", "-i"], txn_fail),
        (true, vec!["txn", "-i", "-w", "json"], txn_cmp_ops),
        (true, vec!["txn", "-i", "-w", "json"], txn_fail),
        (true, vec!["get", "", "--prefix"], ""),
        (true, vec!["del", "nope"], ""),
        (true, vec!["del", "a", "--prev-kv"], ""),
        (true, vec!["del", "ab", "--prefix", "--prev-kv"], ""),
        (true, vec!["del", "x", "z", "--prev-kv", "-w", "json"], ""),
        (true, vec!["del", "d", "--from-key"], ""),
        (true, vec!["get", "", "--prefix", "-w", "json"], ""),
        (true, vec!["compaction", "5"], ""),
        (false, vec!["get", "b", "--rev", "4"], ""),
        (true, vec!["get", "b", "--rev", "5", "-w", "json"], ""),
        (false, vec!["compaction", "3"], ""),
        (true, vec!["put", "f", "1"], ""),
        (true, vec!["del", "", "--prefix", "--prev-kv"], ""),
        (true, vec!["get", "", "--prefix", "-w", "json"], ""),
    ];
    let verbose = std::env::var_os("ETCD_DIFF_VERBOSE").is_some_and(|v| !v.is_empty());
    let mut mismatches = Vec::new();
    for (i, (expect_ok, args, stdin)) in script.iter().enumerate() {
        let e = etcdctl(&etcd.endpoint(), args, stdin);
        // The script itself is checked against the reference first.
        assert_eq!(e.success(), *expect_ok, "script error: unexpected result from the real etcd: {e:?}");
        let r = etcdctl(&cluster.endpoint(i % 3), args, stdin);
        let (ce, cr) = (comparable(&e), comparable(&r));
        if verbose {
            eprintln!("--- #{i} {} [{}]\n{:?}", e.cmdline, if ce == cr { "same" } else { "DIFFERENT" }, ce);
        }
        if ce != cr {
            mismatches.push(format!(
                "#{i} etcdctl {}{}\n  etcd:   exit {:?}\n    stdout: {:?}\n    stderr: {:?}\n  raftvm ({}): exit {:?}\n    stdout: {:?}\n    stderr: {:?}",
                args.join(" "),
                if stdin.is_empty() { String::new() } else { format!(" <<< {stdin:?}") },
                ce.0,
                ce.1,
                ce.2,
                cluster.node(i % 3).name,
                cr.0,
                cr.1,
                cr.2
            ));
        }
    }
    // The report says everything: shut the servers down before failing, so their
    // (large) files are not kept as they would be after a crash or a timeout.
    drop(cluster);
    drop(etcd);
    assert!(
        mismatches.is_empty(),
        "etcdctl output differs between etcd and raftvm in {} of {} commands (the first is the one to look at):\n{}",
        mismatches.len(),
        script.len(),
        mismatches.join("\n\n")
    );
}

// ---------------------------------------------------------------------------
// Python etcd3
// ---------------------------------------------------------------------------

fn python_has(modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .env("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs tests/python/test_etcd3.py with pytest. The Python test starts its own 3-node
/// raftvm cluster with the binary given in RAFTVM_BIN. Skips (with a message) only if
/// python3 is missing; installs `etcd3` and `pytest` with pip if they are missing
/// (scripts/prereqs.sh should have done so already).
#[test]
fn python_etcd3() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED python_etcd3: python3 is not installed");
        return;
    }
    if !python_has("etcd3, pytest") {
        let mut args = vec!["-m", "pip", "install", "--quiet", "etcd3==0.12.0", "pytest"];
        eprintln!("python_etcd3: etcd3/pytest missing; installing them: python3 {}", args.join(" "));
        let out = Command::new("python3").args(&args).output().expect("run pip");
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && err.contains("externally-managed-environment") {
            // Debian's own python3 refuses pip installs (PEP 668); this is a test machine.
            args.push("--break-system-packages");
            eprintln!("python_etcd3: python3 is externally managed; retrying: python3 {}", args.join(" "));
            let st = Command::new("python3").args(&args).status().expect("run pip");
            assert!(st.success(), "`python3 {}` failed ({st})", args.join(" "));
        } else {
            assert!(out.status.success(), "`python3 {}` failed ({}):\n{err}", args.join(" "), out.status);
        }
        assert!(python_has("etcd3, pytest"), "etcd3 and pytest still not importable after pip install");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let out = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_etcd3.py"])
        .current_dir(&dir)
        .env("RAFTVM_BIN", raftvm_tests::raftvm_bin())
        .env("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
        .output()
        .expect("run pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(out.status.success(), "pytest tests/python/test_etcd3.py failed ({}):\n{stdout}\n{stderr}", out.status);
}

/// Waits (bounded) until `key` exists (`present`) or does not.
async fn wait_for_key(c: &mut Client, key: &str, present: bool) {
    for _ in 0..500 {
        if c.get(key, None).await.unwrap().kvs().is_empty() != present {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key} never became {}", if present { "present" } else { "absent" });
}

/// The next value an Observe stream reports.
async fn next_observed(obs: &mut etcd_client::ObserveStream) -> String {
    let r = tokio::time::timeout(Duration::from_secs(10), obs.message()).await.expect("observe stalls").expect("observe fails");
    r.and_then(|r| r.kv().map(|kv| kv.value_str().unwrap().to_string())).expect("observe ended")
}

/// etcd's Lock service through etcd-client, callers on different members: the second
/// caller waits until the first unlocks; a caller whose RPC is canceled while it waits
/// leaves no key behind; lease 0 gets a lease of its own; the keys are those of etcd's
/// mutex recipe (`<name>/<lease hex>`, ordered by create revision), so `etcdctl lock` on
/// the same name waits for them too.
#[test]
fn etcd_client_crate_lock() {
    use etcd_client::LockOptions;
    let cluster = start_kv_cluster(3);
    let urls: Vec<String> = (0..3).map(|i| cluster.node(i).client_url()).collect();
    let ep = cluster.endpoint(2);
    runtime().block_on(async {
        let mut a = connect(&urls[0]).await;
        let mut b = connect(&urls[1]).await;
        let la = a.lease_grant(60, None).await.unwrap().id();
        let lb = b.lease_grant(60, None).await.unwrap().id();
        let held = a.lock("mtx", Some(LockOptions::new().with_lease(la))).await.expect("lock a");
        assert_eq!(held.key(), format!("mtx/{la:x}").as_bytes());
        let a_rev = a.get(held.key(), None).await.unwrap().kvs()[0].create_revision();

        let mut b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.lock("mtx", Some(LockOptions::new().with_lease(lb))).await });
        // b's key is in the store, behind a's; b must still be waiting.
        let b_key = format!("mtx/{lb:x}");
        wait_for_key(&mut a, &b_key, true).await;
        let b_rev = a.get(b_key.as_str(), None).await.unwrap().kvs().first().map(|kv| kv.create_revision());
        assert!(b_rev.is_some_and(|r| r > a_rev), "b's key {b_rev:?} after a's {a_rev}");
        assert!(!waiter.is_finished(), "b got the lock while a held it");
        // etcdctl's client-side mutex queues behind both.
        let etcdctl_lock = tokio::task::spawn_blocking(move || etcdctl(&ep, &["lock", "mtx", "echo", "got it"], ""));
        let prefix = || Some(GetOptions::new().with_prefix().with_count_only());
        for _ in 0..500 {
            if a.get("mtx/", prefix()).await.unwrap().count() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(a.get("mtx/", prefix()).await.unwrap().count(), 3, "etcdctl's key never queued");

        a.unlock(held.key()).await.expect("unlock a");
        let got = tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("b waits forever").unwrap().expect("lock b");
        assert_eq!(got.key(), b_key.as_bytes());
        assert!(!etcdctl_lock.is_finished(), "etcdctl got the lock while b held it");
        b.unlock(got.key()).await.expect("unlock b");
        let out = tokio::time::timeout(Duration::from_secs(20), etcdctl_lock).await.expect("etcdctl lock waits forever").unwrap();
        assert_eq!(out.ok(), "got it");

        // A waiter that gives up: its key goes away.
        let held = a.lock("mtx2", Some(LockOptions::new().with_lease(la))).await.expect("lock mtx2");
        let mut b3 = b.clone();
        let waiter = tokio::spawn(async move { b3.lock("mtx2", Some(LockOptions::new().with_lease(lb))).await });
        let gone_key = format!("mtx2/{lb:x}");
        wait_for_key(&mut a, &gone_key, true).await;
        waiter.abort();
        // The canceled Lock's key goes away.
        wait_for_key(&mut a, &gone_key, false).await;
        a.unlock(held.key()).await.unwrap();

        // Lease 0: the key is attached to a fresh lease.
        let own = a.lock("mtx3", None).await.expect("lock without a lease");
        let kv = a.get(own.key(), None).await.unwrap().kvs()[0].clone();
        assert!(kv.lease() != 0 && own.key() == format!("mtx3/{:x}", kv.lease()).as_bytes(), "{kv:?}");
        let ttl = a.lease_time_to_live(kv.lease(), None).await.unwrap();
        assert!(ttl.granted_ttl() == 60 && ttl.ttl() > 0, "{ttl:?}");
    });
}

/// etcd's Election service through etcd-client: campaign, leader, proclaim, observe and
/// resign, callers on different members, and etcd's errors for a leader that is not one
/// and an election without a leader.
#[test]
fn etcd_client_crate_election() {
    use etcd_client::{ProclaimOptions, ResignOptions};
    let cluster = start_kv_cluster(3);
    let urls: Vec<String> = (0..3).map(|i| cluster.node(i).client_url()).collect();
    runtime().block_on(async {
        let mut a = connect(&urls[0]).await;
        let mut b = connect(&urls[1]).await;
        let mut o = connect(&urls[2]).await;
        assert_eq!(grpc_error(o.leader("el").await), ("Unknown".into(), "election: no leader".into()));
        let la = a.lease_grant(60, None).await.unwrap().id();
        let lb = b.lease_grant(60, None).await.unwrap().id();

        let mut observed = o.observe("el").await.expect("observe");
        let won = a.campaign("el", "a1", la).await.expect("campaign a");
        let a_key = won.leader().expect("leader key").clone();
        assert_eq!(a_key.key(), format!("el/{la:x}").as_bytes());
        assert_eq!(next_observed(&mut observed).await, "a1");

        let mut b2 = b.clone();
        let challenger = tokio::spawn(async move { b2.campaign("el", "b1", lb).await });
        a.proclaim("a2", Some(ProclaimOptions::new().with_leader(a_key.clone()))).await.expect("proclaim");
        assert_eq!(next_observed(&mut observed).await, "a2");
        let leader = o.leader("el").await.expect("leader");
        assert_eq!(leader.kv().map(|kv| kv.value().to_vec()), Some(b"a2".to_vec()));
        assert!(!challenger.is_finished(), "b won while a leads");

        a.resign(Some(ResignOptions::new().with_leader(a_key.clone()))).await.expect("resign");
        let b_won = tokio::time::timeout(Duration::from_secs(10), challenger).await.expect("b waits forever").unwrap().expect("campaign b");
        assert_eq!(b_won.leader().unwrap().key(), format!("el/{lb:x}").as_bytes());
        assert_eq!(next_observed(&mut observed).await, "b1");
        // a no longer leads: its proclamation is refused, its resignation changes nothing.
        let stale = a.proclaim("a3", Some(ProclaimOptions::new().with_leader(a_key.clone()))).await;
        assert_eq!(grpc_error(stale), ("Unknown".into(), "election: not leader".into()));
        a.resign(Some(ResignOptions::new().with_leader(a_key))).await.expect("resign again");
        assert_eq!(o.leader("el").await.unwrap().kv().map(|kv| kv.value().to_vec()), Some(b"b1".to_vec()));
    });
}

/// etcd's Cluster.MemberRemove through etcdctl: a follower passes the call to the leader;
/// the removed member stops itself (a follower learns it from the others' answers to its
/// vote requests, the leader from its own configuration); writes go on with the members
/// left, data intact; an unknown id and the last member are refused with etcd's errors.
#[test]
fn member_remove_shrinks_the_cluster() {
    let c = start_kv_cluster(3);
    let leader = c.leader();
    let (f1, f2) = match leader {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let id = |i: usize| u64::from_str_radix(&c.status(i).expect("status").member_id, 16).expect("hex id");
    let (leader_id, f1_id, f2_id) = (id(leader), id(f1), id(f2));
    assert_eq!(etcdctl(&c.endpoint(leader), &["put", "k", "v"], "").ok(), "OK");
    let listed = |i: usize| -> Vec<u64> {
        let out = etcdctl(&c.endpoint(i), &["member", "list", "-w", "json"], "");
        let v: serde_json::Value = serde_json::from_str(out.ok()).expect("member list json");
        let mut ids: Vec<u64> = v["members"].as_array().expect("members").iter().map(|m| m["ID"].as_u64().unwrap()).collect();
        ids.sort();
        ids
    };

    // A follower reaches the leader at the client URL the leader publishes after it starts.
    raftvm_tests::poll_until(Duration::from_secs(20), "every member's client URLs", || {
        let out = etcdctl(&c.endpoint(f1), &["member", "list"], "");
        if out.success() && out.stdout.lines().filter(|l| l.contains(", started, ") && !l.ends_with(", , false")).count() == 3 {
            Ok(())
        } else {
            Err(format!("{out:?}"))
        }
    });
    let unknown = etcdctl(&c.endpoint(f1), &["member", "remove", "1234"], "");
    assert!(unknown.err().contains("etcdserver: member not found"), "{unknown:?}");

    // A follower removed through the other follower. (etcdctl prints ids as `%16x`.)
    let out = etcdctl(&c.endpoint(f1), &["member", "remove", &format!("{f2_id:x}")], "");
    assert!(out.ok().starts_with(&format!("Member {f2_id:16x} removed from cluster")), "{out:?}");
    let st = c.node(f2).wait_exit(Duration::from_secs(30)).expect("the removed follower to stop");
    assert!(!st.success(), "{st}");
    assert!(c.node(f2).log_contents().contains("permanently removed from the cluster"));
    let mut left = vec![leader_id, f1_id];
    left.sort();
    assert_eq!(listed(f1), left);
    assert_eq!(etcdctl(&c.endpoint(f1), &["put", "k2", "v2"], "").ok(), "OK");

    // The leader removed through the follower: the follower goes on alone.
    let out = etcdctl(&c.endpoint(f1), &["member", "remove", &format!("{leader_id:x}")], "");
    assert!(out.ok().starts_with(&format!("Member {leader_id:16x} removed from cluster")), "{out:?}");
    c.node(leader).wait_exit(Duration::from_secs(30)).expect("the removed leader to stop");
    raftvm_tests::poll_until(Duration::from_secs(30), "the last member to take writes", || {
        let out = etcdctl(&c.endpoint(f1), &["put", "k3", "v3"], "");
        if out.success() {
            Ok(())
        } else {
            Err(format!("{out:?}"))
        }
    });
    assert_eq!(listed(f1), vec![f1_id]);
    let last = etcdctl(&c.endpoint(f1), &["member", "remove", &format!("{f1_id:x}")], "");
    assert!(last.err().contains("not enough started members"), "{last:?}");
    let got = etcdctl(&c.endpoint(f1), &["get", "k", "--print-value-only"], "");
    assert_eq!(got.ok(), "v");
}

/// The value of `KEY="VALUE"` in what `etcdctl member add` prints.
fn member_add_var(out: &str, key: &str) -> String {
    let prefix = format!("{key}=\"");
    let line = out.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {key} in {out:?}"));
    line.trim_end_matches('"').to_string()
}

/// Waits until member `i` itself (a serializable read) has `key` = `want`.
fn wait_local_value(c: &raftvm_tests::Cluster, i: usize, key: &str, want: &str, timeout: Duration) {
    raftvm_tests::poll_until(timeout, &format!("{} to have {key}={want}", c.node(i).name), || {
        let out = etcdctl(&c.endpoint(i), &["get", key, "--print-value-only", "--consistency=s"], "");
        if out.success() && out.stdout.trim() == want {
            Ok(())
        } else {
            Err(format!("{out:?}"))
        }
    });
}

/// The id in `Member <hex id> added to cluster <hex id>`.
fn added_id(out: &str) -> u64 {
    out.split_whitespace().nth(1).map(|h| u64::from_str_radix(h, 16).expect("hex id")).expect("an id")
}

/// A learner never asks for votes, so it cannot learn its removal from vote answers as a
/// voter does; it asks its peers while it is a learner. Removed while it runs, and removed
/// while it is down and then restarted, it stops with etcd's message (before, the second
/// sat idle for good).
#[test]
fn removed_learner_stops() {
    let mut c = start_kv_cluster(1);
    let mut start_learner = |name: &str| -> (usize, u64) {
        let n = c.add_node(name);
        let peer = c.node(n).peer_url();
        let out = etcdctl(&c.endpoint(0), &["member", "add", name, "--learner", &format!("--peer-urls={peer}")], "");
        assert!(out.ok().contains(" added to cluster "), "{out:?}");
        c.nodes[n].set_serve_flag("initial-cluster", &member_add_var(out.ok(), "ETCD_INITIAL_CLUSTER"));
        c.restart(n);
        let started = format!(", started, {name}, ");
        raftvm_tests::poll_until(Duration::from_secs(60), "the learner to publish its name", || {
            let out = etcdctl(&c.endpoint(0), &["member", "list"], "");
            if out.stdout.contains(&started) {
                Ok(())
            } else {
                Err(format!("{out:?}"))
            }
        });
        (n, added_id(out.ok()))
    };
    let (running, running_id) = start_learner("l1");
    let (down, down_id) = start_learner("l2");
    let remove = |id: u64| {
        let out = etcdctl(&c.endpoint(0), &["member", "remove", &format!("{id:x}")], "");
        assert!(out.success(), "{out:?}");
    };

    remove(running_id);
    c.stop(down);
    remove(down_id);
    c.restart(down);
    for n in [running, down] {
        let st = c.node(n).wait_exit(Duration::from_secs(60)).expect("the removed learner to stop");
        assert!(!st.success(), "{st}");
        assert!(c.node(n).log_contents().contains("permanently removed from the cluster"));
    }
    assert_eq!(etcdctl(&c.endpoint(0), &["put", "k", "v"], "").ok(), "OK");
}

/// etcd's strict reconfiguration check (on by default): voters that never started may be
/// added while the started ones still make a quorum of the new configuration; the next one
/// is refused with etcd's error and is not added. Learners do not count. Removing a started
/// voter is refused when the started ones left would be too few; removing one that never
/// started is not. (The added members get unreachable peer URLs and never start.)
#[test]
fn strict_reconfig_check_keeps_a_started_quorum() {
    const REFUSED: &str = "etcdserver: re-configuration failed due to not enough started members";
    let c = start_kv_cluster(3);
    let member_list = || etcdctl(&c.endpoint(1), &["member", "list"], "");
    raftvm_tests::poll_until(Duration::from_secs(30), "three started members", || {
        let out = member_list();
        if out.success() && out.stdout.lines().filter(|l| l.contains(", started, ")).count() == 3 {
            Ok(())
        } else {
            Err(format!("{out:?}"))
        }
    });
    let add = |port: u16, learner: bool| {
        let url = format!("--peer-urls=http://127.0.0.1:{port}");
        let name = format!("never{port}");
        let mut args = vec!["member", "add", name.as_str(), url.as_str()];
        if learner {
            args.push("--learner");
        }
        etcdctl(&c.endpoint(0), &args, "")
    };
    // 3 started of 4 voters, then of 5: still a quorum.
    let first = add(1, false);
    assert!(first.ok().contains(" added to cluster "), "{first:?}");
    assert!(add(2, false).ok().contains(" added to cluster "));
    // 3 started of 6 is not.
    let refused = add(3, false);
    assert!(refused.err().contains(REFUSED), "{refused:?}");
    assert!(add(4, true).ok().contains(" added to cluster "), "a learner is not counted");
    let listed = member_list();
    assert_eq!(listed.ok().lines().count(), 6, "{listed:?}");
    assert!(!listed.ok().contains("http://127.0.0.1:3"), "the refused member was added: {listed:?}");

    // 2 started of 4 after removing a started voter: refused; an unstarted one goes.
    let started = c.status(2).expect("status").member_id;
    let out = etcdctl(&c.endpoint(0), &["member", "remove", &started], "");
    assert!(out.err().contains(REFUSED), "{out:?}");
    let out = etcdctl(&c.endpoint(0), &["member", "remove", &format!("{:x}", added_id(first.ok()))], "");
    assert!(out.success(), "{out:?}");
    assert_eq!(member_list().ok().lines().count(), 5);
}

/// etcd's way to replace a member: remove the dead one, `etcdctl member add` a new one,
/// start it with what etcdctl printed and `--initial-cluster-state existing`. The new
/// member asks a peer for the id MemberAdd gave it, catches up through a snapshot (the log
/// behind it is purged), serves reads and writes and is listed with its name and client
/// URL. A learner added the same way is promoted once it is in sync; a peer URL already in
/// use is refused; a member moved to another peer URL (MemberUpdate) is reached there; a
/// member that lost its data dir cannot come back under its old id.
#[test]
fn member_add_replaces_a_member() {
    let mut c = raftvm_tests::Cluster::builder(3).snapshot_count(40).start();
    for i in 0..3 {
        raftvm_tests::etcd::wait_kv_module(&c, i, Duration::from_secs(60));
    }
    for k in 0..100 {
        assert_eq!(etcdctl(&c.endpoint(0), &["put", &format!("k{k:03}"), &format!("v{k}")], "").ok(), "OK");
    }
    // Replace a follower, through the other follower (the call passes to the leader).
    let leader = c.leader();
    let (gone, via) = if leader == 0 { (1, 2) } else { (0, 3 - leader) };
    let gone_id = u64::from_str_radix(&c.status(gone).expect("status").member_id, 16).expect("hex id");
    let out = etcdctl(&c.endpoint(via), &["member", "remove", &format!("{gone_id:x}")], "");
    assert!(out.success(), "{out:?}");
    c.node(gone).wait_exit(Duration::from_secs(30)).expect("the removed member to stop");

    let n4 = c.add_node("n4");
    let n4_peer = c.node(n4).peer_url();
    let out = etcdctl(&c.endpoint(via), &["member", "add", "n4", &format!("--peer-urls={n4_peer}")], "");
    assert!(out.ok().contains(" added to cluster "), "{out:?}");
    let initial_cluster = member_add_var(out.ok(), "ETCD_INITIAL_CLUSTER");
    let n4_id = added_id(out.ok());
    assert_eq!(member_add_var(out.ok(), "ETCD_INITIAL_CLUSTER_STATE"), "existing");
    assert!(initial_cluster.contains(&format!("n4={n4_peer}")), "{initial_cluster}");
    let listed = etcdctl(&c.endpoint(leader), &["member", "list"], "");
    assert!(listed.ok().lines().any(|l| l.contains("unstarted") && l.contains(&n4_peer)), "{listed:?}");
    let dup = etcdctl(&c.endpoint(leader), &["member", "add", "again", &format!("--peer-urls={n4_peer}")], "");
    assert!(dup.err().contains("Peer URLs already exists"), "{dup:?}");

    c.nodes[n4].set_serve_flag("initial-cluster", &initial_cluster);
    c.restart(n4);
    wait_local_value(&c, n4, "k099", "v99", Duration::from_secs(60));
    assert!(c.node(n4).log_contents().contains("installed snapshot"), "n4 caught up without a snapshot");
    let n4_client = c.node(n4).client_url();
    raftvm_tests::poll_until(Duration::from_secs(30), "n4 listed with its name and client URL", || {
        let out = etcdctl(&c.endpoint(n4), &["member", "list"], "");
        let lines = out.stdout.lines().filter(|l| l.contains(", started, ")).count();
        if out.success() && lines == 3 && out.stdout.lines().any(|l| l.contains(", n4, ") && l.contains(&n4_client)) {
            Ok(())
        } else {
            Err(format!("{out:?}"))
        }
    });
    assert_eq!(etcdctl(&c.endpoint(n4), &["put", "from-n4", "x"], "").ok(), "OK");
    assert_eq!(etcdctl(&c.endpoint(leader), &["get", "from-n4", "--print-value-only"], "").ok(), "x");

    // A learner: added, started, promoted once in sync.
    let n5 = c.add_node("n5");
    let n5_peer = c.node(n5).peer_url();
    let out = etcdctl(&c.endpoint(n4), &["member", "add", "n5", "--learner", &format!("--peer-urls={n5_peer}")], "");
    assert!(out.ok().contains(" added to cluster "), "{out:?}");
    let n5_id = added_id(out.ok());
    c.nodes[n5].set_serve_flag("initial-cluster", &member_add_var(out.ok(), "ETCD_INITIAL_CLUSTER"));
    c.restart(n5);
    raftvm_tests::poll_until(Duration::from_secs(60), "the learner to be promoted", || {
        let out = etcdctl(&c.endpoint(leader), &["member", "promote", &format!("{n5_id:x}")], "");
        if out.success() {
            Ok(())
        } else if out.err().contains("in sync with leader") {
            Err(format!("{out:?}"))
        } else {
            panic!("promote failed: {out:?}")
        }
    });
    let again = etcdctl(&c.endpoint(leader), &["member", "promote", &format!("{n5_id:x}")], "");
    assert!(again.err().contains("can only promote a learner member"), "{again:?}");
    let out = etcdctl(&c.endpoint(n5), &["member", "list", "-w", "json"], "");
    let v: serde_json::Value = serde_json::from_str(out.ok()).expect("member list json");
    let members = v["members"].as_array().expect("members");
    assert_eq!(members.len(), 4, "{v}");
    assert!(members.iter().all(|m| m.get("isLearner").is_none_or(|l| l == false)), "{v}");
    assert_eq!(etcdctl(&c.endpoint(n5), &["put", "from-n5", "y"], "").ok(), "OK");
    c.assert_converged(Duration::from_secs(30));

    // n4 moves to another peer port (MemberUpdate while it is down); the others reach it
    // there and it catches up with a write made meanwhile.
    c.stop(n4);
    let moved = format!("http://{}:{}", c.node(n4).host, raftvm_tests::free_ports(c.node(n4).host, 1)[0]);
    let out = etcdctl(&c.endpoint(leader), &["member", "update", &format!("{n4_id:x}"), &format!("--peer-urls={moved}")], "");
    assert!(out.ok().contains("updated in cluster"), "{out:?}");
    assert_eq!(etcdctl(&c.endpoint(leader), &["put", "while-moving", "z"], "").ok(), "OK");
    let ic = c.node(n4).serve_flag("initial-cluster").expect("initial cluster").replace(&n4_peer, &moved);
    for (flag, value) in [("listen-peer-urls", &moved), ("initial-advertise-peer-urls", &moved), ("initial-cluster", &ic)] {
        c.nodes[n4].set_serve_flag(flag, value);
    }
    c.restart(n4);
    wait_local_value(&c, n4, "while-moving", "z", Duration::from_secs(30));
    c.assert_converged(Duration::from_secs(30));

    // n4 loses its data dir: it may not come back under its old id.
    c.stop(n4);
    std::fs::remove_dir_all(&c.node(n4).data_dir).expect("remove n4's data dir");
    c.restart(n4);
    let st = c.node(n4).wait_exit(Duration::from_secs(30)).expect("n4 to refuse to start");
    assert!(!st.success(), "{st}");
    assert!(c.node(n4).log_contents().contains("has already been bootstrapped"), "{}", c.node(n4).log_tail(20));
}
