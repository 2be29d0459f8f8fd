//! Starting and stopping a node: storage, Raft, the peer and client gRPC servers.
//!
//! [`Server::start`] returns once both listeners are bound, so a caller (the CLI, a test,
//! an embedding program) can talk to the node right away; the cluster may still be
//! electing a leader.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use openraft::{SnapshotPolicy, ServerState};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::admin::AdminService;
use crate::api::cluster::ClusterService;
use crate::api::etcd_kv::{KvService, KV_MACHINE};
use crate::api::etcd_lease::LeaseService;
use crate::api::etcd_watch::WatchService;
use crate::api::maintenance::MaintenanceService;
use crate::api::concurrency::{ElectionService, LockService, Recipes};
use crate::proto::etcdserverpb::cluster_server::ClusterServer;
use crate::proto::v3electionpb::election_server::ElectionServer;
use crate::proto::v3lockpb::lock_server::LockServer;
use crate::proto::etcdserverpb::kv_server::KvServer;
use crate::proto::etcdserverpb::lease_server::LeaseServer;
use crate::proto::etcdserverpb::watch_server::WatchServer;
use crate::proto::etcdserverpb::maintenance_server::MaintenanceServer;
use crate::config::{bind_addr, first_url, ServeConfig};
use crate::node::{Node, PeerService};
use crate::proto::admin::admin_server::AdminServer;
use crate::proto::peer::raft_peer_server::RaftPeerServer;
use crate::raft::log_store::LogStore;
use crate::raft::network::{Network, MAX_PEER_MESSAGE};
use crate::raft::state_machine::StateMachineStore;
use crate::types::{MemberAttrs, Raft};

/// Log entries kept after a snapshot so slow followers can catch up without one (etcd's
/// snapshot catch-up entries), capped by `--snapshot-count`.
const CATCHUP_ENTRIES: u64 = 5000;

/// The etcd key-value machine (guest-examples/kv-mvcc), built into the binary so a new
/// cluster speaks etcd's API with no user action. `scripts/test.sh` rebuilds it from
/// source and fails if this copy is stale.
pub static DEFAULT_KV_MODULE: &[u8] = include_bytes!("../assets/kv-mvcc.wasm");

pub struct Server {
    pub node: Arc<Node>,
    pub client_addr: std::net::SocketAddr,
    pub peer_addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    removed: watch::Receiver<bool>,
}

impl Server {
    pub async fn start(cfg: ServeConfig) -> Result<Self> {
        // Refuse bad flags before touching the data dir or starting Raft.
        let members = cfg.members()?;
        let new_cluster = match cfg.initial_cluster_state.as_str() {
            "new" => true,
            "existing" => false,
            other => anyhow::bail!("--initial-cluster-state must be 'new' or 'existing', got {other:?}"),
        };
        let compaction = crate::compactor::policy(
            &cfg.auto_compaction_mode,
            &cfg.auto_compaction_retention,
            cfg.experimental_compaction_check_interval,
        )?;
        let data_dir = cfg.data_dir();
        let (id, cluster_id, joined) = identity(&cfg, &data_dir, new_cluster).await?;
        std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        // Backups a stopped process was sending.
        let _ = std::fs::remove_dir_all(crate::storage::backup::scratch_dir(&data_dir));

        let raft_config = openraft::Config {
            cluster_name: cfg.initial_cluster_token.clone(),
            heartbeat_interval: cfg.heartbeat_interval,
            election_timeout_min: cfg.election_timeout,
            election_timeout_max: cfg.election_timeout * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_count.max(1)),
            max_in_snapshot_log_to_keep: CATCHUP_ENTRIES.min(cfg.snapshot_count),
            install_snapshot_timeout: 10_000,
            // Entries per AppendEntries. openraft counts entries, not bytes; with batch
            // entries of up to 1 MiB (and single requests up to --max-request-bytes), 32
            // keeps an AppendEntries well inside MAX_PEER_MESSAGE (openraft's default is 300).
            max_payload_entries: 32,
            ..Default::default()
        }
        .validate()
        .context("raft configuration")?;

        // Bind before opening storage: a port already in use then ends the process
        // before RocksDB and raft have started threads that an early exit would race.
        let peer_listener = bind(&first_url(&cfg.listen_peer_urls)?).await?;
        let client_listener = bind(&first_url(&cfg.listen_client_urls)?).await?;

        let log = LogStore::open(&data_dir)?;
        let commit_index = log.commit_index();
        let durable = log.durable();
        let leads_others = log.defer_leader_syncs(id);
        let mut sm = StateMachineStore::open(&data_dir)?;
        sm.apply_only_synced(durable.clone());
        let shared = sm.shared();
        // Peers telling this member it was removed (`Network`), and this member announcing it.
        let (told_removed, told) = watch::channel(false);
        let (removed_tx, removed) = watch::channel(false);
        let told_removed = Arc::new(told_removed);
        let network = Network { removed: told_removed.clone(), durable };
        let raft = Raft::new(id, Arc::new(raft_config), network, log, sm).await.context("starting raft")?;
        tokio::spawn(crate::raft::log_store::defer_while_leading_others(leads_others, id, raft.server_metrics()));

        let node = Arc::new(Node {
            id,
            name: cfg.name.clone(),
            cluster_id,
            raft: raft.clone(),
            shared,
            request_timeout: Duration::from_secs(5),
            batcher: Default::default(),
            read_batcher: Default::default(),
            read_check: cfg.linearizable_reads,
            strict_reconfig_check: cfg.strict_reconfig_check,
            lease: Default::default(),
            commit_index,
            read_stats: Default::default(),
            was_member: (!joined).into(),
        });
        node.start_tasks();

        let peer_addr = peer_listener.local_addr()?;
        let client_addr = client_listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();

        let peer = RaftPeerServer::new(PeerService { node: node.clone(), stopped: stopped.clone() })
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE);
        let mut s = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(peer)
                .serve_with_incoming_shutdown(incoming(peer_listener), async move {
                    let _ = s.wait_for(|v| *v).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("peer server: {e}");
            }
        }));

        let max_msg = (cfg.max_request_bytes as usize).max(crate::runtime::MAX_MODULE_BYTES + 1024 * 1024);
        let admin = AdminServer::new(AdminService { node: node.clone() })
            .max_decoding_message_size(max_msg)
            .max_encoding_message_size(usize::MAX);
        // The transport limit is generous; the service answers over-limit requests with
        // the exact errors etcd gives (see KvService::check_grpc_size).
        let quota = Arc::new(crate::api::quota::Quota::new(node.clone(), cfg.quota_bytes()));
        let kv_service = KvService {
            node: node.clone(),
            max_request_bytes: cfg.max_request_bytes as usize,
            max_txn_ops: cfg.max_txn_ops as usize,
            quota: quota.clone(),
        };
        let lease_service = LeaseService {
            node: node.clone(),
            min_ttl: crate::lessor::min_ttl_secs(cfg.election_timeout, cfg.heartbeat_interval),
            quota,
            stopped: stopped.clone(),
        };
        // etcd's Lock and Election services: its concurrency recipes over KV and Lease.
        let recipes = Recipes { kv: kv_service.clone(), lease: lease_service.clone(), stopped: stopped.clone() };
        let kv = KvServer::new(kv_service)
            .max_decoding_message_size(4 * (cfg.max_request_bytes as usize + crate::api::etcd_kv::GRPC_OVERHEAD_BYTES))
            .max_encoding_message_size(usize::MAX);
        let lease = LeaseServer::new(lease_service);
        let maint_node = node.clone();
        let cluster = ClusterServer::new(ClusterService { node: node.clone() });
        let (watch_node, watch_stopped) = (node.clone(), stopped.clone());
        let mut s = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(admin)
                .add_service(kv)
                .add_service(lease)
                .add_service(WatchServer::new(WatchService { node: watch_node, stopped: watch_stopped }))
                .add_service(MaintenanceServer::new(MaintenanceService { node: maint_node }))
                .add_service(cluster)
                .add_service(LockServer::new(LockService(recipes.clone())))
                .add_service(ElectionServer::new(ElectionService(recipes)))
                .serve_with_incoming_shutdown(client_incoming(client_listener), async move {
                    let _ = s.wait_for(|v| *v).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("client server: {e}");
            }
        }));

        tasks.push(tokio::spawn(leader_callbacks(node.clone(), stopped.clone())));
        tasks.push(tokio::spawn(leave_when_removed(node.clone(), told, removed_tx, stopped.clone())));
        let every = Duration::from_millis(cfg.election_timeout.saturating_mul(3));
        tasks.push(tokio::spawn(ask_while_learner(node.clone(), told_removed, every, stopped.clone())));
        tasks.push(tokio::spawn(install_default_kv(node.clone(), stopped.clone())));
        tasks.push(tokio::spawn(crate::lessor::run_expiry(node.clone(), stopped.clone())));
        tasks.push(tokio::spawn(crate::compactor::finish_pending(node.clone(), stopped.clone())));
        let client_urls = cfg.advertise_client_urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect();
        tasks.push(tokio::spawn(publish_member(node.clone(), client_urls, stopped.clone())));
        if let Some(policy) = compaction {
            tracing::info!(?policy, "auto-compaction enabled");
            tasks.push(tokio::spawn(crate::compactor::run(node.clone(), policy, stopped.clone())));
        }

        if new_cluster && !raft.is_initialized().await? {
            tracing::info!(members = members.len(), "bootstrapping a new cluster");
            if let Err(e) = raft.initialize(members).await {
                // Another member's vote or log may have initialized us meanwhile.
                tracing::info!("initialize: {e}");
            }
        }
        tracing::info!(name = %cfg.name, id = format!("{id:x}"), %client_addr, %peer_addr, "raftvm node started");
        Ok(Self { node, client_addr, peer_addr, stop, tasks, removed })
    }

    /// Resolves once this member has been removed from the cluster (etcd's MemberRemove);
    /// it then serves nothing useful and should be stopped, as etcd stops such a member.
    pub async fn removed(&self) {
        let mut r = self.removed.clone();
        let _ = r.wait_for(|v| *v).await;
    }

    /// Stop serving and shut Raft down.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        let _ = self.node.raft.shutdown().await;
        for t in self.tasks {
            let _ = t.await;
        }
        Ok(())
    }
}

/// Where a member that joined an existing cluster keeps the id MemberAdd gave it and the
/// cluster's id (JSON), since neither follows from its flags.
const JOINED_FILE: &str = "member.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct JoinedIdentity {
    member_id: u64,
    cluster_id: u64,
}

/// This member's id and its cluster's. A member of the cluster's first configuration
/// derives both from its flags (name, peer URL, token, `--initial-cluster`), at every
/// start. A member added later (etcd's MemberAdd, then `serve --initial-cluster-state
/// existing` on a fresh data dir) asks the members in `--initial-cluster` which id its
/// peer URL was given, and keeps the answer in `member.json` for its restarts.
///
/// Returns `(member id, cluster id, whether this member joined after the first configuration)`.
async fn identity(cfg: &ServeConfig, data_dir: &std::path::Path, new_cluster: bool) -> Result<(u64, u64, bool)> {
    // Also checks that --initial-cluster names this member at its advertised peer URL.
    let derived = (cfg.my_id()?, cfg.cluster_id()?);
    let file = data_dir.join(JOINED_FILE);
    match std::fs::read(&file) {
        Ok(b) => {
            let j: JoinedIdentity = serde_json::from_slice(&b).with_context(|| format!("reading {}", file.display()))?;
            return Ok((j.member_id, j.cluster_id, true));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    }
    let fresh = ["raft-log", "raft", "state"].iter().all(|d| !data_dir.join(d).exists());
    if new_cluster || !fresh {
        return Ok((derived.0, derived.1, false));
    }
    let me = first_url(&cfg.initial_advertise_peer_urls)?;
    let mut errors = Vec::new();
    for peer in cfg.members()?.into_values().map(|m| m.peer_url).filter(|u| *u != me) {
        match ask_join(&peer, &me).await {
            Ok(reply) => {
                tracing::info!(id = format!("{:x}", reply.member_id), %peer, "joining an existing cluster");
                std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
                let j = JoinedIdentity { member_id: reply.member_id, cluster_id: reply.cluster_id };
                crate::raft::state_machine::write_atomic(&file, &serde_json::to_vec(&j)?)?;
                return Ok((j.member_id, j.cluster_id, true));
            }
            // Definitive: this member has run before, with a data dir it no longer has.
            Err(e) if e.code() == tonic::Code::FailedPrecondition => anyhow::bail!("{}", e.message()),
            Err(e) => errors.push(format!("{peer}: {}", e.message())),
        }
    }
    anyhow::bail!(
        "--initial-cluster-state existing: no member of --initial-cluster gave this member ({me}) its id: {}",
        if errors.is_empty() { "--initial-cluster names no other member".to_string() } else { errors.join("; ") }
    )
}

async fn ask_join(peer: &str, me: &str) -> Result<crate::proto::peer::JoinReply, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(peer.to_string())
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting: {e}")))?;
    let req = crate::proto::peer::JoinRequest { peer_url: me.to_string() };
    Ok(crate::proto::peer::raft_peer_client::RaftPeerClient::new(channel).join(req).await?.into_inner())
}

async fn bind(url: &str) -> Result<TcpListener> {
    let addr = bind_addr(url)?;
    TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))
}

/// Report when this member is no longer in the cluster: its own committed configuration
/// lacks it, or a peer answered a vote request with
/// [`crate::raft::network::ERR_MEMBER_REMOVED`] (`told`; a removed member may never receive
/// the entry that removed it).
async fn leave_when_removed(
    node: Arc<Node>,
    mut told: watch::Receiver<bool>,
    removed: watch::Sender<bool>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut metrics = node.raft.metrics();
    loop {
        metrics.borrow_and_update();
        if *told.borrow_and_update() || node.self_removed() {
            tracing::error!("the member has been permanently removed from the cluster");
            // A leader that removed itself is still answering that call (and maybe
            // others): let them finish, within bounds.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while node.shared.commands_in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            removed.send_replace(true);
            return;
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            r = told.changed() => if r.is_err() { return },
            _ = stopped.wait_for(|v| *v) => return,
        }
    }
}

/// A learner never asks for votes, so, unlike a voter, no peer ever answers it that it was
/// removed; and the leader stops replicating to a removed learner at once, so it may never
/// receive the entry that removed it (it was down, say). While this member is a learner in
/// its own configuration, it asks its peers every `every` whether they still count it; a
/// peer whose committed configuration removed it answers
/// [`crate::raft::network::ERR_MEMBER_REMOVED`] and `told` is set, as for a voter.
async fn ask_while_learner(node: Arc<Node>, told: Arc<watch::Sender<bool>>, every: Duration, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped.wait_for(|v| *v) => return,
        }
        let (peers, last_log_index) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let learner = membership.get_node(&node.id).is_some() && !membership.voter_ids().any(|v| v == node.id);
            if !learner {
                continue;
            }
            (crate::node::other_peer_urls(membership, node.id), m.last_log_index.unwrap_or(0))
        };
        for url in peers {
            let Ok(link) = crate::raft::network::peer_link(&url) else { continue };
            let mut req = tonic::Request::new(crate::proto::peer::MemberCheckRequest { member_id: node.id, last_log_index });
            req.set_timeout(every);
            if let Err(s) = link.client().member_check(req).await {
                if crate::raft::network::is_member_removed(&s) {
                    told.send_replace(true);
                    return;
                }
                tracing::debug!(peer = %url, "member check: {s}");
            }
        }
    }
}

/// Call every machine's `on-leader-change` when this node gains or loses leadership.
async fn leader_callbacks(node: Arc<Node>, mut stopped: watch::Receiver<bool>) {
    let mut metrics = node.raft.metrics();
    let mut was_leader = false;
    loop {
        let (is_leader, term) = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader, m.current_term)
        };
        if is_leader != was_leader {
            was_leader = is_leader;
            let shared = node.shared.clone();
            let _ = tokio::task::spawn_blocking(move || shared.runtime.leader_changed(&shared.db(), is_leader, term)).await;
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            _ = stopped.wait_for(|v| *v) => return,
        }
    }
}

/// Whenever this node leads a cluster that never had the default `kv` machine, propose it.
/// The entry is a no-op on clusters that already saw it (see `Request::InstallDefault`).
async fn install_default_kv(node: Arc<Node>, mut stopped: watch::Receiver<bool>) {
    let mut metrics = node.raft.metrics();
    loop {
        let is_leader = metrics.borrow_and_update().state == ServerState::Leader;
        if is_leader {
            let shared = node.shared.clone();
            let db = shared.db();
            let needed = !db.default_installed(KV_MACHINE).unwrap_or(true);
            if needed {
                let wasm = match tokio::task::spawn_blocking(move || shared.runtime.validate(DEFAULT_KV_MODULE)).await {
                    Ok(Ok(w)) => w,
                    other => {
                        tracing::error!("built-in kv module is invalid: {other:?}");
                        return;
                    }
                };
                let req = crate::types::Request::InstallDefault {
                    name: KV_MACHINE.to_string(),
                    wasm,
                    fuel: crate::runtime::KV_FUEL,
                    memory_bytes: crate::runtime::KV_MEMORY_BYTES,
                };
                match node.propose(req).await {
                    Ok(_) => tracing::info!("installed the built-in kv machine"),
                    Err(e) => {
                        tracing::warn!("installing the built-in kv machine: {e}; retrying");
                        // Back off before retrying a failed proposal (not synchronization).
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                continue;
            }
            return;
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            _ = stopped.wait_for(|v| *v) => return,
        }
    }
}

/// Publishes this member's name and client URLs (`--advertise-client-urls`) through the
/// log for MemberList, as etcd does when it starts, unless the cluster already holds
/// exactly these. Retries until it has a leader to propose to.
async fn publish_member(node: Arc<Node>, client_urls: Vec<String>, mut stopped: watch::Receiver<bool>) {
    let attrs = MemberAttrs { name: node.name.clone(), client_urls };
    loop {
        let published = node.shared.db().member_attrs().ok().and_then(|m| m.get(&node.id).cloned());
        if published.as_ref() == Some(&attrs) {
            return;
        }
        if node.leader().is_some() {
            let req = crate::types::Request::PublishMember { id: node.id, name: attrs.name.clone(), client_urls: attrs.client_urls.clone() };
            match node.propose(req).await {
                Ok(_) => {
                    tracing::info!(client_urls = ?attrs.client_urls, "published this member's client URLs");
                    return;
                }
                Err(e) => tracing::debug!("publishing this member's client URLs: {e}; retrying"),
            }
        }
        // Back off before asking again (a retry pause, not synchronization).
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stopped.wait_for(|v| *v) => return,
        }
    }
}

/// [`incoming`] for the client URL, each connection able to repair a URL sent as its
/// `:authority` (see `api::authority`).
fn client_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<crate::api::authority::AuthorityFix<tokio::net::TcpStream>>> {
    use futures::TryStreamExt;
    incoming(listener).map_ok(crate::api::authority::AuthorityFix::new)
}

/// Accepted connections with Nagle's algorithm off: gRPC writes small frames, and with
/// Nagle on, a response could wait for the client's delayed ACK (~40 ms).
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
