//! Helpers for the etcd-compatibility tests (`it/etcd_diff.rs`, `it/etcd_clients.rs`,
//! `it/etcd_watch.rs`, `python/`): a real etcd 3.4 process to compare against, `etcdctl`
//! invocations (also long-running ones: [`EtcdctlProcess`]), and raftvm clusters whose
//! built-in `kv` machine is ready.
//!
//! Binaries: `$ETCD_BIN` / `$ETCDCTL_BIN`, else `etcd` / `etcdctl` on `PATH`
//! (Debian's `etcd-server` / `etcd-client` packages, see `scripts/prereqs.sh test`).
//! Like [`Cluster`], an [`EtcdServer`] lives in a private temp dir on free loopback
//! ports, is killed when dropped (and dies with the spawning thread via
//! `PR_SET_PDEATHSIG`), and prints its log tail and keeps its log on panic.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use crate::{free_ports, poll_until, private_loopback, Cluster, CmdOutput, STARTUP_TIMEOUT};

/// Name of the machine that serves etcd's key space.
pub const KV_MACHINE: &str = "kv";

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn tool_bin(env: &str, name: &str, package: &str) -> PathBuf {
    if let Some(p) = std::env::var(env).ok().filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} does not exist", p.display());
        return p;
    }
    find_on_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` not found on PATH (nor {env} set): install etcd 3.4 with \
             `apt-get install {package}` (scripts/prereqs.sh test does)"
        )
    })
}

/// Path of the real etcd server binary.
pub fn etcd_bin() -> PathBuf {
    tool_bin("ETCD_BIN", "etcd", "etcd-server")
}

/// Path of `etcdctl`.
pub fn etcdctl_bin() -> PathBuf {
    tool_bin("ETCDCTL_BIN", "etcdctl", "etcd-client")
}

/// Runs `etcdctl --endpoints ENDPOINTS ARGS...` (API v3) with `stdin` fed to it,
/// capturing output; killed after the harness's client timeout.
pub fn etcdctl(endpoints: &str, args: &[&str], stdin: &str) -> CmdOutput {
    let mut all: Vec<&str> = vec!["--endpoints", endpoints, "--command-timeout", "10s"];
    all.extend_from_slice(args);
    crate::run_command("etcdctl", &etcdctl_bin(), &all, &[("ETCDCTL_API", "3")], Some(stdin))
}

/// A single-member real etcd (3.4) on free loopback ports, in a private temp dir.
pub struct EtcdServer {
    /// A private loopback address (see [`private_loopback`]).
    pub host: std::net::Ipv4Addr,
    pub client_port: u16,
    pub peer_port: u16,
    pub log: PathBuf,
    tmp: Option<tempfile::TempDir>,
    child: Mutex<Option<Child>>,
}

impl EtcdServer {
    /// Starts etcd and waits until it serves KV requests (`etcdctl get`).
    pub fn start() -> EtcdServer {
        Self::start_with(&[])
    }

    /// [`EtcdServer::start`] with extra command-line flags.
    pub fn start_with(extra: &[&str]) -> EtcdServer {
        let tmp = tempfile::Builder::new().prefix("raftvm-etcd-").tempdir().expect("create temp dir");
        let host = private_loopback();
        let ports = free_ports(host, 2);
        let (cp, pp) = (ports[0], ports[1]);
        let client = format!("http://{host}:{cp}");
        let peer = format!("http://{host}:{pp}");
        let log = tmp.path().join("etcd.log");
        let out = File::create(&log).expect("create etcd log");
        let err = out.try_clone().expect("clone log fd");
        let mut cmd = Command::new(etcd_bin());
        cmd.args(["--name", "d", "--data-dir"])
            .arg(tmp.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("d={peer}"), "--initial-cluster-state", "new"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // SAFETY: prctl is async-signal-safe; the closure touches no shared state.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn etcd: {e}"));
        let s = EtcdServer { host, client_port: cp, peer_port: pp, log, tmp: Some(tmp), child: Mutex::new(Some(child)) };
        poll_until(STARTUP_TIMEOUT, "etcd to serve KV requests", || {
            s.assert_running("startup");
            let out = etcdctl(&s.endpoint(), &["get", "raftvm-probe"], "");
            if out.success() { Ok(()) } else { Err(format!("{out:?}")) }
        });
        s
    }

    /// `HOST:PORT` of the client API.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.client_port)
    }

    pub fn client_url(&self) -> String {
        format!("http://{}:{}", self.host, self.client_port)
    }

    pub fn dir(&self) -> &Path {
        self.tmp.as_ref().expect("temp dir").path()
    }

    /// Panics (printing its log) if etcd has exited; `after` says what was last done.
    pub fn assert_running(&self, after: &str) {
        let mut g = self.child.lock().unwrap();
        if let Some(c) = g.as_mut() {
            if let Some(st) = c.try_wait().expect("try_wait etcd") {
                *g = None;
                drop(g);
                panic!("etcd exited unexpectedly with {st} after {after}\n{}", self.log_tail(60));
            }
        }
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!("----- last lines of etcd log ({}) -----\n{}\n----- end of etcd log -----", self.log.display(), lines[from..].join("\n"))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(40));
            if let Some(tmp) = self.tmp.take() {
                // Keep the log only: etcd preallocates ~120 MB of WAL in its data dir.
                let _ = fs::remove_dir_all(tmp.path().join("data"));
                eprintln!("[harness] test failed; etcd log kept in {}", tmp.keep().display());
            }
        }
    }
}

/// Waits until `module list` on node `i` shows the built-in `kv` machine, and until node
/// `i` has published its client URL (a log entry each member proposes when it starts), so
/// that a test sees no startup entries land after this returns.
pub fn wait_kv_module(c: &Cluster, i: usize, timeout: Duration) {
    poll_until(timeout, &format!("the `{KV_MACHINE}` machine on {}", c.node(i).name), || {
        let out = c.raftvm(i, &["module", "list"]);
        if !out.success() {
            return Err(format!("{out:?}"));
        }
        if out.stdout.lines().any(|l| l.split('\t').next() == Some(KV_MACHINE)) {
            Ok(())
        } else {
            Err(format!("not listed yet: {out:?}"))
        }
    });
    let url = c.node(i).client_url();
    poll_until(timeout, &format!("{} to publish its client URL", c.node(i).name), || {
        let out = etcdctl(&c.endpoint(i), &["member", "list"], "");
        if out.success() && out.stdout.contains(&format!(", {url}, ")) {
            Ok(())
        } else {
            Err(format!("{out:?}"))
        }
    });
}

/// Starts an `n`-node raftvm cluster and waits until every member lists the `kv` machine.
pub fn start_kv_cluster(n: usize) -> Cluster {
    let c = Cluster::start(n);
    for i in 0..n {
        wait_kv_module(&c, i, STARTUP_TIMEOUT);
    }
    c
}

/// Comma-separated client endpoints (`HOST:P,...`) of every node of `c`.
pub fn all_endpoints(c: &Cluster) -> String {
    (0..c.len()).map(|i| c.endpoint(i)).collect::<Vec<_>>().join(",")
}

/// One chunk of a [`EtcdctlProcess`]'s output, as its reader threads pass it on.
enum OutputLine {
    Stdout(String),
    Stderr(String),
    /// The stream's end (`true`: stdout).
    Eof(bool),
}

/// A long-running `etcdctl --endpoints ENDPOINTS ARGS...` (API v3), e.g. `watch`: stdin
/// stays open (piped) until [`EtcdctlProcess::close_stdin`], stdout and stderr are read
/// line by line by two threads, so a test can wait (with a deadline) until the output
/// says what it expects. Killed and reaped on drop (and dies with the spawning thread
/// via `PR_SET_PDEATHSIG`).
pub struct EtcdctlProcess {
    pub cmdline: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<OutputLine>,
    stdout: Vec<String>,
    stderr: Vec<String>,
    /// Ends of stdout / stderr seen.
    eof: (bool, bool),
    start: Instant,
}

impl EtcdctlProcess {
    /// Spawns `etcdctl --endpoints ENDPOINTS ARGS...`.
    pub fn spawn(endpoints: &str, args: &[&str]) -> EtcdctlProcess {
        let mut all: Vec<&str> = vec!["--endpoints", endpoints];
        all.extend_from_slice(args);
        let cmdline = std::iter::once("etcdctl").chain(all.iter().copied()).collect::<Vec<_>>().join(" ");
        let mut cmd = Command::new(etcdctl_bin());
        cmd.args(&all)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; the closure touches no shared state.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmdline}: {e}"));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || read_lines(out, true, tx));
        std::thread::spawn(move || read_lines(err, false, tx2));
        let stdin = child.stdin.take();
        EtcdctlProcess {
            cmdline,
            child: Some(child),
            stdin,
            rx,
            stdout: Vec::new(),
            stderr: Vec::new(),
            eof: (false, false),
            start: Instant::now(),
        }
    }

    /// Writes `line` and a newline to its stdin.
    pub fn send_line(&mut self, line: &str) {
        let w = self.stdin.as_mut().unwrap_or_else(|| panic!("{}: stdin already closed", self.cmdline));
        // A process that has exited makes this fail (EPIPE): what it printed says why.
        if let Err(e) = w.write_all(format!("{line}\n").as_bytes()).and_then(|_| w.flush()) {
            eprintln!("[harness] writing {line:?} to {}: {e}", self.cmdline);
        }
    }

    /// Closes its stdin (EOF).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The stdout lines read so far.
    pub fn stdout_lines(&self) -> &[String] {
        &self.stdout
    }

    /// The stderr lines read so far.
    pub fn stderr_lines(&self) -> &[String] {
        &self.stderr
    }

    /// Its exit status if it has exited (without waiting).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait etcdctl"))
    }

    /// Whether both of its output streams have ended (it exited, or closed them).
    pub fn output_ended(&self) -> bool {
        self.eof.0 && self.eof.1
    }

    /// Takes one line (or end) from the readers, waiting until `deadline`; false if none came.
    fn pump(&mut self, deadline: Instant) -> bool {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(wait) {
            Ok(OutputLine::Stdout(l)) => self.stdout.push(l),
            Ok(OutputLine::Stderr(l)) => self.stderr.push(l),
            Ok(OutputLine::Eof(true)) => self.eof.0 = true,
            Ok(OutputLine::Eof(false)) => self.eof.1 = true,
            Err(_) => return false,
        }
        true
    }

    /// Reads output until `done(stdout lines so far)` holds (`Ok`), or until `timeout`
    /// passes or the output ends without it (`Err` describing everything printed).
    pub fn wait_stdout(&mut self, timeout: Duration, done: impl Fn(&[String]) -> bool) -> Result<(), String> {
        self.wait_output(timeout, |out, _| done(out))
    }

    /// Like [`EtcdctlProcess::wait_stdout`], with `done(stdout lines, stderr lines)`.
    pub fn wait_output(&mut self, timeout: Duration, done: impl Fn(&[String], &[String]) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.stdout, &self.stderr) {
                return Ok(());
            }
            if self.output_ended() {
                return Err(format!("its output ended: {self:?}"));
            }
            if !self.pump(deadline) {
                return Err(format!("timed out after {timeout:?}: {self:?}"));
            }
        }
    }

    /// Waits (up to `timeout`) for it to exit by itself, then returns all it printed and
    /// its exit code; killed after `timeout` (code `None`, a harness note on stderr).
    pub fn wait_exit(mut self, timeout: Duration) -> CmdOutput {
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        while !self.output_ended() {
            if !self.pump(deadline) {
                timed_out = true;
                break;
            }
        }
        let mut c = self.child.take().expect("child");
        let status = loop {
            match c.try_wait().expect("try_wait etcdctl") {
                Some(st) => break Some(st),
                None if timed_out || Instant::now() >= deadline => {
                    timed_out = true;
                    let _ = c.kill();
                    let _ = c.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        self.drain(Duration::from_secs(2));
        let mut out = self.output(status.and_then(|s| s.code()));
        if timed_out {
            out.stderr.push_str(&format!("\n[harness: killed after {timeout:?}]"));
        }
        out
    }

    /// Kills it (SIGKILL) and returns everything it printed (exit code `None`).
    pub fn finish(mut self) -> CmdOutput {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.drain(Duration::from_secs(2));
        self.output(None)
    }

    /// Reads what is left after the process is gone (bounded: a grandchild could hold
    /// the pipes open).
    fn drain(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output_ended() && self.pump(deadline) {}
    }

    fn output(&self, code: Option<i32>) -> CmdOutput {
        let join = |v: &[String]| v.iter().map(|l| format!("{l}\n")).collect::<String>();
        CmdOutput {
            cmdline: self.cmdline.clone(),
            code,
            stdout: join(&self.stdout),
            stderr: join(&self.stderr),
            elapsed: self.start.elapsed(),
        }
    }
}

impl std::fmt::Debug for EtcdctlProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` after {:?}{}\n  stdout: {:?}\n  stderr: {:?}",
            self.cmdline,
            self.start.elapsed(),
            if self.output_ended() { " (output ended)" } else { "" },
            self.stdout,
            self.stderr
        )
    }
}

impl Drop for EtcdctlProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_lines(r: impl std::io::Read, stdout: bool, tx: mpsc::Sender<OutputLine>) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                let l = String::from_utf8_lossy(&buf).into_owned();
                let msg = if stdout { OutputLine::Stdout(l) } else { OutputLine::Stderr(l) };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(OutputLine::Eof(stdout));
}

/// A line of etcdctl's stdout with what legitimately differs between two clusters (cluster
/// and member ids, raft term) replaced by `<nonzero>`: in JSON lines (`-w json`) and in
/// `-w fields` lines (`"ClusterID" : 123`).
pub fn normalize_etcdctl_line(l: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(l) {
        Ok(mut v) if v.is_object() => {
            normalize_ids(&mut v);
            v.to_string()
        }
        _ => match l.split_once(" : ") {
            Some((k @ ("\"ClusterID\"" | "\"MemberID\"" | "\"RaftTerm\""), v)) if v.trim() != "0" => {
                format!("{k} : <nonzero>")
            }
            _ => l.to_string(),
        },
    }
}

/// `cluster_id`, `member_id` and `raft_term` anywhere in `v` → `<nonzero>` (unless 0).
pub fn normalize_ids(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if matches!(k.as_str(), "cluster_id" | "member_id" | "raft_term") {
                    if x.as_u64() != Some(0) {
                        *x = Value::String("<nonzero>".into());
                    }
                } else {
                    normalize_ids(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize_ids),
        _ => {}
    }
}

/// etcdctl's stderr without the client library's JSON log lines (they carry timestamps).
pub fn etcdctl_stderr_lines(stderr: &str) -> impl Iterator<Item = &str> {
    stderr.lines().filter(|l| !l.trim_start().starts_with("{\"level\""))
}
