//! The state-machine driver: openraft hands it committed entries, it runs them through the
//! Wasm runtime and commits each applied batch with one RocksDB write batch that also
//! records the last applied log id.
//!
//! Snapshots are RocksDB checkpoints of the state DB packed into a tar archive in a file
//! (see [`crate::raft::snapshot`]); installing one unpacks it into a fresh state directory
//! and swaps it in (`state/CURRENT` names the live one).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, Snapshot};
use tokio::sync::broadcast;

use crate::raft::log_store::Durable;
use crate::raft::snapshot::{self, SnapshotFile};
use crate::storage::backup;
use crate::lessor::{Lessor, ERR_LEASE_EXISTS, ERR_LEASE_NOT_FOUND, ERR_LEASE_TTL_TOO_LARGE, MAX_LEASE_TTL};
use crate::runtime::{ApplyContext, Runtime};
use crate::storage::leases::{attach_key, attached_keys, encode_lease, get_lease, lease_key, list_leases, machine_attach_prefix, LeaseRecord};
use crate::storage::{machine_prefix, prefix_end, ModuleRecord, PendingBatch, StateDb};
use crate::types::{
    ApplyError, ApplyErrorKind, Entry, LogId, MemberAttrs, Request, Response, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};

/// Most commands a batch of entries may hold to be applied on the async task itself.
const INLINE_APPLY_COMMANDS: usize = 4;

/// Events of one committed command, for the watch hub.
#[derive(Debug, Clone)]
pub struct CommittedEvents {
    pub machine: String,
    pub index: u64,
    pub events: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What the node's services share with the driver: the live state DB and the runtime.
pub struct Shared {
    data_dir: PathBuf,
    db: RwLock<Arc<StateDb>>,
    pub runtime: Arc<Runtime>,
    pub events: broadcast::Sender<Arc<CommittedEvents>>,
    /// Lease deadlines (not replicated; see `lessor`), kept in step with the applied table.
    pub leases: Lessor,
    snapshot_seq: AtomicU64,
    /// Held while the current snapshot is replaced or opened. openraft builds a snapshot
    /// on a task of its own, so without it a leader could read the old metadata and find
    /// its data file just removed by the new snapshot.
    snapshot_files: std::sync::Mutex<()>,
    /// Client commands this node is proposing or forwarding and has not answered yet.
    pub commands_in_flight: AtomicUsize,
}

/// Counts commands in [`Shared::commands_in_flight`] while it lives.
pub struct InFlight<'a>(&'a AtomicUsize, usize);

impl<'a> InFlight<'a> {
    pub fn new(counter: &'a AtomicUsize, commands: usize) -> Self {
        counter.fetch_add(commands, Ordering::Relaxed);
        Self(counter, commands)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

impl Shared {
    /// The live state DB. Hold the `Arc` only for one read: a snapshot install swaps it.
    pub fn db(&self) -> Arc<StateDb> {
        self.db.read().expect("poisoned").clone()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
    /// How far the raft log is synced: no entry is applied before (see
    /// [`StateMachineStore::apply_only_synced`]).
    synced: Option<Durable>,
}

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::error(format!("{e:#}"))).into()
}

fn snap_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::new(ErrorSubject::Snapshot(None), verb, AnyError::error(format!("{e:#}"))).into()
}

/// Delete module blob `sha256` in `batch` unless a machine (committed, or pending in
/// `batch`) still runs it: a removed or upgraded module's bytes would otherwise stay in
/// the state, and in every snapshot, for good. A function of the state alone, so every
/// replica deletes alike.
fn drop_unused_blob(db: &StateDb, batch: &mut PendingBatch, sha256: &str) -> anyhow::Result<()> {
    if !db.modules_with(batch)?.iter().any(|m| m.sha256 == sha256) {
        batch.blobs.push((sha256.as_bytes().to_vec(), None));
    }
    Ok(())
}

fn state_root(data_dir: &Path) -> PathBuf {
    data_dir.join("state")
}

/// The state directory a new data dir starts with: `(state root, name of its first store)`.
/// `state/CURRENT` names the live store.
pub(crate) fn initial_state_dir(data_dir: &Path) -> (PathBuf, String) {
    (state_root(data_dir), "state-0".to_string())
}

impl StateMachineStore {
    /// Open (or create) the state under `data_dir`, and load every installed machine.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let root = state_root(data_dir);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let current = match std::fs::read_to_string(root.join("CURRENT")) {
            Ok(s) => s.trim().to_string(),
            Err(_) => {
                let name = initial_state_dir(data_dir).1;
                write_atomic(&root.join("CURRENT"), name.as_bytes())?;
                name
            }
        };
        // Directories left by an interrupted snapshot install or a retired state.
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            let n = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && n != current {
                tracing::info!(dir = %entry.path().display(), "removing stale state directory");
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        snapshot::clean(&snapshot::dir(data_dir)).context("cleaning the snapshot directory")?;
        let seq = current.strip_prefix("state-").and_then(|s| s.parse().ok()).unwrap_or(0);
        let db = Arc::new(StateDb::open(&root.join(&current))?);
        let runtime = Arc::new(Runtime::new(&data_dir.join("cache"))?);
        runtime.sync_with(&db).context("loading installed machines")?;
        let installed = db.modules().context("listing installed machines")?;
        match db.drop_unreferenced_blobs(&installed) {
            Ok(0) => {}
            Ok(n) => tracing::info!(blobs = n, "removed module bytes no machine runs"),
            Err(e) => tracing::warn!("removing unused module bytes: {e:#}"),
        }
        match runtime.prune_cache(installed.iter().map(|m| m.sha256.as_str())) {
            Ok((0, _)) => {}
            Ok((files, bytes)) => tracing::info!(files, bytes, "removed compiled modules no machine uses"),
            Err(e) => tracing::warn!("pruning the module cache: {e:#}"),
        }
        let leases = Lessor::default();
        leases.reset(&list_leases(&db).context("loading leases")?);
        let (events, _) = broadcast::channel(4096);
        Ok(Self {
            shared: Arc::new(Shared {
                data_dir: data_dir.to_owned(),
                db: RwLock::new(db),
                runtime,
                events,
                leases,
                snapshot_seq: AtomicU64::new(seq),
                snapshot_files: Default::default(),
                commands_in_flight: AtomicUsize::new(0),
            }),
            synced: None,
        })
    }

    /// Applies no entry before the raft log has it on disk. A leader may report its own
    /// appends flushed before they are ("Leader appends" in `raft::log_store`); with other
    /// voters, a commit already waited for the sync, but a lone voter commits on its own
    /// report, and its clients must not see a write that a power cut could take back.
    pub fn apply_only_synced(&mut self, durable: Durable) {
        self.synced = Some(durable);
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn snapshot_dir(&self) -> PathBuf {
        snapshot::dir(&self.shared.data_dir)
    }

    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        db: &StateDb,
        batch: &mut PendingBatch,
        name: String,
        wasm: Vec<u8>,
        fuel: u64,
        memory_bytes: u64,
        index: u64,
    ) -> anyhow::Result<Response> {
        let record = ModuleRecord::for_component(name, &wasm, fuel, memory_bytes, index);
        // Validated before it was proposed, so this only fails if the engine differs
        // between nodes; every node answers the same either way.
        Ok(match self.shared.runtime.load(record.clone(), &wasm) {
            Ok(()) => {
                let old = db.modules_with(batch)?.into_iter().find(|m| m.name == record.name);
                batch.blobs.push((record.sha256.clone().into_bytes(), Some(wasm)));
                batch.put_module(&record);
                if let Some(old) = old.filter(|o| o.sha256 != record.sha256) {
                    drop_unused_blob(db, batch, &old.sha256)?;
                }
                Response::Installed { sha256: record.sha256, size: record.size }
            }
            Err(e) => Response::Failed(ApplyError::new(ApplyErrorKind::InvalidModule, format!("{e:#}"))),
        })
    }

    /// Whether to apply `entries` right on the async task that received them: when this
    /// node has at most one client command in flight, and they hold at most
    /// [`INLINE_APPLY_COMMANDS`] commands, all for machines whose recent commands were
    /// light (`Runtime::applies_quickly`), and nothing else that runs a guest or compiles
    /// a module. Skipping the hop to a blocking thread and back saves ~40 µs per batch
    /// (put, 1 node, 1 client: ~1,900 → ~2,150 ops/s). Under load the blocking thread
    /// pays for itself: the apply then runs beside the async workers instead of taking
    /// one of them (inlining one-command entries cost 7% at 16 clients).
    fn applies_quickly(&self, entries: &[Entry]) -> bool {
        if self.shared.commands_in_flight.load(Ordering::Relaxed) > 1 {
            return false;
        }
        let mut commands = 0;
        let mut quick = |r: &Request| match r {
            Request::Call { machine, .. } => {
                commands += 1;
                commands <= INLINE_APPLY_COMMANDS && self.shared.runtime.applies_quickly(machine)
            }
            _ => false,
        };
        entries.iter().all(|e| match &e.payload {
            EntryPayload::Blank => true,
            EntryPayload::Normal(Request::Batch(requests)) => requests.iter().all(&mut quick),
            EntryPayload::Normal(r) => quick(r),
            EntryPayload::Membership(_) => false,
        })
    }

    fn apply_entries(&self, entries: Vec<Entry>) -> anyhow::Result<Vec<Response>> {
        let shared = &self.shared;
        let db = shared.db();
        let rt = &shared.runtime;
        let mut batch = PendingBatch::default();
        tracing::trace!(entries = entries.len(), "applying a batch");
        let mut responses = Vec::with_capacity(entries.len());
        let mut committed_events = Vec::new();
        let mut lease_changes = Vec::new();
        let mut last: Option<LogId> = None;
        for entry in entries {
            last = Some(entry.log_id);
            let index = entry.log_id.index;
            // A batch's requests are applied one by one like entries of their own; their
            // responses are gathered back into one at the end.
            let (payloads, batched) = match entry.payload {
                EntryPayload::Normal(Request::Batch(requests)) => {
                    (requests.into_iter().map(EntryPayload::Normal).collect(), true)
                }
                payload => (vec![payload], false),
            };
            let first_response = responses.len();
            for payload in payloads {
                match payload {
                    EntryPayload::Blank => responses.push(Response::Empty),
                    EntryPayload::Membership(m) => {
                        batch.set_membership(&StoredMembership::new(Some(entry.log_id), m));
                        responses.push(Response::Empty);
                    }
                    EntryPayload::Normal(Request::Call { machine, payload, timestamp_ms }) => {
                        let ctx = ApplyContext { index, term: entry.log_id.leader_id.term, timestamp_ms };
                        match rt.apply(&machine, &db, &mut batch.data, ctx, &payload)? {
                            Ok((out, effects)) => {
                                if !effects.events.is_empty() {
                                    committed_events.push(CommittedEvents { machine, index, events: effects.events });
                                }
                                responses.push(Response::Output(out));
                            }
                            Err(e) => responses.push(Response::Failed(e)),
                        }
                    }
                    EntryPayload::Normal(Request::InstallDefault { name, wasm, fuel, memory_bytes }) => {
                        if batch.default_marked(&name) || db.default_installed(&name)? {
                            responses.push(Response::Empty);
                            continue;
                        }
                        batch.mark_default_installed(&name);
                        responses.push(self.install(&db, &mut batch, name, wasm, fuel, memory_bytes, index)?);
                    }
                    EntryPayload::Normal(Request::Alarm { activate, member_id, alarm }) => {
                        batch.set_alarm(member_id, alarm, activate);
                        responses.push(Response::Empty);
                    }
                    EntryPayload::Normal(Request::PublishMember { id, name, client_urls }) => {
                        batch.set_member_attrs(id, &MemberAttrs { name, client_urls });
                        responses.push(Response::Empty);
                    }
                    EntryPayload::Normal(Request::LeaseGrant { id, ttl }) => {
                        let r = grant(&db, &mut batch, id, ttl)?;
                        if r == Response::Empty {
                            lease_changes.push(LeaseChange::Granted(id, ttl));
                        }
                        responses.push(r);
                    }
                    EntryPayload::Normal(Request::LeaseRevoke { id, timestamp_ms }) => {
                        let ctx = ApplyContext { index, term: entry.log_id.leader_id.term, timestamp_ms };
                        let r = self.revoke(&db, &mut batch, ctx, id, &mut committed_events)?;
                        if r == Response::Empty {
                            lease_changes.push(LeaseChange::Revoked(id));
                        }
                        responses.push(r);
                    }
                    EntryPayload::Normal(Request::InstallModule { name, wasm, fuel, memory_bytes }) => {
                        responses.push(self.install(&db, &mut batch, name, wasm, fuel, memory_bytes, index)?);
                    }
                    EntryPayload::Normal(Request::RemoveModule { name }) => {
                        if rt.machine(&name).is_none() {
                            responses.push(Response::Failed(ApplyError::new(
                                ApplyErrorKind::NoSuchMachine,
                                format!("machine {name:?} is not installed"),
                            )));
                            continue;
                        }
                        let sha = rt.machine(&name).map(|m| m.record.sha256.clone());
                        rt.unload(&name);
                        batch.remove_module(&name);
                        if let Some(sha) = sha {
                            drop_unused_blob(&db, &mut batch, &sha)?;
                        }
                        let p = machine_prefix(&name);
                        batch.range_deletes.push((p.clone(), prefix_end(&p)));
                        // and the keys it attached to leases.
                        let a = machine_attach_prefix(&name);
                        batch.range_deletes.push((a.clone(), prefix_end(&a)));
                        // Commit now: later reads in this batch go through the overlay and the
                        // DB, and neither would see a pending range delete.
                        batch.set_applied(last);
                        db.commit(std::mem::take(&mut batch))?;
                        responses.push(Response::Removed);
                    }
                    EntryPayload::Normal(Request::Batch(_)) => responses.push(Response::Failed(ApplyError::new(
                        ApplyErrorKind::Rejected,
                        "a batch inside a batch is not applied",
                    ))),
                }
            }
            if batched {
                let gathered = responses.split_off(first_response);
                responses.push(Response::Batch(gathered));
            }
        }
        batch.set_applied(last);
        db.commit(batch)?;
        for change in lease_changes {
            match change {
                LeaseChange::Granted(id, ttl) => shared.leases.granted(id, ttl),
                LeaseChange::Revoked(id) => shared.leases.revoked(id),
            }
        }
        for ev in committed_events {
            let _ = shared.events.send(Arc::new(ev));
        }
        Ok(responses)
    }

    /// Apply `LeaseRevoke`: drop the lease and its attachments, and give every machine
    /// that attached keys its `on-lease-revoked` call, all in the current batch. A
    /// machine's callback failing discards only that callback's writes: the lease is
    /// revoked either way (identically on every replica).
    fn revoke(
        &self,
        db: &Arc<StateDb>,
        batch: &mut PendingBatch,
        ctx: ApplyContext,
        id: i64,
        committed_events: &mut Vec<CommittedEvents>,
    ) -> anyhow::Result<Response> {
        if get_lease(db, &[&batch.data], id)?.is_none() {
            return Ok(lease_error(ERR_LEASE_NOT_FOUND));
        }
        // Not live any more, so a callback cannot attach new keys to it.
        batch.data.map.insert(lease_key(id), None);
        let rt = &self.shared.runtime;
        for machine in rt.machine_names() {
            let keys = attached_keys(db, &[&batch.data], &machine, id)?;
            if keys.is_empty() {
                continue;
            }
            for k in &keys {
                batch.data.map.insert(attach_key(&machine, id, k), None);
            }
            match rt.lease_revoked(&machine, db, &mut batch.data, ctx, id, &keys)? {
                Ok(effects) => {
                    if !effects.events.is_empty() {
                        committed_events.push(CommittedEvents { machine, index: ctx.index, events: effects.events });
                    }
                }
                Err(e) => tracing::warn!(%machine, lease = format!("{id:016x}"), "on-lease-revoked failed: {e}"),
            }
        }
        Ok(Response::Empty)
    }
}

/// A lease table change, reported to the lessor once its batch is committed.
enum LeaseChange {
    Granted(i64, i64),
    Revoked(i64),
}

fn lease_error(msg: &str) -> Response {
    Response::Failed(ApplyError::new(ApplyErrorKind::Rejected, msg))
}

/// Apply `LeaseGrant` (etcd's lessor.Grant: the TTL bound first, then uniqueness).
fn grant(db: &StateDb, batch: &mut PendingBatch, id: i64, ttl: i64) -> anyhow::Result<Response> {
    if id == 0 {
        return Ok(lease_error(ERR_LEASE_NOT_FOUND));
    }
    if ttl > MAX_LEASE_TTL {
        return Ok(lease_error(ERR_LEASE_TTL_TOO_LARGE));
    }
    if get_lease(db, &[&batch.data], id)?.is_some() {
        return Ok(lease_error(ERR_LEASE_EXISTS));
    }
    batch.data.map.insert(lease_key(id), Some(encode_lease(&LeaseRecord { ttl })));
    Ok(Response::Empty)
}

pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    // The rename itself is durable only once the directory is synced.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    sync_dir(dir).with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// fsync a directory: makes the creation, removal or renaming of its entries durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let db = self.shared.db();
        let applied = db.applied().map_err(|e| sm_err(ErrorVerb::Read, e))?;
        let membership = db.membership().map_err(|e| sm_err(ErrorVerb::Read, e))?;
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let (Some(synced), Some(last)) = (&self.synced, entries.last()) {
            let index = last.log_id.index;
            while !synced.wait(index, Duration::from_secs(10)).await {
                if synced.closed() {
                    return Err(sm_err(ErrorVerb::Write, "the raft log was closed before it synced the entries to apply"));
                }
                tracing::warn!(index, "applying waits for the raft log to sync");
            }
        }
        if self.applies_quickly(&entries) {
            return self.apply_entries(entries).map_err(|e| sm_err(ErrorVerb::Write, e));
        }
        let this = self.clone();
        // Guests are CPU-bound and synchronous: keep long batches off the async workers.
        tokio::task::spawn_blocking(move || this.apply_entries(entries))
            .await
            .map_err(|e| sm_err(ErrorVerb::Write, e))?
            .map_err(|e| sm_err(ErrorVerb::Write, e))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        let dir = self.snapshot_dir();
        let file = tokio::task::spawn_blocking(move || snapshot::create_incoming(&dir))
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<SnapshotFile>) -> Result<(), StorageError> {
        let this = self.clone();
        let meta = meta.clone();
        let (file, path) = snapshot.into_std().await;
        tokio::task::spawn_blocking(move || this.install_snapshot_data(&meta, file, &path))
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?
            .map_err(|e| snap_err(ErrorVerb::Write, e))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let found = {
            let _files = self.shared.snapshot_files.lock().expect("poisoned");
            snapshot::current(&self.snapshot_dir()).map_err(|e| snap_err(ErrorVerb::Read, e))?
        };
        let meta = match found {
            None => return Ok(None),
            Some((meta, Some(file))) => return Ok(Some(Snapshot { meta, snapshot: Box::new(file) })),
            Some((meta, None)) => meta,
        };
        // The metadata names a data file that is gone (removed by hand, say). openraft
        // treats "no snapshot" as a storage failure once it has seen one: build a fresh one.
        tracing::warn!(snapshot_id = meta.snapshot_id, "the current snapshot's data file is missing: building a new one");
        let this = self.clone();
        let built = tokio::task::spawn_blocking(move || this.build())
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(Some(built))
    }
}

impl StateMachineStore {
    fn install_snapshot_data(&self, meta: &SnapshotMeta, mut file: std::fs::File, received: &Path) -> anyhow::Result<()> {
        let root = state_root(&self.shared.data_dir);
        let seq = self.shared.snapshot_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let name = format!("state-{seq}");
        let dir = root.join(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        if let Err(e) = snapshot::unpack_received(&mut file, meta, &dir) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        drop(file);
        let db = Arc::new(StateDb::open(&dir)?);
        let applied = db.applied()?;
        anyhow::ensure!(
            applied == meta.last_log_id,
            "snapshot content is at {applied:?} but its metadata says {:?}",
            meta.last_log_id
        );
        self.shared.runtime.sync_with(&db)?;
        self.shared.runtime.reset_instances();
        self.shared.leases.reset(&list_leases(&db)?);
        let old = std::mem::replace(&mut *self.shared.db.write().expect("poisoned"), db);
        write_atomic(&root.join("CURRENT"), name.as_bytes())?;
        {
            let _files = self.shared.snapshot_files.lock().expect("poisoned");
            snapshot::publish_received(&self.snapshot_dir(), meta, received)?;
        }
        // Queries may still hold the old DB; if so it is removed at the next start.
        if let Ok(old) = Arc::try_unwrap(old) {
            let path = old.path().to_owned();
            drop(old);
            let _ = std::fs::remove_dir_all(path);
        }
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    fn build(&self) -> anyhow::Result<Snapshot<TypeConfig>> {
        let db = self.shared.db();
        // The checkpoint flushes the live store first, all column families at once: once
        // openraft purges the log up to this snapshot, the store on disk is at least as far
        // (applied batches have no WAL of their own, see `storage`).
        let dir = self.snapshot_dir();
        // The archive streams to a file beside where it will live: no copy of the state
        // in memory, and publishing it is a rename.
        let (archive, (applied, membership)) = backup::create_with(&db, &dir, |cp| {
            let cp = StateDb::open(cp)?;
            Ok((cp.applied()?, cp.membership()?))
        })?;
        let snapshot_id = snapshot::snapshot_id(applied, &archive.sha256);
        let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
        let file = {
            let _files = self.shared.snapshot_files.lock().expect("poisoned");
            snapshot::publish_built(&dir, &meta, archive)?
        };
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build())
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?
            .map_err(|e| snap_err(ErrorVerb::Write, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{DEFAULT_FUEL, DEFAULT_MEMORY_BYTES};
    use crate::storage::sha256_hex;
    use tokio::io::AsyncReadExt;

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(openraft::CommittedLeaderId::new(term, 1), index)
    }

    /// 1 KiB that RocksDB cannot compress away.
    fn value(i: u64) -> Vec<u8> {
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A state with `n` keys of 1 KiB, applied up to `(2, n)`.
    fn fill(sm: &StateMachineStore, n: u64) {
        let mut batch = PendingBatch::default();
        for i in 0..n {
            batch.data.map.insert(format!("k{i:06}").into_bytes(), Some(value(i)));
        }
        batch.set_applied(Some(log_id(2, n)));
        sm.shared.db().commit(batch).unwrap();
    }

    async fn read_all(mut f: SnapshotFile) -> Vec<u8> {
        let mut out = Vec::new();
        f.read_to_end(&mut out).await.unwrap();
        out
    }

    /// A module's bytes leave the state when no machine runs them any more: after an
    /// upgrade to other bytes or a removal, also within one applied batch, and not while
    /// another machine runs the same bytes.
    #[test]
    fn unused_module_blobs_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let sm = StateMachineStore::open(dir.path()).unwrap();
        let v1 = sm.shared.runtime.validate(crate::server::DEFAULT_KV_MODULE).unwrap();
        // The same component with a custom section: other bytes, same code.
        let v2 = [&v1[..], &[0, 3, 1, b'x', 7]].concat();
        let (s1, s2) = (sha256_hex(&v1), sha256_hex(&v2));
        assert_ne!(s1, s2);
        let mut index = 0;
        let mut apply = |requests: Vec<Request>| {
            let entries = requests
                .into_iter()
                .map(|r| {
                    index += 1;
                    Entry { log_id: log_id(1, index), payload: EntryPayload::Normal(r) }
                })
                .collect();
            for r in sm.apply_entries(entries).unwrap() {
                assert!(matches!(r, Response::Installed { .. } | Response::Removed), "{r:?}");
            }
        };
        let install = |name: &str, wasm: &[u8]| Request::InstallModule {
            name: name.into(),
            wasm: wasm.to_vec(),
            fuel: DEFAULT_FUEL,
            memory_bytes: DEFAULT_MEMORY_BYTES,
        };
        let remove = |name: &str| Request::RemoveModule { name: name.into() };
        let held = |sha: &str| sm.shared.db().blob(sha).unwrap().is_some();

        apply(vec![install("a", &v1)]);
        assert!(held(&s1));
        apply(vec![install("a", &v2)]);
        assert!(!held(&s1) && held(&s2), "an upgrade drops the old bytes");
        apply(vec![install("a", &v2)]);
        assert!(held(&s2), "reinstalling the same bytes keeps them");
        apply(vec![install("b", &v2)]);
        apply(vec![remove("a")]);
        assert!(held(&s2), "b still runs them");
        apply(vec![remove("b")]);
        assert!(!held(&s2), "nobody runs them");
        apply(vec![install("c", &v1), install("c", &v2)]);
        assert!(!held(&s1) && held(&s2), "within one batch too");
        apply(vec![install("d", &v1), remove("c"), install("c", &v2)]);
        assert!(held(&s1) && held(&s2));

        // A blob that an older build left behind (no record names it) goes at the next open.
        let mut batch = PendingBatch::default();
        batch.blobs.push((b"00".repeat(32), Some(b"old bytes".to_vec())));
        sm.shared.db().commit(batch).unwrap();
        assert!(held(&"00".repeat(32)));
        drop(sm);
        let sm = StateMachineStore::open(dir.path()).unwrap();
        let db = sm.shared.db();
        assert!(db.blob(&"00".repeat(32)).unwrap().is_none());
        assert!(db.blob(&s1).unwrap().is_some() && db.blob(&s2).unwrap().is_some());
    }

    /// A snapshot goes from a built file through openraft's receiving side into another
    /// store, which then holds the same state, and keeps the received file as its own.
    #[tokio::test]
    async fn a_built_snapshot_installs_elsewhere_through_files() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = StateMachineStore::open(a_dir.path()).unwrap();
        fill(&a, 300);
        let built = a.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(2, 300)));
        let bytes = read_all(*built.snapshot).await;
        assert!(bytes.len() > 300 * 1024, "{} bytes", bytes.len());

        let mut b = StateMachineStore::open(b_dir.path()).unwrap();
        let mut incoming = b.begin_receiving_snapshot().await.unwrap();
        // In two chunks, as openraft writes them.
        tokio::io::AsyncWriteExt::write_all(&mut incoming, &bytes[..1000]).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut incoming, &bytes[1000..]).await.unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut incoming).await.unwrap();
        b.install_snapshot(&built.meta, incoming).await.unwrap();

        let db = b.shared.db();
        assert_eq!(db.applied().unwrap(), Some(log_id(2, 300)));
        assert_eq!(db.get_data(b"k000299").unwrap(), Some(value(299)));
        assert_eq!(db.hashes().unwrap(), a.shared.db().hashes().unwrap());
        let served = b.get_current_snapshot().await.unwrap().expect("the installed snapshot is b's current one");
        assert_eq!(served.meta.snapshot_id, built.meta.snapshot_id);
        assert_eq!(read_all(*served.snapshot).await, bytes);
        // Only the metadata and the data file it names are left.
        let mut left: Vec<_> = std::fs::read_dir(b.snapshot_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, [format!("{}.data", built.meta.snapshot_id).into(), std::ffi::OsString::from("current.meta")]);
    }

    /// A transfer damaged on the way is refused and leaves the live state as it was.
    #[tokio::test]
    async fn a_damaged_snapshot_is_not_installed() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = StateMachineStore::open(a_dir.path()).unwrap();
        fill(&a, 50);
        let built = a.build_snapshot().await.unwrap();
        let mut bytes = read_all(*built.snapshot).await;
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;

        let mut b = StateMachineStore::open(b_dir.path()).unwrap();
        fill(&b, 3);
        let mut incoming = b.begin_receiving_snapshot().await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut incoming, &bytes).await.unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut incoming).await.unwrap();
        let err = b.install_snapshot(&built.meta, incoming).await.unwrap_err();
        assert!(err.to_string().contains("does not match its id") || format!("{err:?}").contains("does not match its id"), "{err:?}");
        assert_eq!(b.shared.db().applied().unwrap(), Some(log_id(2, 3)));
        assert_eq!(b.shared.db().get_data(b"k000010").unwrap(), None);
        // The half-unpacked state directory is gone; only the live one is left.
        let states: Vec<_> = std::fs::read_dir(state_root(b_dir.path())).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).collect();
        assert_eq!(states.len(), 1);
    }

    /// A current snapshot whose data file is gone is rebuilt, never served without data;
    /// files left by a stopped process are removed at start.
    #[tokio::test]
    async fn a_missing_data_file_is_rebuilt_and_leftovers_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachineStore::open(dir.path()).unwrap();
        fill(&sm, 10);
        let built = sm.build_snapshot().await.unwrap();
        let served = sm.get_current_snapshot().await.unwrap().expect("a saved snapshot");
        assert_eq!(served.meta.snapshot_id, built.meta.snapshot_id);
        let bytes = read_all(*served.snapshot).await;

        let data = sm.snapshot_dir().join(format!("{}.data", built.meta.snapshot_id));
        std::fs::remove_file(&data).unwrap();
        let rebuilt = sm.get_current_snapshot().await.unwrap().expect("a snapshot");
        assert_eq!(rebuilt.meta.last_log_id, built.meta.last_log_id);
        let rebuilt_bytes = read_all(*rebuilt.snapshot).await;
        let hash = sha256_hex(&rebuilt_bytes);
        assert!(rebuilt.meta.snapshot_id.ends_with(&hash[..16]), "{} vs {hash}", rebuilt.meta.snapshot_id);
        assert!(!bytes.is_empty());

        // An abandoned transfer and a build's scratch, as a killed process leaves them.
        drop(sm.begin_receiving_snapshot().await.unwrap());
        std::fs::create_dir(sm.snapshot_dir().join("77-1")).unwrap();
        std::fs::write(sm.snapshot_dir().join("77-1.tar"), b"x").unwrap();
        drop(sm);
        let sm = StateMachineStore::open(dir.path()).unwrap();
        let mut left: Vec<_> = std::fs::read_dir(sm.snapshot_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, [format!("{}.data", rebuilt.meta.snapshot_id).into(), std::ffi::OsString::from("current.meta")]);
    }

    #[tokio::test]
    async fn nothing_is_applied_before_the_log_has_it_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachineStore::open(dir.path()).unwrap();
        let (synced, durable) = tokio::sync::watch::channel(1);
        sm.apply_only_synced(Durable::from_watch(durable));
        let entries = vec![Entry { log_id: log_id(1, 2), payload: EntryPayload::Blank }];
        {
            let mut apply = std::pin::pin!(sm.apply(entries));
            // Entry 2 is committed (a lone voter's deferred append) but not synced yet.
            assert!(futures::poll!(apply.as_mut()).is_pending(), "applied an entry the log has not synced");
            synced.send_replace(2);
            apply.await.unwrap();
        }
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 2)));
    }
}
