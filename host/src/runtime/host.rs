//! The host side of the `raftvm:machine` imports, and the per-instance resource limiter.

use std::sync::Arc;

use crate::storage::{machine_prefix, prefix_end, read_through, scan_through, Committed, ModuleRecord, Overlay, StateDb, StateView};
use crate::storage::leases::{attach_key, get_lease};

use super::bindings::raftvm::machine::{events, leases, log, store, types};
use super::Events;

/// Largest `limit` a single `scan` honours, so a guest cannot make the host build a huge
/// list in one call (it pages instead).
const MAX_SCAN: u32 = 10_000;

/// Per-instance host state: where the guest's store calls go, and its limits.
pub struct HostState {
    machine: String,
    db: Arc<StateDb>,
    /// What a read-only call reads: one snapshot for the whole call, so batches committed
    /// meanwhile cannot tear its answer. `None` while applying: the apply loop is the only
    /// writer, so the live store cannot change under it.
    view: Option<StateView>,
    /// `machine name ++ 0x00`: prepended to every key the guest uses.
    prefix: Vec<u8>,
    prefix_end: Vec<u8>,
    /// Writes of earlier commands in the current batch (read-only for this command).
    base: Overlay,
    /// This command's writes.
    cmd: Overlay,
    events: Events,
    writable: bool,
    memory_cap: usize,
    /// Size the instance's linear memory has grown to (it never shrinks).
    memory: usize,
    /// `memory` right after instantiation (see `grown`).
    baseline: usize,
    /// Set when the limiter refused memory growth: the reason reported to the client.
    oom: Option<String>,
    /// A failure of the node's own storage while the guest ran: the call must not count.
    fault: Option<anyhow::Error>,
    /// Host reads this call may still make (a get or a scanned row costs 1, plus 1 per
    /// KiB returned), `None` for no limit. Fuel counts guest instructions only; this
    /// bounds the host work a query does on an async worker (see `Runtime::query_within`).
    read_budget: Option<u64>,
    over_read_budget: bool,
    /// Reads charged so far in this call, budget or not.
    reads: u64,
}

impl HostState {
    pub(super) fn new(record: &ModuleRecord, db: Arc<StateDb>) -> Self {
        let prefix = machine_prefix(&record.name);
        Self {
            machine: record.name.clone(),
            db,
            view: None,
            prefix_end: prefix_end(&prefix),
            prefix,
            base: Overlay::default(),
            cmd: Overlay::default(),
            events: Vec::new(),
            writable: false,
            memory_cap: usize::try_from(record.memory_bytes).unwrap_or(usize::MAX),
            memory: 0,
            baseline: 0,
            oom: None,
            fault: None,
            read_budget: None,
            over_read_budget: false,
            reads: 0,
        }
    }

    pub(super) fn db(&self) -> &Arc<StateDb> {
        &self.db
    }

    /// Note the instance's memory as instantiated: what it needs anyway.
    pub(super) fn set_baseline(&mut self) {
        self.baseline = self.memory;
    }

    /// Bytes of linear memory the instance grew by since instantiation (see
    /// `runtime::keep_warm`).
    pub(super) fn grown(&self) -> usize {
        self.memory - self.baseline
    }

    pub(super) fn out_of_memory(&self) -> Option<String> {
        self.oom.clone()
    }

    /// Start a call. A read-only call reads a snapshot taken now (see `view`).
    pub(super) fn begin(&mut self, base: Overlay, writable: bool) {
        self.view = (!writable).then(|| self.db.view());
        self.base = base;
        self.cmd = Overlay::default();
        self.events.clear();
        self.writable = writable;
        self.oom = None;
        self.fault = None;
        self.read_budget = None;
        self.over_read_budget = false;
        self.reads = 0;
    }

    /// Limit the host reads of the call just begun (see `read_budget`).
    pub(super) fn limit_reads(&mut self, budget: u64) {
        self.read_budget = Some(budget);
    }

    /// Whether the call trapped because it used up its read budget.
    pub(super) fn over_read_budget(&self) -> bool {
        self.over_read_budget
    }

    /// Reads the call just run was charged (see `read_budget`), limited or not.
    pub(super) fn reads(&self) -> u64 {
        self.reads
    }

    /// Charge `rows` reads returning `bytes` bytes against the read budget.
    fn charge_reads(&mut self, rows: usize, bytes: usize) -> wasmtime::Result<()> {
        let cost = rows as u64 + (bytes as u64).div_ceil(1024);
        self.reads = self.reads.saturating_add(cost);
        let Some(left) = self.read_budget.as_mut() else {
            return Ok(());
        };
        match left.checked_sub(cost) {
            Some(l) => {
                *left = l;
                Ok(())
            }
            None => {
                self.over_read_budget = true;
                Err(wasmtime::Error::msg("the call exceeded its host read budget"))
            }
        }
    }

    /// End a call: hand back the base overlay, this command's writes and events, and any
    /// host fault.
    pub(super) fn finish(&mut self) -> (Overlay, Overlay, Events, Option<anyhow::Error>) {
        self.writable = false;
        self.view = None;
        (
            std::mem::take(&mut self.base),
            std::mem::take(&mut self.cmd),
            std::mem::take(&mut self.events),
            self.fault.take(),
        )
    }

    /// The committed state this call reads.
    fn committed(&self) -> &dyn Committed {
        match &self.view {
            Some(v) => v,
            None => &*self.db,
        }
    }

    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        [self.prefix.as_slice(), key].concat()
    }

    fn require_writable(&self, what: &str) -> wasmtime::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(wasmtime::Error::msg(format!("store.{what} called outside apply: the store is read-only here")))
        }
    }

    fn host_fault<T>(&mut self, e: anyhow::Error) -> wasmtime::Result<T> {
        let msg = format!("host storage failure: {e:#}");
        self.fault = Some(e);
        Err(wasmtime::Error::msg(msg))
    }
}

impl types::Host for HostState {}

impl store::Host for HostState {
    fn get(&mut self, key: Vec<u8>) -> wasmtime::Result<Option<Vec<u8>>> {
        let full = self.full_key(&key);
        match read_through(self.committed(), &[&self.base, &self.cmd], &full) {
            Ok(v) => {
                self.charge_reads(1, v.as_ref().map_or(0, Vec::len))?;
                Ok(v)
            }
            Err(e) => self.host_fault(e),
        }
    }

    fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<()> {
        self.require_writable("set")?;
        let full = self.full_key(&key);
        self.cmd.map.insert(full, Some(value));
        Ok(())
    }

    fn remove(&mut self, key: Vec<u8>) -> wasmtime::Result<()> {
        self.require_writable("remove")?;
        let full = self.full_key(&key);
        self.cmd.map.insert(full, None);
        Ok(())
    }

    fn scan(&mut self, start: Vec<u8>, end: Vec<u8>, reverse: bool, limit: u32) -> wasmtime::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let s = self.full_key(&start);
        let e = if end.is_empty() { self.prefix_end.clone() } else { self.full_key(&end) };
        let limit = limit.min(MAX_SCAN) as usize;
        match scan_through(self.committed(), &[&self.base, &self.cmd], &s, &e, reverse, limit) {
            Ok(rows) => {
                let bytes = rows.iter().map(|(k, v)| k.len() + v.len()).sum();
                self.charge_reads(rows.len().max(1), bytes)?;
                let n = self.prefix.len();
                Ok(rows.into_iter().map(|(mut k, v)| (k.split_off(n), v)).collect())
            }
            Err(e) => self.host_fault(e),
        }
    }
}

impl events::Host for HostState {
    fn emit(&mut self, key: Vec<u8>, event: Vec<u8>) -> wasmtime::Result<()> {
        self.require_writable("emit")?;
        self.events.push((key, event));
        Ok(())
    }
}

impl leases::Host for HostState {
    // The replicated lease table (storage::leases), read through this command's overlays:
    // a lease granted earlier in the same batch is live, one revoked earlier is not. No
    // clock is involved, so every replica gives the same answer.
    fn is_live(&mut self, id: i64) -> wasmtime::Result<bool> {
        match get_lease(self.committed(), &[&self.base, &self.cmd], id) {
            Ok(rec) => Ok(rec.is_some()),
            Err(e) => self.host_fault(e),
        }
    }

    // Attachments are rows of the command's own write set: they are kept only if the
    // command commits.
    fn attach(&mut self, id: i64, key: Vec<u8>) -> wasmtime::Result<()> {
        self.require_writable("attach")?;
        if !self.is_live(id)? {
            return Err(wasmtime::Error::msg(format!("lease {id} is not live")));
        }
        self.cmd.map.insert(attach_key(&self.machine, id, &key), Some(Vec::new()));
        Ok(())
    }

    fn detach(&mut self, id: i64, key: Vec<u8>) -> wasmtime::Result<()> {
        self.require_writable("detach")?;
        self.cmd.map.insert(attach_key(&self.machine, id, &key), None);
        Ok(())
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: types::Level, message: String) -> wasmtime::Result<()> {
        let m = self.machine.as_str();
        match level {
            types::Level::Trace => tracing::trace!(machine = m, "{message}"),
            types::Level::Debug => tracing::debug!(machine = m, "{message}"),
            types::Level::Info => tracing::info!(machine = m, "{message}"),
            types::Level::Warn => tracing::warn!(machine = m, "{message}"),
            types::Level::Error => tracing::error!(machine = m, "{message}"),
        }
        Ok(())
    }
}

impl wasmtime::ResourceLimiter for HostState {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            let msg = format!("memory limit of {} bytes exceeded (wanted {desired})", self.memory_cap);
            self.oom = Some(msg.clone());
            return Err(wasmtime::Error::msg(msg));
        }
        self.memory = self.memory.max(desired);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::leases::{attached_keys, encode_lease, lease_key, LeaseRecord};
    use crate::storage::PendingBatch;

    fn record(name: &str) -> ModuleRecord {
        ModuleRecord::for_component(name.into(), b"", 1, 1 << 20, 1)
    }

    #[test]
    fn leases_follow_the_replicated_table_and_attachments_are_command_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::open(dir.path()).unwrap());
        let mut committed = PendingBatch::default();
        committed.data.map.insert(lease_key(1), Some(encode_lease(&LeaseRecord { ttl: 60 })));
        committed.data.map.insert(lease_key(2), Some(encode_lease(&LeaseRecord { ttl: 60 })));
        db.commit(committed).unwrap();
        // Earlier in the batch: lease 2 revoked, lease 3 granted.
        let mut batch = Overlay::default();
        batch.map.insert(lease_key(2), None);
        batch.map.insert(lease_key(3), Some(encode_lease(&LeaseRecord { ttl: 5 })));

        let mut h = HostState::new(&record("kv"), db.clone());
        h.begin(batch, true);
        use leases::Host;
        assert!(h.is_live(1).unwrap() && !h.is_live(2).unwrap() && h.is_live(3).unwrap() && !h.is_live(0).unwrap());
        h.attach(1, b"a".to_vec()).unwrap();
        h.attach(3, b"b".to_vec()).unwrap();
        let err = h.attach(2, b"c".to_vec()).unwrap_err();
        assert!(err.to_string().contains("lease 2 is not live"), "{err}");
        h.detach(1, b"a".to_vec()).unwrap();
        let (base, cmd, _, fault) = h.finish();
        assert!(fault.is_none());
        // Only in the command's write set, under this machine's name.
        assert!(attached_keys(&db, &[&base], "kv", 3).unwrap().is_empty());
        assert_eq!(attached_keys(&db, &[&base, &cmd], "kv", 3).unwrap(), vec![b"b".to_vec()]);
        assert!(attached_keys(&db, &[&base, &cmd], "kv", 1).unwrap().is_empty());
        assert!(attached_keys(&db, &[&base, &cmd], "other", 3).unwrap().is_empty());

        // Read-only calls (query) may ask, not attach.
        h.begin(Overlay::default(), false);
        assert!(h.is_live(1).unwrap());
        assert!(h.attach(1, b"x".to_vec()).is_err());
        assert!(h.detach(1, b"x".to_vec()).is_err());
    }

    #[test]
    fn a_read_budget_counts_gets_rows_and_kibibytes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::open(dir.path()).unwrap());
        let mut h = HostState::new(&record("kv"), db);
        h.begin(Overlay::default(), true);
        use store::Host;
        for i in 0..10u8 {
            h.set(vec![b'k', i], vec![0; 2048]).unwrap();
        }
        // Unlimited by default.
        assert_eq!(h.scan(Vec::new(), Vec::new(), false, 100).unwrap().len(), 10);
        h.limit_reads(3 + 12);
        assert_eq!(h.get(b"k\x00".to_vec()).unwrap().map(|v| v.len()), Some(2048)); // 1 + 2 KiB
        assert_eq!(h.scan(b"k\x01".to_vec(), b"k\x04".to_vec(), false, 100).unwrap().len(), 3); // 3 + 7
        assert!(!h.over_read_budget());
        assert!(h.get(b"k\x05".to_vec()).is_err(), "3 + 7 + 3 > 15");
        assert!(h.over_read_budget());
        // A new call starts unlimited again.
        h.begin(Overlay::default(), false);
        assert!(!h.over_read_budget());
        assert!(h.get(b"absent".to_vec()).unwrap().is_none());
    }
}
