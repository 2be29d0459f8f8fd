//! The host side of the `raftvm:machine` imports, and the per-instance resource limiter.

use std::sync::Arc;

use crate::storage::{machine_prefix, prefix_end, read_through, scan_through, ModuleRecord, Overlay, StateDb};

use super::bindings::raftvm::machine::{events, leases, log, store, types};

/// Largest `limit` a single `scan` honours, so a guest cannot make the host build a huge
/// list in one call (it pages instead).
const MAX_SCAN: u32 = 10_000;

/// Per-instance host state: where the guest's store calls go, and its limits.
pub struct HostState {
    machine: String,
    db: Arc<StateDb>,
    /// `machine name ++ 0x00`: prepended to every key the guest uses.
    prefix: Vec<u8>,
    prefix_end: Vec<u8>,
    /// Writes of earlier commands in the current batch (read-only for this command).
    base: Overlay,
    /// This command's writes.
    cmd: Overlay,
    events: Vec<(Vec<u8>, Vec<u8>)>,
    writable: bool,
    memory_cap: usize,
    /// Set when the limiter refused memory growth: the reason reported to the client.
    oom: Option<String>,
    /// A failure of the node's own storage while the guest ran: the call must not count.
    fault: Option<anyhow::Error>,
}

impl HostState {
    pub(super) fn new(record: &ModuleRecord, db: Arc<StateDb>) -> Self {
        let prefix = machine_prefix(&record.name);
        Self {
            machine: record.name.clone(),
            db,
            prefix_end: prefix_end(&prefix),
            prefix,
            base: Overlay::default(),
            cmd: Overlay::default(),
            events: Vec::new(),
            writable: false,
            memory_cap: usize::try_from(record.memory_bytes).unwrap_or(usize::MAX),
            oom: None,
            fault: None,
        }
    }

    pub(super) fn db(&self) -> &Arc<StateDb> {
        &self.db
    }

    pub(super) fn out_of_memory(&self) -> Option<String> {
        self.oom.clone()
    }

    pub(super) fn begin(&mut self, base: Overlay, writable: bool) {
        self.base = base;
        self.cmd = Overlay::default();
        self.events.clear();
        self.writable = writable;
        self.oom = None;
        self.fault = None;
    }

    /// End a call: hand back the base overlay, this command's writes and events, and any
    /// host fault.
    pub(super) fn finish(&mut self) -> (Overlay, Overlay, Vec<(Vec<u8>, Vec<u8>)>, Option<anyhow::Error>) {
        self.writable = false;
        (
            std::mem::take(&mut self.base),
            std::mem::take(&mut self.cmd),
            std::mem::take(&mut self.events),
            self.fault.take(),
        )
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
        match read_through(&self.db, &[&self.base, &self.cmd], &full) {
            Ok(v) => Ok(v),
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
        match scan_through(&self.db, &[&self.base, &self.cmd], &s, &e, reverse, limit) {
            Ok(rows) => {
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
    // Lease grants arrive with the Lease service; until then no lease is live, so a guest
    // that attaches keys gets a consistent "not live" answer on every replica.
    fn is_live(&mut self, _id: i64) -> wasmtime::Result<bool> {
        Ok(false)
    }

    fn attach(&mut self, id: i64, _key: Vec<u8>) -> wasmtime::Result<()> {
        self.require_writable("attach")?;
        Err(wasmtime::Error::msg(format!("lease {id} is not live")))
    }

    fn detach(&mut self, _id: i64, _key: Vec<u8>) -> wasmtime::Result<()> {
        self.require_writable("detach")?;
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
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}
