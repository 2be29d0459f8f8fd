//! `raftvm bench` against a real etcd 3.4 and against a 1-node raftvm cluster: every
//! workload with small totals, asserting on the `--json` report and, through etcdctl, on
//! what the run left in the key space (keys are `raftvm-bench/` + the zero-padded decimal
//! key index, `--key-size` digits).

use raftvm_tests::etcd::{all_endpoints, etcdctl, start_kv_cluster, EtcdServer};
use raftvm_tests::{free_ports, poll_until, private_loopback, run_raftvm, CmdOutput};
use serde_json::Value;

/// Small runs: 4 clients over 2 connections.
const SMALL: &[&str] = &["--total", "200", "--clients", "4", "--conns", "2"];

fn bench(endpoint: &str, workload: &str, args: &[&str]) -> CmdOutput {
    let mut all = vec!["bench", workload, "--endpoints", endpoint, "--json", "--command-timeout", "10s"];
    all.extend_from_slice(args);
    run_raftvm(&all)
}

/// Runs a bench that must succeed; returns its report after checking the JSON schema.
#[track_caller]
fn bench_json(endpoint: &str, workload: &str, args: &[&str]) -> Value {
    let out = bench(endpoint, workload, args);
    let text = out.ok();
    assert_eq!(text.lines().count(), 1, "--json must print exactly one line: {out:?}");
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {out:?}"));
    assert_schema(&v);
    assert_eq!(v["workload"], workload, "{v}");
    v
}

#[track_caller]
fn assert_schema(v: &Value) {
    let o = v.as_object().unwrap_or_else(|| panic!("not an object: {v}"));
    for k in ["workload", "consistency"] {
        assert!(o.get(k).is_some_and(Value::is_string), "{k} missing or not a string: {v}");
    }
    assert!(o["endpoints"].as_array().is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string)), "{v}");
    for k in ["clients", "conns", "key_size", "val_size", "key_space", "total", "ok", "errors", "cas_failed"] {
        assert!(o.get(k).is_some_and(Value::is_u64), "{k} missing or not an unsigned integer: {v}");
    }
    for k in ["duration_s", "ops_per_sec"] {
        assert!(o.get(k).is_some_and(Value::is_number), "{k} missing or not a number: {v}");
    }
    let lat = o["latency_ms"].as_object().unwrap_or_else(|| panic!("latency_ms: {v}"));
    for k in ["p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(lat.get(k).is_some_and(Value::is_number), "latency_ms.{k} missing: {v}");
    }
    let msgs = o["error_messages"].as_object().unwrap_or_else(|| panic!("error_messages: {v}"));
    assert!(msgs.values().all(Value::is_u64), "{v}");
    assert_eq!(msgs.values().map(|n| n.as_u64().unwrap()).sum::<u64>(), o["errors"].as_u64().unwrap(), "{v}");
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

fn lat(v: &Value, k: &str) -> f64 {
    v["latency_ms"][k].as_f64().unwrap_or_else(|| panic!("latency_ms.{k} in {v}"))
}

/// Every operation succeeded, and the numbers are consistent with each other.
#[track_caller]
fn assert_all_ok(v: &Value, total: u64) {
    assert_eq!((num(v, "total"), num(v, "ok"), num(v, "errors")), (total, total, 0), "{v}");
    assert_eq!(v["error_messages"], serde_json::json!({}), "{v}");
    assert_sane_numbers(v);
}

#[track_caller]
fn assert_sane_numbers(v: &Value) {
    let (p50, p99, max, mean) = (lat(v, "p50"), lat(v, "p99"), lat(v, "max"), lat(v, "mean"));
    assert!(0.0 < p50 && p50 <= lat(v, "p90") && lat(v, "p90") <= p99 && p99 <= lat(v, "p999"), "{v}");
    assert!(lat(v, "p999") <= max && 0.0 < mean && mean <= max, "{v}");
    let d = v["duration_s"].as_f64().unwrap();
    assert!(d > 0.0, "{v}");
    let ok = num(v, "ok") as f64;
    let ops = v["ops_per_sec"].as_f64().unwrap();
    // duration_s is rounded to milliseconds in the report (ops_per_sec to 0.1), so the true
    // duration lies within half a millisecond of it: short runs need that whole margin.
    let (lo, hi) = (ok / (d + 0.0005), if d > 0.0005 { ok / (d - 0.0005) } else { f64::INFINITY });
    assert!(lo - 1.0 <= ops && ops <= hi + 1.0, "ops_per_sec {ops} is not ok / duration_s ({lo}..{hi}): {v}");
}

/// Number of keys under `prefix` (etcdctl 3.4 has no `--count-only`: the JSON `count` is
/// the number of keys in the range before `--limit`).
fn count_prefix(endpoint: &str, prefix: &str) -> u64 {
    let out = etcdctl(endpoint, &["get", "--prefix", prefix, "--keys-only", "--limit", "1", "-w", "json"], "");
    let v: Value = serde_json::from_str(out.ok()).unwrap_or_else(|e| panic!("etcdctl JSON ({e}): {out:?}"));
    v["count"].as_u64().unwrap_or(0)
}

/// `etcdctl get KEY -w json`: the key's first KeyValue.
fn get_kv(endpoint: &str, key: &str) -> Value {
    let out = etcdctl(endpoint, &["get", key, "-w", "json"], "");
    let v: Value = serde_json::from_str(out.ok()).unwrap_or_else(|e| panic!("etcdctl JSON ({e}): {out:?}"));
    v["kvs"][0].clone()
}

// ---------------------------------------------------------------------------
// Against etcd 3.4
// ---------------------------------------------------------------------------

#[test]
fn etcd_put_writes_the_documented_keys() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let v = bench_json(&ep, "put", &["--total", "50", "--sequential-keys", "--key-space", "50", "--clients", "4", "--conns", "2"]);
    assert_all_ok(&v, 50);
    assert_eq!((num(&v, "clients"), num(&v, "conns"), num(&v, "key_space")), (4, 2, 50), "{v}");
    assert_eq!(v["key_prefix"], "raftvm-bench/", "{v}");
    assert_eq!(count_prefix(&ep, "raftvm-bench/"), 50);
    // Key 49 of key size 8: the prefix and "00000049"; the value has --val-size bytes.
    let kv = get_kv(&ep, "raftvm-bench/00000049");
    assert_eq!(kv["version"], 1, "{kv}");
    assert_eq!(kv["value"].as_str().map(str::len), Some(12), "8 bytes are 12 in base64: {kv}");

    // 16 clients over 3 connections, 256-byte values, random keys in a large key space.
    let v = bench_json(&ep, "put", &["--total", "300", "--clients", "16", "--conns", "3", "--val-size", "256", "--key-space", "1000000"]);
    assert_all_ok(&v, 300);
    let written = count_prefix(&ep, "raftvm-bench/") - 50;
    assert!((250..=300).contains(&written), "300 random puts over 10^6 keys wrote {written} new keys");
}

#[test]
fn etcd_put_for_a_duration_the_human_table_and_a_total_failure() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let v = bench_json(&ep, "put", &["--duration", "500ms", "--total", "1", "--clients", "2"]);
    // --duration wins over --total.
    assert!(num(&v, "total") > 1, "{v}");
    assert_all_ok(&v, num(&v, "total"));
    assert!(v["duration_s"].as_f64().unwrap() >= 0.5, "{v}");

    let out = run_raftvm(&["bench", "put", "--endpoints", &ep, "--total", "20"]);
    let table = out.ok();
    for row in ["workload", "total", "ok", "errors", "duration", "throughput", "latency-ms", "p99.9"] {
        assert!(table.contains(row), "no {row} in the table: {out:?}");
    }
    assert!(out.stderr.is_empty(), "no progress bar when stderr is not a terminal: {out:?}");

    // Values over etcd's 1.5 MiB request limit: every put fails. The report is still
    // printed, and the exit status says that nothing succeeded.
    let out = bench(&ep, "put", &["--total", "3", "--val-size", "2000000"]);
    assert!(out.err().contains("all 3 operations failed"), "{out:?}");
    let v: Value = serde_json::from_str(out.out()).unwrap_or_else(|e| panic!("bad JSON ({e}): {out:?}"));
    assert_schema(&v);
    assert_eq!((num(&v, "total"), num(&v, "ok"), num(&v, "errors")), (3, 0, 3), "{v}");
    let msgs = v["error_messages"].as_object().unwrap();
    assert!(msgs.keys().any(|m| m.contains("too large")), "{v}");
}

#[test]
fn etcd_range_with_both_consistencies() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    for c in ["l", "s"] {
        let mut args = SMALL.to_vec();
        args.extend(["--prefill", "--key-space", "100", "--consistency", c]);
        let v = bench_json(&ep, "range", &args);
        assert_all_ok(&v, 200);
        assert_eq!(v["consistency"], c, "{v}");
    }
    assert_eq!(count_prefix(&ep, "raftvm-bench/"), 100, "--prefill puts every key of the key space");
}

#[test]
fn etcd_txn_put_tracks_mod_revisions() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    // One client, fresh keys: the first compare per key is against 0 (absent), every later
    // one against the revision of the client's own last put: no compare fails.
    let v = bench_json(
        &ep,
        "txn-put",
        &["--total", "100", "--sequential-keys", "--key-space", "10", "--key-prefix", "cas/"],
    );
    assert_all_ok(&v, 100);
    assert_eq!(num(&v, "cas_failed"), 0, "{v}");
    assert_eq!(get_kv(&ep, "cas/00000003")["version"], 10, "each of the 10 keys is put 10 times");

    // Prefilled keys are unknown to every client: first compares fail (and count as ok),
    // then the client knows the revision from the failure branch's range.
    let mut args = SMALL.to_vec();
    args.extend(["--prefill", "--key-space", "10"]);
    let v = bench_json(&ep, "txn-put", &args);
    assert_all_ok(&v, 200);
    let failed = num(&v, "cas_failed");
    assert!(failed > 0 && failed < 200, "{v}");
    let versions: u64 = (0..10).map(|i| get_kv(&ep, &format!("raftvm-bench/{i:08}"))["version"].as_u64().unwrap()).sum();
    assert_eq!(versions, 10 + (200 - failed), "prefill puts plus one put per successful compare");
}

#[test]
fn etcd_delete_removes_the_keys() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let mut args = SMALL.to_vec();
    args.extend(["--prefill", "--key-space", "20", "--sequential-keys"]);
    let v = bench_json(&ep, "delete", &args);
    assert_all_ok(&v, 200);
    assert_eq!(count_prefix(&ep, "raftvm-bench/"), 0);
}

#[test]
fn etcd_watch_counts_every_delivery() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let v = bench_json(&ep, "watch", &["--total", "200", "--clients", "2", "--watchers", "4", "--conns", "2"]);
    // total = puts; ok = deliveries: every put seen by each of the 4 watchers.
    assert_eq!((num(&v, "total"), num(&v, "ok"), num(&v, "errors")), (200, 800, 0), "{v}");
    assert_eq!((num(&v, "watchers"), num(&v, "puts_ok"), num(&v, "deliveries_expected")), (4, 200, 800), "{v}");
    assert_sane_numbers(&v);

    // --watchers defaults to --clients.
    let v = bench_json(&ep, "watch", SMALL);
    assert_eq!((num(&v, "total"), num(&v, "ok"), num(&v, "errors"), num(&v, "watchers")), (200, 800, 0, 4), "{v}");
}

#[test]
fn etcd_lease_keepalive_revokes_its_leases() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let v = bench_json(&ep, "lease-keepalive", SMALL);
    assert_all_ok(&v, 200);
    assert_eq!(v["revoke_failed"], 0, "{v}");
    let out = etcdctl(&ep, &["lease", "list"], "");
    assert!(out.ok().contains("found 0 leases"), "{out:?}");
}

#[test]
fn an_unreachable_endpoint_fails_without_a_report() {
    let host = private_loopback();
    let port = free_ports(host, 1)[0];
    let out = run_raftvm(&["bench", "put", "--endpoints", &format!("{host}:{port}"), "--json", "--dial-timeout", "1s"]);
    let err = out.err();
    assert!(err.contains("connecting to"), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

// ---------------------------------------------------------------------------
// Against raftvm
// ---------------------------------------------------------------------------

#[test]
fn raftvm_kv_workloads() {
    let c = start_kv_cluster(1);
    let ep = c.endpoint(0);

    let v = bench_json(&ep, "put", &["--total", "50", "--sequential-keys", "--key-space", "50", "--clients", "4", "--conns", "2"]);
    assert_all_ok(&v, 50);
    assert_eq!(count_prefix(&ep, "raftvm-bench/"), 50);

    let v = bench_json(&ep, "put", SMALL);
    assert_all_ok(&v, 200);
    for consistency in ["l", "s"] {
        let mut args = SMALL.to_vec();
        args.extend(["--consistency", consistency]);
        let v = bench_json(&ep, "range", &args);
        assert_all_ok(&v, 200);
        assert_eq!(v["consistency"], consistency, "{v}");
    }
    let mut args = SMALL.to_vec();
    args.extend(["--prefill", "--key-space", "10", "--key-prefix", "cas/"]);
    let v = bench_json(&ep, "txn-put", &args);
    assert_all_ok(&v, 200);
    let failed = num(&v, "cas_failed");
    assert!(failed > 0 && failed < 200, "{v}");

    let mut args = SMALL.to_vec();
    args.extend(["--key-space", "50", "--sequential-keys"]);
    let v = bench_json(&ep, "delete", &args);
    assert_all_ok(&v, 200);
    assert_eq!(count_prefix(&ep, "raftvm-bench/"), 0);
}

#[test]
fn concurrent_puts_through_every_member_apply_exactly_once_everywhere() {
    // Many clients through all three members at once: followers forward, the leader
    // batches concurrent commands into shared log entries. Every put must land once: the
    // revision of a fresh store after N puts is 1 + N, on every member, and the replicas
    // end up identical.
    let c = start_kv_cluster(3);
    let n = 3000u64;
    let total = n.to_string();
    let args = ["--total", &total, "--key-space", &total, "--sequential-keys", "--clients", "48", "--conns", "6"];
    let v = bench_json(&all_endpoints(&c), "put", &args);
    assert_all_ok(&v, n);
    for i in 0..3 {
        let ep = c.endpoint(i);
        assert_eq!(count_prefix(&ep, "raftvm-bench/"), n, "member {i}");
        let out = etcdctl(&ep, &["get", "raftvm-bench/", "--prefix", "--limit", "1", "-w", "json"], "");
        let r: Value = serde_json::from_str(out.ok()).expect("etcdctl JSON");
        assert_eq!(r["header"]["revision"].as_u64(), Some(1 + n), "member {i}: {r}");
    }
    poll_until(std::time::Duration::from_secs(20), "equal state hashes on every member", || {
        let h: Vec<_> = (0..3).map(|i| c.hash(i)).collect::<Result<_, _>>()?;
        if h.iter().all(|x| x.applied_index == h[0].applied_index && x.store_hash == h[0].store_hash) {
            Ok(())
        } else {
            Err(format!("{h:?}"))
        }
    });
}

#[test]
fn raftvm_lease_keepalive_and_watch_work() {
    let c = start_kv_cluster(1);
    let ep = c.endpoint(0);
    let v = bench_json(&ep, "lease-keepalive", SMALL);
    assert_all_ok(&v, 200);
    let leases = etcdctl(&ep, &["lease", "list"], "");
    assert!(leases.ok().starts_with("found 0 leases"), "the bench left leases behind: {leases:?}");
    // What etcd_watch_counts_every_delivery asserts of etcd.
    let v = bench_json(&ep, "watch", &["--total", "200", "--clients", "2", "--watchers", "4", "--conns", "2"]);
    assert_eq!((num(&v, "total"), num(&v, "ok"), num(&v, "errors")), (200, 800, 0), "{v}");
    assert_eq!((num(&v, "watchers"), num(&v, "puts_ok"), num(&v, "deliveries_expected")), (4, 200, 800), "{v}");
    assert_sane_numbers(&v);
}
