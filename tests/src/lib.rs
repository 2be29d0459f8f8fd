//! Black-box test harness for raftvm clusters.
//!
//! Every node is a real `raftvm serve` child process; every client operation is
//! a real `raftvm <command>` invocation. Nothing here links the `raftvm` crate,
//! so the harness builds even while the host does not.
//!
//! Binary: `$RAFTVM_BIN`, else `$CARGO_TARGET_DIR/debug/raftvm`, else the
//! `debug/raftvm` next to the running test executable, else
//! `<workspace>/target/debug/raftvm`.
//! Guests: `$RAFTVM_GUESTS/NAME.wasm`, else `$CARGO_TARGET_DIR/guests`, else the
//! `guests/` directory of the target dir holding the test executable, else
//! `<workspace>/target/guests`.
//!
//! Rules the harness follows (and tests built on it should too):
//! * every cluster listens on a loopback address of its own
//!   ([`private_loopback`]) with ports picked at run time (bind `HOST:0`, read,
//!   drop), and keeps its data in a per-cluster temp dir, so tests run in parallel;
//! * no sleeps as synchronization: [`poll_until`] re-checks a condition at short
//!   intervals until a deadline;
//! * every child process is killed and reaped when the [`Cluster`] drops (also on
//!   panic; nodes additionally get `PR_SET_PDEATHSIG` so they die with the
//!   thread that spawned them); on panic the tail of every node log is printed
//!   and the temp dir is kept for post-mortem.

pub mod components;
pub mod etcd;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// How long a single client invocation may run before the harness kills it, unless it asks
/// for a longer `--command-timeout` (see `hard_timeout`).
/// The CLI has its own `--command-timeout` (5 s); this only guards against hangs.
pub const CLIENT_HARD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a fresh cluster to elect a leader everyone agrees on.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// `--command-timeout` the harness passes to client commands that propose or
/// read through Raft (install, call, query, module list/remove). Longer than the
/// CLI's 5 s default: on a loaded 2-core machine compiling a module on every
/// node can take a while. Override per call by passing `--command-timeout`.
pub const COMMAND_TIMEOUT: &str = "15s";
/// `--command-timeout` for `status` and `hash` (local, cheap, and polled).
pub const STATUS_COMMAND_TIMEOUT: &str = "5s";
/// Interval between two checks of a polled condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Lines of each node log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;

// ---------------------------------------------------------------------------
// Locating the binary and the guests
// ---------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `<target>/debug` derived from the running test executable
/// (`<target>/debug/deps/<test>-<hash>`).
fn exe_profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    Some(deps.parent()?.to_path_buf())
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Path of the `raftvm` binary under test. Panics with instructions if absent.
pub fn raftvm_bin() -> PathBuf {
    let mut tried = Vec::new();
    if let Some(p) = non_empty_env("RAFTVM_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return p;
        }
        panic!("RAFTVM_BIN={} does not exist (or is not a file); build it with `cargo build -p raftvm`", p.display());
    }
    if let Some(t) = non_empty_env("CARGO_TARGET_DIR") {
        tried.push(PathBuf::from(t).join("debug/raftvm"));
    }
    if let Some(d) = exe_profile_dir() {
        tried.push(d.join("raftvm"));
    }
    tried.push(workspace_root().join("target/debug/raftvm"));
    for p in &tried {
        if p.is_file() {
            return p.clone();
        }
    }
    panic!(
        "the raftvm binary was not found (tried {}). Build it with `cargo build -p raftvm` \
         (with the same CARGO_TARGET_DIR) or point RAFTVM_BIN at it.",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
}

/// Directory holding the built example guests (`NAME.wasm`).
pub fn guests_dir() -> PathBuf {
    if let Some(p) = non_empty_env("RAFTVM_GUESTS") {
        return PathBuf::from(p);
    }
    let mut tried = Vec::new();
    if let Some(t) = non_empty_env("CARGO_TARGET_DIR") {
        tried.push(PathBuf::from(t).join("guests"));
    }
    if let Some(d) = exe_profile_dir().and_then(|d| d.parent().map(Path::to_path_buf)) {
        tried.push(d.join("guests"));
    }
    tried.push(workspace_root().join("target/guests"));
    tried.iter().find(|p| p.is_dir()).cloned().unwrap_or_else(|| tried[0].clone())
}

/// Path of the example guest `name` (e.g. `register-rust`). Panics with
/// instructions if it has not been built.
pub fn guest(name: &str) -> PathBuf {
    let p = guests_dir().join(format!("{name}.wasm"));
    assert!(
        p.is_file(),
        "guest {name} not found at {}: build the guests with scripts/build-guests.sh \
         (output goes to $CARGO_TARGET_DIR/guests) or set RAFTVM_GUESTS",
        p.display()
    );
    p
}

/// Lower-case hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hex::encode(Sha256::digest(&bytes))
}

// ---------------------------------------------------------------------------
// Ports, polling
// ---------------------------------------------------------------------------

/// A loopback address of its own for one cluster or server: `127.A.B.C`, chosen at
/// random outside `127.0.0.0/16`.
///
/// Ports picked with [`free_ports`] are only released when the caller's server
/// binds them, and in that window another process may take the same port. Every
/// outgoing loopback connection gets its ephemeral port on `127.0.0.1` (the
/// kernel's source address for `127.0.0.0/8`), and other test clusters sit on
/// their own random addresses, so nobody else binds ports on this one.
pub fn private_loopback() -> Ipv4Addr {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS: different in every process and call.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    let r = h.finish();
    let a = 1 + (r % 254) as u8; // 1..=254: stays clear of 127.0.x.x
    let b = (r >> 8) as u8;
    let c = 1 + ((r >> 16) % 254) as u8; // 1..=254: no .0 or .255
    Ipv4Addr::new(127, a, b, c)
}

/// `n` distinct free TCP ports on `host`. All listeners are held until every
/// port is chosen, so the ports are distinct; they are released before return.
/// Use a [`private_loopback`] host, so no other process races for them.
pub fn free_ports(host: Ipv4Addr, n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((host, 0)).unwrap_or_else(|e| panic!("bind {host}:0: {e}")))
        .collect();
    listeners.iter().map(|l| l.local_addr().expect("local_addr").port()).collect()
}

/// Calls `check` every [`POLL_INTERVAL`] until it returns `Ok`, or panics after
/// `timeout` with `what` and the last `Err` description.
pub fn poll_until<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last observation: {last}");
                }
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------
// Client invocations
// ---------------------------------------------------------------------------

/// Result of one `raftvm` client invocation.
#[derive(Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub cmdline: String,
    /// Exit code; `None` if killed by a signal or by the harness timeout.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout without the single trailing newline the CLI appends.
    pub fn out(&self) -> &str {
        self.stdout.strip_suffix('\n').unwrap_or(&self.stdout)
    }

    /// Panics (with everything known) unless the command succeeded; returns
    /// [`CmdOutput::out`].
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert!(self.success(), "command failed: {self:?}");
        self.out()
    }

    /// Panics unless the command failed with a non-zero exit code and an error
    /// message on stderr; returns stderr.
    #[track_caller]
    pub fn err(&self) -> &str {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "command was expected to fail with a non-zero exit code: {self:?}"
        );
        assert!(!self.stderr.trim().is_empty(), "failing command printed no error on stderr: {self:?}");
        &self.stderr
    }
}

impl fmt::Debug for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` -> exit {:?} after {:?}\n  stdout: {:?}\n  stderr: {:?}",
            self.cmdline, self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Runs `raftvm ARGS...`, capturing output, killing it after [`hard_timeout`].
pub fn run_raftvm<S: AsRef<str>>(args: &[S]) -> CmdOutput {
    let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
    run_command("raftvm", &raftvm_bin(), &args, &[], None)
}

/// How long the harness lets a client command run: [`CLIENT_HARD_TIMEOUT`], or longer when
/// ARGS give a longer `--command-timeout` (`=D` or as the next argument, read as the CLI
/// reads it, with `humantime`), so that a test asking a slow install to wait five minutes
/// is not killed after thirty seconds.
fn hard_timeout(args: &[&str]) -> Duration {
    let value = args.iter().enumerate().find_map(|(i, a)| match a.strip_prefix("--command-timeout") {
        Some("") => args.get(i + 1).copied(),
        Some(v) => v.strip_prefix('='),
        None => None,
    });
    let asked = value.and_then(|v| humantime::parse_duration(v).ok());
    asked.map_or(CLIENT_HARD_TIMEOUT, |d| CLIENT_HARD_TIMEOUT.max(d + Duration::from_secs(10)))
}

/// Runs `bin ARGS...` (shown as `name ...`) with extra environment and, if given,
/// `stdin` fed to it; captures stdout and stderr and kills it after
/// [`hard_timeout`].
pub fn run_command(name: &str, bin: &Path, args: &[&str], envs: &[(&str, &str)], stdin: Option<&str>) -> CmdOutput {
    let cmdline = std::iter::once(name.to_string())
        .chain(args.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ");
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    if let Some(input) = stdin {
        let mut w = child.stdin.take().expect("piped stdin");
        let input = input.to_string();
        // A writer thread, so a child that does not read stdin cannot block us.
        std::thread::spawn(move || {
            let _ = w.write_all(input.as_bytes());
        });
    }
    let out_reader = spawn_reader(child.stdout.take().expect("piped stdout"));
    let err_reader = spawn_reader(child.stderr.take().expect("piped stderr"));
    let hard = hard_timeout(args);
    let deadline = start + hard;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait().expect("try_wait client") {
            Some(st) => break st,
            None if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().expect("wait killed client");
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let stdout = out_reader.join().expect("stdout reader");
    let mut stderr = err_reader.join().expect("stderr reader");
    if timed_out {
        stderr.push_str(&format!("\n[harness: killed after {hard:?}]"));
    }
    CmdOutput { cmdline, code: if timed_out { None } else { status.code() }, stdout, stderr, elapsed: start.elapsed() }
}

fn spawn_reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

// ---------------------------------------------------------------------------
// JSON shapes of `status -w json` and `hash -w json`
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub endpoint: String,
    pub member_id: String,
    pub name: String,
    /// Hex id of the leader this node knows of, empty if none.
    pub leader_id: String,
    pub is_leader: bool,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    /// Linearizable reads confirmed on the leader lease, and read-index rounds run.
    pub lease_reads: u64,
    pub read_index_rounds: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct HashInfo {
    pub endpoint: String,
    pub applied_index: u64,
    pub store_hash: String,
    pub machines: BTreeMap<String, String>,
}

/// One line of `module list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// Parses `module list` output (`NAME<TAB>sha256<TAB>SIZE` lines).
pub fn parse_module_list(out: &str) -> Result<Vec<ModuleEntry>, String> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            if f.len() != 3 {
                return Err(format!("bad `module list` line {l:?} (want NAME\\tSHA256\\tSIZE)"));
            }
            let size = f[2].trim().parse().map_err(|e| format!("bad size in {l:?}: {e}"))?;
            Ok(ModuleEntry { name: f[0].to_string(), sha256: f[1].to_string(), size })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Nodes and clusters
// ---------------------------------------------------------------------------

/// One `raftvm serve` process (running or not).
pub struct Node {
    pub name: String,
    /// The cluster's private loopback address (see [`private_loopback`]).
    pub host: Ipv4Addr,
    pub client_port: u16,
    pub peer_port: u16,
    /// Node directory: holds `data/` and `node.log`.
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    /// stdout + stderr of every incarnation of this node.
    pub log: PathBuf,
    args: Vec<String>,
    child: Mutex<Option<Child>>,
    starts: Mutex<u32>,
}

impl Node {
    /// `HOST:PORT` of the client API.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.client_port)
    }

    pub fn client_url(&self) -> String {
        format!("http://{}:{}", self.host, self.client_port)
    }

    pub fn peer_url(&self) -> String {
        format!("http://{}:{}", self.host, self.peer_port)
    }

    /// The `serve` arguments this node is (re)started with.
    pub fn serve_args(&self) -> &[String] {
        &self.args
    }

    /// The value of `serve` flag `--NAME` on this node's command line.
    pub fn serve_flag(&self, name: &str) -> Option<&str> {
        let flag = format!("--{name}");
        self.args.windows(2).find(|w| w[0] == flag).map(|w| w[1].as_str())
    }

    /// Sets `serve` flag `--NAME` to `value` for the next start (appended if absent).
    pub fn set_serve_flag(&mut self, name: &str, value: &str) {
        let flag = format!("--{name}");
        match self.args.iter().position(|a| *a == flag) {
            Some(i) => self.args[i + 1] = value.to_string(),
            None => self.args.extend([flag, value.to_string()]),
        }
    }

    fn spawn(&self) {
        let mut guard = self.child.lock().unwrap();
        assert!(guard.is_none(), "node {} is already running", self.name);
        let mut starts = self.starts.lock().unwrap();
        *starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        writeln!(
            log,
            "===== harness: start #{} of {}: raftvm {}",
            *starts,
            self.name,
            self.args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
        )
        .expect("write node log");
        let err = log.try_clone().expect("clone log fd");
        let mut cmd = Command::new(raftvm_bin());
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .env("RUST_BACKTRACE", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // SAFETY: prctl is async-signal-safe; the closure touches no shared state.
        // The node dies with the thread that spawned it (the test's thread) even if
        // the test process is killed without running destructors.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn raftvm serve for {}: {e}", self.name));
        *guard = Some(child);
    }

    /// Whether the process is (still) running. Panics if it exited on its own,
    /// since nodes are only ever stopped by the harness.
    pub fn is_running(&self) -> bool {
        let mut guard = self.child.lock().unwrap();
        match guard.as_mut() {
            None => false,
            Some(c) => match c.try_wait().expect("try_wait node") {
                None => true,
                Some(st) => {
                    *guard = None;
                    drop(guard);
                    panic!("node {} exited unexpectedly with {st}\n{}", self.name, self.log_tail(LOG_TAIL_LINES));
                }
            },
        }
    }

    /// Waits up to `timeout` for the process to exit on its own and reaps it; `None` if it
    /// is still running then (or was not running).
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut guard = self.child.lock().unwrap();
                let c = guard.as_mut()?;
                if let Some(st) = c.try_wait().expect("try_wait node") {
                    *guard = None;
                    return Some(st);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap. No-op if not running.
    pub fn kill(&self) -> Option<ExitStatus> {
        let mut guard = self.child.lock().unwrap();
        let mut c = guard.take()?;
        let _ = c.kill();
        Some(c.wait().expect("wait killed node"))
    }

    /// Sends `sig` to the running process (SIGSTOP / SIGCONT freeze and thaw it).
    pub fn signal(&self, sig: libc::c_int) {
        let guard = self.child.lock().unwrap();
        let c = guard.as_ref().unwrap_or_else(|| panic!("signal: node {} is not running", self.name));
        // SAFETY: plain kill(2) on our own child's pid, which we have not reaped yet.
        let r = unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill({}, {sig}) failed", c.id());
    }

    /// SIGTERM, wait up to `grace` for exit, then SIGKILL. Returns the exit status.
    pub fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        {
            let guard = self.child.lock().unwrap();
            let c = guard.as_ref()?;
            // SAFETY: plain kill(2) on our own child's pid, which we have not reaped yet.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
                // A node a test froze ([`Cluster::pause`]) acts on SIGTERM once thawed.
                libc::kill(c.id() as libc::pid_t, libc::SIGCONT);
            }
        }
        if let Some(st) = self.wait_exit(grace) {
            return Some(st);
        }
        eprintln!("[harness] node {} ignored SIGTERM for {grace:?}; killing it", self.name);
        self.kill()
    }

    /// The last `n` lines of this node's log, framed for printing.
    pub fn log_tail(&self, n: usize) -> String {
        let text = match fs::read(&self.log) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => return format!("(cannot read {}: {e})", self.log.display()),
        };
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "----- last {} lines of {} ({}) -----\n{}\n----- end of {} -----",
            lines.len() - from,
            self.name,
            self.log.display(),
            lines[from..].join("\n"),
            self.name
        )
    }

    /// Whole log contents (all incarnations).
    pub fn log_contents(&self) -> String {
        fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }
}

/// Options for a cluster; see [`Cluster::builder`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    size: usize,
    snapshot_count: Option<u64>,
    heartbeat_ms: Option<u64>,
    election_ms: Option<u64>,
    extra_args: Vec<String>,
}

impl ClusterBuilder {
    /// `--snapshot-count N`.
    pub fn snapshot_count(mut self, n: u64) -> Self {
        self.snapshot_count = Some(n);
        self
    }

    /// `--heartbeat-interval MS`.
    pub fn heartbeat_interval_ms(mut self, ms: u64) -> Self {
        self.heartbeat_ms = Some(ms);
        self
    }

    /// `--election-timeout MS`.
    pub fn election_timeout_ms(mut self, ms: u64) -> Self {
        self.election_ms = Some(ms);
        self
    }

    /// Any other `serve` argument, appended verbatim to every node's command line.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra_args.push(a.into());
        self
    }

    /// Starts all nodes and waits until they agree on a leader.
    pub fn start(self) -> Cluster {
        let c = self.spawn_only();
        c.wait_for_leader(STARTUP_TIMEOUT);
        c
    }

    /// Starts all nodes without waiting for anything.
    pub fn spawn_only(self) -> Cluster {
        let cluster = self.create();
        for n in &cluster.nodes {
            n.spawn();
        }
        cluster
    }

    /// Lays out the nodes (directories, ports, command lines) without starting any; start
    /// each with [`Cluster::restart`].
    pub fn create(self) -> Cluster {
        assert!(self.size >= 1, "a cluster needs at least one node");
        raftvm_bin(); // fail on a missing binary before creating anything
        let tmp = tempfile::Builder::new().prefix("raftvm-it-").tempdir().expect("create temp dir");
        let host = private_loopback();
        let ports = free_ports(host, 2 * self.size);
        let names: Vec<String> = (1..=self.size).map(|i| format!("n{i}")).collect();
        let initial_cluster = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{n}=http://{host}:{}", ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        // Unique per cluster, so two clusters that somehow reach each other refuse to mix.
        let token = format!("raftvm-it-{}", tmp.path().file_name().and_then(|s| s.to_str()).unwrap_or("cluster"));
        let nodes = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let dir = tmp.path().join(name);
                let data_dir = dir.join("data");
                fs::create_dir_all(&dir).expect("create node dir");
                let client_url = format!("http://{host}:{}", ports[2 * i]);
                let peer_url = format!("http://{host}:{}", ports[2 * i + 1]);
                let mut args: Vec<String> = vec![
                    "serve".into(),
                    "--name".into(),
                    name.clone(),
                    "--data-dir".into(),
                    data_dir.display().to_string(),
                    "--listen-client-urls".into(),
                    client_url.clone(),
                    "--advertise-client-urls".into(),
                    client_url,
                    "--listen-peer-urls".into(),
                    peer_url.clone(),
                    "--initial-advertise-peer-urls".into(),
                    peer_url,
                    "--initial-cluster".into(),
                    initial_cluster.clone(),
                    "--initial-cluster-state".into(),
                    "new".into(),
                    "--initial-cluster-token".into(),
                    token.clone(),
                ];
                if let Some(n) = self.snapshot_count {
                    args.extend(["--snapshot-count".into(), n.to_string()]);
                }
                if let Some(ms) = self.heartbeat_ms {
                    args.extend(["--heartbeat-interval".into(), ms.to_string()]);
                }
                if let Some(ms) = self.election_ms {
                    args.extend(["--election-timeout".into(), ms.to_string()]);
                }
                args.extend(self.extra_args.iter().cloned());
                Node {
                    name: name.clone(),
                    host,
                    client_port: ports[2 * i],
                    peer_port: ports[2 * i + 1],
                    log: dir.join("node.log"),
                    dir,
                    data_dir,
                    args,
                    child: Mutex::new(None),
                    starts: Mutex::new(0),
                }
            })
            .collect();
        Cluster { tmp: Some(tmp), nodes }
    }
}

/// A cluster of `raftvm serve` processes in a private temp dir. Nodes are
/// addressed by index `0..len()`, named `n1..nN`.
pub struct Cluster {
    tmp: Option<tempfile::TempDir>,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts an `n`-node cluster (`n1..nN`, default timing) and waits for a leader.
    pub fn start(n: usize) -> Cluster {
        Self::builder(n).start()
    }

    pub fn builder(n: usize) -> ClusterBuilder {
        ClusterBuilder { size: n, snapshot_count: None, heartbeat_ms: None, election_ms: None, extra_args: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The cluster's temp dir (scratch space for tests, e.g. generated modules).
    pub fn dir(&self) -> &Path {
        self.tmp.as_ref().expect("temp dir").path()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn endpoint(&self, i: usize) -> String {
        self.nodes[i].endpoint()
    }

    /// Indices of the nodes currently running.
    pub fn running(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.nodes[i].is_running()).collect()
    }

    /// Comma-separated endpoints of all running nodes.
    pub fn endpoints(&self) -> String {
        self.running().iter().map(|&i| self.endpoint(i)).collect::<Vec<_>>().join(",")
    }

    // ----- process control -----

    /// SIGKILL node `i` (kill -9) and reap it.
    pub fn kill(&self, i: usize) {
        assert!(self.nodes[i].kill().is_some(), "kill: node {} was not running", self.nodes[i].name);
    }

    /// Graceful stop (SIGTERM; SIGKILL after 10 s).
    pub fn stop(&self, i: usize) {
        assert!(
            self.nodes[i].stop(Duration::from_secs(10)).is_some(),
            "stop: node {} was not running",
            self.nodes[i].name
        );
    }

    /// Stops every running node.
    pub fn stop_all(&self) {
        for n in &self.nodes {
            n.stop(Duration::from_secs(10));
        }
    }

    /// Freezes node `i` (SIGSTOP): to the others it is partitioned away, its open
    /// connections stay open. [`Cluster::resume`] thaws it.
    pub fn pause(&self, i: usize) {
        self.nodes[i].signal(libc::SIGSTOP);
    }

    /// Thaws node `i` after [`Cluster::pause`] (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.nodes[i].signal(libc::SIGCONT);
    }

    /// Lays out one more node, `name`, to join through MemberAdd: node 0's command line
    /// with its own name, directories and ports on the cluster's host, and
    /// `--initial-cluster-state existing`. Not started: set its `--initial-cluster` (what
    /// `etcdctl member add` prints) and start it with [`Cluster::restart`].
    pub fn add_node(&mut self, name: &str) -> usize {
        let host = self.nodes[0].host;
        let ports = free_ports(host, 2);
        let dir = self.dir().join(name);
        fs::create_dir_all(&dir).expect("create node dir");
        let mut node = Node {
            name: name.to_string(),
            host,
            client_port: ports[0],
            peer_port: ports[1],
            log: dir.join("node.log"),
            data_dir: dir.join("data"),
            dir,
            args: self.nodes[0].args.clone(),
            child: Mutex::new(None),
            starts: Mutex::new(0),
        };
        let (client, peer, data) = (node.client_url(), node.peer_url(), node.data_dir.display().to_string());
        for (flag, value) in [
            ("name", name),
            ("data-dir", &data),
            ("listen-client-urls", &client),
            ("advertise-client-urls", &client),
            ("listen-peer-urls", &peer),
            ("initial-advertise-peer-urls", &peer),
            ("initial-cluster-state", "existing"),
        ] {
            node.set_serve_flag(flag, value);
        }
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Starts a stopped node again with the same command line.
    pub fn restart(&self, i: usize) {
        self.nodes[i].spawn();
    }

    // ----- client commands -----

    /// `raftvm ARGS... --endpoints <node i>`.
    pub fn raftvm(&self, i: usize, args: &[&str]) -> CmdOutput {
        self.raftvm_at(&self.endpoint(i), args)
    }

    /// `raftvm ARGS... --endpoints ENDPOINTS --command-timeout T`, where T is
    /// [`STATUS_COMMAND_TIMEOUT`] for `status`/`hash`, else [`COMMAND_TIMEOUT`],
    /// unless ARGS already set `--command-timeout`.
    pub fn raftvm_at(&self, endpoints: &str, args: &[&str]) -> CmdOutput {
        let mut v: Vec<&str> = args.to_vec();
        v.extend(["--endpoints", endpoints]);
        if !args.iter().any(|a| a.starts_with("--command-timeout")) {
            let t = if matches!(args.first(), Some(&"status" | &"hash")) {
                STATUS_COMMAND_TIMEOUT
            } else {
                COMMAND_TIMEOUT
            };
            v.extend(["--command-timeout", t]);
        }
        run_raftvm(&v)
    }

    /// `module install NAME FILE [EXTRA...]` via node `i`.
    pub fn install(&self, i: usize, name: &str, file: &Path, extra: &[&str]) -> CmdOutput {
        let file = file.display().to_string();
        let mut args = vec!["module", "install", name, file.as_str()];
        args.extend_from_slice(extra);
        self.raftvm(i, &args)
    }

    /// Installs `file` as `name` via node `i`, asserting the reported sha256.
    #[track_caller]
    pub fn install_ok(&self, i: usize, name: &str, file: &Path) -> String {
        let out = self.install(i, name, file, &[]);
        let sha = sha256_file(file);
        assert_eq!(out.ok(), format!("installed {name} sha256={sha}"), "{out:?}");
        sha
    }

    /// [`Cluster::install_ok`], then waits until every running node lists the
    /// module (a linearizable `module list` per node), so later commands through
    /// any node find it. Returns the sha256.
    #[track_caller]
    pub fn install_everywhere(&self, i: usize, name: &str, file: &Path) -> String {
        let sha = self.install_ok(i, name, file);
        for j in self.running() {
            poll_until(Duration::from_secs(20), &format!("{name} to be listed on {}", self.nodes[j].name), || {
                let list = self.module_list(j);
                if list.iter().any(|m| m.name == name && m.sha256 == sha) {
                    Ok(())
                } else {
                    Err(format!("{list:?}"))
                }
            });
        }
        sha
    }

    /// `call MODULE PAYLOAD` via node `i`.
    pub fn call(&self, i: usize, module: &str, payload: &str) -> CmdOutput {
        self.raftvm(i, &["call", module, payload])
    }

    /// `query MODULE PAYLOAD` (linearizable) via node `i`.
    pub fn query(&self, i: usize, module: &str, payload: &str) -> CmdOutput {
        self.raftvm(i, &["query", module, payload])
    }

    /// `query MODULE PAYLOAD --serializable` via node `i`.
    pub fn query_serializable(&self, i: usize, module: &str, payload: &str) -> CmdOutput {
        self.raftvm(i, &["query", module, payload, "--serializable"])
    }

    /// `module list` on node `i`.
    #[track_caller]
    pub fn module_list(&self, i: usize) -> Vec<ModuleEntry> {
        let out = self.raftvm(i, &["module", "list"]);
        parse_module_list(out.ok()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    }

    /// `status -w json` on node `i` alone.
    pub fn status(&self, i: usize) -> Result<Status, String> {
        let out = self.raftvm(i, &["status", "-w", "json"]);
        if !out.success() {
            return Err(format!("{out:?}"));
        }
        let v: Vec<Status> = serde_json::from_str(out.out()).map_err(|e| format!("bad status JSON ({e}): {out:?}"))?;
        match <[Status; 1]>::try_from(v) {
            Ok([s]) => Ok(s),
            Err(v) => Err(format!("status for one endpoint returned {} objects: {out:?}", v.len())),
        }
    }

    /// `hash -w json` on node `i` alone.
    pub fn hash(&self, i: usize) -> Result<HashInfo, String> {
        let out = self.raftvm(i, &["hash", "-w", "json"]);
        if !out.success() {
            return Err(format!("{out:?}"));
        }
        let v: Vec<HashInfo> = serde_json::from_str(out.out()).map_err(|e| format!("bad hash JSON ({e}): {out:?}"))?;
        match <[HashInfo; 1]>::try_from(v) {
            Ok([h]) => Ok(h),
            Err(v) => Err(format!("hash for one endpoint returned {} objects: {out:?}", v.len())),
        }
    }

    // ----- waiting for conditions -----

    /// Waits until every running node answers `status`, exactly one reports
    /// `is_leader`, and all report the same `leader_id` (its `member_id`) and
    /// term. Returns the leader's index.
    pub fn wait_for_leader(&self, timeout: Duration) -> usize {
        self.wait_for_leader_where(timeout, "a leader all running nodes agree on", |_| true)
    }

    /// Like [`Cluster::wait_for_leader`], but the leader must also satisfy `ok`.
    pub fn wait_for_leader_where(&self, timeout: Duration, what: &str, ok: impl Fn(usize) -> bool) -> usize {
        poll_until(timeout, what, || {
            let running = self.running();
            if running.is_empty() {
                return Err("no node is running".into());
            }
            let mut st = Vec::new();
            for &i in &running {
                st.push((i, self.status(i)?));
            }
            let leaders: Vec<&(usize, Status)> = st.iter().filter(|(_, s)| s.is_leader).collect();
            let [(li, ls)] = leaders.as_slice() else {
                return Err(format!("{} nodes claim leadership: {st:?}", leaders.len()));
            };
            if st.iter().any(|(_, s)| s.leader_id != ls.member_id || s.term != ls.term) {
                return Err(format!("nodes disagree on leader/term: {st:?}"));
            }
            if !ok(*li) {
                return Err(format!("leader is node index {li}, not acceptable: {st:?}"));
            }
            Ok(*li)
        })
    }

    /// Index of the current leader (waits up to 20 s for agreement).
    pub fn leader(&self) -> usize {
        self.wait_for_leader(Duration::from_secs(20))
    }

    /// Waits until all running nodes report the same `applied_index` in `hash`
    /// (and it is at least `min_applied`), then returns their hash reports (in
    /// node order). It does not compare the hashes; tests assert on them.
    pub fn wait_same_applied(&self, timeout: Duration, min_applied: u64) -> Vec<(usize, HashInfo)> {
        poll_until(timeout, "all running nodes to reach the same applied index", || {
            let mut hs = Vec::new();
            for i in self.running() {
                hs.push((i, self.hash(i)?));
            }
            let first = hs.first().ok_or("no node is running")?.1.applied_index;
            if first < min_applied || hs.iter().any(|(_, h)| h.applied_index != first) {
                return Err(format!(
                    "applied indices (want all equal and >= {min_applied}): {:?}",
                    hs.iter().map(|(i, h)| (self.nodes[*i].name.as_str(), h.applied_index)).collect::<Vec<_>>()
                ));
            }
            Ok(hs)
        })
    }

    /// Waits for equal applied indices, then asserts all store hashes (and
    /// per-machine hashes) are equal. Returns the agreed hash report.
    #[track_caller]
    pub fn assert_converged(&self, timeout: Duration) -> HashInfo {
        let hs = self.wait_same_applied(timeout, 0);
        let (_, first) = &hs[0];
        for (i, h) in &hs[1..] {
            assert_eq!(
                (&h.store_hash, &h.machines),
                (&first.store_hash, &first.machines),
                "node {} diverges from node {} at applied index {}: {hs:#?}",
                self.nodes[*i].name,
                self.nodes[hs[0].0].name,
                first.applied_index
            );
        }
        first.clone()
    }

    /// Prints the tail of every node's log to stderr.
    pub fn dump_logs(&self) {
        for n in &self.nodes {
            eprintln!("{}", n.log_tail(LOG_TAIL_LINES));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.kill();
        }
        if std::thread::panicking() {
            self.dump_logs();
            if let Some(tmp) = self.tmp.take() {
                let kept = tmp.keep();
                eprintln!("[harness] test failed; cluster files kept in {}", kept.display());
            }
        }
    }
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    let mut f = File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(bytes).expect("write file");
    p
}

/// Case-insensitive "contains any of".
pub fn contains_any_ci(haystack: &str, needles: &[&str]) -> bool {
    let h = haystack.to_lowercase();
    needles.iter().any(|n| h.contains(&n.to_lowercase()))
}

#[cfg(test)]
mod hard_timeout_tests {
    use super::*;

    #[test]
    fn a_longer_command_timeout_extends_the_harness_limit() {
        assert_eq!(hard_timeout(&["module", "list"]), CLIENT_HARD_TIMEOUT);
        assert_eq!(hard_timeout(&["call", "m", "x", "--command-timeout", "15s"]), CLIENT_HARD_TIMEOUT);
        assert_eq!(hard_timeout(&["module", "install", "--command-timeout=300s"]), Duration::from_secs(310));
        assert_eq!(hard_timeout(&["module", "install", "--command-timeout", "2m"]), Duration::from_secs(130));
        assert_eq!(hard_timeout(&["--command-timeout=soon"]), CLIENT_HARD_TIMEOUT);
    }
}
