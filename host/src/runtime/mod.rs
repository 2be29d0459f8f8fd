//! The Wasm runtime: compiles, validates, caches and runs state-machine components.
//!
//! Owns wasmtime and nothing else: it never sees openraft. The state-machine driver
//! (`raft::state_machine`) hands it a command plus the write set to run against, and gets
//! back the guest's answer and the writes to keep.
//!
//! Determinism (every replica must reach the same bytes):
//! - fuel metering with the module's per-command budget (recorded in the log at install);
//! - a linear-memory cap enforced by our own [`wasmtime::ResourceLimiter`], which turns
//!   growth past the cap into a trap instead of a `-1` the guest could branch on;
//! - NaN canonicalisation, deterministic relaxed SIMD, no threads, a fixed max stack;
//! - no ambient imports: the linker only has the `raftvm:machine` interfaces.
//!
//! Instances: one per machine and log entry for `apply` (an entry's commands and callbacks
//! run on it in order), and a small pool of warm ones for queries. A guest's linear memory
//! is state the store does not hold: allocator state, globals, caches. If an applier
//! outlived its entry, a replica that restarted or installed a snapshot would run the
//! next entry on a younger instance than the others, and anything that depends on that
//! memory (a global written to the store, the fuel an allocation costs, where the memory
//! cap is hit) could differ between replicas. An instance created for each entry gives
//! every replica the same memory at the start of every entry.
//!
//! The one exception is the built-in kv module (this build's `DEFAULT_KV_MODULE`,
//! recognised by its sha256), whose applier stays warm across entries: our code, which
//! keeps nothing in memory between commands that is not a function of the store, and whose
//! puts a fresh instance per entry slowed by ~20% at 1 and 16 clients (measured; the
//! pooling allocator did not help). What remains for it is the edge: a command that ends
//! close to its fuel budget (10G) or its memory cap (1 GiB) could get another verdict on a
//! replica whose instance is younger, since the allocator's work and layout differ.
//!
//! An instance that trapped is dropped at once; a query instance may be re-created at any
//! time.

mod host;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, Store};

use crate::storage::{sha256_hex, ModuleRecord, Overlay, StateDb};
use crate::types::{ApplyError, ApplyErrorKind};

pub use host::HostState;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "state-machine",
        imports: { default: trappable },
    });
}

use bindings::raftvm::machine::types::ApplyContext as WitApplyContext;
use bindings::{StateMachine, StateMachinePre};

/// Largest module accepted by `module install` (after componentizing). A Python guest
/// carries CPython (componentize-py: ~18 MB for guest-examples/register-py), so 32 MiB;
/// a module travels in one log entry, and an AppendEntries that would not fit in a peer
/// message is split (`raft::network`).
pub const MAX_MODULE_BYTES: usize = 32 * 1024 * 1024;
/// Default per-command fuel budget (~ instructions). Big enough for real work, small
/// enough that an infinite loop fails in well under a second.
pub const DEFAULT_FUEL: u64 = 500_000_000;
/// Fuel budget of the built-in kv module, which a new cluster installs by itself. Its
/// code is ours, so the budget only has to bound legitimate work: etcd serves a range or
/// a delete of every key in one request, and kv-mvcc spends ~7,500 fuel per key doing so
/// (measured on 150,000 keys: ~5 µs per key with its host reads, release build). 10G
/// covers ~1.3M keys in one request, ~7 s of guest time, during which other writes wait
/// for the apply as they do in etcd.
pub const KV_FUEL: u64 = 10_000_000_000;
/// Default linear-memory cap per instance.
pub const DEFAULT_MEMORY_BYTES: u64 = 128 * 1024 * 1024;
/// Linear-memory cap of the built-in kv module: a range answer is built in guest memory
/// (the generic 128 MiB held ~100,000 keys of 256 B), and etcd answers ranges of hundreds
/// of MB.
pub const KV_MEMORY_BYTES: u64 = 1024 * 1024 * 1024;
/// Number of warm query instances kept per machine.
const QUERY_POOL: usize = 4;
/// Linear memory never shrinks: an instance that grew by more than this since it was
/// instantiated (one huge range, say) is dropped after its call instead of being kept
/// warm, so it does not hold the memory. Measured from instantiation, so a module that
/// starts big (an interpreter) is still kept warm.
const KEEP_WARM_MEMORY: usize = 64 * 1024 * 1024;

/// The entry-specific facts a guest sees in `apply`.
#[derive(Debug, Clone, Copy)]
pub struct ApplyContext {
    pub index: u64,
    pub term: u64,
    pub timestamp_ms: u64,
}

impl From<ApplyContext> for WitApplyContext {
    fn from(c: ApplyContext) -> Self {
        WitApplyContext { index: c.index, term: c.term, timestamp_ms: c.timestamp_ms }
    }
}

/// The events a command emitted, in order: (key, event bytes) pairs.
pub type Events = Vec<(Vec<u8>, Vec<u8>)>;

/// A committed command's effects.
#[derive(Debug, Default)]
pub struct Effects {
    pub events: Events,
}

/// A failure of the node itself (disk, cache), as opposed to a guest failure: the node must
/// not pretend the command was applied.
#[derive(Debug, thiserror::Error)]
#[error("host fault: {0:#}")]
pub struct HostFault(pub anyhow::Error);

struct Warm {
    store: Store<HostState>,
    bindings: StateMachine,
    /// The log entry an applier instance was created for (unused for query instances).
    entry: u64,
}

/// A loaded machine: its record, its pre-linked component and warm instances.
pub struct Machine {
    pub record: ModuleRecord,
    pre: StateMachinePre<HostState>,
    applier: Mutex<Option<Warm>>,
    /// A fresh applier for every log entry (every module but the built-in kv one; see the
    /// module doc).
    per_entry: bool,
    readers: Mutex<Vec<Warm>>,
    /// Set when one of its commands burned more than [`QUICK_APPLY_FUEL`] or made more
    /// than [`QUICK_APPLY_READS`] host reads; cleared after [`QUICK_APPLY_STREAK`] light
    /// commands in a row. While set, its commands are applied on a blocking thread (see
    /// [`Runtime::applies_quickly`]).
    slow: AtomicBool,
    light_streak: AtomicU32,
}

/// Work (not wall time, which a busy machine stretches) above which one command marks its
/// machine as slow: a millisecond or two of guest code, or of host reads. Measured: a
/// kv-mvcc put burns ~13,000 fuel and makes 3 reads; deleting 600 keys, 4.2M and 634.
const QUICK_APPLY_FUEL: u64 = 2_000_000;
const QUICK_APPLY_READS: u64 = 500;
/// Light commands in a row that make a slow machine quick again. A machine whose commands
/// are heavy one time in this many can hold an async worker for at most one command's
/// budget per this many commands.
const QUICK_APPLY_STREAK: u32 = 1_000;

impl Machine {
    /// Record what one command cost (see `slow`).
    fn note_cost(&self, fuel: u64, reads: u64) {
        if fuel > QUICK_APPLY_FUEL || reads > QUICK_APPLY_READS {
            self.light_streak.store(0, Ordering::Relaxed);
            if !self.slow.swap(true, Ordering::Relaxed) {
                tracing::debug!(machine = %self.record.name, fuel, reads, "a heavy command: applying on a blocking thread");
            }
        } else if self.slow.load(Ordering::Relaxed)
            && self.light_streak.fetch_add(1, Ordering::Relaxed) + 1 >= QUICK_APPLY_STREAK
        {
            self.slow.store(false, Ordering::Relaxed);
            self.light_streak.store(0, Ordering::Relaxed);
        }
    }
}

pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: PathBuf,
    engine_tag: String,
    machines: RwLock<HashMap<String, Arc<Machine>>>,
}

impl Runtime {
    pub fn new(cache_dir: &Path) -> Result<Self> {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(true)
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            .max_wasm_stack(1024 * 1024);
        // Threads are off: the `threads` cargo feature of wasmtime is not enabled at all.
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut linker = Linker::new(&engine);
        StateMachine::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_tag = format!("{:016x}", h.finish());
        std::fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
        Ok(Self { engine, linker, cache_dir: cache_dir.to_owned(), engine_tag, machines: RwLock::new(HashMap::new()) })
    }

    /// Check a module before it is proposed. Returns the component bytes to replicate:
    /// a core module carrying wit-bindgen's component-type section is componentized here.
    /// Also leaves the compiled artifact in the cache, so applying it is cheap.
    pub fn validate(&self, wasm: &[u8]) -> Result<Vec<u8>, String> {
        if wasm.len() > MAX_MODULE_BYTES {
            return Err(format!("module is {} bytes, over the {MAX_MODULE_BYTES}-byte limit", wasm.len()));
        }
        let component = if wasmparser::Parser::is_component(wasm) {
            wasm.to_vec()
        } else if wasmparser::Parser::is_core_wasm(wasm) {
            wit_component::ComponentEncoder::default()
                .module(wasm)
                .and_then(|e| e.validate(true).encode())
                .map_err(|e| format!("core module could not be turned into a component (does it carry wit-bindgen's component-type section?): {e:#}"))?
        } else {
            return Err("not a WebAssembly module or component".to_string());
        };
        if component.len() > MAX_MODULE_BYTES {
            return Err(format!("component is {} bytes, over the {MAX_MODULE_BYTES}-byte limit", component.len()));
        }
        let compiled = self.compile(&component).map_err(|e| format!("{e:#}"))?;
        self.link(&compiled)?;
        Ok(component)
    }

    fn link(&self, component: &Component) -> Result<StateMachinePre<HostState>, String> {
        let pre = self.linker.instantiate_pre(component).map_err(|e| {
            let e = e.to_string();
            // The usual cause: a toolchain's default build, which imports WASI.
            let hint = if e.contains("`wasi:") {
                " (state machines get no WASI, which would give replicas clocks, randomness and files of \
                 their own: build with componentize-py --stub-wasi, componentize-js --disable stdio random \
                 clocks http fetch-event, or for wasm32-unknown-unknown; see docs/guest-abi.md)"
            } else {
                ""
            };
            format!("module imports something outside the raftvm:machine world: {e}{hint}")
        })?;
        StateMachinePre::new(pre)
            .map_err(|e| format!("module does not implement the raftvm:machine/state-machine world: {e}"))
    }

    /// Compile `component` into the on-disk cache (a no-op if it is there), so that
    /// loading it later is cheap; see `Node::precompile_on_peers`.
    pub fn precompile(&self, component: &[u8]) -> Result<()> {
        self.compile(component).map(drop)
    }

    /// Delete the cache's compiled artifacts that no module in `keep` (sha256s) uses: those
    /// of removed or upgraded modules, of installs that were compiled but never committed
    /// (validation, `precompile`), and those an older engine wrote. Returns the number of
    /// files and bytes removed. Run at startup, before anything compiles.
    pub fn prune_cache<'a>(&self, keep: impl IntoIterator<Item = &'a str>) -> Result<(usize, u64)> {
        let keep: std::collections::HashSet<String> = keep.into_iter().map(|sha| self.artifact_name(sha)).collect();
        let (mut files, mut bytes) = (0, 0);
        for entry in std::fs::read_dir(&self.cache_dir).with_context(|| format!("reading {}", self.cache_dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(".cwasm") || name.ends_with(".tmp");
            if !ours || keep.contains(&name) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
            files += 1;
            bytes += size;
        }
        Ok((files, bytes))
    }

    /// The cache file of the component whose sha256 is `sha`, compiled by this engine.
    fn artifact_name(&self, sha: &str) -> String {
        format!("{sha}-{}.cwasm", self.engine_tag)
    }

    /// Compile (or load from the on-disk cache) a component.
    fn compile(&self, component: &[u8]) -> Result<Component> {
        let sha = sha256_hex(component);
        let path = self.cache_dir.join(self.artifact_name(&sha));
        if path.exists() {
            // SAFETY: the file was written by `Component::serialize` of an engine with the
            // same compatibility hash (it is in the file name), in our private data dir.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(c) => return Ok(c),
                Err(e) => tracing::warn!(path = %path.display(), "dropping unusable cached artifact: {e}"),
            }
        }
        let c = Component::new(&self.engine, component).map_err(|e| anyhow::anyhow!("module does not compile: {e}"))?;
        match c.serialize() {
            Ok(bytes) => {
                // A name of its own: a precompile and an apply may compile the same bytes
                // at once (a precompile that outlasted its caller's wait), and two writers
                // of one temporary file could rename a half-written artifact into place.
                static WRITES: AtomicU64 = AtomicU64::new(0);
                let tmp = path.with_extension(format!("{}.tmp", WRITES.fetch_add(1, Ordering::Relaxed)));
                if let Err(e) = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path)) {
                    tracing::warn!("could not cache compiled module: {e}");
                }
            }
            Err(e) => tracing::warn!("could not serialize compiled module: {e}"),
        }
        // Compiling (and serializing) a large component leaves its working memory freed
        // but kept in glibc's arenas: installing register-py (18 MB of CPython) took a
        // 1-node server from 53 to 449 MiB resident without this, to 249 MiB with it.
        // SAFETY: malloc_trim only hands free heap pages back to the kernel.
        unsafe { libc::malloc_trim(0) };
        Ok(c)
    }

    /// Load (or replace) a machine from its record and component bytes.
    pub fn load(&self, record: ModuleRecord, component: &[u8]) -> Result<()> {
        let compiled = self.compile(component)?;
        let pre = self.link(&compiled).map_err(anyhow::Error::msg)?;
        let per_entry = record.sha256 != *builtin_kv_sha256();
        let m = Arc::new(Machine {
            record,
            pre,
            applier: Mutex::new(None),
            per_entry,
            readers: Mutex::new(Vec::new()),
            slow: AtomicBool::new(false),
            light_streak: AtomicU32::new(0),
        });
        self.machines.write().expect("poisoned").insert(m.record.name.clone(), m);
        Ok(())
    }

    pub fn unload(&self, name: &str) {
        self.machines.write().expect("poisoned").remove(name);
    }

    /// Make the loaded machines match the module records of `db` (startup, snapshot install).
    pub fn sync_with(&self, db: &StateDb) -> Result<()> {
        let records = db.modules()?;
        let wanted: HashMap<_, _> = records.iter().map(|r| (r.name.clone(), r.clone())).collect();
        let loaded: Vec<(String, ModuleRecord)> =
            self.machines.read().expect("poisoned").iter().map(|(n, m)| (n.clone(), m.record.clone())).collect();
        for (name, rec) in loaded {
            if wanted.get(&name) != Some(&rec) {
                self.unload(&name);
            }
        }
        for rec in records {
            if self.machine(&rec.name).is_some() {
                continue;
            }
            let bytes = db.blob(&rec.sha256)?.with_context(|| format!("module blob {} missing", rec.sha256))?;
            self.load(rec, &bytes)?;
        }
        Ok(())
    }

    /// Drop every warm instance (they hold the state DB they were created for).
    pub fn reset_instances(&self) {
        for m in self.machines.read().expect("poisoned").values() {
            *m.applier.lock().expect("poisoned") = None;
            m.readers.lock().expect("poisoned").clear();
        }
    }

    /// Whether machine `name`'s recent commands were light (see `Machine::slow`; true for
    /// a machine that is not installed: that command fails at once). The state machine
    /// driver applies small batches of such machines right on its async task, saving two
    /// thread hops per batch; after a heavy command (a big range delete, a hostile loop
    /// burning its fuel) the machine's commands go to a blocking thread until it has been
    /// light for a while.
    pub fn applies_quickly(&self, name: &str) -> bool {
        self.machine(name).is_none_or(|m| !m.slow.load(Ordering::Relaxed))
    }

    pub fn machine(&self, name: &str) -> Option<Arc<Machine>> {
        self.machines.read().expect("poisoned").get(name).cloned()
    }

    pub fn machine_names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.machines.read().expect("poisoned").keys().cloned().collect();
        v.sort();
        v
    }

    fn instantiate(&self, m: &Machine, db: Arc<StateDb>) -> Result<Warm, ApplyError> {
        let mut store = Store::new(&self.engine, HostState::new(&m.record, db));
        store.limiter(|s| s);
        // The most a guest may hand the host in one call (an answer, a write): whatever
        // fits in its memory. wasmtime's default, 128 MiB, would cap the kv module's answers
        // below its memory cap.
        store.set_hostcall_fuel(usize::try_from(m.record.memory_bytes).unwrap_or(usize::MAX));
        store.set_fuel(m.record.fuel).expect("fuel is enabled");
        match m.pre.instantiate(&mut store) {
            Ok(bindings) => {
                store.data_mut().set_baseline();
                Ok(Warm { store, bindings, entry: 0 })
            }
            Err(e) => Err(classify(&store, e)),
        }
    }

    /// Run `apply` of machine `name`. Writes go into a fresh command overlay on top of
    /// `batch` and are moved into `batch` only if the guest returns `ok`.
    pub fn apply(
        &self,
        name: &str,
        db: &Arc<StateDb>,
        batch: &mut Overlay,
        ctx: ApplyContext,
        command: &[u8],
    ) -> Result<Result<(Vec<u8>, Effects), ApplyError>, HostFault> {
        let Some(m) = self.machine(name) else {
            return Ok(Err(ApplyError::new(ApplyErrorKind::NoSuchMachine, format!("machine {name:?} is not installed"))));
        };
        self.run_transaction(&m, db, batch, ctx.index, |w| w.bindings.call_apply(&mut w.store, ctx.into(), command))
    }

    /// Run `on-lease-revoked` of machine `name`, transactional like `apply`.
    pub fn lease_revoked(
        &self,
        name: &str,
        db: &Arc<StateDb>,
        batch: &mut Overlay,
        ctx: ApplyContext,
        lease: i64,
        keys: &[Vec<u8>],
    ) -> Result<Result<Effects, ApplyError>, HostFault> {
        let Some(m) = self.machine(name) else {
            return Ok(Ok(Effects::default()));
        };
        let r = self.run_transaction(&m, db, batch, ctx.index, |w| {
            w.bindings.call_on_lease_revoked(&mut w.store, ctx.into(), lease, keys).map(|r| r.map(|()| Vec::new()))
        })?;
        Ok(r.map(|(_, e)| e))
    }

    /// Run one call of log entry `entry` on the machine's applier instance for that entry
    /// (see the module doc: a new entry gets a new instance, on every replica alike,
    /// unless the machine is the built-in kv one).
    fn run_transaction(
        &self,
        m: &Machine,
        db: &Arc<StateDb>,
        batch: &mut Overlay,
        entry: u64,
        call: impl FnOnce(&mut Warm) -> wasmtime::Result<Result<Vec<u8>, String>>,
    ) -> Result<Result<(Vec<u8>, Effects), ApplyError>, HostFault> {
        let mut slot = m.applier.lock().expect("poisoned");
        // An earlier entry's instance, or one of a state that was swapped since (a
        // snapshot install): start clean.
        if slot.as_ref().is_some_and(|w| (m.per_entry && w.entry != entry) || !Arc::ptr_eq(w.store.data().db(), db)) {
            *slot = None;
        }
        let mut warm = match slot.take() {
            Some(w) => w,
            None => match self.instantiate(m, db.clone()) {
                Ok(w) => Warm { entry, ..w },
                Err(e) => return Ok(Err(e)),
            },
        };
        warm.store.set_fuel(m.record.fuel).expect("fuel is enabled");
        warm.store.data_mut().begin(std::mem::take(batch), true);
        let result = call(&mut warm);
        m.note_cost(m.record.fuel.saturating_sub(warm.store.get_fuel().unwrap_or(0)), warm.store.data().reads());
        let (base, cmd, events, fault) = warm.store.data_mut().finish();
        *batch = base;
        if let Some(f) = fault {
            return Err(HostFault(f));
        }
        match result {
            Ok(Ok(out)) => {
                batch.absorb(cmd);
                *slot = keep_warm(warm);
                Ok(Ok((out, Effects { events })))
            }
            Ok(Err(msg)) => {
                *slot = keep_warm(warm);
                Ok(Err(ApplyError::new(ApplyErrorKind::Rejected, msg)))
            }
            // The instance may be in any state after a trap: drop it.
            Err(e) => Ok(Err(classify(&warm.store, e))),
        }
    }

    /// Run `query` of machine `name` against the committed state in `db`.
    pub fn query(&self, name: &str, db: &Arc<StateDb>, request: &[u8]) -> Result<Result<Vec<u8>, ApplyError>, HostFault> {
        Ok(self.query_within(name, db, request, u64::MAX)?.expect("a query with the machine's whole budget is final"))
    }

    /// [`Runtime::query`] with at most `fuel` of the machine's fuel budget: `None` when
    /// the query needed more than `fuel` but the machine's budget is larger (run it again
    /// with [`Runtime::query`]; queries have no effects, so a rerun is safe).
    pub fn query_within(
        &self,
        name: &str,
        db: &Arc<StateDb>,
        request: &[u8],
        fuel: u64,
    ) -> Result<Option<Result<Vec<u8>, ApplyError>>, HostFault> {
        let Some(m) = self.machine(name) else {
            return Ok(Some(Err(ApplyError::new(ApplyErrorKind::NoSuchMachine, format!("machine {name:?} is not installed")))));
        };
        let slice = (fuel < m.record.fuel).then_some(Slice { fuel, reads: fuel / QUICK_FUEL_PER_READ });
        let call = |w: &mut Warm| w.bindings.call_query(&mut w.store, request);
        Ok(self.run_read_only(&m, db, slice, call)?.map(|r| match r {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(msg)) => Err(ApplyError::new(ApplyErrorKind::Rejected, msg)),
            Err(e) => Err(e),
        }))
    }

    /// Tell every machine that this node's leadership changed. Local, read-only, best effort.
    pub fn leader_changed(&self, db: &Arc<StateDb>, is_leader: bool, term: u64) {
        let machines: Vec<_> = self.machines.read().expect("poisoned").values().cloned().collect();
        for m in machines {
            match self.run_read_only(&m, db, None, |w| w.bindings.call_on_leader_change(&mut w.store, is_leader, term)) {
                Ok(Some(Ok(()))) => {}
                Ok(None) => unreachable!("a call without a slice cannot run out of it"),
                Ok(Some(Err(e))) => tracing::warn!(machine = %m.record.name, "on-leader-change: {e}"),
                Err(e) => tracing::warn!(machine = %m.record.name, "on-leader-change: {e}"),
            }
        }
    }

    /// Run a read-only call on one of `m`'s pooled instances (the store refuses writes),
    /// with the machine's fuel budget or only `slice` of it (`None` when the call needed
    /// more than the slice). An instance that trapped is not returned to the pool.
    fn run_read_only<T>(
        &self,
        m: &Machine,
        db: &Arc<StateDb>,
        slice: Option<Slice>,
        call: impl FnOnce(&mut Warm) -> wasmtime::Result<T>,
    ) -> Result<Option<Result<T, ApplyError>>, HostFault> {
        let pooled = m.readers.lock().expect("poisoned").pop();
        let mut warm = match pooled {
            Some(w) if Arc::ptr_eq(w.store.data().db(), db) => w,
            _ => match self.instantiate(m, db.clone()) {
                Ok(w) => w,
                Err(e) => return Ok(Some(Err(e))),
            },
        };
        warm.store.set_fuel(slice.map_or(m.record.fuel, |s| s.fuel)).expect("fuel is enabled");
        warm.store.data_mut().begin(Overlay::default(), false);
        if let Some(s) = slice {
            warm.store.data_mut().limit_reads(s.reads);
        }
        let result = call(&mut warm);
        let (_, _, _, fault) = warm.store.data_mut().finish();
        if let Some(f) = fault {
            return Err(HostFault(f));
        }
        match result {
            Ok(v) => {
                if let Some(warm) = keep_warm(warm) {
                    let mut pool = m.readers.lock().expect("poisoned");
                    if pool.len() < QUERY_POOL {
                        pool.push(warm);
                    }
                }
                Ok(Some(Ok(v)))
            }
            Err(e) if slice.is_some() && is_out_of_slice(&warm.store, &e) => Ok(None),
            Err(e) => Ok(Some(Err(classify(&warm.store, e)))),
        }
    }
}

/// Part of a machine's budget for one read-only call: `fuel` and host `reads` (see
/// `HostState::limit_reads`).
#[derive(Clone, Copy)]
struct Slice {
    fuel: u64,
    reads: u64,
}

/// A slice of `f` fuel may make `f / QUICK_FUEL_PER_READ` host reads: 1,000,000 fuel
/// allows 4,000 rows (measured: a 30,000-key range of kv-mvcc burns less than 1,000,000
/// fuel, because copying a value is one `memory.copy`; its host reads are the cost).
const QUICK_FUEL_PER_READ: u64 = 250;

fn is_out_of_slice(store: &Store<HostState>, e: &wasmtime::Error) -> bool {
    store.data().over_read_budget() || matches!(e.downcast_ref::<wasmtime::Trap>(), Some(wasmtime::Trap::OutOfFuel))
}

/// The sha256 of this build's built-in kv component (see the module doc).
fn builtin_kv_sha256() -> &'static String {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| sha256_hex(crate::server::DEFAULT_KV_MODULE))
}

/// `warm`, unless its linear memory grew by more than [`KEEP_WARM_MEMORY`]. The choice
/// depends only on what the guest did, so every replica makes it alike.
fn keep_warm(warm: Warm) -> Option<Warm> {
    (warm.store.data().grown() <= KEEP_WARM_MEMORY).then_some(warm)
}

/// Turn a wasmtime error into the deterministic error every replica reports.
fn classify(store: &Store<HostState>, e: wasmtime::Error) -> ApplyError {
    if let Some(msg) = store.data().out_of_memory() {
        return ApplyError::new(ApplyErrorKind::OutOfMemory, msg);
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => ApplyError::new(ApplyErrorKind::OutOfFuel, "the command exceeded its fuel budget"),
        Some(t) => ApplyError::new(ApplyErrorKind::Trap, t.to_string()),
        // Errors raised by host imports (e.g. a write during `query`): their own message,
        // without the wasm backtrace wasmtime attaches as context.
        None => ApplyError::new(ApplyErrorKind::Trap, format!("{}", e.root_cause())),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto::etcdserverpb::{
        request_op, CompactionRequest, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
        RequestOp, TxnRequest,
    };
    use crate::storage::PendingBatch;

    use crate::api::etcd_kv::{frame, TAG_COMPACT, TAG_COMPACT_STEP, TAG_DELETE, TAG_PUT, TAG_RANGE, TAG_TXN};

    /// A state store and a runtime with the built-in kv-mvcc loaded as `kv`.
    fn kv_runtime() -> (tempfile::TempDir, Arc<StateDb>, Runtime) {
        kv_runtime_with(DEFAULT_FUEL, DEFAULT_MEMORY_BYTES)
    }

    /// [`kv_runtime`] with the kv module's fuel and memory limits given.
    fn kv_runtime_with(fuel: u64, memory_bytes: u64) -> (tempfile::TempDir, Arc<StateDb>, Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::open(&dir.path().join("state")).unwrap());
        let rt = Runtime::new(&dir.path().join("cache")).unwrap();
        let wasm = rt.validate(crate::server::DEFAULT_KV_MODULE).unwrap();
        rt.load(ModuleRecord::for_component("kv".into(), &wasm, fuel, memory_bytes, 1), &wasm).unwrap();
        (dir, db, rt)
    }

    /// Startup pruning keeps the artifacts of installed modules and nothing else.
    #[test]
    fn prune_cache_keeps_only_installed_modules() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(&dir.path().join("cache")).unwrap();
        let kv = rt.validate(crate::server::DEFAULT_KV_MODULE).unwrap();
        let kv_sha = sha256_hex(&kv);
        let cache = dir.path().join("cache");
        let other = "ab".repeat(32);
        for name in [rt.artifact_name(&other), format!("{kv_sha}-0000000000000000.cwasm"), format!("{other}-x.tmp")] {
            std::fs::write(cache.join(name), b"stale").unwrap();
        }
        std::fs::write(cache.join("notes.txt"), b"not ours").unwrap();
        assert_eq!(rt.prune_cache([kv_sha.as_str()]).unwrap(), (3, 15));
        let mut left: Vec<String> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, vec![rt.artifact_name(&kv_sha), "notes.txt".to_string()]);
        // What is kept still loads without a compile.
        rt.load(ModuleRecord::for_component("kv".into(), &kv, 1, 1, 1), &kv).unwrap();
        assert_eq!(rt.prune_cache([]).unwrap().0, 1);
    }

    /// Applies `cmd` to the kv machine as a batch of its own and commits it: the guest's
    /// output or error.
    fn apply_committed(rt: &Runtime, db: &Arc<StateDb>, index: &mut u64, cmd: &[u8]) -> Result<Vec<u8>, ApplyError> {
        let mut batch = PendingBatch::default();
        *index += 1;
        let ctx = ApplyContext { index: *index, term: 1, timestamp_ms: 0 };
        let out = rt.apply("kv", db, &mut batch.data, ctx, cmd).unwrap().map(|(out, _)| out);
        db.commit(batch).unwrap();
        out
    }

    /// Puts keys `key-0000000` to `key-{n-1}` with `value_len`-byte values, 1,000 per txn
    /// (the guest takes a txn of any size).
    fn put_keys(rt: &Runtime, db: &Arc<StateDb>, index: &mut u64, n: usize, value_len: usize) {
        for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
            let success = chunk
                .iter()
                .map(|i| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: format!("key-{i:07}").into_bytes(),
                        value: vec![b'v'; value_len],
                        ..Default::default()
                    })),
                })
                .collect();
            apply_committed(rt, db, index, &frame(TAG_TXN, &TxnRequest { success, ..Default::default() })).unwrap();
        }
    }

    /// etcd answers `get --prefix ""` and `del --prefix ""` over every key in one request;
    /// so must the built-in kv module within the limits the server installs it with. With
    /// the generic ones (500M fuel, 128 MiB) a range of 50,000 keys and a delete of 90,000
    /// ran out of fuel (these need ~750M each), and this range (a 150 MB answer) needs more
    /// memory. The instance that grew that much is not kept warm.
    #[test]
    fn the_built_in_kv_budget_covers_a_range_and_a_delete_of_every_key() {
        const KEYS: usize = 100_000;
        let (_dir, db, rt) = kv_runtime_with(KV_FUEL, KV_MEMORY_BYTES);
        let mut index = 0;
        put_keys(&rt, &db, &mut index, KEYS, 1_500);
        let all = RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
        let r = RangeResponse::decode(rt.query("kv", &db, &frame(TAG_RANGE, &all)).unwrap().unwrap().as_slice()).unwrap();
        assert_eq!((r.count, r.kvs.len()), (KEYS as i64, KEYS));
        assert_eq!(r.kvs[KEYS - 1].key, format!("key-{:07}", KEYS - 1).into_bytes());
        let kv = rt.machine("kv").unwrap();
        assert!(kv.readers.lock().unwrap().iter().all(|w| w.store.data().grown() <= KEEP_WARM_MEMORY));
        let del = DeleteRangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
        let d = DeleteRangeResponse::decode(apply_committed(&rt, &db, &mut index, &frame(TAG_DELETE, &del)).unwrap().as_slice()).unwrap();
        assert_eq!(d.deleted, KEYS as i64);
        let r = RangeResponse::decode(rt.query("kv", &db, &frame(TAG_RANGE, &all)).unwrap().unwrap().as_slice()).unwrap();
        assert_eq!(r.count, 0);
    }

    /// A compaction removes its history in steps of bounded work (`api::etcd_kv::compact_kv`
    /// proposes them), so one revision that deleted 20,000 keys compacts on a 100M budget,
    /// a fifth of the generic one. Removing its 40,000 history records in one call does not
    /// fit (~60,000 records read at the measured 8,000–16,000 fuel each). The steps leave
    /// only the live key's records.
    #[test]
    fn compaction_steps_fit_a_small_budget() {
        const KEYS: usize = 20_000;
        let (_dir, db, rt) = kv_runtime_with(KV_FUEL, KV_MEMORY_BYTES);
        let mut index = 0;
        put_keys(&rt, &db, &mut index, KEYS, 8);
        let mut apply = |cmd: &[u8]| apply_committed(&rt, &db, &mut index, cmd);
        let all = DeleteRangeRequest { key: vec![0], range_end: vec![0], ..Default::default() };
        apply(&frame(TAG_DELETE, &all)).unwrap();
        let live = PutRequest { key: b"live".to_vec(), value: b"1".to_vec(), ..Default::default() };
        let rev = PutResponse::decode(apply(&frame(TAG_PUT, &live)).unwrap().as_slice()).unwrap().header.unwrap().revision;
        let wasm = rt.validate(crate::server::DEFAULT_KV_MODULE).unwrap();
        rt.load(ModuleRecord::for_component("kv".into(), &wasm, 100_000_000, KV_MEMORY_BYTES, 2), &wasm).unwrap();
        apply(&frame(TAG_COMPACT, &CompactionRequest { revision: rev, physical: false })).unwrap();
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 1_000, "compaction steps do not end");
            match apply(&[TAG_COMPACT_STEP]) {
                Ok(more) if more == [1] => continue,
                Ok(done) => {
                    assert_eq!(done, [0]);
                    break;
                }
                Err(e) => panic!("step {steps}: {e}"),
            }
        }
        assert!(steps > 2, "{steps} steps");
        let prefix = crate::storage::machine_prefix("kv");
        let left = db.scan_data(&prefix, &crate::storage::prefix_end(&prefix), false, usize::MAX).unwrap();
        let left: Vec<_> = left.iter().map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned()).collect();
        // m/rev, m/compact, and live's k/, h/ and r/ records.
        assert_eq!(left.len(), 5, "{left:?}");
    }

    #[test]
    fn a_query_too_big_for_its_slice_is_left_for_a_rerun_with_the_whole_budget() {
        let (_dir, db, rt) = kv_runtime();
        let mut batch = PendingBatch::default();
        for i in 0..300u64 {
            let put = PutRequest { key: format!("k{i:04}").into_bytes(), value: vec![b'v'; 100], ..Default::default() };
            let ctx = ApplyContext { index: i + 1, term: 1, timestamp_ms: 0 };
            rt.apply("kv", &db, &mut batch.data, ctx, &frame(TAG_PUT, &put)).unwrap().unwrap();
        }
        db.commit(batch).unwrap();
        let count = |out: Vec<u8>| RangeResponse::decode(out.as_slice()).unwrap().kvs.len();

        let one = frame(TAG_RANGE, &RangeRequest { key: b"k0007".to_vec(), ..Default::default() });
        let all = frame(TAG_RANGE, &RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() });
        // 100 host reads, 25,000 fuel: enough for one key, not for 300.
        let slice = 100 * QUICK_FUEL_PER_READ;
        let quick = rt.query_within("kv", &db, &one, slice).unwrap().expect("a point read fits the slice");
        assert_eq!(count(quick.unwrap()), 1);
        assert!(rt.query_within("kv", &db, &all, slice).unwrap().is_none(), "300 keys do not fit");
        // The whole budget answers it; so does a slice as large as the budget.
        assert_eq!(count(rt.query("kv", &db, &all).unwrap().unwrap()), 300);
        let whole = rt.query_within("kv", &db, &all, DEFAULT_FUEL).unwrap().expect("not a slice");
        assert_eq!(count(whole.unwrap()), 300);
        // The instance dropped after running out of its slice is replaced.
        assert_eq!(count(rt.query_within("kv", &db, &one, slice).unwrap().unwrap().unwrap()), 1);
    }

    /// A query makes several host reads (kv-mvcc: the current revision, then the key's index
    /// record, then its value). A batch committed between two of them must not show: the
    /// answer's revision is never below the revision of a key it returns.
    #[test]
    fn a_query_reads_one_state_while_batches_commit_under_it() {
        let (_dir, db, rt) = kv_runtime();
        let put = |i: u64| frame(TAG_PUT, &PutRequest { key: b"k".to_vec(), value: i.to_be_bytes().to_vec(), ..Default::default() });
        let get = frame(TAG_RANGE, &RangeRequest { key: b"k".to_vec(), ..Default::default() });
        std::thread::scope(|s| {
            // Joined when the scope ends, which re-raises a panic of the writer.
            let writer = s.spawn(|| {
                for i in 1..=3_000u64 {
                    let mut batch = PendingBatch::default();
                    let ctx = ApplyContext { index: i, term: 1, timestamp_ms: 0 };
                    rt.apply("kv", &db, &mut batch.data, ctx, &put(i)).unwrap().unwrap();
                    db.commit(batch).unwrap();
                }
            });
            let mut checked = 0;
            while !writer.is_finished() {
                let r = RangeResponse::decode(rt.query("kv", &db, &get).unwrap().unwrap().as_slice()).unwrap();
                let revision = r.header.unwrap().revision;
                for kv in &r.kvs {
                    assert!(kv.mod_revision <= revision, "after {checked} reads: key at revision {} in an answer at {revision}", kv.mod_revision);
                }
                checked += 1;
            }
            assert!(checked > 0, "the writer finished before any query ran");
        });
    }

    #[test]
    fn a_heavy_command_sends_its_machine_to_a_blocking_thread_until_it_is_light_again() {
        let (_dir, db, rt) = kv_runtime();
        let mut index = 0;
        let mut apply = |msg: Vec<u8>| apply_committed(&rt, &db, &mut index, &msg).unwrap();
        let put = |i: u64| {
            frame(TAG_PUT, &PutRequest { key: format!("k{i:04}").into_bytes(), value: vec![b'v'; 100], ..Default::default() })
        };
        for i in 0..QUICK_APPLY_READS + 100 {
            apply(put(i));
        }
        assert!(rt.applies_quickly("kv"), "puts are light");
        assert!(rt.applies_quickly("not-installed"));

        // Deleting every key reads more than QUICK_APPLY_READS rows.
        let all = DeleteRangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
        let deleted = DeleteRangeResponse::decode(apply(frame(TAG_DELETE, &all)).as_slice()).unwrap().deleted;
        assert_eq!(deleted, (QUICK_APPLY_READS + 100) as i64);
        assert!(!rt.applies_quickly("kv"), "the range delete was heavy");

        for i in 0..u64::from(QUICK_APPLY_STREAK) - 1 {
            apply(put(i));
            assert!(!rt.applies_quickly("kv"), "still slow after {} light commands", i + 1);
        }
        apply(put(0));
        assert!(rt.applies_quickly("kv"), "quick again after {QUICK_APPLY_STREAK} light commands");
    }
}
