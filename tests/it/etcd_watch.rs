//! etcd's Watch service on raftvm, compared with a real etcd 3.4:
//! * `etcdctl watch` (simple, `-w json`, `-w fields`, `--hex`, an exec command): history
//!   replays with `--rev`, live events from puts, deletes and txns, `--prefix`, ranges,
//!   `--prev-kv`, future start revisions, watches without `--rev` (made ready with marker
//!   writes), and watches from a compacted revision;
//! * `etcdctl watch -i` (several watches on one stream, fed through stdin);
//! * the Rust `etcd-client` crate: every response of a watch stream (created, events,
//!   cancel, progress, filters, manual and duplicate watch ids, empty ranges, compaction);
//! * raftvm only: a watch on a follower (and one on the leader, which is then killed -9)
//!   sees every revision once, in order, while writes go on through a survivor.
//!
//! The differential tests run the same script against etcd and against a 3-node raftvm
//! cluster (watchers on one member, writes rotating over the members). Both start at
//! revision 1 and see the same writes, so revisions must agree. Only ids that legitimately
//! differ are normalised: cluster_id, member_id and raft_term (non-zero: "<nonzero>").
//! Each script step is checked against etcd first: a step etcd does not pass is a script
//! error (panic), a step raftvm does not pass is a difference (reported at the end).
//! `ETCD_DIFF_VERBOSE=1` prints every step with etcd's output; `ETCD_DIFF_REFERENCE_ONLY=1`
//! runs the differential scripts against etcd alone (to check a script).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, LeaseGrantOptions, PutOptions, Txn, TxnOp, WatchFilterType,
    WatchOptions, WatchResponse, WatchStream,
};
use raftvm_tests::etcd::{etcdctl, etcdctl_stderr_lines, normalize_etcdctl_line, start_kv_cluster, EtcdServer, EtcdctlProcess};
use raftvm_tests::{poll_until, CmdOutput};
use serde_json::Value;

/// How long a watcher may take to print what a step expects.
const WAIT: Duration = Duration::from_secs(10);

fn verbose() -> bool {
    std::env::var_os("ETCD_DIFF_VERBOSE").is_some_and(|v| !v.is_empty())
}

// ---------------------------------------------------------------------------
// Transcripts and their comparison
// ---------------------------------------------------------------------------

/// One server under test: a real etcd (the reference) or a raftvm cluster.
struct Target {
    name: String,
    endpoints: Vec<String>,
    /// The real etcd: whatever it does not do as the script expects is a script error.
    reference: bool,
    /// (step, what was observed), compared step by step between the two servers.
    transcript: Vec<(String, String)>,
    /// Where raftvm did not do what the script expects (of etcd), as it happened.
    troubles: Vec<String>,
    /// Rotates writes over the endpoints.
    writes: usize,
}

impl Target {
    fn new(name: &str, endpoints: Vec<String>, reference: bool) -> Target {
        Target { name: name.to_string(), endpoints, reference, transcript: Vec::new(), troubles: Vec::new(), writes: 0 }
    }

    /// Endpoint for the `i`-th watcher of a step.
    fn watch_endpoint(&self, i: usize) -> String {
        self.endpoints[i % self.endpoints.len()].clone()
    }

    /// A linearizable read through every endpoint: each member has then applied every
    /// write acknowledged so far (writes go through other members than watches; a member
    /// that has not applied a compaction yet would still replay history from below it).
    fn sync_members(&self) {
        for ep in &self.endpoints {
            let out = etcdctl(ep, &["get", "--consistency=l", "sync"], "");
            assert!(out.success(), "linearizable read through {ep}: {out:?}");
        }
    }

    fn next_write_endpoint(&mut self) -> String {
        self.writes += 1;
        self.endpoints[self.writes % self.endpoints.len()].clone()
    }

    fn record(&mut self, step: impl Into<String>, observed: impl Into<String>) {
        let (step, observed) = (step.into(), observed.into());
        if verbose() {
            eprintln!("--- [{}] {step}\n{observed}", self.name);
        }
        self.transcript.push((step, observed));
    }

    /// A script step went wrong: on etcd the script is wrong (panic); on raftvm it is a
    /// difference, listed in the report (the transcript shows its effect).
    #[track_caller]
    fn trouble(&mut self, step: &str, what: String) {
        assert!(!self.reference, "script error: etcd does not do what the script expects at {step}: {what}");
        if verbose() {
            eprintln!("--- [{}] TROUBLE at {step}: {what}", self.name);
        }
        self.troubles.push(format!("at {step}: {what}"));
    }

    /// `etcdctl ARGS` (stdin fed) through the next endpoint, recorded; `ok` is whether it
    /// must succeed (checked against etcd).
    fn ctl(&mut self, ok: bool, args: &[&str], stdin: &str) -> CmdOutput {
        let ep = self.next_write_endpoint();
        let out = etcdctl(&ep, args, stdin);
        if self.reference {
            assert_eq!(out.success(), ok, "script error: unexpected result from etcd: {out:?}");
        }
        let step = format!(
            "etcdctl {}{}",
            args.join(" "),
            if stdin.is_empty() { String::new() } else { format!(" <<< {stdin:?}") }
        );
        self.record(step, render(&comparable(&out, 0)));
        out
    }

    /// `etcdctl ARGS` through the next endpoint, not recorded (its effect differs
    /// legitimately, e.g. how many readiness markers were needed); must succeed.
    fn ctl_quiet(&mut self, args: &[&str]) -> Result<CmdOutput, String> {
        let ep = self.next_write_endpoint();
        let out = etcdctl(&ep, args, "");
        if out.success() {
            Ok(out)
        } else {
            Err(format!("{out:?}"))
        }
    }
}

/// Compares two transcripts step by step; `Err` lists every differing step.
fn compare(e: &Target, r: &Target) -> Result<(), String> {
    let mut diffs = Vec::new();
    let n = e.transcript.len().max(r.transcript.len());
    for i in 0..n {
        match (e.transcript.get(i), r.transcript.get(i)) {
            (Some(a), Some(b)) if a == b => {}
            (a, b) => diffs.push(format!(
                "#{i} {}\n  etcd:\n{}\n  {}:\n{}",
                a.or(b).map(|s| s.0.as_str()).unwrap_or("?"),
                indent(a),
                r.name,
                indent(b)
            )),
        }
    }
    if diffs.is_empty() && r.troubles.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} steps differ between etcd and {} (the first is the one to look at):\n{}\n\n\
             {} did not do what etcd does {} times, in this order:\n{}",
            diffs.len(),
            n,
            r.name,
            diffs.join("\n\n"),
            r.name,
            r.troubles.len(),
            r.troubles.join("\n")
        ))
    }
}

fn indent(s: Option<&(String, String)>) -> String {
    match s {
        None => "    (no such step)".into(),
        Some((_, obs)) => obs.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"),
    }
}

/// Exit code, stdout from line `skip` on (ids normalised), stderr without the client
/// library's log lines.
fn comparable(out: &CmdOutput, skip: usize) -> (Option<i32>, Vec<String>, Vec<String>) {
    let stdout = out.stdout.lines().skip(skip).map(normalize_etcdctl_line).collect();
    let stderr = etcdctl_stderr_lines(&out.stderr).map(str::to_string).collect();
    (out.code, stdout, stderr)
}

fn render((code, out, err): &(Option<i32>, Vec<String>, Vec<String>)) -> String {
    let mut s = format!("exit {code:?}\n");
    for l in out {
        s.push_str(&format!("out| {l}\n"));
    }
    for l in err {
        s.push_str(&format!("err| {l}\n"));
    }
    s
}

/// Runs `script` against a real etcd and against a 3-node raftvm cluster, then compares.
fn differential(script: fn(&mut Target)) {
    let etcd = EtcdServer::start();
    let mut e = Target::new("etcd", vec![etcd.endpoint()], true);
    if std::env::var_os("ETCD_DIFF_REFERENCE_ONLY").is_some_and(|v| !v.is_empty()) {
        script(&mut e);
        eprintln!("ETCD_DIFF_REFERENCE_ONLY: the script passes on etcd; raftvm not tested");
        return;
    }
    let cluster = start_kv_cluster(3);
    script(&mut e);
    let mut r = Target::new("raftvm", (0..3).map(|i| cluster.endpoint(i)).collect(), false);
    script(&mut r);
    let converged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cluster.assert_converged(WAIT * 2)));
    // The report says everything: shut the servers down before failing, so their
    // (large) files are not kept as they would be after a crash or a timeout.
    drop(cluster);
    drop(etcd);
    let res = compare(&e, &r);
    if let Err(p) = converged {
        std::panic::resume_unwind(p);
    }
    if let Err(report) = res {
        panic!("{report}");
    }
}

// ---------------------------------------------------------------------------
// etcdctl watch
// ---------------------------------------------------------------------------

/// How a watcher prints events, i.e. how to count them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fmt {
    /// Simple (and `--hex`): a `PUT` / `DELETE` line per event.
    Simple,
    /// `-w json`: a line per response, events in `Events`.
    Json,
    /// `-w fields`: a `"Type" : ...` line per event.
    Fields,
    /// With an exec command that prints a line starting `exec ` per event.
    Exec,
}

fn count_events(fmt: Fmt, lines: &[String]) -> usize {
    match fmt {
        Fmt::Simple => lines.iter().filter(|l| *l == "PUT" || *l == "DELETE").count(),
        Fmt::Json => lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["Events"].as_array().map_or(0, Vec::len))
            .sum(),
        Fmt::Fields => lines.iter().filter(|l| l.starts_with("\"Type\" : ")).count(),
        Fmt::Exec => lines.iter().filter(|l| l.starts_with("exec ")).count(),
    }
}

/// A running `etcdctl watch` and how many events it must have printed so far.
struct Watcher {
    label: String,
    fmt: Fmt,
    proc: EtcdctlProcess,
    /// stdout lines before this one are readiness markers, not compared.
    cut: usize,
    expected: usize,
    /// Set (on raftvm) once it missed a step: later waits are skipped.
    failed: bool,
}

impl Watcher {
    fn start(t: &Target, i: usize, fmt: Fmt, args: &[&str]) -> Watcher {
        let proc = EtcdctlProcess::spawn(&t.watch_endpoint(i), args);
        Watcher { label: format!("etcdctl {}", args.join(" ")), fmt, proc, cut: 0, expected: 0, failed: false }
    }

    fn count(&self) -> usize {
        count_events(self.fmt, &self.proc.stdout_lines()[self.cut..])
    }

    /// Expects `more` events; waits until they are printed.
    fn expect(&mut self, t: &mut Target, more: usize, after: &str) {
        self.expected += more;
        if self.failed || more == 0 {
            return;
        }
        let (fmt, cut, n) = (self.fmt, self.cut, self.expected);
        if let Err(e) = self.proc.wait_stdout(WAIT, |l| count_events(fmt, &l[cut..]) >= n) {
            self.failed = true;
            t.trouble(&self.label, format!("expected {n} events after {after}; {e}"));
        }
    }

    /// Kills it and records what it printed (after the readiness markers).
    fn finish(self, t: &mut Target) {
        let n = self.count();
        if n != self.expected {
            t.trouble(&self.label, format!("printed {n} events, expected {}: {:?}", self.expected, self.proc));
        }
        let out = self.proc.finish();
        t.record(format!("{} (killed)", self.label), render(&comparable(&out, self.cut)));
    }
}

/// Tiny base64 (standard alphabet, padded): how `-w json` shows keys and values.
fn b64(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A watch without `--rev` starts at "now", whenever etcdctl gets there: put markers on
/// `marker_key` (in its range) until it prints one, and cut its output after the last
/// marker written. Returns how many markers were written.
fn make_ready(t: &mut Target, w: &mut Watcher, marker_key: &str) -> usize {
    let waits = [200u64, 500, 1000, 2000, 3000, 5000, 5000];
    for (m, ms) in waits.iter().enumerate().map(|(i, ms)| (i + 1, ms)) {
        let value = format!("ready-{m}");
        if let Err(e) = t.ctl_quiet(&["put", marker_key, &value]) {
            t.trouble(&w.label, format!("marker put failed: {e}"));
            w.failed = true;
            return m;
        }
        let (fmt, needle) = (w.fmt, if w.fmt == Fmt::Json { b64(&value) } else { value.clone() });
        let seen = w.proc.wait_stdout(Duration::from_millis(*ms), |lines| {
            lines.iter().any(|l| if fmt == Fmt::Json { l.contains(&format!("\"{needle}\"")) } else { *l == needle })
        });
        if seen.is_ok() {
            let lines = w.proc.stdout_lines();
            let last = lines
                .iter()
                .rposition(|l| if fmt == Fmt::Json { l.contains(&format!("\"{needle}\"")) } else { *l == needle })
                .expect("marker line");
            w.cut = last + 1;
            return m;
        }
        if w.proc.output_ended() {
            break;
        }
    }
    t.trouble(&w.label, format!("never printed a readiness marker: {:?}", w.proc));
    w.failed = true;
    waits.len()
}

/// The write `args` (recorded), then every watcher in `ws` must print `events[i]` more.
fn live(t: &mut Target, ws: &mut [Watcher], args: &[&str], stdin: &str, events: &[usize]) {
    assert_eq!(ws.len(), events.len(), "script error: one event count per watcher");
    t.ctl(true, args, stdin);
    let after = format!("etcdctl {}", args.join(" "));
    for (w, n) in ws.iter_mut().zip(events) {
        w.expect(t, *n, &after);
    }
}

const EXEC: &str =
    "echo \"exec rev=$ETCD_WATCH_REVISION type=$ETCD_WATCH_EVENT_TYPE key=$ETCD_WATCH_KEY value=$ETCD_WATCH_VALUE\"";

/// The `etcdctl watch` script (revisions as they are on a fresh server).
fn etcdctl_watch_script(t: &mut Target) {
    // --- history ---
    t.ctl(true, &["put", "w/k", "v1"], ""); // 2
    t.ctl(true, &["put", "w/k", "v2"], ""); // 3
    t.ctl(true, &["put", "w/p/a", "a1"], ""); // 4
    t.ctl(true, &["txn", "-i"], "\nput w/p/b b1\nput w/k v3\ndel w/p/a\n\n\n"); // 5
    t.ctl(true, &["del", "w/k"], ""); // 6
    t.ctl(true, &["put", "w/k", "v4"], ""); // 7
    t.ctl(true, &["del", "w/p/", "--prefix"], ""); // 8 (w/p/b)
    t.ctl(true, &["put", "w/p/c", "c1"], ""); // 9
    t.ctl(true, &["put", "w/pz", "z"], ""); // 10

    // --- replays from a revision, then live events ---
    // (format, args, events in history)
    let specs: Vec<(Fmt, Vec<&str>, usize)> = vec![
        (Fmt::Simple, vec!["watch", "--rev", "2", "w/k"], 5),
        (Fmt::Json, vec!["watch", "--rev", "2", "w/k", "-w", "json"], 5),
        (Fmt::Simple, vec!["watch", "--rev", "1", "--prefix", "w/p/", "--prev-kv"], 5),
        (Fmt::Json, vec!["watch", "--rev", "1", "--prefix", "w/p/", "--prev-kv", "-w", "json"], 5),
        (Fmt::Json, vec!["watch", "--rev", "3", "w/k", "--prev-kv", "-w", "json"], 4),
        // [w/k, w/p/b): w/k and w/p/a.
        (Fmt::Json, vec!["watch", "--rev", "4", "w/k", "w/p/b", "-w", "json"], 5),
        (Fmt::Fields, vec!["watch", "--rev", "5", "--prefix", "w/", "-w", "fields"], 8),
        (Fmt::Simple, vec!["watch", "--rev", "5", "w/k", "--hex"], 3),
        (Fmt::Exec, vec!["watch", "--rev", "2", "w/k", "--", "sh", "-c", EXEC], 5),
        (Fmt::Json, vec!["watch", "--rev", "1", "--prefix", "", "-w", "json"], 11),
        // The next revision, and one further on.
        (Fmt::Json, vec!["watch", "--rev", "11", "w/k", "-w", "json"], 0),
        (Fmt::Json, vec!["watch", "--rev", "13", "w/k", "--prev-kv", "-w", "json"], 0),
    ];
    let mut ws: Vec<Watcher> = specs.iter().enumerate().map(|(i, (f, a, _))| Watcher::start(t, i, *f, a)).collect();
    for (w, (_, _, n)) in ws.iter_mut().zip(&specs) {
        w.expect(t, *n, "the history");
    }
    //                                                     k  k  p  p  k  r  f  h  x  a  11 13
    live(t, &mut ws, &["put", "w/k", "live1"], "", &[1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]); // 11
    live(t, &mut ws, &["put", "w/p/b", "live2"], "", &[0, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0]); // 12
    let txn = "\nput w/k live3\ndel w/p/b\nput w/p/a live3a\n\n\n";
    live(t, &mut ws, &["txn", "-i"], txn, &[1, 1, 2, 2, 1, 2, 3, 1, 1, 3, 1, 1]); // 13
    let del = ["del", "w/", "--prefix", "--prev-kv"]; // w/k, w/p/a, w/p/c, w/pz
    live(t, &mut ws, &del, "", &[1, 1, 2, 2, 1, 2, 4, 1, 1, 4, 1, 1]); // 14
    live(t, &mut ws, &["put", "w/k", "last"], "", &[1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]); // 15
    for w in ws {
        w.finish(t);
    }

    // --- watches from "now" (no --rev) ---
    let mut ws = vec![
        Watcher::start(t, 0, Fmt::Simple, &["watch", "n/k"]),
        Watcher::start(t, 1, Fmt::Json, &["watch", "--prefix", "n/p/", "-w", "json"]),
        Watcher::start(t, 2, Fmt::Json, &["watch", "--prefix", "n/j/", "--prev-kv", "-w", "json"]),
    ];
    let mut markers = 0;
    for (w, key) in ws.iter_mut().zip(["n/k", "n/p/ready", "n/j/ready"]) {
        markers += make_ready(t, w, key);
    }
    // Pad to revision 15 + 30 whatever number of markers it took (n/pad is in no range).
    assert!(markers < 30, "{markers} markers");
    for _ in markers..30 {
        if let Err(e) = t.ctl_quiet(&["put", "n/pad", "x"]) {
            t.trouble("padding", e);
        }
    }
    live(t, &mut ws, &["put", "n/k", "a"], "", &[1, 0, 0]); // 46
    live(t, &mut ws, &["put", "n/p/x", "b"], "", &[0, 1, 0]);
    live(t, &mut ws, &["put", "n/j/a", "1"], "", &[0, 0, 1]);
    live(t, &mut ws, &["put", "n/j/a", "2"], "", &[0, 0, 1]);
    live(t, &mut ws, &["txn", "-i"], "\nput n/p/y c\nput n/p/z d\ndel n/k\n\n\n", &[1, 2, 0]);
    live(t, &mut ws, &["del", "n/j/a"], "", &[0, 0, 1]);
    live(t, &mut ws, &["del", "n/p/", "--prefix"], "", &[0, 4, 0]); // n/p/{ready,x,y,z}
    live(t, &mut ws, &["put", "n/k", "again"], "", &[1, 0, 0]);
    for w in ws {
        w.finish(t);
    }

    // --- compaction ---
    // --physical: etcd answers once the compaction is done, not just scheduled (what a
    // watch replays from history depends on it, see below).
    t.ctl(true, &["compaction", "--physical", "5"], "");
    t.sync_members();
    for args in [
        &["watch", "--rev", "3", "w/k"][..],
        &["watch", "--rev", "3", "w/k", "-w", "json"],
        &["watch", "--rev", "4", "--prefix", "w/", "-w", "json"],
        &["watch", "--rev", "1", "--prefix", "", "--prev-kv", "-w", "fields"],
    ] {
        // etcd cancels the watch with the compacted revision; etcdctl exits.
        let out = EtcdctlProcess::spawn(&t.watch_endpoint(0), args).wait_exit(WAIT);
        if t.reference {
            assert_eq!(out.code, Some(5), "script error: {out:?}");
        }
        t.record(format!("etcdctl {} (exits)", args.join(" ")), render(&comparable(&out, 0)));
    }
    // From the compacted revision itself: the history is there, but not the previous
    // values from before it. Nor the deletion of w/p/a at revision 5: etcd's compaction
    // at 5 drops a key whose last generation ended (tombstone) at or below 5, tombstone
    // included, so the replay has 2 of the 3 events of revision 5 (17 events, not 18).
    let mut ws = vec![
        Watcher::start(t, 1, Fmt::Json, &["watch", "--rev", "5", "--prefix", "w/", "--prev-kv", "-w", "json"]),
        Watcher::start(t, 2, Fmt::Simple, &["watch", "--rev", "5", "w/k", "--prev-kv"]),
    ];
    ws[0].expect(t, 17, "the history");
    ws[1].expect(t, 7, "the history");
    live(t, &mut ws, &["put", "w/k", "after-compaction"], "", &[1, 1]);
    for w in ws {
        w.finish(t);
    }
    t.ctl(false, &["compaction", "3"], "");
}

#[test]
fn etcdctl_watch_matches_etcd() {
    differential(etcdctl_watch_script);
}

/// `etcdctl watch -i`: watch commands read from stdin, one watcher each on one stream
/// (etcdctl 3.4 has no interactive `cancel`: it is rejected, as are other commands).
fn etcdctl_interactive_script(t: &mut Target) {
    t.ctl(true, &["put", "i/a", "1"], ""); // 2
    t.ctl(true, &["put", "i/b/x", "1"], ""); // 3
    t.ctl(true, &["put", "i/a", "2"], ""); // 4
    t.ctl(true, &["put", "j/a", "1"], ""); // 5
    t.ctl(true, &["put", "j/b/x", "1"], ""); // 6
    t.ctl(true, &["put", "j/a", "2"], ""); // 7
    for (n, p, fmt) in [(0, "i", Fmt::Simple), (1, "j", Fmt::Json)] {
        let args: &[&str] = if fmt == Fmt::Json { &["watch", "-i", "-w", "json"] } else { &["watch", "-i"] };
        let mut w = Watcher::start(t, n, fmt, args);
        let label = w.label.clone();
        // Each watch covers keys of its own, so no event is printed twice (the watchers
        // print concurrently).
        let (a, b) = (2 + 3 * n, 3 + 3 * n);
        for (cmd, events) in [
            (format!("watch --rev {a} {p}/a"), 2),
            (format!("watch {p}/b --prefix --rev {b}"), 1),
            (format!("watch --rev 8 {p}/c --prev-kv"), 0),
        ] {
            w.proc.send_line(&cmd);
            w.expect(t, events, &cmd);
        }
        for bad in ["cancel 0", "watch", "get i/a"] {
            w.proc.send_line(bad);
        }
        // They are rejected on stderr.
        if !w.failed {
            if let Err(e) =
                w.proc.wait_output(WAIT, |_, err| err.iter().filter(|l| l.starts_with("Invalid command")).count() >= 3)
            {
                t.trouble(&label, format!("rejections of bad commands: {e}"));
            }
        }
        let ws = std::slice::from_mut(&mut w);
        live(t, ws, &["put", &format!("{p}/a"), "live"], "", &[1]);
        live(t, ws, &["put", &format!("{p}/b/y"), "1"], "", &[1]);
        live(t, ws, &["put", &format!("{p}/c"), "1"], "", &[1]);
        live(t, ws, &["put", &format!("{p}/c"), "2"], "", &[1]);
        // (A delete of several watchers' keys would have them print concurrently.)
        live(t, ws, &["del", &format!("{p}/b/"), "--prefix"], "", &[2]);
        // Without stdin etcdctl -i gives up.
        w.proc.close_stdin();
        let out = w.proc.wait_exit(WAIT);
        if t.reference {
            assert_eq!(out.code, Some(3), "script error: {out:?}");
        }
        t.record(format!("{label} (stdin closed)"), render(&comparable(&out, 0)));
    }
}

#[test]
fn etcdctl_watch_interactive_matches_etcd() {
    differential(etcdctl_interactive_script);
}

// ---------------------------------------------------------------------------
// The etcd-client crate
// ---------------------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// A client on one endpoint. No request timeout: a gRPC deadline would end watch streams.
async fn connect(url: &str) -> Result<Client, String> {
    let opts = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
    Client::connect([url], Some(opts)).await.map_err(|e| format!("connect {url}: {e}"))
}

fn fmt_kv(kv: &etcd_client::KeyValue) -> String {
    format!(
        "{}={:?} create={} mod={} ver={} lease={:#x}",
        String::from_utf8_lossy(kv.key()),
        String::from_utf8_lossy(kv.value()),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease()
    )
}

/// Everything in a watch response; header ids are compared with those of a KV response
/// from the same endpoint (`ids`: cluster_id, member_id).
fn fmt_resp(r: &WatchResponse, ids: (u64, u64)) -> String {
    let h = match r.header() {
        None => "none".to_string(),
        Some(h) => format!(
            "rev={} ids={} term={}",
            h.revision(),
            if (h.cluster_id(), h.member_id()) == ids {
                "as-kv".to_string()
            } else {
                format!("{:#x}/{:#x} (kv: {:#x}/{:#x})", h.cluster_id(), h.member_id(), ids.0, ids.1)
            },
            if h.raft_term() == 0 { "0" } else { "<nonzero>" }
        ),
    };
    let mut s = format!(
        "watch_id={} created={} canceled={} compact_revision={} cancel_reason={:?} header[{h}]",
        r.watch_id(),
        r.created(),
        r.canceled(),
        r.compact_revision(),
        r.cancel_reason()
    );
    for e in r.events() {
        let ty = match e.event_type() {
            EventType::Put => "PUT",
            EventType::Delete => "DELETE",
        };
        s.push_str(&format!("\n    {ty} {}", e.kv().map_or("no kv".into(), fmt_kv)));
        if let Some(p) = e.prev_kv() {
            s.push_str(&format!("\n      prev {}", fmt_kv(p)));
        }
    }
    s
}

/// A watch stream and what the script needs to record its responses.
struct Stream {
    s: WatchStream,
    ids: (u64, u64),
}

impl Stream {
    /// Receives `n` responses (sorted by watch id: responses of different watchers of one
    /// revision come in any order). `Err` on a timeout, an error or the stream's end.
    async fn recv(&mut self, n: usize) -> Result<String, String> {
        let mut got: Vec<WatchResponse> = Vec::new();
        while got.len() < n {
            match tokio::time::timeout(WAIT, self.s.message()).await {
                Err(_) => {
                    return Err(format!(
                        "timed out waiting for response {} of {n}; got {}",
                        got.len() + 1,
                        self.fmt(&got)
                    ))
                }
                Ok(Err(e)) => {
                    return Err(format!(
                        "stream error after {} of {n} responses: {e}; got {}",
                        got.len(),
                        self.fmt(&got)
                    ))
                }
                Ok(Ok(None)) => {
                    return Err(format!("stream ended after {} of {n} responses; got {}", got.len(), self.fmt(&got)))
                }
                Ok(Ok(Some(r))) => got.push(r),
            }
        }
        Ok(self.fmt(&got))
    }

    fn fmt(&self, rs: &[WatchResponse]) -> String {
        let mut rs: Vec<&WatchResponse> = rs.iter().collect();
        rs.sort_by_key(|r| r.watch_id());
        rs.iter().map(|r| fmt_resp(r, self.ids)).collect::<Vec<_>>().join("\n")
    }
}

/// Records `step`: `Ok(text)` as observed; `Err` as trouble, and as what was observed
/// (the caller stops there).
fn step(t: &mut Target, name: &str, r: Result<String, String>) -> Result<(), ()> {
    match r {
        Ok(s) => {
            t.record(name, s);
            Ok(())
        }
        Err(e) => {
            t.trouble(name, e.clone());
            t.record(name, format!("TROUBLE (the script stops here): {e}"));
            Err(())
        }
    }
}

fn err_str<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

/// The etcd-client script: runs on the Target's first endpoint; writes go through its
/// others (raftvm) or the same (etcd). Stops at the first step that goes wrong.
async fn client_script(t: &mut Target) -> Result<(), ()> {
    let watch_url = format!("http://{}", t.endpoints[0]);
    let write_url = format!("http://{}", t.endpoints[1 % t.endpoints.len()]);
    let mut kv = match connect(&write_url).await {
        Ok(c) => c,
        Err(e) => return step(t, "connect", Err(e)),
    };
    let mut wc = match connect(&watch_url).await {
        Ok(c) => c,
        Err(e) => return step(t, "connect", Err(e)),
    };
    // The header ids of this endpoint, to compare watch headers with.
    let ids = match wc.get("nothing", None).await {
        Ok(r) => r.header().map(|h| (h.cluster_id(), h.member_id())).unwrap_or_default(),
        Err(e) => return step(t, "get", Err(e.to_string())),
    };

    // --- history ---
    macro_rules! w {
        ($name:expr, $e:expr) => {{
            let r = err_str($e.await).map(|r| match r.header() {
                Some(h) => format!("ok rev={}", h.revision()),
                None => "ok (no header)".into(),
            });
            step(t, $name, r)?
        }};
    }
    w!("put r/a 1", kv.put("r/a", "1", None)); // 2
    w!("put r/b 1", kv.put("r/b", "1", None)); // 3
    w!("put r/a 2", kv.put("r/a", "2", None)); // 4
    w!("delete r/b", kv.delete("r/b", None)); // 5
    w!(
        "txn put r/c 1, put r/a 3",
        kv.txn(Txn::new().and_then([TxnOp::put("r/c", "1", None), TxnOp::put("r/a", "3", None)]))
    ); // 6
    w!("put x/other 1", kv.put("x/other", "1", None)); // 7
    step(
        t,
        "lease grant 0x1234",
        err_str(kv.lease_grant(600, Some(LeaseGrantOptions::new().with_id(0x1234))).await)
            .map(|r| format!("id={:#x}", r.id())),
    )?;
    w!("put r/l v (lease)", kv.put("r/l", "v", Some(PutOptions::new().with_lease(0x1234)))); // 8

    // --- one stream, several watchers ---
    // The writes went through another member: a linearizable read through the watch
    // member makes it apply them first (see `send!` below).
    if let Err(e) = wc.get("sync", None).await {
        return step(t, "sync", Err(e.to_string()));
    }
    let opts = WatchOptions::new().with_prefix().with_start_revision(3).with_prev_key();
    let s = match wc.watch("r/", Some(opts)).await {
        Ok(s) => s,
        Err(e) => return step(t, "watch r/ --prefix --rev 3 --prev-kv", Err(e.to_string())),
    };
    let mut s = Stream { s, ids };
    // Created, then the history in one response.
    let r = s.recv(2).await;
    step(t, "watch 0: r/ prefix from 3 with prev kv", r)?;

    // Writes go through another member than the watch stream: a linearizable read through
    // the stream's member first makes it apply every acknowledged write, so a watch "from
    // now", a progress report or a header revision means the same revision as on etcd.
    macro_rules! send {
        ($name:expr, $e:expr, $n:expr) => {{
            if let Err(e) = wc.get("sync", None).await {
                return step(t, $name, Err(format!("sync: {e}")));
            }
            if let Err(e) = $e.await {
                return step(t, $name, Err(format!("send: {e}")));
            }
            let r = s.recv($n).await;
            step(t, $name, r)?
        }};
    }
    macro_rules! wr {
        ($name:expr, $e:expr, $n:expr) => {{
            if let Err(e) = $e.await {
                return step(t, $name, Err(format!("write: {e}")));
            }
            let r = s.recv($n).await;
            step(t, $name, r)?
        }};
    }
    send!("watch 1: r/a from now", s.s.watch("r/a", None), 1);
    wr!("put r/a 4", kv.put("r/a", "4", None), 2); // 9: watchers 0, 1
    send!("watch 2: from key r/b", s.s.watch("r/b", Some(WatchOptions::new().with_from_key())), 1);
    wr!("put x/y 1", kv.put("x/y", "1", None), 1); // 10: watcher 2
    send!("cancel watch 1", s.s.cancel(1), 1);
    wr!("put r/a 5", kv.put("r/a", "5", None), 1); // 11: watcher 0
    send!("request progress", s.s.request_progress(), 1);
    // Nothing for an unknown watch id: the next response is the progress report.
    if let Err(e) = s.s.cancel(42).await {
        return step(t, "cancel 42", Err(e.to_string()));
    }
    send!("cancel unknown watch 42, request progress", s.s.request_progress(), 1);

    // --- filters ---
    let no_put = WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoPut]);
    send!("watch 3: r/ prefix, no puts", s.s.watch("r/", Some(no_put)), 1);
    let no_del = WatchOptions::new().with_prefix().with_filters([WatchFilterType::NoDelete]).with_prev_key();
    send!("watch 4: r/ prefix, no deletes, prev kv", s.s.watch("r/", Some(no_del)), 1);
    wr!("put r/d 1", kv.put("r/d", "1", None), 3); // 12: watchers 0, 2, 4
    wr!("delete r/d", kv.delete("r/d", None), 3); // 13: watchers 0, 2, 3
    wr!("lease revoke 0x1234", kv.lease_revoke(0x1234), 3); // 14: r/l goes with it; watchers 0, 2, 3
    let txn = Txn::new()
        .when([Compare::version("r/a", CompareOp::Greater, 0)])
        .and_then([TxnOp::delete("r/", Some(DeleteOptions::new().with_prefix())), TxnOp::put("x/z", "1", None)]);
    wr!("txn: delete r/ prefix, put x/z", kv.txn(txn), 3); // 15: r/a, r/c; watchers 0, 2 (r/c, x/z), 3
    wr!("put r/b 2 (a create event)", kv.put("r/b", "2", None), 3); // 16: watchers 0, 2, 4

    // --- watch ids ---
    send!("watch with id 7: m/ prefix", s.s.watch("m/", Some(WatchOptions::new().with_prefix().with_watch_id(7))), 1);
    send!("watch with id 7 again", s.s.watch("m/x", Some(WatchOptions::new().with_watch_id(7))), 1);
    send!("watch with an automatic id", s.s.watch("m/y", None), 1);
    send!("watch [r/z, r/a): an empty range", s.s.watch("r/z", Some(WatchOptions::new().with_range("r/a"))), 1);
    send!("watch with progress_notify", s.s.watch("m/z", Some(WatchOptions::new().with_progress_notify())), 1);
    wr!("put m/x 1", kv.put("m/x", "1", None), 1); // 17: watcher 7

    // --- a start revision in the future ---
    send!("watch f/k from 20", s.s.watch("f/k", Some(WatchOptions::new().with_start_revision(20))), 1);
    wr!("put f/k 1 (revision 18, before the start)", kv.put("f/k", "1", None), 0); // 18
    wr!("put f/k 2 (revision 19)", kv.put("f/k", "2", None), 0); // 19
    wr!("put f/k 3 (revision 20)", kv.put("f/k", "3", None), 1); // 20

    // --- compaction ---
    wr!("put r/b 3", kv.put("r/b", "3", None), 3); // 21: watchers 0, 2, 4
    step(t, "compact 21", err_str(kv.compact(21, None).await).map(|_| "ok".to_string()))?;
    // The compaction went through another member than the watches: a linearizable read
    // through theirs makes it apply the compaction before the watches below start.
    step(t, "sync the watch member", err_str(wc.get("sync", None).await).map(|_| "ok".to_string()))?;
    send!(
        "watch r/ prefix from 10 (compacted)",
        s.s.watch("r/", Some(WatchOptions::new().with_prefix().with_start_revision(10))),
        2
    );
    // At the compacted revision: the event is there, its previous value is not.
    send!(
        "watch r/b from 21 with prev kv",
        s.s.watch("r/b", Some(WatchOptions::new().with_start_revision(21).with_prev_key())),
        2
    );
    wr!("put r/b 4", kv.put("r/b", "4", None), 4); // 22: watchers 0, 2, 4, and the last one
    send!("cancel watch 0", s.s.cancel(0), 1);
    wr!("put r/a 6", kv.put("r/a", "6", None), 1); // 23: watcher 4
    drop(s);

    // --- a second stream: ids start again ---
    let opts = WatchOptions::new().with_start_revision(22).with_prev_key().with_progress_notify();
    let s2 = match wc.watch("r/b", Some(opts)).await {
        Ok(s) => s,
        Err(e) => return step(t, "second stream", Err(e.to_string())),
    };
    let mut s2 = Stream { s: s2, ids };
    let r = s2.recv(2).await;
    step(t, "second stream: watch r/b from 22", r)?;
    if let Err(e) = s2.s.request_progress().await {
        return step(t, "second stream: request progress", Err(e.to_string()));
    }
    let r = s2.recv(1).await;
    step(t, "second stream: request progress", r)?;
    Ok(())
}

#[test]
fn etcd_client_watch_matches_etcd() {
    fn script(t: &mut Target) {
        let rt = runtime();
        let _ = rt.block_on(client_script(t));
    }
    differential(script);
}

// ---------------------------------------------------------------------------
// A raftvm cluster: watches across a leader failure
// ---------------------------------------------------------------------------

/// One event as a watcher saw it: (revision, type, key, value).
type Seen = (i64, &'static str, String, String);

fn seen(e: &etcd_client::Event) -> Seen {
    let kv = e.kv().expect("event kv");
    let ty = match e.event_type() {
        EventType::Put => "PUT",
        EventType::Delete => "DELETE",
    };
    (kv.mod_revision(), ty, String::from_utf8_lossy(kv.key()).into(), String::from_utf8_lossy(kv.value()).into())
}

/// What a resuming watcher observed.
#[derive(Debug, Default)]
struct WatchLog {
    events: Vec<Seen>,
    /// (endpoint, start revision) of every (re-)watch.
    watches: Vec<(String, i64)>,
    /// Why streams ended.
    breaks: Vec<String>,
}

/// Watches `prefix` from `start`, first through `urls[0]`; whenever the stream breaks it
/// watches again from the last revision seen + 1 through the next endpoint that answers,
/// as an etcd client must do itself. Ends once it has seen revision `until` (set later;
/// 0: unknown yet) or at `deadline`.
async fn resuming_watch(
    urls: Vec<String>,
    prefix: &'static str,
    start: i64,
    until: std::sync::Arc<std::sync::atomic::AtomicI64>,
    deadline: Instant,
) -> WatchLog {
    use std::sync::atomic::Ordering;
    let mut log = WatchLog::default();
    let mut next = start;
    let mut u = 0;
    'outer: while Instant::now() < deadline {
        let url = urls[u % urls.len()].clone();
        u += 1;
        let mut c = match connect(&url).await {
            Ok(c) => c,
            Err(e) => {
                log.breaks.push(e);
                continue;
            }
        };
        let opts = WatchOptions::new().with_prefix().with_start_revision(next);
        let left = deadline.saturating_duration_since(Instant::now());
        let mut s = match tokio::time::timeout(left, c.watch(prefix, Some(opts))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                log.breaks.push(format!("watch via {url}: {e}"));
                continue;
            }
            Err(_) => break,
        };
        log.watches.push((url.clone(), next));
        loop {
            let target = until.load(Ordering::SeqCst);
            if target > 0 && next > target {
                break 'outer;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left.min(Duration::from_secs(1)), s.message()).await {
                Err(_) if Instant::now() >= deadline => break 'outer,
                Err(_) => continue,
                Ok(Err(e)) => {
                    log.breaks.push(format!("stream via {url}: {e}"));
                    break;
                }
                Ok(Ok(None)) => {
                    log.breaks.push(format!("stream via {url} ended"));
                    break;
                }
                Ok(Ok(Some(r))) => {
                    if r.canceled() {
                        log.breaks.push(format!("watch via {url} canceled: {r:?}"));
                        break;
                    }
                    for e in r.events() {
                        let ev = seen(e);
                        next = ev.0 + 1;
                        log.events.push(ev);
                    }
                }
            }
        }
    }
    log
}

/// A watch on a follower sees the writes made through the leader, then through a
/// survivor after the leader is killed -9, every revision once and in order; a watch on
/// the leader breaks with it and, resumed by the client from its last revision + 1 on a
/// survivor, ends up with the same events. Both equal the history replayed at the end.
#[test]
fn watch_on_follower_survives_leader_kill() {
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
    use std::sync::Arc;
    const BEFORE: usize = 40;
    const AFTER: usize = 40;
    let c = start_kv_cluster(3);
    let leader = c.leader();
    let (f, g) = ((leader + 1) % 3, (leader + 2) % 3);
    let url = |i: usize| c.node(i).client_url();
    let rt = runtime();
    let deadline = Instant::now() + Duration::from_secs(120);
    let until = Arc::new(AtomicI64::new(0));

    // Both watches start at the revision of this first write (a short replay first).
    let start = rt.block_on(async {
        let mut cl = connect(&url(leader)).await.expect("connect");
        let r = cl.put("fo/start", "s", None).await.expect("put");
        r.header().expect("header").revision()
    });
    let follower = rt.spawn(resuming_watch(vec![url(f), url(g)], "fo/", start, until.clone(), deadline));
    let on_leader = rt.spawn(resuming_watch(vec![url(leader), url(g), url(f)], "fo/", start, until.clone(), deadline));

    // One writer: through the leader, and through the survivors once it is gone. Each
    // attempt writes a value of its own, so a retried write that did commit shows.
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let written = written.clone();
        let urls = [url(leader), url(f), url(g)];
        rt.spawn(async move {
            let mut acked: Vec<(i64, String, String)> = Vec::new();
            let mut u = 0;
            let mut cl = connect(&urls[0]).await.expect("connect writer");
            let mut attempt = 0;
            let mut failures = Vec::new();
            for i in 0..BEFORE + AFTER {
                loop {
                    assert!(Instant::now() < deadline, "writer stuck at write {i}: {failures:?}");
                    attempt += 1;
                    let (k, v) = (format!("fo/k{}", i % 7), format!("w{i}-a{attempt}"));
                    match tokio::time::timeout(Duration::from_secs(10), cl.put(k.as_str(), v.as_str(), None)).await {
                        Ok(Ok(r)) => {
                            acked.push((r.header().expect("header").revision(), k, v));
                            break;
                        }
                        Ok(Err(e)) => failures.push(format!("{i}/{attempt}: {e}")),
                        Err(_) => failures.push(format!("{i}/{attempt}: timed out")),
                    }
                    // Another member (the dead one refuses connections).
                    u += 1;
                    if let Ok(n) = connect(&urls[1 + u % 2]).await {
                        cl = n;
                    }
                }
                written.fetch_add(1, Ordering::SeqCst);
            }
            (acked, failures)
        })
    };

    poll_until(Duration::from_secs(60), "the first writes", || {
        let n = written.load(Ordering::SeqCst);
        if n >= BEFORE {
            Ok(())
        } else {
            Err(format!("{n} writes"))
        }
    });
    c.kill(leader);
    eprintln!("killed the leader {} after {} writes", c.node(leader).name, written.load(Ordering::SeqCst));
    let (acked, failures) = rt.block_on(writer).expect("writer task");
    let last = acked.last().expect("writes").0;
    until.store(last, Ordering::SeqCst);
    let on_follower = rt.block_on(follower).expect("follower watch");
    let on_leader = rt.block_on(on_leader).expect("leader watch");

    // The history, replayed from a survivor.
    let history = rt.block_on(async {
        let mut cl = connect(&url(g)).await.expect("connect");
        let mut s = cl
            .watch("fo/", Some(WatchOptions::new().with_prefix().with_start_revision(start)))
            .await
            .expect("history watch");
        let mut evs: Vec<Seen> = Vec::new();
        while evs.last().is_none_or(|e| e.0 < last) {
            let r = tokio::time::timeout(WAIT, s.message())
                .await
                .unwrap_or_else(|_| panic!("history replay timed out at {evs:?}"))
                .expect("history stream")
                .expect("history stream open");
            evs.extend(r.events().iter().map(seen));
        }
        evs
    });
    eprintln!(
        "writes: {} acked (last revision {last}), failed attempts {failures:?}\nfollower watch: {:?} {:?}\nleader watch: {:?} {:?}",
        acked.len(),
        on_follower.watches,
        on_follower.breaks,
        on_leader.watches,
        on_leader.breaks
    );
    // Every write is a revision of its own on fo/: the history has no gaps, and holds
    // every acknowledged write at its revision.
    let revs: Vec<i64> = history.iter().map(|e| e.0).collect();
    assert_eq!(revs, (start..=last).collect::<Vec<_>>(), "history revisions: {history:?}");
    let by_rev: BTreeMap<i64, &Seen> = history.iter().map(|e| (e.0, e)).collect();
    for (rev, k, v) in &acked {
        let e = by_rev.get(rev).unwrap_or_else(|| panic!("acknowledged write {k}={v} at {rev} not in the history"));
        assert_eq!((e.1, &e.2, &e.3), ("PUT", k, v), "revision {rev}");
    }
    for (who, log) in [("follower", &on_follower), ("leader", &on_leader)] {
        if log.events != history {
            let dups =
                log.events.len() - log.events.iter().map(|e| e.0).collect::<std::collections::BTreeSet<_>>().len();
            let mut gaps = Vec::new();
            for w in log.events.windows(2) {
                if w[1].0 != w[0].0 + 1 {
                    gaps.push((w[0].0, w[1].0));
                }
            }
            panic!(
                "the watch on the {who} saw {} events ({dups} duplicates, jumps {gaps:?}), the history has {}:\nseen: {:?}\nhistory: {history:?}\n{log:?}",
                log.events.len(),
                history.len(),
                log.events
            );
        }
    }
    assert!(on_leader.watches.len() >= 2, "the watch on the killed leader never resumed: {on_leader:?}");
    c.assert_converged(Duration::from_secs(30));
}

/// A watch on a follower that was frozen (SIGSTOP) while the others wrote past their
/// snapshot, so it catches up by installing a snapshot: the revisions that arrive inside
/// the snapshot never come through the event fan-out, and the watcher reads them from
/// the store. Every write is delivered once, in order.
#[test]
fn watch_on_a_follower_across_a_snapshot_install() {
    const BEFORE: usize = 5;
    const PAUSED: usize = 300;
    const AFTER: usize = 5;
    let c = raftvm_tests::Cluster::builder(3).snapshot_count(50).start();
    for i in 0..3 {
        raftvm_tests::etcd::wait_kv_module(&c, i, Duration::from_secs(20));
    }
    let leader = c.leader();
    let f = (leader + 1) % 3;
    let rt = runtime();
    rt.block_on(async {
        let mut w = connect(&c.node(f).client_url()).await.expect("connect to the follower");
        let mut kv = connect(&c.node(leader).client_url()).await.expect("connect to the leader");
        let first = kv.put("snap/k", "0", None).await.expect("put").header().unwrap().revision();
        let mut stream =
            w.watch("snap/", Some(WatchOptions::new().with_prefix().with_start_revision(first))).await.expect("watch");
        let mut revs = Vec::new();
        let put = |kv: &mut etcd_client::Client, i: usize| {
            let mut kv = kv.clone();
            async move { kv.put(format!("snap/k{}", i % 10), format!("v{i}"), None).await.expect("put").header().unwrap().revision() }
        };
        let mut want = vec![first];
        for i in 0..BEFORE {
            want.push(put(&mut kv, i).await);
        }
        c.pause(f);
        for i in 0..PAUSED {
            want.push(put(&mut kv, BEFORE + i).await);
        }
        c.resume(f);
        for i in 0..AFTER {
            want.push(put(&mut kv, BEFORE + PAUSED + i).await);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while revs.len() < want.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{} of {} events after 60 s: {revs:?}", revs.len(), want.len());
            match tokio::time::timeout(left, stream.message()).await {
                Ok(Ok(Some(r))) => {
                    assert!(!r.canceled(), "watch canceled: {r:?}");
                    revs.extend(r.events().iter().map(|e| e.kv().unwrap().mod_revision()));
                }
                other => panic!("watch stream: {other:?} after {} events", revs.len()),
            }
        }
        assert_eq!(revs, want, "every write once, in order");
    });
    // The path under test: the follower caught up by installing a snapshot (the state
    // machine logs it), not from the log.
    let log = c.node(f).log_contents();
    assert!(log.contains("installed snapshot"), "the follower never installed a snapshot: the test missed its point");
}
