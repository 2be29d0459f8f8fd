//! The Raft log in preallocated segment files, and the vote beside it.
//!
//! Layout of `<data-dir>/raft-log/`:
//!
//! | file | holds |
//! |---|---|
//! | `<first index, 20 digits>.seg` | consecutive entries from `first` on, one record each |
//! | `meta` | vote, last purged log id, commit hint (postcard, replaced atomically) |
//!
//! A record is `len: u32 LE`, `crc32: u32 LE` of the payload, then the payload: the entry in
//! postcard. A segment gets its full size ([`SEGMENT_BYTES`], `set_len`: a sparse file)
//! when it is created, so an append never changes the file's size, which `fdatasync`
//! would otherwise have to write too. A 350-byte write + `fdatasync` took 108–130 µs into
//! such a file, 113–135 µs into an fallocated one and 184–367 µs appended to a growing
//! file (this machine kind, 2,000 each, during a build); a synced RocksDB put ~130 µs on
//! an idle machine. A zero length marks the end of a segment's records. Segments roll
//! over once full; only the last one takes appends.
//!
//! Appends are written and synced right in `append`, on the calling task: openraft 0.9's
//! core awaits every append's flush before it does anything else, so the append is on the
//! critical path anyway. A follower acknowledges an entry only after the `fdatasync` that
//! covers it, so an acknowledged write survives power loss.
//!
//! Leader appends: the one exception. openraft 0.9 replicates nothing until the leader's
//! own append reports its flush, so a write to a 3-member cluster paid two syncs in a row,
//! the leader's and then a follower's. etcd's leader writes its disk while the followers
//! write theirs, and so does this log: when this member leads a cluster with other voters,
//! an append of the leader's own entries (the committed vote is this member's and the
//! entries carry its leader id) is written and reported flushed at once, and a blocking
//! task syncs it behind (one `fdatasync` for whatever was written meanwhile). That is safe
//! because nothing outside the leader learns of such an entry's commit before it is on the
//! leader's disk: [`Durable`] publishes how far the log is synced, and the network holds a
//! follower's acknowledgement until the leader's disk has the entries it acknowledges (so
//! a commit always counts the leader's synced copy plus a follower's) and holds any commit
//! index it sends until it is synced here; the state machine applies no entry before it is
//! synced. A failed background sync ends the process: the append was already reported done.
//!
//! Crash safety:
//! - A torn append can only be at the end of the last segment (a full segment is synced
//!   before the next one is created). At open the log ends at the first record there that is
//!   short, fails its CRC or breaks the index sequence, and the segment is cut at that point.
//!   A bad record in any other segment is corruption: open fails and says where.
//! - Preallocated space may hold older records (a truncation, a torn tail). Cutting a
//!   segment (`truncate`, the repair at open) shrinks the file to the cut and grows it back,
//!   which drops every byte after the cut, so an older record can never reappear behind
//!   newer ones.
//! - `truncate` deletes later segments before it cuts, and `purge` records the purged id
//!   before it deletes segments, so a crash in between never leaves a hole.
//!
//! A data dir written by an earlier raftvm keeps its log in RocksDB (`<data-dir>/raft`); it
//! is copied into segments at the first open and then removed ([`migrate_rocksdb_log`]).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::raft::state_machine::{sync_dir, write_atomic};
use crate::types::{decode, encode, Entry, LogId, NodeId, StorageError, TypeConfig};

/// Size a segment is preallocated to. A record larger than what is left starts a new
/// segment; one larger than a whole segment gets a segment of its own, grown to fit.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const HEADER: usize = 8;
const META_FILE: &str = "meta";
const SEG_EXT: &str = "seg";

#[derive(Clone)]
pub struct LogStore {
    wal: Arc<Mutex<Wal>>,
    /// The latest commit index openraft reported since this process started (0 before
    /// the first), for a leader's lease reads (see [`crate::raft::lease`]).
    commit_index: Arc<AtomicU64>,
    deferral: Arc<Deferral>,
}

/// When a leader's appends may be synced behind (see "Leader appends" in the module doc).
#[derive(Default)]
struct Deferral {
    /// This member's id, once [`LogStore::defer_leader_syncs`] gave it.
    me: OnceLock<NodeId>,
    /// Set while this member leads a cluster with other voters. Only a hint for speed:
    /// with one voter a commit needs no other member's acknowledgement, so deferring
    /// would only add a hop before the apply, which waits for the sync either way.
    leads_others: Arc<AtomicBool>,
}

/// How far the raft log is on disk: every entry up to [`Durable::index`] is synced (or
/// covered by an installed snapshot). Only a leader's own appends are ever behind it.
#[derive(Clone)]
pub struct Durable(watch::Receiver<u64>);

impl Durable {
    pub fn index(&self) -> u64 {
        *self.0.borrow()
    }

    /// The log this watches is gone.
    pub fn closed(&self) -> bool {
        self.0.has_changed().is_err()
    }

    /// One that reports what `rx` holds, for tests of those who wait on it.
    #[cfg(test)]
    pub(crate) fn from_watch(rx: watch::Receiver<u64>) -> Self {
        Durable(rx)
    }

    /// Waits until every entry up to `index` is synced; false if `timeout` passed first
    /// or the log was closed.
    pub async fn wait(&self, index: u64, timeout: Duration) -> bool {
        if self.index() >= index {
            return true;
        }
        let mut rx = self.0.clone();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|d| *d >= index)).await;
        matches!(reached, Ok(Ok(_)))
    }
}

/// What `meta` holds.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote<NodeId>>,
    purged: Option<LogId>,
    /// The latest commit index openraft reported: a hint for restarts. It is updated in
    /// memory on every commit and written with the next vote or purge, rather than
    /// costing a sync of its own per commit.
    committed: Option<LogId>,
}

struct Segment {
    /// Index of its first entry; also its file name.
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    /// `offsets[i]`: where the record of entry `first + i` starts.
    offsets: Vec<u64>,
    /// Where the next record goes.
    end: u64,
}

impl Segment {
    fn next_index(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }

    fn offset_of(&self, index: u64) -> Option<u64> {
        let i = index.checked_sub(self.first)?;
        self.offsets.get(i as usize).copied()
    }

    /// End of the record of entry `index` (the next record's start, or `end`).
    fn record_end(&self, index: u64) -> u64 {
        self.offset_of(index + 1).unwrap_or(self.end)
    }

    /// Drops every byte from `at` on (see the module doc), keeping the preallocation.
    fn cut(&mut self, at: u64, segment_bytes: u64) -> std::io::Result<()> {
        self.file.set_len(at)?;
        self.file.set_len(at.max(segment_bytes))?;
        self.file.sync_all()?;
        self.end = at;
        Ok(())
    }
}

struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    /// Ordered by `first`; the last one takes appends. Never empty once something was
    /// appended.
    segments: VecDeque<Segment>,
    meta: Meta,
    /// Id of the last entry in the log (not counting purged ones), if any.
    last: Option<LogId>,
    /// Every entry up to this index is synced (see "Leader appends" in the module doc),
    /// published through `durable_tx`.
    durable: u64,
    durable_tx: watch::Sender<u64>,
    /// The highest index written by an append whose sync was deferred.
    sync_wanted: u64,
    /// A background sync is running (it ends once nothing is left to sync).
    syncing: bool,
    /// Bumped by every truncate: a background sync that started before one does not
    /// vouch for entries written after it.
    epoch: u64,
}

fn seg_name(first: u64) -> String {
    format!("{first:020}.{SEG_EXT}")
}

fn record(entry: &Entry) -> anyhow::Result<Vec<u8>> {
    let payload = encode(entry);
    let len = u32::try_from(payload.len()).with_context(|| format!("entry {} is over 4 GiB", entry.log_id.index))?;
    let mut r = Vec::with_capacity(HEADER + payload.len());
    r.extend_from_slice(&len.to_le_bytes());
    r.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    r.extend_from_slice(&payload);
    Ok(r)
}

/// Decodes the record at the start of `buf`: the entry and the record's length, or `None`
/// if there is no whole, intact record there.
fn parse_record(buf: &[u8]) -> Option<(Entry, usize)> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    let payload = buf.get(HEADER..HEADER + len)?;
    if len == 0 || crc32fast::hash(payload) != crc {
        return None;
    }
    Some((decode(payload).ok()?, HEADER + len))
}

/// How a segment's scan ended.
enum ScanEnd {
    /// A zero length where the next record would start, or the end of the file.
    Clean,
    /// Something that is not a whole, intact record with the expected index.
    Bad(String),
}

/// Reads a segment's records from the start: their offsets, the last entry's id, where the
/// valid records end and why.
fn scan(file: &File, first: u64) -> std::io::Result<(Vec<u64>, Option<LogId>, u64, ScanEnd)> {
    let size = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let (mut offsets, mut last, mut pos) = (Vec::new(), None, 0u64);
    let mut payload = Vec::new();
    loop {
        if pos + HEADER as u64 > size {
            return Ok((offsets, last, pos, ScanEnd::Clean));
        }
        let mut h = [0u8; HEADER];
        r.read_exact(&mut h)?;
        let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as u64;
        let crc = u32::from_le_bytes(h[4..].try_into().expect("4 bytes"));
        if len == 0 {
            let end = if crc == 0 { ScanEnd::Clean } else { ScanEnd::Bad("a zero length with a checksum".into()) };
            return Ok((offsets, last, pos, end));
        }
        if pos + HEADER as u64 + len > size {
            return Ok((offsets, last, pos, ScanEnd::Bad(format!("a record of {len} bytes past the file's end"))));
        }
        payload.resize(len as usize, 0);
        r.read_exact(&mut payload)?;
        if crc32fast::hash(&payload) != crc {
            return Ok((offsets, last, pos, ScanEnd::Bad("a checksum mismatch".into())));
        }
        let expected = first + offsets.len() as u64;
        match decode::<Entry>(&payload) {
            Ok(e) if e.log_id.index == expected => last = Some(e.log_id),
            Ok(e) => {
                let why = format!("entry {} where {expected} belongs", e.log_id.index);
                return Ok((offsets, last, pos, ScanEnd::Bad(why)));
            }
            Err(e) => return Ok((offsets, last, pos, ScanEnd::Bad(format!("an undecodable entry: {e}")))),
        }
        offsets.push(pos);
        pos += HEADER as u64 + len;
    }
}

impl Wal {
    fn open(dir: &Path, segment_bytes: u64) -> anyhow::Result<Wal> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let meta = match std::fs::read(dir.join(META_FILE)) {
            Ok(b) => decode(&b).with_context(|| format!("reading {}", dir.join(META_FILE).display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.join(META_FILE).display())),
        };
        let mut firsts = Vec::new();
        for ent in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = ent?.path();
            if path.extension().is_some_and(|x| x == SEG_EXT) {
                let first = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok());
                let Some(first) = first else { bail!("{}: not a segment name", path.display()) };
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let purged_next = meta.purged.map_or(0, |p| p.index + 1);
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments: VecDeque::new(),
            last: None,
            meta,
            durable: 0,
            durable_tx: watch::channel(0).0,
            sync_wanted: 0,
            syncing: false,
            epoch: 0,
        };
        for (n, &first) in firsts.iter().enumerate() {
            let path = dir.join(seg_name(first));
            let file = OpenOptions::new().read(true).write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
            if n == 0 && wal.meta.purged.is_some() && first > purged_next {
                bail!(
                    "raft log {}: the first segment starts at {first}, but entries from {purged_next} on are needed",
                    dir.display()
                );
            }
            if let Some(prev) = wal.segments.back() {
                // Consecutive, or a fresh start after everything before was purged (a
                // snapshot installed beyond the log's end).
                let ok = first == prev.next_index() || (prev.next_index() <= purged_next && first <= purged_next);
                if !ok {
                    bail!(
                        "raft log {}: segment {} follows one that ends before {}: entries are missing",
                        dir.display(),
                        seg_name(first),
                        prev.next_index()
                    );
                }
            }
            let (offsets, last, end, how) = scan(&file, first).with_context(|| format!("reading {}", path.display()))?;
            let mut seg = Segment { first, path, file: Arc::new(file), offsets, end };
            if let ScanEnd::Bad(why) = how {
                if n + 1 != firsts.len() {
                    bail!(
                        "raft log {}: {} is damaged at byte {} ({why}), and it is not the last segment; \
                         restore this member from a snapshot or remove and re-add it",
                        dir.display(),
                        seg_name(first),
                        seg.end
                    );
                }
                tracing::warn!(segment = %seg.path.display(), at = seg.end, %why, "raft log: cutting a torn tail");
            }
            if n + 1 == firsts.len() {
                // Whatever follows the last record goes, torn or stale (see the module doc).
                let at = seg.end;
                seg.cut(at, segment_bytes).with_context(|| format!("repairing {}", seg.path.display()))?;
            }
            if last.is_some() {
                wal.last = last;
            }
            wal.segments.push_back(seg);
        }
        if wal.last.is_none_or(|l| Some(l.index) < wal.meta.purged.map(|p| p.index)) {
            wal.last = wal.meta.purged;
        }
        wal.drop_purged_segments()?;
        // What was read back is on disk (a repaired tail was cut and synced above).
        wal.mark_durable(wal.last.map_or(0, |l| l.index));
        Ok(wal)
    }

    /// Records that every entry up to `index` is synced.
    fn mark_durable(&mut self, index: u64) {
        if index > self.durable {
            self.durable = index;
            self.durable_tx.send_replace(index);
        }
    }

    /// Whether an append of `entries` may report its flush before its sync: they are
    /// this member's own entries as the leader of a cluster with other voters.
    fn may_defer(&self, deferral: &Deferral, entries: &[Entry]) -> bool {
        let (Some(&me), Some(vote)) = (deferral.me.get(), self.meta.vote) else { return false };
        let leader = vote.leader_id();
        deferral.leads_others.load(Ordering::Acquire)
            && vote.is_committed()
            && leader.node_id == me
            && entries.iter().all(|e| e.log_id.leader_id.node_id == me && e.log_id.leader_id.term == leader.term)
    }

    fn purged_next(&self) -> u64 {
        self.meta.purged.map_or(0, |p| p.index + 1)
    }

    /// The index the next appended entry must have.
    fn next_index(&self) -> Option<u64> {
        self.last.map(|l| l.index + 1)
    }

    fn save_meta(&self) -> anyhow::Result<()> {
        write_atomic(&self.dir.join(META_FILE), &encode(&self.meta))
    }

    fn new_segment(&mut self, first: u64) -> std::io::Result<()> {
        let path = self.dir.join(seg_name(first));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        file.set_len(self.segment_bytes)?;
        file.sync_all()?;
        sync_dir(&self.dir)?;
        self.segments.push_back(Segment { first, path, file: Arc::new(file), offsets: Vec::new(), end: 0 });
        Ok(())
    }

    /// Deletes segments whose entries are all purged, except the last one.
    fn drop_purged_segments(&mut self) -> std::io::Result<()> {
        let purged_next = self.purged_next();
        while self.segments.len() > 1 && self.segments[1].first <= purged_next {
            let s = self.segments.pop_front().expect("len > 1");
            std::fs::remove_file(&s.path)?;
        }
        Ok(())
    }

    /// Writes the entries' records. The last segment is left to sync; a segment filled
    /// on the way is synced before the next one is created.
    fn write(&mut self, entries: impl IntoIterator<Item = Entry>) -> anyhow::Result<()> {
        let mut buf: Vec<u8> = Vec::new();
        let mut pending: Vec<u64> = Vec::new();
        for e in entries {
            let index = e.log_id.index;
            if let Some(n) = self.next_index() {
                if index != n {
                    bail!("append of entry {index} where {n} belongs");
                }
            }
            let rec = record(&e)?;
            // A new segment starts at the first entry ever, at the first one after a
            // snapshot installed beyond the log's end, and when the last one is full.
            let starts_new = match self.segments.back() {
                None => true,
                Some(s) => {
                    s.next_index() + pending.len() as u64 != index
                        || (s.end + (buf.len() + rec.len()) as u64 > self.segment_bytes && !(s.offsets.is_empty() && pending.is_empty()))
                }
            };
            if starts_new {
                self.flush_pending(&mut buf, &mut pending)?;
                if let Some(s) = self.segments.back() {
                    // A full segment is on disk before the next one exists (see the module doc).
                    s.file.sync_data()?;
                }
                self.new_segment(index)?;
                self.drop_purged_segments()?;
            }
            let s = self.segments.back().expect("a segment");
            pending.push(s.end + buf.len() as u64);
            buf.extend_from_slice(&rec);
            self.last = Some(e.log_id);
        }
        self.flush_pending(&mut buf, &mut pending)?;
        Ok(())
    }

    fn flush_pending(&mut self, buf: &mut Vec<u8>, pending: &mut Vec<u64>) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let s = self.segments.back_mut().expect("a segment");
        s.file.write_all_at(buf, s.end)?;
        s.end += buf.len() as u64;
        s.offsets.append(pending);
        buf.clear();
        Ok(())
    }

    fn read(&self, start: u64, end: u64) -> anyhow::Result<Vec<Entry>> {
        let start = start.max(self.purged_next());
        let end = end.min(self.next_index().unwrap_or(0));
        let mut out = Vec::new();
        let mut index = start;
        for s in &self.segments {
            // Segments hold every index from the first one's first on, without holes.
            index = index.max(s.first);
            if index >= end {
                break;
            }
            let (Some(from), last) = (s.offset_of(index), end.min(s.next_index())) else { continue };
            let to = s.record_end(last - 1);
            let mut buf = vec![0u8; (to - from) as usize];
            s.file.read_exact_at(&mut buf, from).with_context(|| format!("reading {}", s.path.display()))?;
            let mut at = 0;
            while index < last {
                let Some((e, n)) = parse_record(&buf[at..]) else {
                    bail!("{}: the record of entry {index} is damaged", s.path.display());
                };
                out.push(e);
                at += n;
                index += 1;
            }
        }
        Ok(out)
    }

    /// The id of entry `index`, read back from its segment.
    fn log_id_at(&self, index: u64) -> anyhow::Result<Option<LogId>> {
        Ok(self.read(index, index + 1)?.pop().map(|e| e.log_id))
    }

    fn truncate(&mut self, index: u64) -> anyhow::Result<()> {
        // Later segments go first, so a crash midway leaves a shorter log, never a hole.
        while self.segments.back().is_some_and(|s| s.first >= index) {
            let s = self.segments.pop_back().expect("non-empty");
            std::fs::remove_file(&s.path).with_context(|| format!("removing {}", s.path.display()))?;
        }
        sync_dir(&self.dir)?;
        let segment_bytes = self.segment_bytes;
        if let Some(s) = self.segments.back_mut() {
            if let Some(at) = s.offset_of(index) {
                s.offsets.truncate((index - s.first) as usize);
                s.cut(at, segment_bytes).with_context(|| format!("cutting {}", s.path.display()))?;
            }
        }
        self.last = match index.checked_sub(1) {
            Some(prev) if prev >= self.purged_next() => self.log_id_at(prev)?,
            _ => None,
        };
        if self.last.is_none() {
            self.last = self.meta.purged;
        }
        let keep = index.saturating_sub(1);
        self.epoch += 1;
        self.sync_wanted = self.sync_wanted.min(keep);
        if self.durable > keep {
            self.durable = keep;
            self.durable_tx.send_replace(keep);
        }
        Ok(())
    }

    fn purge(&mut self, log_id: LogId) -> anyhow::Result<()> {
        if self.meta.purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        self.meta.purged = Some(log_id);
        self.save_meta()?;
        if self.last.is_none_or(|l| l.index < log_id.index) {
            self.last = Some(log_id);
        }
        // Purged entries are in a snapshot that is on disk.
        self.mark_durable(log_id.index);
        self.drop_purged_segments()?;
        Ok(())
    }
}

fn io_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::new(subject, verb, AnyError::error(e.to_string())).into()
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, format!("{e:#}"))
}

impl LogStore {
    /// Opens the log in `<data_dir>/raft-log`, first moving an earlier raftvm's RocksDB log
    /// (`<data_dir>/raft`) there if that is what the data dir holds.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        Self::open_with(data_dir, SEGMENT_BYTES)
    }

    fn open_with(data_dir: &Path, segment_bytes: u64) -> anyhow::Result<Self> {
        let dir = data_dir.join("raft-log");
        let legacy = data_dir.join("raft");
        if legacy.join("CURRENT").exists() && !dir.exists() {
            migrate_rocksdb_log(&legacy, &dir, segment_bytes)?;
        }
        let wal = Wal::open(&dir, segment_bytes).with_context(|| format!("opening raft log {}", dir.display()))?;
        if legacy.exists() && dir.join(META_FILE).exists() {
            // A migration that got as far as its rename: the old log is no longer needed.
            std::fs::remove_dir_all(&legacy).with_context(|| format!("removing {}", legacy.display()))?;
        }
        Ok(Self { wal: Arc::new(Mutex::new(wal)), commit_index: Default::default(), deferral: Default::default() })
    }

    /// How far this log is on disk.
    pub fn durable(&self) -> Durable {
        Durable(self.wal().durable_tx.subscribe())
    }

    /// Writes `entries` and syncs them, or (see "Leader appends" in the module doc) has
    /// them synced behind; either way, openraft may be told they are flushed on return.
    fn write_entries(&self, entries: Vec<Entry>) -> anyhow::Result<()> {
        let (file, last) = {
            let mut wal = self.wal();
            let defer = wal.may_defer(&self.deferral, &entries);
            wal.write(entries)?;
            let last = wal.last.map_or(0, |l| l.index);
            if defer {
                wal.sync_wanted = last;
                if !std::mem::replace(&mut wal.syncing, true) {
                    let wal = self.wal.clone();
                    tokio::task::spawn_blocking(move || sync_behind(&wal));
                }
                return Ok(());
            }
            (wal.segments.back().map(|s| s.file.clone()), last)
        };
        // The sync runs outside the lock, so readers go on meanwhile. This task is the log's
        // only writer: no cut can come between the write and the sync.
        if let Some(f) = file {
            f.sync_data()?;
        }
        self.wal().mark_durable(last);
        Ok(())
    }

    /// Lets this member's appends as a leader be synced behind (see "Leader appends" in
    /// the module doc) while the returned flag is set; `me` is this member's id.
    pub fn defer_leader_syncs(&self, me: NodeId) -> Arc<AtomicBool> {
        let _ = self.deferral.me.set(me);
        self.deferral.leads_others.clone()
    }

    /// The commit index as openraft reports it to this store. openraft reports each new
    /// commit index before it hands the entries to the state machine, so the value is
    /// never below the index of an applied entry.
    pub fn commit_index(&self) -> Arc<AtomicU64> {
        self.commit_index.clone()
    }

    fn wal(&self) -> MutexGuard<'_, Wal> {
        self.wal.lock().expect("raft log lock poisoned")
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        self.wal().read(start, end).map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let wal = self.wal();
        Ok(LogState { last_purged_log_id: wal.meta.purged, last_log_id: wal.last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let mut wal = self.wal();
        wal.meta.vote = Some(*vote);
        wal.save_meta().map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, format!("{e:#}")))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.wal().meta.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint for restarts (openraft re-learns the commit index if it is lost): written
        // with the next vote or purge, or lost with the process, which only means a
        // restarted node waits for the leader to tell it again.
        if let Some(c) = committed {
            self.commit_index.fetch_max(c.index, Ordering::Release);
            let mut wal = self.wal();
            // Never a hint past the synced log: a restart would look for entries it lost.
            if c.index <= wal.durable {
                wal.meta.committed = Some(c);
            }
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.wal().meta.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let synced = self.write_entries(entries.into_iter().collect());
        match synced {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(format!("{e:#}"))));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.wal().truncate(log_id.index).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.wal().purge(log_id).map_err(write_err)
    }
}

/// Syncs what deferred appends wrote (see "Leader appends" in the module doc), one
/// `fdatasync` for everything written by the time it starts, until nothing is left.
fn sync_behind(wal: &Mutex<Wal>) {
    let lock = || wal.lock().expect("raft log lock poisoned");
    loop {
        let (file, target, epoch) = {
            let mut w = lock();
            if w.sync_wanted <= w.durable {
                w.syncing = false;
                return;
            }
            // Entries in earlier segments were synced when their segment filled up.
            (w.segments.back().map(|s| s.file.clone()), w.sync_wanted, w.epoch)
        };
        if let Some(Err(e)) = file.map(|f| f.sync_data()) {
            // openraft was told these entries are flushed, and after a failed fsync the
            // kernel may have dropped the pages: this member can no longer vouch for its
            // log. The entries are not committed (no follower's ack counts before this
            // sync), so the cluster goes on without this member.
            tracing::error!(error = %e, "raft log: syncing a leader's appends failed; stopping");
            eprintln!("raftvm: syncing the raft log failed ({e}); stopping");
            std::process::abort();
        }
        let mut w = lock();
        if w.epoch == epoch {
            w.mark_durable(target);
        }
    }
}

/// Keeps `flag` set while this member (`me`) leads a cluster with other voters (see
/// [`LogStore::defer_leader_syncs`]); ends with the metrics. openraft's server metrics
/// change with the role and the membership only, not with every commit.
pub async fn defer_while_leading_others(
    flag: Arc<AtomicBool>,
    me: NodeId,
    mut metrics: watch::Receiver<openraft::metrics::RaftServerMetrics<NodeId, crate::types::Member>>,
) {
    loop {
        let on = {
            let m = metrics.borrow_and_update();
            m.state == openraft::ServerState::Leader && m.membership_config.membership().voter_ids().any(|v| v != me)
        };
        flag.store(on, Ordering::Release);
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Copies an earlier raftvm's RocksDB log (column families `logs`: big-endian index →
/// postcard entry, and `meta`: `vote`, `committed`, `purged`) into segments at `dir`. The
/// copy is built beside `dir` and renamed into place once complete; the caller removes the
/// old log after that.
fn migrate_rocksdb_log(legacy: &Path, dir: &Path, segment_bytes: u64) -> anyhow::Result<()> {
    use rocksdb::{IteratorMode, Options, DB};
    let db = DB::open_cf(&Options::default(), legacy, ["logs", "meta"])
        .with_context(|| format!("opening the earlier raft log {}", legacy.display()))?;
    let cf = |name| db.cf_handle(name).with_context(|| format!("{}: no column family {name}", legacy.display()));
    let meta_cf = cf("meta")?;
    let get = |key: &str| -> anyhow::Result<Option<Vec<u8>>> { Ok(db.get_cf(meta_cf, key)?) };
    let vote: Option<Vote<NodeId>> = get("vote")?.map(|b| decode(&b)).transpose()?;
    let committed: Option<LogId> = get("committed")?.map(|b| decode::<Option<LogId>>(&b)).transpose()?.flatten();
    let purged: Option<LogId> = get("purged")?.map(|b| decode::<Option<LogId>>(&b)).transpose()?.flatten();

    let tmp = dir.with_extension("migrating");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let mut wal = Wal::open(&tmp, segment_bytes)?;
    wal.meta = Meta { vote, purged, committed };
    wal.last = purged;
    let mut n = 0u64;
    let mut chunk = Vec::new();
    for item in db.iterator_cf(cf("logs")?, IteratorMode::Start) {
        let (_, v) = item?;
        let e: Entry = decode(&v).context("decoding an entry of the earlier raft log")?;
        if purged.is_some_and(|p| e.log_id.index <= p.index) {
            continue;
        }
        chunk.push(e);
        n += 1;
        if chunk.len() == 1024 {
            wal.write(chunk.drain(..))?;
        }
    }
    wal.write(chunk.drain(..))?;
    for s in &wal.segments {
        s.file.sync_data()?;
    }
    wal.save_meta()?;
    drop(wal);
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    sync_dir(dir.parent().unwrap_or(Path::new(".")))?;
    tracing::info!(entries = n, from = %legacy.display(), to = %dir.display(), "moved the raft log from RocksDB to segment files");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Request;
    use openraft::{CommittedLeaderId, EntryPayload};

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, crate::raft::state_machine::StateMachineStore, tempfile::TempDir>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, crate::raft::state_machine::StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().expect("tempdir");
            // Small segments, so the suite's logs span several of them.
            let log = LogStore::open_with(dir.path(), 512).expect("open log");
            let sm = crate::raft::state_machine::StateMachineStore::open(dir.path()).expect("open state machine");
            Ok((dir, log, sm))
        }
    }

    type Suite = openraft::testing::Suite<
        TypeConfig,
        LogStore,
        crate::raft::state_machine::StateMachineStore,
        Builder,
        tempfile::TempDir,
    >;

    /// openraft's own conformance suite for log stores and state machines, one test each.
    /// Left out: `get_initial_state_membership_from_log_and_sm`. It appends entry 1 right
    /// after `get_initial_state` purged the log up to the state machine's applied entry 2
    /// (openraft's `StorageHelper` does that when the log ends before the state machine).
    /// openraft itself never appends at or below a purged index, and this log refuses an
    /// append that does not continue it ("append of entry 1 where 3 belongs").
    macro_rules! openraft_suite {
        ($($name:ident),* $(,)?) => {
            mod openraft_suite {
                use super::*;
                use openraft::testing::StoreBuilder;
                $(
                    #[tokio::test]
                    async fn $name() {
                        let (_dir, log, sm) = Builder.build().await.unwrap();
                        Suite::$name(log, sm).await.unwrap();
                    }
                )*
            }
        };
    }

    openraft_suite!(
        last_membership_in_log_initial,
        last_membership_in_log,
        last_membership_in_log_multi_step,
        get_membership_initial,
        get_membership_from_log_and_empty_sm,
        get_membership_from_empty_log_and_sm,
        get_membership_from_log_le_sm_last_applied,
        get_membership_from_log_gt_sm_last_applied_1,
        get_membership_from_log_gt_sm_last_applied_2,
        get_initial_state_without_init,
        get_initial_state_with_state,
        get_initial_state_last_log_gt_sm,
        get_initial_state_last_log_lt_sm,
        get_initial_state_log_ids,
        get_initial_state_re_apply_committed,
        save_vote,
        get_log_entries,
        limited_get_log_entries,
        try_get_log_entry,
        initial_logs,
        get_log_state,
        get_log_id,
        last_id_in_log,
        last_applied_state,
        purge_logs_upto_0,
        purge_logs_upto_5,
        purge_logs_upto_20,
        delete_logs_since_11,
        delete_logs_since_0,
        append_to_log,
        snapshot_meta,
        apply_single,
        apply_multiple,
    );

    #[tokio::test]
    async fn openraft_suite_transfer_snapshot() {
        Suite::transfer_snapshot(&Builder).await.unwrap();
    }

    fn entry(term: u64, index: u64, size: usize) -> Entry {
        let payload = Request::Call { machine: "kv".into(), payload: vec![index as u8; size], timestamp_ms: term };
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Normal(payload) }
    }

    fn append(wal: &mut Wal, entries: Vec<Entry>) {
        wal.write(entries).expect("write");
        for s in &wal.segments {
            s.file.sync_data().expect("sync");
        }
    }

    /// Entries as bytes (`Request` has no `PartialEq`).
    fn enc(entries: &[Entry]) -> Vec<Vec<u8>> {
        entries.iter().map(encode).collect()
    }

    fn ids(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect()
    }

    fn segment_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn entries_survive_a_reopen_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 4096).unwrap();
        let mut want = Vec::new();
        for batch in 0..20u64 {
            let es: Vec<Entry> = (0..10).map(|i| entry(1, 1 + batch * 10 + i, 50 + (i as usize) * 40)).collect();
            want.extend(es.clone());
            append(&mut wal, es);
        }
        // One entry larger than a whole segment gets one of its own.
        let big = entry(2, 201, 10_000);
        want.push(big.clone());
        append(&mut wal, vec![big]);
        drop(wal);
        let wal = Wal::open(dir.path(), 4096).unwrap();
        assert!(segment_files(dir.path()).len() > 5, "{:?}", segment_files(dir.path()));
        assert_eq!(enc(&wal.read(0, u64::MAX).unwrap()), enc(&want));
        assert_eq!(enc(&wal.read(57, 61).unwrap()), enc(&want[56..60]));
        assert_eq!(wal.last, Some(want.last().unwrap().log_id));
    }

    #[test]
    fn a_torn_tail_is_cut_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 1 << 20).unwrap();
        append(&mut wal, (1..=10).map(|i| entry(1, i, 100)).collect());
        let seg = wal.segments.back().unwrap();
        let (path, end) = (seg.path.clone(), seg.end);
        drop(wal);
        // Half of an eleventh record, as a crash in the middle of its write leaves it.
        let torn = record(&entry(1, 11, 100)).unwrap();
        File::options().write(true).open(&path).unwrap().write_all_at(&torn[..torn.len() / 2], end).unwrap();
        let mut wal = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(wal.last.map(|l| l.index), Some(10));
        append(&mut wal, vec![entry(1, 11, 30)]);
        drop(wal);
        let wal = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&wal.read(0, 100).unwrap()), (1..=11).map(|i| (1, i)).collect::<Vec<_>>());
    }

    #[test]
    fn truncated_entries_never_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 2048).unwrap();
        // Entries 1..=30 of term 1 over several segments.
        append(&mut wal, (1..=30).map(|i| entry(1, i, 200)).collect());
        let before = segment_files(dir.path());
        assert!(before.len() >= 3, "{before:?}");
        // A new leader's entry 12 replaces 12..=30; it is shorter than what it overwrites.
        wal.truncate(12).unwrap();
        assert_eq!(wal.last.map(|l| l.index), Some(11));
        append(&mut wal, vec![entry(2, 12, 10)]);
        assert!(segment_files(dir.path()).len() < before.len());
        drop(wal);
        let wal = Wal::open(dir.path(), 2048).unwrap();
        let mut want: Vec<(u64, u64)> = (1..=11).map(|i| (1, i)).collect();
        want.push((2, 12));
        assert_eq!(ids(&wal.read(0, 100).unwrap()), want);
        assert_eq!(wal.last.map(|l| (l.leader_id.term, l.index)), Some((2, 12)));
    }

    #[test]
    fn purge_removes_whole_segments_and_a_snapshot_beyond_the_log_starts_anew() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 2048).unwrap();
        append(&mut wal, (1..=30).map(|i| entry(1, i, 200)).collect());
        let n = segment_files(dir.path()).len();
        wal.purge(LogId::new(CommittedLeaderId::new(1, 1), 20)).unwrap();
        assert!(segment_files(dir.path()).len() < n);
        assert_eq!(ids(&wal.read(0, 100).unwrap()), (21..=30).map(|i| (1, i)).collect::<Vec<_>>());
        // A snapshot up to 100 installed: everything is purged and the log goes on at 101.
        let snap = LogId::new(CommittedLeaderId::new(3, 1), 100);
        wal.purge(snap).unwrap();
        assert_eq!(wal.last, Some(snap));
        assert!(wal.read(0, 1000).unwrap().is_empty());
        append(&mut wal, (101..=103).map(|i| entry(3, i, 10)).collect());
        assert_eq!(segment_files(dir.path()), vec![seg_name(101)]);
        drop(wal);
        let wal = Wal::open(dir.path(), 2048).unwrap();
        assert_eq!(wal.meta.purged, Some(snap));
        assert_eq!(ids(&wal.read(0, 1000).unwrap()), vec![(3, 101), (3, 102), (3, 103)]);
    }

    #[test]
    fn damage_before_the_last_segment_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 2048).unwrap();
        append(&mut wal, (1..=30).map(|i| entry(1, i, 200)).collect());
        let first = wal.segments[0].path.clone();
        drop(wal);
        let f = File::options().read(true).write(true).open(&first).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 300).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], 300).unwrap();
        let err = format!("{:#}", Wal::open(dir.path(), 2048).err().expect("a damaged log must not open"));
        assert!(err.contains("damaged") && err.contains("not the last segment"), "{err}");
    }

    #[tokio::test]
    async fn vote_and_entries_of_a_rocksdb_log_are_moved() {
        use rocksdb::{ColumnFamilyDescriptor, Options, DB};
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("raft");
        let vote = Vote::new_committed(4, 2);
        let purged = Some(LogId::new(CommittedLeaderId::new(1, 1), 3));
        {
            // The layout the earlier log store wrote.
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let cfs = ["logs", "meta"].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
            let db = DB::open_cf_descriptors(&opts, &legacy, cfs).unwrap();
            let (logs, meta) = (db.cf_handle("logs").unwrap(), db.cf_handle("meta").unwrap());
            for i in 1..=9u64 {
                db.put_cf(logs, i.to_be_bytes(), encode(&entry(1 + i / 5, i, 64))).unwrap();
            }
            db.put_cf(meta, "vote", encode(&vote)).unwrap();
            db.put_cf(meta, "purged", encode(&purged)).unwrap();
        }
        let mut log = LogStore::open(dir.path()).unwrap();
        assert!(!legacy.exists());
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, purged);
        assert_eq!(state.last_log_id.map(|l| l.index), Some(9));
        let got = log.try_get_log_entries(0..100).await.unwrap();
        assert_eq!(enc(&got), enc(&(4..=9).map(|i| entry(1 + i / 5, i, 64)).collect::<Vec<_>>()));
        drop(log);
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(log.try_get_log_entries(0..100).await.unwrap().len(), 6);
    }

    /// The log of member 1, which leads term `term` of a cluster with other voters.
    async fn leading(dir: &Path, term: u64) -> (LogStore, Arc<AtomicBool>) {
        let mut log = LogStore::open_with(dir, 1 << 20).unwrap();
        let leads_others = log.defer_leader_syncs(1);
        leads_others.store(true, Ordering::Release);
        log.save_vote(&Vote::new_committed(term, 1)).await.unwrap();
        (log, leads_others)
    }

    #[tokio::test]
    async fn only_a_leaders_own_appends_are_synced_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, leads_others) = leading(dir.path(), 2).await;
        let durable = log.durable();
        // Its own entries, as the leader of others: reported at once, synced behind.
        log.write_entries((1..=3).map(|i| entry(2, i, 50)).collect()).unwrap();
        assert_eq!(log.wal().sync_wanted, 3, "the append was not deferred");
        assert!(durable.wait(3, Duration::from_secs(10)).await, "the sync behind never covered entry 3");
        // The same as a lone voter: synced before the append returns.
        leads_others.store(false, Ordering::Release);
        log.write_entries(vec![entry(2, 4, 50)]).unwrap();
        assert_eq!((log.wal().sync_wanted, durable.index()), (3, 4));
        // A follower's append of another leader's entries (here node 2 leads term 3) is
        // synced before it returns whatever the flag says: that is what its ack vouches for.
        leads_others.store(true, Ordering::Release);
        log.save_vote(&Vote::new_committed(3, 2)).await.unwrap();
        let mut theirs = entry(3, 5, 50);
        theirs.log_id.leader_id.node_id = 2;
        log.write_entries(vec![theirs]).unwrap();
        assert_eq!((log.wal().sync_wanted, durable.index()), (3, 5));
        // A vote not yet granted by a quorum (a candidate's) does not make a leader.
        log.save_vote(&Vote::new(4, 1)).await.unwrap();
        log.write_entries(vec![entry(4, 6, 50)]).unwrap();
        assert_eq!((log.wal().sync_wanted, durable.index()), (3, 6));
        // Entries cut by a new leader are no longer on disk, as far as anyone waiting knows.
        log.truncate(LogId::new(CommittedLeaderId::new(4, 1), 5)).await.unwrap();
        assert_eq!(durable.index(), 4);
        drop(log);
        // Whatever a reopened log holds is on disk.
        let log = LogStore::open_with(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.durable().index(), 4);
    }

    #[tokio::test]
    async fn entries_synced_behind_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _leads_others) = leading(dir.path(), 1).await;
        let durable = log.durable();
        let want: Vec<Entry> = (1..=200).map(|i| entry(1, i, 300)).collect();
        for chunk in want.chunks(7) {
            log.write_entries(chunk.to_vec()).unwrap();
        }
        assert!(durable.wait(200, Duration::from_secs(10)).await);
        // The sync behind ends once it has nothing left to do.
        let idle = tokio::time::timeout(Duration::from_secs(10), async {
            while log.wal().syncing {
                tokio::task::yield_now().await;
            }
        });
        assert!(idle.await.is_ok(), "the sync behind never stopped");
        drop(log);
        let mut log = LogStore::open_with(dir.path(), 1 << 20).unwrap();
        assert_eq!(enc(&log.try_get_log_entries(0..1000).await.unwrap()), enc(&want));
    }
}
