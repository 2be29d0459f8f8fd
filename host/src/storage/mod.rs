//! The applied state: one RocksDB instance per state version, plus the write sets
//! commands see while they are being applied.
//!
//! Layout (column families of the state DB):
//! - `data`: every machine's private store. Key = `machine name ++ 0x00 ++ user key`.
//!   Names never contain 0x00, so each machine owns one contiguous key range. Keys starting
//!   with 0x01 are reserved for the host (lease attachments).
//! - `meta`: `applied` (last applied log id), `membership`, `module/<name>` (module records).
//! - `blobs`: module bytes by sha256, deleted when no machine runs them any more.
//!
//! The Raft log lives in a different DB (see `raft::log_store`) so a snapshot of the state
//! can be swapped in as a whole directory.
//!
//! Writes never go straight to the DB: the state-machine driver collects a whole applied
//! batch in an [`Overlay`] (and each command in its own overlay on top, so a failed command
//! can be discarded) and commits it with one `WriteBatch` together with the applied log id.
//!
//! Applied batches skip RocksDB's own write-ahead log: the Raft log is this store's WAL
//! (as etcd's raft WAL is its bbolt backend's, with the consistent index). After a crash
//! the store holds what its last flush wrote, `applied` included, and the node applies the
//! log from there again. Two things keep that sound:
//! - every flush covers all column families at once (`atomic_flush`), so what is on disk
//!   is always the state after some whole batch, never data ahead of its `applied`;
//! - the log is only purged up to a snapshot, and building one checkpoints this store,
//!   which flushes it first (`raft::state_machine`), so the entries after what is on disk
//!   are always still in the log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::types::{decode, encode, LogId, MemberAttrs, StoredMembership};

pub mod backup;
pub mod leases;

const CF_DATA: &str = "data";
const CF_META: &str = "meta";
const CF_BLOBS: &str = "blobs";

const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const MODULE_PREFIX: &[u8] = b"module/";
const DEFAULT_PREFIX: &[u8] = b"default-installed/";
const ALARM_PREFIX: &[u8] = b"alarm/";
const MEMBER_PREFIX: &[u8] = b"member/";

/// A machine's record in `meta`, replicated like everything else in the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub name: String,
    pub sha256: String,
    pub size: u64,
    pub fuel: u64,
    pub memory_bytes: u64,
    pub installed_index: u64,
}

impl ModuleRecord {
    /// The record of component `wasm` installed as `name` at log index `installed_index`.
    pub fn for_component(name: String, wasm: &[u8], fuel: u64, memory_bytes: u64, installed_index: u64) -> Self {
        Self { name, sha256: sha256_hex(wasm), size: wasm.len() as u64, fuel, memory_bytes, installed_index }
    }
}

/// Hex sha256: the content address of module blobs and compiled artifacts.
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The first key of machine `name`'s range in `data`.
pub fn machine_prefix(name: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(name.len() + 1);
    p.extend_from_slice(name.as_bytes());
    p.push(0);
    p
}

/// The smallest key greater than every key that starts with `prefix` (empty = unbounded).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

pub struct StateDb {
    db: DB,
    path: PathBuf,
    /// The active alarms, read once and dropped when a commit changes them: every etcd
    /// write checks them (the NOSPACE quota), and a RocksDB iterator per put is costly.
    alarms: std::sync::Mutex<Option<Vec<(u64, i32)>>>,
}

impl StateDb {
    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Applied batches are written without RocksDB's WAL (module docs): a memtable flush
        // must then never persist one column family further than another.
        opts.set_atomic_flush(true);
        // Guests probe many keys that do not exist yet (a new key's index record, say):
        // bloom filters answer most of those misses without reading SST blocks.
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        let mut data_opts = Options::default();
        data_opts.set_block_based_table_factory(&table);
        // The same for the memtable, where most of a busy node's probes end (profiled:
        // skiplist searches were the largest single cost of applying puts).
        data_opts.set_memtable_whole_key_filtering(true);
        data_opts.set_memtable_prefix_bloom_ratio(0.1);
        // Smaller memtables than RocksDB's 64 MiB: each put inserts three records at
        // random places in it, and a shallower skiplist that stays closer in cache costs
        // less per insert. Measured (session 15): apply bench 66–71k → 73–77k puts/s;
        // put, 1 node, 128 clients, 100,000 keys: 21.8–22.7k → 23.1–23.7k ops/s.
        data_opts.set_write_buffer_size(16 << 20);
        let cfs = [
            ColumnFamilyDescriptor::new(CF_DATA, data_opts),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_BLOBS, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs)
            .with_context(|| format!("opening state store {}", path.display()))?;
        Ok(Self { db, path: path.to_owned(), alarms: std::sync::Mutex::new(None) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    pub fn get_data(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_DATA), key)?)
    }

    /// Up to `limit` committed entries of `data` with `start <= key < end`, ascending or
    /// descending. `end` must be non-empty.
    pub fn scan_data(&self, start: &[u8], end: &[u8], reverse: bool, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_data_opt(ReadOptions::default(), start, end, reverse, limit)
    }

    /// A consistent view of the committed state as of now, unaffected by later commits.
    pub fn view(self: &Arc<Self>) -> StateView {
        StateView::new(self.clone(), |db| db.db.snapshot())
    }

    /// [`StateDb::scan_data`] with `ro` (which may pin a snapshot).
    fn scan_data_opt(
        &self,
        mut ro: ReadOptions,
        start: &[u8],
        end: &[u8],
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        if limit == 0 || start >= end {
            return Ok(out);
        }
        ro.set_iterate_lower_bound(start.to_vec());
        ro.set_iterate_upper_bound(end.to_vec());
        let mode = if reverse { IteratorMode::End } else { IteratorMode::From(start, Direction::Forward) };
        for item in self.db.iterator_cf_opt(self.cf(CF_DATA), ro, mode) {
            let (k, v) = item?;
            out.push((k.into_vec(), v.into_vec()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn get_meta<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>> {
        match self.db.get_cf(self.cf(CF_META), key)? {
            Some(b) => Ok(Some(decode(&b).with_context(|| format!("decoding meta {}", String::from_utf8_lossy(key)))?)),
            None => Ok(None),
        }
    }

    pub fn applied(&self) -> Result<Option<LogId>> {
        Ok(self.get_meta::<Option<LogId>>(KEY_APPLIED)?.flatten())
    }

    pub fn membership(&self) -> Result<StoredMembership> {
        Ok(self.get_meta(KEY_MEMBERSHIP)?.unwrap_or_default())
    }

    pub fn module(&self, name: &str) -> Result<Option<ModuleRecord>> {
        self.get_meta(&module_key(name))
    }

    pub fn modules(&self) -> Result<Vec<ModuleRecord>> {
        let mut out = Vec::new();
        let mode = IteratorMode::From(MODULE_PREFIX, Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_META), mode) {
            let (k, v) = item?;
            if !k.starts_with(MODULE_PREFIX) {
                break;
            }
            out.push(decode(&v).context("decoding module record")?);
        }
        Ok(out)
    }

    /// The machines' records as they stand with `batch`'s pending writes applied.
    pub fn modules_with(&self, batch: &PendingBatch) -> Result<Vec<ModuleRecord>> {
        let mut records: BTreeMap<Vec<u8>, ModuleRecord> =
            self.modules()?.into_iter().map(|r| (module_key(&r.name), r)).collect();
        for (k, v) in batch.meta.range(MODULE_PREFIX.to_vec()..).take_while(|(k, _)| k.starts_with(MODULE_PREFIX)) {
            match v {
                Some(v) => records.insert(k.clone(), decode(v).context("decoding module record")?),
                None => records.remove(k),
            };
        }
        Ok(records.into_values().collect())
    }

    /// Whether the built-in default machine `name` was ever installed in this cluster.
    pub fn default_installed(&self, name: &str) -> Result<bool> {
        Ok(self.db.get_cf(self.cf(CF_META), [DEFAULT_PREFIX, name.as_bytes()].concat())?.is_some())
    }

    /// The attributes members published, by member id.
    pub fn member_attrs(&self) -> Result<BTreeMap<u64, MemberAttrs>> {
        let mut out = BTreeMap::new();
        for item in self.db.iterator_cf(self.cf(CF_META), IteratorMode::From(MEMBER_PREFIX, Direction::Forward)) {
            let (k, v) = item?;
            let Some(rest) = k.strip_prefix(MEMBER_PREFIX) else { break };
            let id = u64::from_be_bytes(rest.try_into().context("member record key")?);
            out.insert(id, decode(&v).context("decoding member attributes")?);
        }
        Ok(out)
    }

    /// Active alarms as (member id, etcd AlarmType), in key order.
    pub fn alarms(&self) -> Result<Vec<(u64, i32)>> {
        // Loaded under the lock, so a commit's invalidation (after its write) cannot be
        // overtaken by a load that read the store before that write.
        let mut cached = self.alarms.lock().expect("poisoned");
        if let Some(a) = cached.as_ref() {
            return Ok(a.clone());
        }
        let a = self.load_alarms()?;
        *cached = Some(a.clone());
        Ok(a)
    }

    fn load_alarms(&self) -> Result<Vec<(u64, i32)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_META), IteratorMode::From(ALARM_PREFIX, Direction::Forward)) {
            let (k, _) = item?;
            let Some(rest) = k.strip_prefix(ALARM_PREFIX) else { break };
            if rest.len() == 12 {
                let member = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
                let alarm = i32::from_be_bytes(rest[8..].try_into().expect("4 bytes"));
                out.push((member, alarm));
            }
        }
        Ok(out)
    }

    /// Bytes the state occupies (SST files plus memtables, all column families).
    pub fn size(&self) -> Result<u64> {
        let mut total = 0;
        for cf in [CF_DATA, CF_META, CF_BLOBS] {
            for prop in ["rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables"] {
                total += self.db.property_int_value_cf(self.cf(cf), prop)?.unwrap_or(0);
            }
        }
        Ok(total)
    }

    /// Rewrite all files so deleted data stops taking space (etcd's defragment).
    pub fn defragment(&self) -> Result<()> {
        for cf in [CF_DATA, CF_META, CF_BLOBS] {
            self.db.compact_range_cf(self.cf(cf), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    pub fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_BLOBS), sha256.as_bytes())?)
    }

    /// Delete the module blobs that none of `installed` (the machines' records) names,
    /// returning how many went. Apply deletes a blob when its last machine goes
    /// (`raft::state_machine`); this reclaims those an older build left behind. Safe
    /// outside the log: a blob is written in the same batch as the record that names it,
    /// so one that no record names is never read, and blobs are not part of the state hash.
    pub fn drop_unreferenced_blobs(&self, installed: &[ModuleRecord]) -> Result<usize> {
        let named: std::collections::HashSet<&[u8]> = installed.iter().map(|m| m.sha256.as_bytes()).collect();
        let mut wb = WriteBatch::default();
        let mut n = 0;
        // Keys only: a blob is a whole module, and nothing here needs its bytes.
        let mut it = self.db.raw_iterator_cf(self.cf(CF_BLOBS));
        it.seek_to_first();
        while let Some(k) = it.key() {
            if !named.contains(k) {
                wb.delete_cf(self.cf(CF_BLOBS), k);
                n += 1;
            }
            it.next();
        }
        it.status()?;
        if n > 0 {
            self.db.write(wb)?;
        }
        Ok(n)
    }

    /// Commit one applied batch atomically, without RocksDB's WAL: the Raft log replays it
    /// after a crash (module docs). Measured (session 18, `benches/apply.rs`, three runs
    /// each, alternating): 121–123k → 127–138k puts/s.
    pub fn commit(&self, batch: PendingBatch) -> Result<()> {
        self.write_batch(batch, false)
    }

    /// Commit `batch` atomically and durably (through the WAL, synced): for a write that
    /// no Raft log can replay, such as the membership a restored backup starts from.
    pub fn commit_durable(&self, batch: PendingBatch) -> Result<()> {
        self.write_batch(batch, true)?;
        self.db.flush_wal(true)?;
        Ok(())
    }

    fn write_batch(&self, batch: PendingBatch, wal: bool) -> Result<()> {
        let mut wb = WriteBatch::default();
        let data = self.cf(CF_DATA);
        // By reference: the overlay is freed after the write, not entry by entry in between
        // (measured: ~+10% puts/s in benches/apply.rs).
        for (k, v) in &batch.data.map {
            match v {
                Some(v) => wb.put_cf(data, k, v),
                None => wb.delete_cf(data, k),
            }
        }
        let meta = self.cf(CF_META);
        let alarms_changed = batch.meta.keys().any(|k| k.starts_with(ALARM_PREFIX));
        for (k, v) in batch.meta {
            match v {
                Some(v) => wb.put_cf(meta, k, v),
                None => wb.delete_cf(meta, k),
            }
        }
        for (k, v) in batch.blobs {
            match v {
                Some(v) => wb.put_cf(self.cf(CF_BLOBS), k, v),
                None => wb.delete_cf(self.cf(CF_BLOBS), k),
            }
        }
        for (start, end) in batch.range_deletes {
            wb.delete_range_cf(data, start, end);
        }
        // No fsync here, and no WAL for applied batches: the log is durable, and `applied`
        // moves in the same batch, so a crash loses only applied entries that are
        // replayed from the log at restart.
        let mut opts = rocksdb::WriteOptions::default();
        opts.disable_wal(!wal);
        self.db.write_opt(wb, &opts)?;
        if alarms_changed {
            *self.alarms.lock().expect("poisoned") = None;
        }
        Ok(())
    }

    /// Records in `data` (every machine's private store and the host's records there).
    pub fn count_data(&self) -> Result<u64> {
        let mut n = 0;
        for item in self.db.iterator_cf(self.cf(CF_DATA), IteratorMode::Start) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// A consistent, openable copy of the whole store in `dir` (hard links where possible).
    /// It flushes the memtables of every column family first, atomically, so the live
    /// store on disk is then at least as new as the copy.
    pub fn checkpoint(&self, dir: &Path) -> Result<()> {
        let cp = rocksdb::checkpoint::Checkpoint::new(&self.db)?;
        cp.create_checkpoint(dir).with_context(|| format!("checkpoint into {}", dir.display()))?;
        Ok(())
    }

    /// The replica-check hashes: one per machine (its private store) and one over the whole
    /// replicated state (all data, host-reserved keys and module records; not the Raft
    /// bookkeeping, which legitimately differs between replicas).
    pub fn hashes(&self) -> Result<StateHashes> {
        let mut store = Sha256::new();
        let mut machines = BTreeMap::new();
        let mut current: Option<(String, Sha256)> = None;
        for item in self.db.iterator_cf(self.cf(CF_DATA), IteratorMode::Start) {
            let (k, v) = item?;
            feed(&mut store, &k, &v);
            let Some(split) = k.iter().position(|b| *b == 0) else { continue };
            if k.first() == Some(&1) {
                continue;
            }
            let name = String::from_utf8_lossy(&k[..split]).into_owned();
            if current.as_ref().map(|(n, _)| n != &name).unwrap_or(true) {
                if let Some((n, h)) = current.take() {
                    machines.insert(n, hex::encode(h.finalize()));
                }
                current = Some((name, Sha256::new()));
            }
            feed(&mut current.as_mut().expect("set above").1, &k[split + 1..], &v);
        }
        if let Some((n, h)) = current.take() {
            machines.insert(n, hex::encode(h.finalize()));
        }
        for rec in self.modules()? {
            let enc = encode(&rec);
            feed(&mut store, rec.name.as_bytes(), &enc);
            machines.entry(rec.name).or_insert_with(|| hex::encode(Sha256::new().finalize()));
        }
        Ok(StateHashes { store: hex::encode(store.finalize()), machines })
    }
}

fn feed(h: &mut Sha256, k: &[u8], v: &[u8]) {
    h.update((k.len() as u32).to_be_bytes());
    h.update(k);
    h.update((v.len() as u32).to_be_bytes());
    h.update(v);
}

pub fn module_key(name: &str) -> Vec<u8> {
    [MODULE_PREFIX, name.as_bytes()].concat()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateHashes {
    pub store: String,
    pub machines: BTreeMap<String, String>,
}

/// Uncommitted writes to `data`: `None` is a deletion.
#[derive(Debug, Default, Clone)]
pub struct Overlay {
    pub map: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Move every write of `other` on top of this overlay.
    pub fn absorb(&mut self, other: Overlay) {
        if self.map.is_empty() {
            self.map = other.map;
        } else {
            self.map.extend(other.map);
        }
    }
}

/// Everything one applied batch writes, committed by [`StateDb::commit`].
#[derive(Debug, Default)]
pub struct PendingBatch {
    pub data: Overlay,
    pub meta: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Module blobs written (`Some`) or deleted (`None`), in apply order.
    pub blobs: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Applied before nothing else in the batch can observe them: the driver commits the
    /// batch right after queueing a range delete.
    pub range_deletes: Vec<(Vec<u8>, Vec<u8>)>,
}

impl PendingBatch {
    pub fn set_applied(&mut self, log_id: Option<LogId>) {
        self.meta.insert(KEY_APPLIED.to_vec(), Some(encode(&log_id)));
    }

    pub fn set_membership(&mut self, m: &StoredMembership) {
        self.meta.insert(KEY_MEMBERSHIP.to_vec(), Some(encode(m)));
    }

    pub fn put_module(&mut self, rec: &ModuleRecord) {
        self.meta.insert(module_key(&rec.name), Some(encode(rec)));
    }

    pub fn mark_default_installed(&mut self, name: &str) {
        self.meta.insert([DEFAULT_PREFIX, name.as_bytes()].concat(), Some(Vec::new()));
    }

    pub fn default_marked(&self, name: &str) -> bool {
        self.meta.contains_key(&[DEFAULT_PREFIX, name.as_bytes()].concat())
    }

    pub fn set_alarm(&mut self, member_id: u64, alarm: i32, active: bool) {
        let key = [ALARM_PREFIX, &member_id.to_be_bytes(), &alarm.to_be_bytes()].concat();
        self.meta.insert(key, active.then(Vec::new));
    }

    pub fn set_member_attrs(&mut self, id: u64, attrs: &MemberAttrs) {
        self.meta.insert([MEMBER_PREFIX, &id.to_be_bytes()].concat(), Some(encode(attrs)));
    }

    pub fn remove_member_attrs(&mut self, id: u64) {
        self.meta.insert([MEMBER_PREFIX, &id.to_be_bytes()].concat(), None);
    }

    pub fn remove_module(&mut self, name: &str) {
        self.meta.insert(module_key(name), None);
    }
}

/// Reads of the committed `data` column family: the live store, or a [`StateView`].
pub trait Committed {
    fn get_data(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// See [`StateDb::scan_data`].
    fn scan_data(&self, start: &[u8], end: &[u8], reverse: bool, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
}

impl Committed for StateDb {
    fn get_data(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        StateDb::get_data(self, key)
    }

    fn scan_data(&self, start: &[u8], end: &[u8], reverse: bool, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        StateDb::scan_data(self, start, end, reverse, limit)
    }
}

impl<T: Committed + ?Sized> Committed for Arc<T> {
    fn get_data(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        (**self).get_data(key)
    }

    fn scan_data(&self, start: &[u8], end: &[u8], reverse: bool, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        (**self).scan_data(start, end, reverse, limit)
    }
}

type Snap<'a> = rocksdb::Snapshot<'a>;

self_cell::self_cell!(
    /// A RocksDB snapshot of a [`StateDb`], owning the `Arc` that keeps the store open.
    /// Queries read through one so that every read of a call sees the same applied
    /// index while the apply loop keeps committing batches underneath.
    pub struct StateView {
        owner: Arc<StateDb>,
        #[covariant]
        dependent: Snap,
    }
);

impl StateView {
    fn read_options(&self) -> ReadOptions {
        let mut ro = ReadOptions::default();
        ro.set_snapshot(self.borrow_dependent());
        ro
    }
}

impl Committed for StateView {
    fn get_data(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let db = self.borrow_owner();
        Ok(db.db.get_cf_opt(db.cf(CF_DATA), key, &self.read_options())?)
    }

    fn scan_data(&self, start: &[u8], end: &[u8], reverse: bool, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.borrow_owner().scan_data_opt(self.read_options(), start, end, reverse, limit)
    }
}

/// Read `key` through the overlays (topmost first), then the committed store.
pub fn read_through(db: &(impl Committed + ?Sized), layers: &[&Overlay], key: &[u8]) -> Result<Option<Vec<u8>>> {
    for layer in layers.iter().rev() {
        if let Some(v) = layer.map.get(key) {
            return Ok(v.clone());
        }
    }
    db.get_data(key)
}

/// Scan `start <= key < end` (end non-empty) through the overlays (later layers win) and
/// the committed store, skipping deletions, at most `limit` entries.
pub fn scan_through(
    db: &(impl Committed + ?Sized),
    layers: &[&Overlay],
    start: &[u8],
    end: &[u8],
    reverse: bool,
    limit: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    if limit == 0 || start >= end {
        return Ok(Vec::new());
    }
    // The overlays are small (one batch); fold them into one ordered view of the range.
    let mut pending: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
    for layer in layers {
        for (k, v) in layer.map.range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Excluded(end))) {
            pending.insert(k.as_slice(), v.as_deref());
        }
    }
    let deletions = pending.values().filter(|v| v.is_none()).count();
    // Enough committed entries to fill `limit` even if overlay deletions hide some.
    let committed = db.scan_data(start, end, reverse, limit.saturating_add(deletions))?;
    // The overlays' entries in scan order: a key and its value, `None` for a deletion.
    type Pending<'a> = Box<dyn Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a>;
    let mut over: Pending<'_> =
        if reverse { Box::new(pending.into_iter().rev()) } else { Box::new(pending.into_iter()) };
    let mut over_next = over.next();
    let mut base = committed.into_iter().peekable();
    let mut out = Vec::new();
    while out.len() < limit {
        let take_over = match (&over_next, base.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((ok, _)), Some((bk, _))) => {
                if reverse {
                    *ok >= bk.as_slice()
                } else {
                    *ok <= bk.as_slice()
                }
            }
        };
        if take_over {
            let (k, v) = over_next.take().expect("checked");
            if base.peek().is_some_and(|(bk, _)| bk.as_slice() == k) {
                base.next();
            }
            if let Some(v) = v {
                out.push((k.to_vec(), v.to_vec()));
            }
            over_next = over.next();
        } else {
            out.push(base.next().expect("checked"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(o: &mut Overlay, k: &str, v: Option<&str>) {
        o.map.insert(k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()));
    }

    fn keys(v: &[(Vec<u8>, Vec<u8>)]) -> Vec<String> {
        v.iter().map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), String::from_utf8_lossy(v))).collect()
    }

    #[test]
    fn scan_merges_overlays_over_committed_state() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let mut base = PendingBatch::default();
        for k in ["a", "c", "e", "g"] {
            put(&mut base.data, k, Some("db"));
        }
        db.commit(base).unwrap();

        let mut batch = Overlay::default();
        put(&mut batch, "c", None);
        put(&mut batch, "d", Some("batch"));
        let mut cmd = Overlay::default();
        put(&mut cmd, "d", Some("cmd"));
        put(&mut cmd, "e", None);
        put(&mut cmd, "f", Some("cmd"));
        let layers = [&batch, &cmd];

        let all = scan_through(&db, &layers, b"a", b"z", false, 100).unwrap();
        assert_eq!(keys(&all), ["a=db", "d=cmd", "f=cmd", "g=db"]);
        let rev = scan_through(&db, &layers, b"a", b"z", true, 100).unwrap();
        assert_eq!(keys(&rev), ["g=db", "f=cmd", "d=cmd", "a=db"]);
        let lim = scan_through(&db, &layers, b"b", b"g", false, 2).unwrap();
        assert_eq!(keys(&lim), ["d=cmd", "f=cmd"]);
        let lim_rev = scan_through(&db, &layers, b"a", b"f", true, 2).unwrap();
        assert_eq!(keys(&lim_rev), ["d=cmd", "a=db"]);
        // Deletions in the overlay must not starve the limit.
        let one = scan_through(&db, &[&batch, &cmd], b"c", b"z", false, 1).unwrap();
        assert_eq!(keys(&one), ["d=cmd"]);
        assert_eq!(read_through(&db, &layers, b"e").unwrap(), None);
        assert_eq!(read_through(&db, &layers, b"a").unwrap(), Some(b"db".to_vec()));
        assert_eq!(read_through(&db, &layers, b"d").unwrap(), Some(b"cmd".to_vec()));
    }

    #[test]
    fn hashes_follow_content_and_checkpoints_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("s")).unwrap();
        let mut b = PendingBatch::default();
        put(&mut b.data, "m1\0k", Some("v"));
        put(&mut b.data, "m2\0k", Some("v"));
        db.commit(b).unwrap();
        let h1 = db.hashes().unwrap();
        assert_eq!(h1.machines.len(), 2);
        assert_eq!(h1.machines["m1"], h1.machines["m2"], "same content, same machine hash");

        db.checkpoint(&dir.path().join("cp")).unwrap();
        let copy = StateDb::open(&dir.path().join("cp")).unwrap();
        assert_eq!(copy.hashes().unwrap(), h1);

        let mut b = PendingBatch::default();
        put(&mut b.data, "m1\0k", Some("w"));
        db.commit(b).unwrap();
        let h2 = db.hashes().unwrap();
        assert_ne!(h2.store, h1.store);
        assert_ne!(h2.machines["m1"], h1.machines["m1"]);
        assert_eq!(h2.machines["m2"], h1.machines["m2"]);
    }

    #[test]
    fn prefix_end_is_exclusive_upper_bound() {
        assert_eq!(prefix_end(b"ab\0"), b"ab\x01".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), Vec::<u8>::new());
    }
}
