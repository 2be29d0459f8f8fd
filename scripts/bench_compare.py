#!/usr/bin/env python3
"""Side-by-side benchmark of raftvm against etcd (issue 5).

Starts fresh etcd and raftvm clusters on 127.0.0.1 (1 and/or 3 members, free ports
picked at run time, data in one temp dir on the same disk for both, identical server
flags), runs identical `raftvm bench` workloads against both (alternating which system
goes first per workload, so machine drift hits both alike), measures the memory and
disk footprint of 1,000,000 keys on a fresh 1-node cluster of each, and writes
results.json, results.md and throughput.svg into --out.

Usually started through scripts/bench-compare.sh (installs etcd, builds raftvm).
Standard library only.
"""

import argparse
import ctypes
import datetime
import html
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ("etcd", "raftvm")
# Workload ids (as given to --workloads) -> (bench workload, consistency or None).
WORKLOADS = {
    "put": ("put", None),
    "range-l": ("range", "l"),
    "range-s": ("range", "s"),
    "txn-put": ("txn-put", None),
    "delete": ("delete", None),
    "watch": ("watch", None),
    "lease-keepalive": ("lease-keepalive", None),
}
# Not a workload one asks for: the bulk put that fills the key space before the first range run.
PREFILL = "prefill"
# Order matters: range reads what put wrote (and its prefill), delete comes after range.
DEFAULT_WORKLOADS = ["put", "range-l", "range-s", "txn-put", "delete", "watch", "lease-keepalive"]
POLL = 0.1  # seconds between two checks of a polled condition
GIB = 1024 ** 3
MIB = 1024 ** 2


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------

def int_list(s):
    out = [int(x) for x in str(s).split(",") if x.strip()]
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"want a comma-separated list of positive integers, got {s!r}")
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the unset ones (those say theirs in [brackets])."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="bench_compare.py",
        description="Benchmark raftvm against etcd on identical workloads (issue 5).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny totals, clients 1,16, mem-keys 20000, topologies 1 "
                        "(explicit flags still win)")
    p.add_argument("--topologies", type=int_list, default=None, help="cluster sizes [1,3; quick: 1]")
    p.add_argument("--systems", default="etcd,raftvm", help="systems to run (subset of etcd,raftvm)")
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                   help="subset of " + ",".join(DEFAULT_WORKLOADS))
    p.add_argument("--clients", type=int_list, default=None, help="client counts for put [1,16,128,512; quick: 1,16]")
    p.add_argument("--range-clients", type=int_list, default=None, help="client counts for range [same as --clients]")
    p.add_argument("--other-clients", type=int_list, default=[16],
                   help="client counts for txn-put, delete, watch, lease-keepalive")
    p.add_argument("--conns", type=int, default=None, help="gRPC connections per run [min(clients, 16)]")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each workload and client count per system (the order of the systems "
                        "alternates); the table reports the median run and the range")
    p.add_argument("--ops", type=int, default=None, help="--total per run [20000; quick: 1000]")
    p.add_argument("--ops-1client", type=int, default=None, help="--total for 1-client runs [2000; quick: 200]")
    p.add_argument("--duration", default=None,
                   help="run each workload for this long (e.g. 10s) instead of a fixed --total")
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--key-size", type=int, default=None, help="[the bench tool's default]")
    p.add_argument("--key-space", type=int, default=None,
                   help="distinct keys of the workloads; range reads a key space prefilled once per "
                        "cluster [100000; quick: 10000]")
    p.add_argument("--mem-keys", type=int, default=None,
                   help="keys loaded for the memory measurement, 0 to skip it [1000000; quick: 20000]")
    p.add_argument("--load-clients", type=int, default=128,
                   help="clients of the bulk loads (range prefill, memory load)")
    p.add_argument("--load-conns", type=int, default=16, help="conns of the bulk loads")
    p.add_argument("--snapshot-count", type=int, default=100000, help="server flag, same for both systems")
    p.add_argument("--heartbeat-interval", type=int, default=100, help="server flag (ms), same for both")
    p.add_argument("--election-timeout", type=int, default=1000, help="server flag (ms), same for both")
    p.add_argument("--quota-backend-bytes", type=int, default=8 * GIB,
                   help="server flag, same for both (etcd's 2 GiB default would stop the 1M-key load)")
    p.add_argument("--data-root", default=None,
                   help="directory in which one temp dir holds every server's data "
                        "[a new dir under $TMPDIR or /var/tmp]")
    p.add_argument("--out", default=None, help="result directory [bench-results/<timestamp>]")
    p.add_argument("--raftvm-bin", default=None,
                   help="raftvm binary [$RAFTVM_BIN, else $CARGO_TARGET_DIR/release/raftvm]")
    p.add_argument("--bench-bin", default=None,
                   help="binary whose `bench` subcommand drives the load [the raftvm binary]")
    p.add_argument("--etcd-bin", default=None, help="[$ETCD_BIN, else etcd on PATH]")
    p.add_argument("--etcdctl-bin", default=None, help="[$ETCDCTL_BIN, else etcdctl on PATH]")
    p.add_argument("--startup-timeout", type=float, default=60.0, help="seconds for a cluster to serve requests")
    p.add_argument("--settle-timeout", type=float, default=30.0,
                   help="seconds to wait, before each run, for every server to go idle")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds one bench run may take")
    p.add_argument("--mem-timeout", type=float, default=3600.0, help="seconds the memory load may take")
    p.add_argument("--keep-data", action="store_true", help="do not delete the data root at the end")
    a = p.parse_args(argv)

    quick = a.quick
    if a.topologies is None:
        a.topologies = [1] if quick else [1, 3]
    if a.clients is None:
        a.clients = [1, 16] if quick else [1, 16, 128, 512]
    if a.range_clients is None:
        a.range_clients = list(a.clients)
    if a.ops is None:
        a.ops = 1000 if quick else 20000
    if a.ops_1client is None:
        a.ops_1client = 200 if quick else 2000
    if a.key_space is None:
        a.key_space = 10000 if quick else 100000
    if a.mem_keys is None:
        a.mem_keys = 20000 if quick else 1000000
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    for s in a.systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r} (want etcd and/or raftvm)")
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for w in a.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r} (want some of {','.join(DEFAULT_WORKLOADS)})")
    for t in a.topologies:
        if t not in (1, 3, 5):
            p.error(f"topology {t}: use 1, 3 or 5 nodes")

    a.raftvm_bin = a.raftvm_bin or os.environ.get("RAFTVM_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.path.expanduser("~"), ".cache/raftvm/target"),
        "release", "raftvm")
    a.bench_bin = a.bench_bin or a.raftvm_bin
    a.etcd_bin = a.etcd_bin or os.environ.get("ETCD_BIN") or shutil.which("etcd")
    a.etcdctl_bin = a.etcdctl_bin or os.environ.get("ETCDCTL_BIN") or shutil.which("etcdctl")
    for name, path in (("raftvm", a.raftvm_bin), ("bench", a.bench_bin), ("etcd", a.etcd_bin),
                       ("etcdctl", a.etcdctl_bin)):
        if name == "etcd" and "etcd" not in a.systems:
            continue
        if not path or not os.access(path, os.X_OK):
            p.error(f"{name} binary not found ({path}); scripts/bench-compare.sh installs/builds it")
    if a.out is None:
        a.out = os.path.join(REPO, "bench-results", time.strftime("%Y%m%d-%H%M%S"))
    return a


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

try:
    # Loaded here, not in the forked child.
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:
    _libc = None


def _die_with_parent():
    """preexec_fn: the child gets SIGKILL if this script dies without cleaning up."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def spawn(cmd, stdout, stderr, env=None):
    """Starts cmd in its own session (process group), so it can be killed as a group
    and does not get the terminal's Ctrl-C (we clean it up ourselves)."""
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)


def kill_group(proc, grace=10.0):
    """SIGTERM the process group of proc (started by spawn: its pgid is its pid), wait up to
    grace seconds for proc, then SIGKILL whatever is left in the group."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the leader if still there, and anything it left
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log(f"warning: pid {proc.pid} did not die after SIGKILL")


def run_capture(cmd, timeout, env=None):
    """Runs cmd in its own process group; returns (exit code or None on timeout, stdout, stderr)."""
    proc = spawn(cmd, subprocess.PIPE, subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    except subprocess.TimeoutExpired:
        kill_group(proc, grace=2)
        out, err = proc.communicate()
        return None, out.decode(errors="replace"), err.decode(errors="replace") + f"\n[killed after {timeout}s]"
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, exception)
            kill_group(proc, grace=1)


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cpu_seconds(pid):
    """utime + stime of a process (all threads), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def dir_size(path):
    """(allocated bytes, apparent bytes) of everything under path."""
    alloc = apparent = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return alloc, apparent


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


# ---------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------

class Member:
    def __init__(self, name, client_port, peer_port, dir_):
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.dir = dir_
        self.data_dir = os.path.join(dir_, "data")
        self.log = os.path.join(dir_, "server.log")
        self.proc = None

    @property
    def endpoint(self):
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self):
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self):
        return f"http://127.0.0.1:{self.peer_port}"


class Cluster:
    """n members of one system (etcd or raftvm), started with identical flags."""

    def __init__(self, system, n, root, ports, args, label):
        self.system = system
        self.n = n
        self.args = args
        self.label = label
        self.dir = os.path.join(root, label)
        os.makedirs(self.dir)
        self.members = [Member(f"n{i + 1}", ports[2 * i], ports[2 * i + 1], os.path.join(self.dir, f"n{i + 1}"))
                        for i in range(n)]
        self.token = f"bench-{label}-{os.getpid()}"

    @property
    def endpoints(self):
        return [m.endpoint for m in self.members]

    def follower_first(self):
        """The endpoints with a follower first, then the others, the leader last.

        A client with fewer connections than members (1 client: 1 connection) talks to the
        first endpoint only, so whether that member leads decides what a one-client run
        measures (a follower forwards writes and asks the leader for a read index). Both
        systems get the same role: a follower, as for most members of a cluster."""
        if self.n == 1:
            return self.endpoints
        code, out, _ = run_capture(
            [self.args.etcdctl_bin, "--endpoints", ",".join(self.endpoints), "--dial-timeout", "1s",
             "--command-timeout", "3s", "endpoint", "status", "-w", "json"],
            timeout=15, env=dict(os.environ, ETCDCTL_API="3"))
        leaders = set()
        if code == 0:
            try:
                for st in json.loads(out):
                    if st["Status"]["leader"] == st["Status"]["header"]["member_id"]:
                        leaders.add(st["Endpoint"])
            except (ValueError, KeyError, TypeError):
                pass
        if len(leaders) != 1:
            log(f"{self.label}: leader unknown (endpoint status exit {code}); endpoints in member order")
            return self.endpoints
        order = sorted(self.endpoints, key=lambda e: e in leaders)
        if order != getattr(self, "_logged_order", self.endpoints):
            log(f"{self.label}: leader {next(iter(leaders))}, client endpoints {','.join(order)}")
        self._logged_order = order
        return order

    def command(self, m):
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        flags = [
            "--name", m.name, "--data-dir", m.data_dir,
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--snapshot-count", str(self.args.snapshot_count),
            "--heartbeat-interval", str(self.args.heartbeat_interval),
            "--election-timeout", str(self.args.election_timeout),
            "--quota-backend-bytes", str(self.args.quota_backend_bytes),
        ]
        if self.system == "etcd":
            return [self.args.etcd_bin] + flags
        return [self.args.raftvm_bin, "serve"] + flags

    def start(self):
        for m in self.members:
            os.makedirs(m.dir, exist_ok=True)
            with open(m.log, "ab") as f:
                f.write(("===== bench: " + " ".join(self.command(m)) + "\n").encode())
                f.flush()
                m.proc = spawn(self.command(m), f, subprocess.STDOUT)

    def pids(self):
        return [m.proc.pid for m in self.members if m.proc is not None and m.proc.poll() is None]

    def dead(self):
        """A message naming the members that exited, or None."""
        gone = [f"{m.name} (exit {m.proc.returncode})" for m in self.members
                if m.proc is not None and m.proc.poll() is not None]
        return f"{self.label}: server exited: {', '.join(gone)}" if gone else None

    def log_tail(self, m, n=30):
        try:
            with open(m.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError as e:
            return f"(cannot read {m.log}: {e})"

    def wait_ready(self, timeout):
        """Until a linearizable `etcdctl get` succeeds on every member (bounded)."""
        deadline = time.monotonic() + timeout
        pending = list(self.members)
        last = ""
        while pending:
            d = self.dead()
            if d:
                raise RuntimeError(d + "\n" + "\n".join(self.log_tail(m) for m in self.members))
            m = pending[0]
            code, out, err = run_capture(
                [self.args.etcdctl_bin, "--endpoints", m.endpoint, "--dial-timeout", "1s",
                 "--command-timeout", "3s", "get", "bench-probe"],
                timeout=15, env=dict(os.environ, ETCDCTL_API="3"))
            if code == 0:
                pending.pop(0)
                continue
            last = (err or out).strip()[-300:]
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.label}: {m.name} not serving after {timeout}s; last: {last}\n"
                                   + self.log_tail(m))
            time.sleep(POLL)

    def stop(self):
        for m in self.members:
            if m.proc is not None:
                kill_group(m.proc)


def wait_quiet(clusters, timeout, max_cores=0.10, window=0.5):
    """Polls until every server process of the given clusters together used less than
    max_cores of CPU over the last window (background flushes, compactions, snapshots
    of a previous run are over). Returns seconds waited, or None on timeout."""
    start = time.monotonic()
    deadline = start + timeout
    pids = [p for c in clusters for p in c.pids()]
    if not pids:
        return 0.0
    prev = sum(cpu_seconds(p) or 0.0 for p in pids)
    t_prev = time.monotonic()
    while True:
        time.sleep(window)
        cur = sum(cpu_seconds(p) or 0.0 for p in pids)
        now = time.monotonic()
        if (cur - prev) / (now - t_prev) < max_cores:
            return now - start
        if now >= deadline:
            return None
        prev, t_prev = cur, now


# ---------------------------------------------------------------------------
# Bench runs
# ---------------------------------------------------------------------------

UNSUPPORTED_MARKERS = ("unimplemented", "not implemented", "unknown service", "unsupported", "unknown method")


def parse_bench_json(stdout):
    text = stdout.strip()
    if not text:
        return None
    try:
        v = json.loads(text)
        return v if isinstance(v, dict) else None
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                v = json.loads(line)
                if isinstance(v, dict):
                    return v
            except ValueError:
                continue
    return None


def first_error(result, stderr):
    msgs = (result or {}).get("error_messages") or {}
    if msgs:
        msg, count = max(msgs.items(), key=lambda kv: kv[1])
        return f"{msg} (x{count})" if len(msgs) == 1 else f"{msg} (x{count}; {len(msgs)} kinds)"
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    return lines[-1] if lines else "no output"


def run_bench(args, bench_args, timeout):
    cmd = [args.bench_bin, "bench"] + bench_args
    t0 = time.monotonic()
    code, out, err = run_capture(cmd, timeout)
    wall = time.monotonic() - t0
    result = parse_bench_json(out)
    ok = (result or {}).get("ok") or 0
    if result is not None and ok > 0:
        status = "ok"
    else:
        text = (json.dumps((result or {}).get("error_messages") or {}) + " " + err).lower()
        status = "unsupported" if any(k in text for k in UNSUPPORTED_MARKERS) else "error"
    rec = {
        "cmd": cmd,
        "exit_code": code,
        "wall_s": round(wall, 3),
        "status": status,
        "result": result,
        "stderr_tail": err[-4000:],
    }
    if status != "ok" or (result or {}).get("errors"):
        rec["error"] = first_error(result, err)
    if result is None:
        rec["stdout_tail"] = out[-2000:]
    return rec


def load_args(args, endpoints, keys):
    """A bulk put of keys 0..keys-1, each once (the range prefill and the memory load)."""
    a = ["put", "--endpoints", ",".join(endpoints), "--total", str(keys), "--key-space", str(keys),
         "--sequential-keys", "--clients", str(args.load_clients), "--conns", str(args.load_conns),
         "--val-size", str(args.val_size)]
    if args.key_size:
        a += ["--key-size", str(args.key_size)]
    return a + ["--json"]


def bench_args_for(args, workload_id, clients, endpoints, repeat=0):
    if workload_id == PREFILL:
        return load_args(args, endpoints, args.key_space)
    workload, consistency = WORKLOADS[workload_id]
    conns = args.conns if args.conns else min(clients, 16)
    a = [workload, "--endpoints", ",".join(endpoints), "--clients", str(clients), "--conns", str(conns)]
    if consistency:
        a += ["--consistency", consistency]
    if args.duration:
        a += ["--duration", args.duration]
    else:
        a += ["--total", str(args.ops_1client if clients == 1 else args.ops)]
    if args.key_size:
        a += ["--key-size", str(args.key_size)]
    a += ["--val-size", str(args.val_size), "--key-space", str(args.key_space)]
    if workload == "txn-put":
        # Keys nobody wrote yet: the first compare (mod revision 0) succeeds, later ones use the
        # revision the client learned. On the prefilled keys nearly every compare would fail,
        # and so on the keys of an earlier run: every repeat gets keys of its own.
        a += ["--key-prefix", f"raftvm-bench-txn-c{clients}-r{repeat}/"]
    a.append("--json")
    return a


def cases(args):
    """(workload id, clients) in run order; the prefill goes before the first range run."""
    out = []
    for w in args.workloads:
        if w.startswith("range") and not any(x == PREFILL for x, _ in out):
            out.append((PREFILL, args.load_clients))
        if w == "put":
            clist = args.clients
        elif w.startswith("range"):
            clist = args.range_clients
        else:
            clist = args.other_clients
        out += [(w, c) for c in clist]
    return out


# ---------------------------------------------------------------------------
# Machine info
# ---------------------------------------------------------------------------

def sh(cmd, timeout=20):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:
        return None


def machine_info(args, data_root):
    info = {"nproc": os.cpu_count(), "nproc_available": len(os.sched_getaffinity(0))}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_kib"] = int(line.split()[1])
    except OSError:
        pass
    u = os.uname()
    info["kernel"] = f"{u.sysname} {u.release} {u.machine}"
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    df = sh(["df", "-P", "-T", data_root])
    if df:
        parts = df.splitlines()[-1].split()
        info["data_root_fs"] = {"device": parts[0], "fstype": parts[1], "mount": parts[-1]}
        dev = parts[0]
        if dev.startswith("/dev/"):
            lb = sh(["lsblk", "-ndo", "NAME,ROTA,TYPE,SIZE,MODEL", dev])
            if lb:
                info["data_root_disk"] = lb
                f = lb.split()
                if len(f) > 1:
                    info["data_root_rotational"] = f[1] == "1"
    ev = sh([args.etcd_bin, "--version"]) if args.etcd_bin else None
    if ev:
        info["etcd_version"] = ev.splitlines()[0].replace("etcd Version:", "").strip()
        info["etcd_version_full"] = ev
    info["etcdctl_version"] = ((sh([args.etcdctl_bin, "version"]) or "").splitlines() or [None])[0]
    info["raftvm_version"] = sh([args.raftvm_bin, "--version"])
    rev = sh(["git", "-C", REPO, "rev-parse", "HEAD"])
    if rev:
        dirty = sh(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
        info["raftvm_git_rev"] = rev + ("-dirty" if dirty else "")
    info["raftvm_bin"] = args.raftvm_bin
    try:
        info["raftvm_bin_mtime"] = datetime.datetime.fromtimestamp(os.path.getmtime(args.raftvm_bin)).isoformat()
    except OSError:
        pass
    info["loadavg_at_start"] = loadavg()
    info["hostname"] = socket.gethostname()
    return info


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------

def fmt_num(x):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def cell(rec):
    if rec is None:
        return "-"
    if rec["status"] != "ok":
        return rec["status"]
    return fmt_num(rec["result"].get("ops_per_sec"))


def p99(rec):
    if rec is None or rec["status"] != "ok":
        return "-"
    v = ((rec["result"] or {}).get("latency_ms") or {}).get("p99")
    return "-" if v is None else f"{v:.2f}"


def short(msg, n=70):
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def workload_label(wid):
    if wid == PREFILL:
        return "put (prefill, seq)"
    w, c = WORKLOADS[wid]
    return f"{w} ({c})" if c else w


def ops_of(rec):
    return (rec.get("result") or {}).get("ops_per_sec") if rec and rec["status"] == "ok" else None


def ratio_of(e, f):
    """raftvm/etcd throughput of two run records, if both succeeded."""
    eo, fo = ops_of(e), ops_of(f)
    if eo and fo is not None:
        return f"{fo / eo:.2f}x"
    return "-"


def median_run(recs):
    """The run with the median throughput (the lower middle one of an even count), or the
    last run if none succeeded."""
    ok = sorted((r for r in recs if ops_of(r) is not None), key=ops_of)
    if ok:
        return ok[(len(ok) - 1) // 2]
    return recs[-1] if recs else None


def runs_by_case(state):
    """{(workload id, nodes, clients): {system: [runs]}} in run order."""
    seen = {}
    for r in state["runs"]:
        key = (r["workload_id"], r["nodes"], r["clients"])
        seen.setdefault(key, {}).setdefault(r["system"], []).append(r)
    return seen


def table_rows(state):
    rows = []
    for (wid, nodes, clients), by in runs_by_case(state).items():
        e, f = median_run(by.get("etcd", [])), median_run(by.get("raftvm", []))
        ratio = ratio_of(e, f)
        notes = []
        for name in ("etcd", "raftvm"):
            got = sorted(o for o in map(ops_of, by.get(name, [])) if o is not None)
            if len(by.get(name, [])) > 1 and got:
                notes.append(f"{name}: median of {len(by[name])}, {fmt_num(got[0])}–{fmt_num(got[-1])}")
        for name, rec in (("etcd", e), ("raftvm", f)):
            if rec is None:
                continue
            if rec["status"] != "ok":
                notes.append(f"{name}: {short(rec.get('error', rec['status']), 60)}")
            elif (rec["result"] or {}).get("errors"):
                notes.append(f"{name}: {rec['result']['errors']} errors: {short(rec.get('error', ''), 40)}")
            if rec["status"] == "ok" and (rec["result"] or {}).get("cas_failed"):
                notes.append(f"{name}: {rec['result']['cas_failed']} cas failed")
        rows.append([workload_label(wid), str(nodes), str(clients), cell(e), cell(f), ratio, p99(e), p99(f),
                     "; ".join(notes)])
    mem = {m["system"]: m for m in state["memory"]}
    if mem:
        keys = max(m.get("keys", 0) for m in mem.values())
        e, f = mem.get("etcd"), mem.get("raftvm")

        def mrow(label, getter, unit_div, with_notes=False):
            ev = getter(e) if e else None
            fv = getter(f) if f else None
            ratio = f"{fv / ev:.2f}x" if ev and fv is not None else "-"
            notes = "; ".join(f"{n}: {short(m.get('error') or m.get('note'))}" for n, m in (("etcd", e), ("raftvm", f))
                              if with_notes and m and (m.get("error") or m.get("note")))
            return [label, "1", "-", fmt_num(ev / unit_div) if ev is not None else "-",
                    fmt_num(fv / unit_div) if fv is not None else "-", ratio, "-", "-", notes]

        le, lf = (e or {}).get("load"), (f or {}).get("load")
        rows.append(["put (mem load, seq keys)", "1", str(state["config"]["load_clients"]), cell(le), cell(lf),
                     ratio_of(le, lf), p99(le), p99(lf), ""])
        rows.append(mrow(f"memory: RSS MiB, {keys:,} keys", lambda m: m.get("rss_kib_after") and m["rss_kib_after"] * 1024, MIB, True))
        rows.append(mrow(f"memory: peak RSS MiB, {keys:,} keys", lambda m: m.get("hwm_kib_after") and m["hwm_kib_after"] * 1024, MIB))
        rows.append(mrow(f"disk: allocated MiB, {keys:,} keys", lambda m: m.get("disk_bytes"), MIB))
        rows.append(mrow(f"disk: apparent MiB, {keys:,} keys", lambda m: m.get("disk_apparent_bytes"), MIB))
    return rows


HEADER = ["workload", "nodes", "clients", "etcd ops/s", "raftvm ops/s", "raftvm/etcd", "etcd p99 ms",
          "raftvm p99 ms", "notes"]


def text_table(rows):
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in rows)) if rows else len(HEADER[i]) for i in range(len(HEADER))]
    right = {1, 2, 3, 4, 5, 6, 7}

    def line(r):
        return "  ".join((c.rjust(widths[i]) if i in right else c.ljust(widths[i])) for i, c in enumerate(r)).rstrip()

    return "\n".join([line(HEADER), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(rows):
    def esc(c):
        return c.replace("|", "\\|")
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * 7 + ["---"]) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def markdown(state, rows):
    m = state["machine"]
    c = state["config"]
    lines = [f"# raftvm vs etcd — {state['started_at']}", ""]
    lines.append(f"Command: `{' '.join(state['argv'])}`")
    lines.append("")
    mem = m.get("mem_total_kib")
    lines.append(
        f"Machine: {m.get('nproc')} CPUs ({m.get('cpu_model', '?')}), "
        f"{(mem or 0) / 1024 / 1024:.1f} GiB RAM, {m.get('os', '?')}, {m.get('kernel', '?')}; "
        f"data on {m.get('data_root_fs', {}).get('device', '?')} ({m.get('data_root_fs', {}).get('fstype', '?')}"
        + (", lsblk ROTA=1" if m.get("data_root_rotational") else ", lsblk ROTA=0" if "data_root_rotational" in m else "")
        + f"); load average at start {m.get('loadavg_at_start')}, at end {state.get('loadavg_at_end')}.")
    lines.append(f"etcd {m.get('etcd_version', '?')}; raftvm {m.get('raftvm_git_rev', '?')} (release build).")
    lines.append("")
    lines.append(
        f"Both systems: same server flags (`--snapshot-count {c['snapshot_count']} --heartbeat-interval "
        f"{c['heartbeat_interval']} --election-timeout {c['election_timeout']} --quota-backend-bytes "
        f"{c['quota_backend_bytes']}`), same disk, same client (`raftvm bench`), all members' endpoints given "
        f"to the client, a follower's first (a client with fewer connections than members talks to the first "
        f"only, so both systems' one-client runs go through a follower). Runs alternate which system goes first; before each run every server is idle. "
        f"Values {c['val_size']} B, key space {c['key_space']:,}, "
        + (f"each run {c['duration']}" if c.get("duration") else
           f"{c['ops']:,} ops per run ({c['ops_1client']:,} with 1 client)")
        + ", `--conns` = " + (str(c["conns"]) if c.get("conns") else "min(clients, 16)") + "."
        + (f" Each workload ran {c['repeat']} times per system; a row shows each system's median run "
           f"(ops/s and its p99) and the range in its notes." if c.get("repeat", 1) > 1 else ""))
    lines.append("")
    lines.append(md_table(rows))
    lines.append("")
    lines.append(
        "Rows: `put`, `delete`: one PutRequest / DeleteRangeRequest of a uniformly random key per op. "
        "`put (prefill, seq)`: every key of the key space put once, in order, before the first range run "
        f"({c['load_clients']} clients). `range (l)` / `range (s)`: a linearizable / serializable "
        "RangeRequest of one random key. `txn-put`: a Txn that puts the key if its mod revision is the "
        "one the client last saw (compare-and-swap), on a key prefix of its own. `watch`: as many watch streams as clients on the "
        "bench prefix while the clients put; ops/s counts delivered events, p99 is put→event latency. "
        "`lease-keepalive`: LeaseKeepAlive round trips, one lease per client. Latencies are per "
        "request as the client sees it. `unsupported` means the server answered Unimplemented.")
    lines.append("")
    if state["memory"]:
        lines.append("Memory: a fresh 1-node cluster of each system, alone on the machine, loaded with "
                     f"{c['mem_keys']:,} sequential keys of {c['val_size']} B; VmRSS/VmHWM of the server "
                     "process once it is idle, and the size of its data dir: allocated (`du`) and apparent "
                     "(sum of file sizes; preallocation such as etcd's 64 MB WAL segments or RocksDB's "
                     "fallocate counts only in the first).")
        for mm in state["memory"]:
            if mm.get("rss_kib_idle") is not None:
                lines.append(f"- {mm['system']}: RSS of the fresh, empty server {mm['rss_kib_idle'] / 1024:.1f} MiB")
        lines.append("")
    lines.append("Raw data: results.json. Plot: throughput.svg.")
    lines.append("")
    return "\n".join(lines)


def nice_step(span, target=5):
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def svg_plot(state):
    series = {}
    for (wid, nodes, clients), by in runs_by_case(state).items():
        if wid != "put":
            continue
        for system, recs in by.items():
            ops = ops_of(median_run(recs))
            if ops is not None:
                series.setdefault((system, nodes), []).append((clients, ops))
    W, H = 820, 480
    L, R, T, B = 85, 200, 55, 65
    pw, ph = W - L - R, H - T - B
    xs = sorted({c for pts in series.values() for c, _ in pts}) or [1, 16]
    ymax = max([o for pts in series.values() for _, o in pts] or [1.0])
    lx0, lx1 = math.log10(xs[0]), math.log10(xs[-1])
    if lx1 - lx0 < 1e-9:
        lx0, lx1 = lx0 - 0.5, lx1 + 0.5
    step = nice_step(ymax * 1.05)
    ytop = step * math.ceil(ymax * 1.05 / step)

    def X(c):
        return L + (math.log10(c) - lx0) / (lx1 - lx0) * pw

    def Y(v):
        return T + ph - v / ytop * ph

    e = html.escape
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         'font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>']
    c = state["config"]
    o.append(f'<text x="{L + pw / 2}" y="24" text-anchor="middle" font-size="15" font-weight="bold">'
             f'{e("put throughput vs clients — raftvm vs etcd")}</text>')
    sub = (f"{c['val_size']} B values, key space {c['key_space']:,}, "
           + (f"{c['duration']} per run" if c.get("duration") else
              f"{c['ops']:,} ops per run ({c['ops_1client']:,} with 1 client)")
           + f"; {state['machine'].get('nproc')} CPUs")
    o.append(f'<text x="{L + pw / 2}" y="42" text-anchor="middle" fill="#555">{e(sub)}</text>')
    # grid and y ticks
    v = 0.0
    while v <= ytop + step / 2:
        y = Y(v)
        o.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        o.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{e(f"{v:,.0f}")}</text>')
        v += step
    for cl in xs:
        x = X(cl)
        o.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{T + ph}" stroke="#eeeeee"/>')
        o.append(f'<text x="{x:.1f}" y="{T + ph + 18}" text-anchor="middle">{cl}</text>')
    o.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    o.append(f'<text x="{L + pw / 2}" y="{H - 18}" text-anchor="middle">clients (log scale)</text>')
    o.append(f'<text transform="translate(20,{T + ph / 2}) rotate(-90)" text-anchor="middle">ops/s</text>')
    colors = {"etcd": "#1f77b4", "raftvm": "#d62728"}
    dashes = {1: "", 3: ' stroke-dasharray="7,4"', 5: ' stroke-dasharray="2,3"'}
    ly = T + 10
    for (system, nodes) in sorted(series):
        pts = sorted(series[(system, nodes)])
        col = colors.get(system, "#444")
        dash = dashes.get(nodes, ' stroke-dasharray="4,2"')
        path = " ".join(f"{X(cl):.1f},{Y(op):.1f}" for cl, op in pts)
        o.append(f'<polyline points="{path}" fill="none" stroke="{col}" stroke-width="2"{dash}/>')
        for cl, op in pts:
            o.append(f'<circle cx="{X(cl):.1f}" cy="{Y(op):.1f}" r="3.5" fill="{col}">'
                     f'<title>{e(f"{system}, {nodes} node(s), {cl} clients: {op:,.0f} ops/s")}</title></circle>')
        lx = L + pw + 15
        o.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 30}" y2="{ly}" stroke="{col}" stroke-width="2"{dash}/>')
        o.append(f'<circle cx="{lx + 15}" cy="{ly}" r="3.5" fill="{col}"/>')
        o.append(f'<text x="{lx + 38}" y="{ly + 4}">{e(f"{system}, {nodes} node" + ("s" if nodes > 1 else ""))}</text>')
        ly += 22
    if not series:
        o.append(f'<text x="{L + pw / 2}" y="{T + ph / 2}" text-anchor="middle" fill="#a00">no successful put runs</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def write_json(state):
    path = os.path.join(state["out"], "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------

class Runner:
    def __init__(self, args):
        self.args = args
        self.clusters = []  # every cluster started and not yet stopped
        self.failed = False  # a topology or the memory phase broke (a workload failing does not count)
        base = args.data_root or os.environ.get("TMPDIR") or "/var/tmp"
        os.makedirs(base, exist_ok=True)
        self.data_root = tempfile.mkdtemp(prefix="raftvm-bench-", dir=base)
        os.makedirs(args.out, exist_ok=True)
        self.state = {
            "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:],
            "out": os.path.abspath(args.out),
            "data_root": self.data_root,
            "config": {k: v for k, v in vars(args).items()},
            "machine": machine_info(args, self.data_root),
            "runs": [],
            "memory": [],
            "warnings": [],
        }

    def warn(self, msg):
        log("warning: " + msg)
        self.state["warnings"].append(msg)

    def new_cluster(self, system, n, label, ports):
        c = Cluster(system, n, self.data_root, ports, self.args, label)
        self.clusters.append(c)
        c.start()
        return c

    def stop_cluster(self, c):
        c.stop()
        self.save_logs(c)
        if c in self.clusters:
            self.clusters.remove(c)
        if not self.args.keep_data:
            shutil.rmtree(c.dir, ignore_errors=True)

    def save_logs(self, c):
        """Keeps the last 256 KiB of every server log in OUT/logs/."""
        d = os.path.join(self.args.out, "logs")
        os.makedirs(d, exist_ok=True)
        for m in c.members:
            try:
                with open(m.log, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 256 * 1024))
                    data = f.read()
                with open(os.path.join(d, f"{c.label}-{m.name}.log"), "wb") as g:
                    g.write(data)
            except OSError:
                pass

    def settle(self, clusters):
        waited = wait_quiet(clusters, self.args.settle_timeout)
        if waited is None:
            self.warn(f"servers still busy after {self.args.settle_timeout}s; running anyway")
        return waited

    def topology(self, n):
        a = self.args
        ports = free_ports(2 * n * len(a.systems))
        clusters = {}
        for i, s in enumerate(a.systems):
            clusters[s] = self.new_cluster(s, n, f"{s}-{n}node", ports[2 * n * i: 2 * n * (i + 1)])
        try:
            for s, c in clusters.items():
                t0 = time.monotonic()
                c.wait_ready(a.startup_timeout)
                log(f"{c.label} ready in {time.monotonic() - t0:.1f}s: {','.join(c.endpoints)}")
            runs = [(wid, clients, k) for wid, clients in cases(a)
                    for k in range(1 if wid == PREFILL else max(1, a.repeat))]
            for i, (wid, clients, k) in enumerate(runs):
                order = list(a.systems) if i % 2 == 0 else list(reversed(a.systems))
                for s in order:
                    c = clusters[s]
                    workload, consistency = WORKLOADS.get(wid, ("put", None))
                    rec = {"system": s, "nodes": n, "workload_id": wid, "workload": workload,
                           "consistency": consistency, "clients": clients, "repeat": k}
                    dead = c.dead()
                    if dead:
                        rec.update(status="error", error=dead)
                    else:
                        rec["settle_s"] = self.settle(list(clusters.values()))
                        rec["loadavg_before"] = loadavg()
                        endpoints = c.follower_first()
                        rec["endpoints"] = endpoints
                        bargs = bench_args_for(a, wid, clients, endpoints, k)
                        rec.update(run_bench(a, bargs, a.run_timeout))
                        dead = c.dead()
                        if dead:
                            rec["server_exited"] = dead
                    self.state["runs"].append(rec)
                    write_json(self.state)
                    res = rec.get("result") or {}
                    if rec["status"] == "ok":
                        lat = res.get("latency_ms") or {}
                        log(f"{s:6} {n}n {workload_label(wid):16} c={clients:<4} {res.get('ops_per_sec', 0):>10,.0f} ops/s"
                            f"  p99 {lat.get('p99', float('nan')):.2f} ms"
                            + (f"  errors {res.get('errors')}" if res.get("errors") else ""))
                    else:
                        log(f"{s:6} {n}n {workload_label(wid):16} c={clients:<4} {rec['status']}: {short(rec.get('error', ''), 100)}")
        finally:
            for c in clusters.values():
                self.stop_cluster(c)

    def memory(self, system):
        a = self.args
        ports = free_ports(2)
        c = self.new_cluster(system, 1, f"{system}-mem", ports)
        m = {"system": system, "keys": a.mem_keys}
        try:
            c.wait_ready(a.startup_timeout)
            pid = c.members[0].proc.pid
            self.settle([c])
            m["rss_kib_idle"] = proc_status_kib(pid, "VmRSS")
            bargs = load_args(a, c.endpoints, a.mem_keys)
            log(f"{system}: loading {a.mem_keys:,} keys for the memory measurement")
            m["load"] = run_bench(a, bargs, a.mem_timeout)
            dead = c.dead()
            if dead:
                m["error"] = dead
                return m
            if m["load"]["status"] != "ok":
                m["error"] = "load: " + m["load"].get("error", m["load"]["status"])
            elif m["load"]["result"].get("errors"):
                m["note"] = f"load: {m['load']['result']['errors']} failed puts ({m['load'].get('error', '')})"
            m["settle_s"] = self.settle([c])
            m["rss_kib_after"] = proc_status_kib(pid, "VmRSS")
            m["hwm_kib_after"] = proc_status_kib(pid, "VmHWM")
            m["disk_bytes"], m["disk_apparent_bytes"] = dir_size(c.members[0].data_dir)
            res = m["load"].get("result") or {}
            log(f"{system}: {m['keys']:,} keys: RSS {(m['rss_kib_after'] or 0) / 1024:.1f} MiB "
                f"(peak {(m['hwm_kib_after'] or 0) / 1024:.1f}), data dir {m['disk_bytes'] / MIB:.1f} MiB, "
                f"load {res.get('ops_per_sec', 0):,.0f} puts/s")
            return m
        except Exception as e:
            m["error"] = f"{type(e).__name__}: {e}"
            return m
        finally:
            self.stop_cluster(c)

    def run(self):
        a = self.args
        log(f"data root {self.data_root}; results in {a.out}")
        for n in a.topologies:
            log(f"=== {n}-node clusters: {', '.join(a.systems)}")
            try:
                self.topology(n)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                self.failed = True
                self.warn(f"{n}-node topology aborted: {type(e).__name__}: {e}")
        if a.mem_keys > 0:
            log(f"=== memory: {a.mem_keys:,} keys on a fresh 1-node cluster of each system")
            for s in a.systems:
                m = self.memory(s)
                if m.get("error"):
                    self.failed = True
                    self.warn(f"memory measurement of {s}: {m['error']}")
                self.state["memory"].append(m)
                write_json(self.state)
        if self.state["runs"] and not any(r["status"] == "ok" for r in self.state["runs"]):
            self.failed = True
            self.warn("no bench run succeeded")

    def report(self):
        self.state["loadavg_at_end"] = loadavg()
        self.state["finished_at"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        rows = table_rows(self.state)
        self.state["table"] = {"header": HEADER, "rows": rows}
        write_json(self.state)
        with open(os.path.join(self.args.out, "results.md"), "w") as f:
            f.write(markdown(self.state, rows))
        with open(os.path.join(self.args.out, "throughput.svg"), "w") as f:
            f.write(svg_plot(self.state))
        print(text_table(rows))
        print(f"\nresults: {os.path.join(self.args.out, 'results.md')}, results.json, throughput.svg")

    def cleanup(self):
        for c in list(self.clusters):
            try:
                self.stop_cluster(c)
            except Exception as e:
                log(f"warning: stopping {c.label}: {e}")
        if self.args.keep_data:
            log(f"data kept in {self.data_root}")
        else:
            shutil.rmtree(self.data_root, ignore_errors=True)


def main(argv):
    args = parse_args(argv)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # Explicitly, also when started in the background (where SIGINT is inherited as ignored).
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    runner = Runner(args)
    interrupted = False
    try:
        runner.run()
    except KeyboardInterrupt:
        interrupted = True
        runner.warn("interrupted; reporting what was measured so far")
    finally:
        # Ignore further Ctrl-C while cleaning up, so no server is left behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        runner.cleanup()
        try:
            runner.report()
        except Exception as e:
            log(f"writing the report failed: {type(e).__name__}: {e}")
            raise
    if interrupted:
        return 130
    if runner.failed:
        log("finished with failures: " + ("; ".join(runner.state["warnings"]) or "see the notes column"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
