//! Helpers for the etcd-compatibility tests (`it/etcd_diff.rs`, `it/etcd_clients.rs`,
//! `python/`): a real etcd 3.4 process to compare against, `etcdctl` invocations, and
//! raftvm clusters whose built-in `kv` machine is ready.
//!
//! Binaries: `$ETCD_BIN` / `$ETCDCTL_BIN`, else `etcd` / `etcdctl` on `PATH`
//! (Debian's `etcd-server` / `etcd-client` packages, see `scripts/prereqs.sh test`).
//! Like [`Cluster`], an [`EtcdServer`] lives in a private temp dir on free loopback
//! ports, is killed when dropped (and dies with the spawning thread via
//! `PR_SET_PDEATHSIG`), and prints its log tail and keeps its log on panic.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

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

/// Waits until `module list` on node `i` shows the built-in `kv` machine.
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
