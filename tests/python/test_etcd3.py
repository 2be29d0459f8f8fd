"""The Python `etcd3` client (PyPI `etcd3`) against a 3-node raftvm cluster.

The module starts its own cluster of `raftvm serve` processes on free loopback ports
in a temp dir and kills them at the end. Binary: $RAFTVM_BIN, else
$CARGO_TARGET_DIR/debug/raftvm, else ~/.cache/raftvm/target/debug/raftvm.

Run:  PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python python3 -m pytest -q tests/python
(`cargo test -p raftvm-tests --test etcd_clients python_etcd3` does this for you).
etcd3 0.12's generated protobuf modules need the pure-Python protobuf implementation
with protobuf >= 4, hence the environment variable (set below too, before the import).
"""

import ctypes
import json
import queue
import secrets
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

import etcd3  # noqa: E402
import grpc  # noqa: E402
import pytest  # noqa: E402

STARTUP_TIMEOUT = 60.0
POLL_INTERVAL = 0.05


def raftvm_bin():
    env = os.environ.get("RAFTVM_BIN")
    if env:
        return env
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/raftvm/target")
    path = os.path.join(target, "debug", "raftvm")
    if not os.path.isfile(path):
        pytest.fail(f"raftvm binary not found at {path}: build it with `cargo build -p raftvm` or set RAFTVM_BIN")
    return path


def private_loopback():
    """A random 127.A.B.C outside 127.0.0.0/16, so no other process (whose outgoing
    connections take ephemeral ports on 127.0.0.1) races for the ports we pick."""
    r = secrets.randbits(24)
    return f"127.{1 + r % 254}.{(r >> 8) & 0xFF}.{1 + (r >> 16) % 254}"


def free_ports(host, n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent():
    # PR_SET_PDEATHSIG = 1: the node is killed if pytest dies without cleaning up.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def poll_until(what, check, timeout=STARTUP_TIMEOUT):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            ok, last = check()
            if ok:
                return last
        except Exception as e:  # noqa: BLE001 - report the last failure on timeout
            last = repr(e)
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last observation: {last}")
        time.sleep(POLL_INTERVAL)


class RaftvmCluster:
    def __init__(self, n):
        self.bin = raftvm_bin()
        self.dir = tempfile.mkdtemp(prefix="raftvm-py-")
        self.host = host = private_loopback()
        ports = free_ports(host, 2 * n)
        self.names = [f"n{i + 1}" for i in range(n)]
        self.client_ports = ports[0::2]
        peer_ports = ports[1::2]
        initial = ",".join(f"{nm}=http://{host}:{p}" for nm, p in zip(self.names, peer_ports))
        token = "raftvm-py-" + uuid.uuid4().hex[:12]
        self.procs, self.logs = [], []
        for nm, cp, pp in zip(self.names, self.client_ports, peer_ports):
            d = os.path.join(self.dir, nm)
            os.makedirs(d)
            log_path = os.path.join(d, "node.log")
            self.logs.append(log_path)
            args = [
                self.bin, "serve", "--name", nm, "--data-dir", os.path.join(d, "data"),
                "--listen-client-urls", f"http://{host}:{cp}",
                "--advertise-client-urls", f"http://{host}:{cp}",
                "--listen-peer-urls", f"http://{host}:{pp}",
                "--initial-advertise-peer-urls", f"http://{host}:{pp}",
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", token,
            ]
            with open(log_path, "ab") as log:
                self.procs.append(subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent, env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
                ))

    def endpoint(self, i):
        return f"{self.host}:{self.client_ports[i]}"

    def cli(self, i, *args):
        return subprocess.run([self.bin, *args, "--endpoints", self.endpoint(i)],
                              capture_output=True, text=True, timeout=30)

    def _check_alive(self):
        for nm, p in zip(self.names, self.procs):
            if p.poll() is not None:
                raise AssertionError(f"node {nm} exited with {p.returncode}\n{self.log_tails()}")

    def wait_ready(self):
        def leader_agreed():
            self._check_alive()
            st = []
            for i in range(len(self.procs)):
                out = self.cli(i, "status", "-w", "json")
                if out.returncode != 0:
                    return False, out.stderr
                st.append(json.loads(out.stdout)[0])
            leaders = [s for s in st if s["is_leader"]]
            if len(leaders) != 1 or any(s["leader_id"] != leaders[0]["member_id"] for s in st):
                return False, st
            return True, st

        poll_until("a leader all nodes agree on", leader_agreed)
        for i in range(len(self.procs)):
            def kv_listed(i=i):
                self._check_alive()
                out = self.cli(i, "module", "list")
                listed = any(line.split("\t")[0] == "kv" for line in out.stdout.splitlines())
                return out.returncode == 0 and listed, out.stdout + out.stderr
            poll_until(f"the kv machine on {self.names[i]}", kv_listed)

    def log_tails(self, n=40):
        out = []
        for nm, path in zip(self.names, self.logs):
            try:
                with open(path, errors="replace") as f:
                    lines = f.read().splitlines()[-n:]
            except OSError as e:
                lines = [f"(cannot read {path}: {e})"]
            out.append(f"----- last lines of {nm} ({path}) -----\n" + "\n".join(lines))
        return "\n".join(out)

    def close(self, keep=False):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if keep:
            print(f"[test_etcd3] cluster files kept in {self.dir}\n{self.log_tails()}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(request):
    c = RaftvmCluster(3)
    failed_before = request.session.testsfailed
    try:
        c.wait_ready()
        yield c
    except BaseException:
        c.close(keep=True)
        raise
    else:
        c.close(keep=request.session.testsfailed > failed_before)


@pytest.fixture(scope="module")
def clients(cluster):
    cs = [etcd3.client(host=cluster.host, port=p, timeout=15) for p in cluster.client_ports]
    yield cs
    for c in cs:
        c.close()


def values(pairs):
    return [(m.key.decode(), v.decode()) for v, m in pairs]


def test_members(cluster, clients):
    # etcd3's `members` calls Cluster.MemberList; every member publishes its client URL
    # through the log once it starts.
    want = sorted(
        (nm, [f"http://{cluster.host}:{cp}"]) for nm, cp in zip(cluster.names, cluster.client_ports)
    )

    def listed(c):
        return sorted((m.name, list(m.client_urls)) for m in c.members)

    poll_until("every member's client URL", lambda: (listed(clients[0]) == want, listed(clients[0])))
    for c in clients:
        members = list(c.members)
        assert sorted((m.name, list(m.client_urls)) for m in members) == want
        assert len({m.id for m in members}) == len(want)
        assert all(len(m.peer_urls) == 1 and m.peer_urls[0].startswith("http://") for m in members)

    # A member added through etcd3 (MemberAdd; it never starts) is listed without a name,
    # moves to another peer URL (MemberUpdate) and is removed again, each through another
    # member (followers pass the call to the leader).
    added = clients[0].add_member(["http://127.0.0.1:1"])
    assert added.name == "" and list(added.peer_urls) == ["http://127.0.0.1:1"]
    clients[1].update_member(added.id, ["http://127.0.0.1:2"])

    def peer_urls_of_added():
        urls = {m.id: list(m.peer_urls) for m in clients[2].members}
        return urls.get(added.id) == ["http://127.0.0.1:2"], urls

    poll_until("the updated peer URL", peer_urls_of_added)
    clients[2].remove_member(added.id)
    poll_until("the added member gone", lambda: (listed(clients[0]) == want, listed(clients[0])))


def test_put_get_on_every_member(clients):
    a, b, c = clients
    resp = a.put("/py/k", "v1")
    rev = resp.header.revision
    for i, cl in enumerate(clients):
        value, meta = cl.get("/py/k")
        assert value == b"v1", f"member {i}"
        assert meta.key == b"/py/k"
        assert meta.mod_revision == rev and meta.create_revision == rev and meta.version == 1
    prev = b.put("/py/k", "v2", prev_kv=True)
    assert prev.prev_kv.value == b"v1"
    for i, cl in enumerate(clients):
        value, meta = cl.get("/py/k")
        assert (value, meta.version) == (b"v2", 2), f"member {i}"
    assert c.get("/py/missing") == (None, None)
    # Serializable reads are served locally; a follower may lag briefly.
    poll_until("a serializable read to catch up",
               lambda: (c.get("/py/k", serializable=True)[0] == b"v2", c.get("/py/k", serializable=True)))


def test_delete(clients):
    a, b, c = clients
    a.put("/py/del", "x")
    assert b.delete("/py/del") is True
    assert b.delete("/py/del") is False
    for cl in clients:
        assert cl.get("/py/del") == (None, None)
    c.put("/py/del2", "y")
    resp = a.delete("/py/del2", prev_kv=True, return_response=True)
    assert resp.deleted == 1 and resp.prev_kvs[0].value == b"y"


def test_prefix(clients):
    a, b, c = clients
    for i in range(5):
        clients[i % 3].put(f"/py/pre/{i}", f"v{i}")
    a.put("/py/prefix-sibling", "s")
    want = [(f"/py/pre/{i}", f"v{i}") for i in range(5)]
    for i, cl in enumerate(clients):
        assert values(cl.get_prefix("/py/pre/")) == want, f"member {i}"
    desc = values(b.get_prefix("/py/pre/", sort_order="descend", sort_target="key"))
    assert desc == list(reversed(want))
    by_mod = values(c.get_prefix("/py/pre/", sort_order="descend", sort_target="mod"))
    assert by_mod == list(reversed(want))
    keys = [m.key.decode() for _, m in a.get_prefix("/py/pre/", keys_only=True)]
    assert keys == [k for k, _ in want]
    assert values(b.get_range("/py/pre/1", "/py/pre/3")) == want[1:3]
    resp = c.delete_prefix("/py/pre/")
    assert resp.deleted == 5
    for i, cl in enumerate(clients):
        assert list(cl.get_prefix("/py/pre/")) == [], f"member {i}"
        assert cl.get("/py/prefix-sibling")[0] == b"s"


def test_transactions(clients):
    a, b, c = clients
    t = a.transactions
    a.put("/py/txn", "old")
    ok, responses = b.transaction(
        compare=[t.value("/py/txn") == "old", t.version("/py/txn") > 0],
        success=[t.put("/py/txn", "new"), t.get("/py/txn")],
        failure=[t.put("/py/txn", "failed")],
    )
    assert ok
    assert [v for v, _ in responses[1]] == [b"new"]
    for cl in clients:
        assert cl.get("/py/txn")[0] == b"new"
    ok, responses = c.transaction(
        compare=[t.value("/py/txn") == "old"],
        success=[t.put("/py/txn", "never")],
        failure=[t.get("/py/txn"), t.delete("/py/txn-other")],
    )
    assert not ok
    assert [v for v, _ in responses[0]] == [b"new"]
    # create/mod revision compares, and the client's helpers built on transactions.
    _, meta = a.get("/py/txn")
    ok, _ = c.transaction(compare=[t.mod("/py/txn") == meta.mod_revision,
                                   t.create("/py/txn") < meta.mod_revision],
                          success=[t.put("/py/txn", "cas")], failure=[])
    assert ok
    assert b.replace("/py/txn", "cas", "replaced") is True
    assert a.replace("/py/txn", "cas", "again") is False
    assert c.get("/py/txn")[0] == b"replaced"
    assert a.put_if_not_exists("/py/once", "1") is True
    assert b.put_if_not_exists("/py/once", "2") is False
    assert c.get("/py/once")[0] == b"1"


def test_compaction_and_errors(clients):
    a, b, c = clients
    first = a.put("/py/rev", "1").header.revision
    second = b.put("/py/rev", "2").header.revision
    # etcd3 0.12's get() does not pass a revision: use its generated stub directly.
    rng = etcd3.etcdrpc.RangeRequest
    old = c.kvstub.Range(rng(key=b"/py/rev", revision=first), 15)
    assert [kv.value for kv in old.kvs] == [b"1"]
    a.compact(second)
    for cl in clients:
        with pytest.raises(grpc.RpcError) as e:
            cl.kvstub.Range(rng(key=b"/py/rev", revision=first), 15)
        assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert e.value.details() == "etcdserver: mvcc: required revision has been compacted"
        with pytest.raises(grpc.RpcError) as e:
            cl.kvstub.Range(rng(key=b"/py/rev", revision=second + 1000), 15)
        assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert e.value.details() == "etcdserver: mvcc: required revision is a future revision"
        assert cl.get("/py/rev")[0] == b"2"
    with pytest.raises(grpc.RpcError) as e:
        b.put("", "v")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "etcdserver: key is not provided"


def test_leases(clients):
    a, b, c = clients
    lease = a.lease(30)
    assert lease.id > 0 and lease.ttl == 30
    b.put("/py/lease/a", "1", lease=lease)
    c.put("/py/lease/b", "2", lease=lease.id)
    for i, cl in enumerate(clients):
        value, meta = cl.get("/py/lease/a")
        assert (value, meta.lease_id) == (b"1", lease.id), f"member {i}"
    info = c.get_lease_info(lease.id)
    assert info.grantedTTL == 30 and 25 <= info.TTL <= 30, info
    assert sorted(info.keys) == [b"/py/lease/a", b"/py/lease/b"]
    assert [(r.ID, r.TTL) for r in b.refresh_lease(lease.id)] == [(lease.id, 30)]
    assert lease.granted_ttl == 30
    fixed = b.lease(60, lease_id=0x5151)
    assert (fixed.id, fixed.ttl) == (0x5151, 60)
    with pytest.raises(etcd3.exceptions.PreconditionFailedError):
        c.lease(60, lease_id=0x5151)

    lease.revoke()
    for i, cl in enumerate(clients):
        assert list(cl.get_prefix("/py/lease/")) == [], f"member {i}"
    assert c.get_lease_info(lease.id).TTL == -1
    assert [r.TTL for r in a.refresh_lease(lease.id)] == [0]
    for call in (lambda: b.revoke_lease(lease.id), lambda: c.put("/py/lease/c", "x", lease=lease.id)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == "etcdserver: requested lease not found"
    fixed.revoke()


def _collector():
    """A watch callback that queues what it gets, and a way to take `n` events from it."""
    q = queue.Queue()

    def take(n, timeout=15):
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out with {len(got)} of {n} events: {got}"
            r = q.get(timeout=left)
            if isinstance(r, Exception):
                got.append(r)
                return got
            got.extend(r.events)
        return got

    return q.put, take


def test_watch(clients):
    a, b, c = clients
    first = a.put("/py/w/a", "1").header.revision
    b.put("/py/w/b", "2")
    b.delete("/py/w/a")
    # On a follower: history from a past revision with prev_kv, then live events.
    put, take = _collector()
    wid = c.add_watch_prefix_callback("/py/w/", put, start_revision=first, prev_kv=True)
    a.put("/py/w/b", "3")
    evs = take(4)
    assert [(type(e).__name__, e.key, e.mod_revision) for e in evs] == [
        ("PutEvent", b"/py/w/a", first),
        ("PutEvent", b"/py/w/b", first + 1),
        ("DeleteEvent", b"/py/w/a", first + 2),
        ("PutEvent", b"/py/w/b", first + 3),
    ]
    assert [e.value for e in evs if isinstance(e, etcd3.events.PutEvent)] == [b"1", b"2", b"3"]
    assert (evs[2].prev_value, evs[3].prev_value) == (b"1", b"2")
    c.cancel_watch(wid)

    # Single key, from now, through another member; a compacted start is an error.
    # A linearizable read first: b has then applied every write acknowledged so far,
    # so "now" on b is after them (add_watch_callback returns once the watch is created).
    b.get("/py/w/b")
    put, take = _collector()
    wid = b.add_watch_callback("/py/w/b", put)
    a.delete("/py/w/b")
    (ev,) = take(1)
    assert isinstance(ev, etcd3.events.DeleteEvent) and ev.key == b"/py/w/b"
    b.cancel_watch(wid)
    rev = a.put("/py/w/c", "x").header.revision
    a.compact(rev)
    # c applies the compaction on its own time: a linearizable read on c waits for it
    # (under load c still served the old history here, and the watch got events).
    c.get("/py/w/c")
    put, take = _collector()
    c.add_watch_prefix_callback("/py/w/", put, start_revision=first)
    (err,) = take(1)
    assert isinstance(err, etcd3.exceptions.RevisionCompactedError) and err.compacted_revision == rev


def test_snapshot(clients, tmp_path):
    """etcd3's `snapshot` streams a member's state; `raftvm snapshot status` checks the
    file's trailing sha256 and finds the kv module in it."""
    a, b, _ = clients
    a.put("/py/snap", "s")
    b.get("/py/snap")  # linearizable: b has applied the put
    path = tmp_path / "py.db"
    with open(path, "wb") as f:
        b.snapshot(f)
    out = subprocess.run([raftvm_bin(), "snapshot", "status", str(path), "-w", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["total_size"] == path.stat().st_size
    assert [name for name, _ in info["modules"]] == ["kv"]
    assert info["total_keys"] > 0
