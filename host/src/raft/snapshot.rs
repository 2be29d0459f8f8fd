//! Raft snapshots on disk.
//!
//! A snapshot is a tar archive of a RocksDB checkpoint of the state store: the archive a
//! backup holds, without the trailing hash. It is built, served to followers, received
//! and unpacked through files, never held in memory, so a state of gigabytes costs disk
//! and a few buffers, not its size in RAM on the leader and again on the follower.
//!
//! `<data-dir>/snapshot/` holds:
//! - `<id>.data`: a snapshot's archive, named by its id (`term-index-hash16`, hash16 being
//!   the first 16 hex digits of the archive's sha256);
//! - `current.meta`: the latest snapshot's metadata, which names its data file. It is
//!   replaced (atomically) only after that data file is complete, synced and in place, so
//!   the two always agree;
//! - `incoming-N.part`: a snapshot being received from the leader, renamed to `<id>.data`
//!   once it is installed;
//! - scratch for a snapshot being built (a checkpoint directory and its archive).
//!
//! Anything but `current.meta` and the data file it names is left by an earlier process
//! or an abandoned transfer, and [`clean`] removes it at start.

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use anyhow::{ensure, Context as _, Result};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::storage::backup::{BackupFile, Hashing};
use crate::types::{decode, encode, SnapshotMeta};

const META: &str = "current.meta";
const INCOMING_PREFIX: &str = "incoming-";

/// openraft's `SnapshotData`: a snapshot archive in a file, with the file's path so an
/// installed snapshot can be kept under its id without copying it.
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
}

impl SnapshotFile {
    fn new(file: std::fs::File, path: PathBuf) -> Self {
        Self { file: tokio::fs::File::from_std(file), path }
    }

    /// The file and its path, once openraft is done writing to it.
    pub async fn into_std(self) -> (std::fs::File, PathBuf) {
        (self.file.into_std().await, self.path)
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().file).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.get_mut().file).start_seek(position)
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Pin::new(&mut self.get_mut().file).poll_complete(cx)
    }
}

/// The snapshot directory of a data dir.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshot")
}

fn data_path(dir: &Path, meta: &SnapshotMeta) -> PathBuf {
    dir.join(format!("{}.data", meta.snapshot_id))
}

/// The first 16 hex digits of an archive's sha256, as a snapshot id ends.
fn id_hash(sha256: &[u8]) -> String {
    hex::encode(&sha256[..8])
}

/// A snapshot's id: `term-index-hash16` of the log id it was taken at and its archive.
pub fn snapshot_id(at: Option<crate::types::LogId>, sha256: &[u8]) -> String {
    let (term, index) = at.map_or((0, 0), |l| (l.leader_id.term, l.index));
    format!("{term}-{index}-{}", id_hash(sha256))
}

/// Whether an archive with this sha256 is the one `id` was made from.
fn id_matches(id: &str, sha256: &[u8]) -> bool {
    id.rsplit('-').next() == Some(id_hash(sha256).as_str())
}

/// The latest snapshot's metadata and its data file, if there is one. `Ok(Some((meta,
/// None)))` means the metadata names a data file that is gone.
pub fn current(dir: &Path) -> Result<Option<(SnapshotMeta, Option<SnapshotFile>)>> {
    let meta = match std::fs::read(dir.join(META)) {
        Ok(b) => decode::<SnapshotMeta>(&b).context("decoding snapshot metadata")?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("reading snapshot metadata"),
    };
    let path = data_path(dir, &meta);
    let file = match std::fs::File::open(&path) {
        Ok(f) => Some(SnapshotFile::new(f, path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    Ok(Some((meta, file)))
}

/// Make a built archive the current snapshot; returns it opened for reading.
pub fn publish_built(dir: &Path, meta: &SnapshotMeta, archive: BackupFile) -> Result<SnapshotFile> {
    let path = data_path(dir, meta);
    // Opened before the rename: the handle stays valid whatever happens to the name.
    let file = std::fs::File::open(&archive.path)?;
    archive.persist(&path)?;
    set_current(dir, meta)?;
    Ok(SnapshotFile::new(file, path))
}

/// Make a received (and installed) archive the current snapshot.
pub fn publish_received(dir: &Path, meta: &SnapshotMeta, received: &Path) -> Result<()> {
    let path = data_path(dir, meta);
    std::fs::rename(received, &path).with_context(|| format!("renaming {} to {}", received.display(), path.display()))?;
    set_current(dir, meta)
}

fn set_current(dir: &Path, meta: &SnapshotMeta) -> Result<()> {
    // A build that started before a snapshot install can finish after it, with an older
    // state: the newer snapshot stays current (openraft ignores the older one too).
    let keep = match current(dir) {
        Ok(Some((cur, Some(_)))) if cur.last_log_id > meta.last_log_id => data_path(dir, &cur),
        _ => {
            crate::raft::state_machine::write_atomic(&dir.join(META), &encode(meta))?;
            data_path(dir, meta)
        }
    };
    // The other snapshots' files: a leader still sending one keeps reading it through its
    // open handle.
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "data") && p != keep {
            let _ = std::fs::remove_file(&p);
        }
    }
    Ok(())
}

/// Numbers the incoming files of this process.
static INCOMING: AtomicU64 = AtomicU64::new(0);

/// A new file to receive a snapshot into. A transfer openraft abandoned for a newer one
/// left its file behind; it is removed here (openraft receives one snapshot at a time).
pub fn create_incoming(dir: &Path) -> Result<SnapshotFile> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(INCOMING_PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let n = INCOMING.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{INCOMING_PREFIX}{}-{n}.part", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(SnapshotFile::new(file, path))
}

/// Remove what an earlier process left in the snapshot directory: everything but the
/// current metadata and the data file it names.
pub fn clean(dir: &Path) -> Result<()> {
    let keep = match current(dir) {
        Ok(Some((meta, Some(_)))) => Some(data_path(dir, &meta)),
        _ => None,
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let p = entry?.path();
        if p.file_name().is_some_and(|n| n == META) || Some(&p) == keep.as_ref() {
            continue;
        }
        tracing::info!(path = %p.display(), "removing a stale snapshot file");
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Unpack a received archive into `dest` (a new directory), checking it against the id
/// it was sent under, and sync what was unpacked: the log before the snapshot is purged
/// once it is installed, so the files must be on disk.
pub fn unpack_received(file: &mut std::fs::File, meta: &SnapshotMeta, dest: &Path) -> Result<()> {
    file.sync_all().context("syncing the received snapshot")?;
    file.seek(SeekFrom::Start(0))?;
    let mut reader = Hashing::new(std::io::BufReader::new(&mut *file));
    let unpacked = tar::Archive::new(&mut reader).unpack(dest);
    // The rest: the end-of-archive blocks the unpacker need not read, or what follows
    // where a damaged archive stopped it.
    std::io::copy(&mut reader, &mut std::io::sink())?;
    let sha256 = reader.finish();
    ensure!(
        id_matches(&meta.snapshot_id, &sha256),
        "the received snapshot does not match its id {} (its sha256 starts {}): damaged in transfer",
        meta.snapshot_id,
        id_hash(&sha256)
    );
    unpacked.context("unpacking snapshot")?;
    sync_tree(dest)
}

/// fsync every file under `dir`, then the directories.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            std::fs::File::open(&p)?.sync_all().with_context(|| format!("syncing {}", p.display()))?;
        }
    }
    crate::raft::state_machine::sync_dir(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_at(index: u64, id: &str) -> SnapshotMeta {
        let log_id = crate::types::LogId::new(openraft::CommittedLeaderId::new(1, 1), index);
        SnapshotMeta { last_log_id: Some(log_id), last_membership: Default::default(), snapshot_id: id.into() }
    }

    /// A build that finishes after a newer snapshot was installed does not replace it.
    #[test]
    fn an_older_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let (new, old) = (meta_at(20, "1-20-aaaa"), meta_at(10, "1-10-bbbb"));
        std::fs::write(dir.path().join("incoming"), b"new").unwrap();
        publish_received(dir.path(), &new, &dir.path().join("incoming")).unwrap();
        std::fs::write(dir.path().join("1-10-bbbb.data"), b"old").unwrap();
        set_current(dir.path(), &old).unwrap();
        let (cur, file) = current(dir.path()).unwrap().expect("a current snapshot");
        assert_eq!(cur.snapshot_id, new.snapshot_id);
        assert!(file.is_some());
        assert!(!dir.path().join("1-10-bbbb.data").exists());
        // A newer one does replace it.
        std::fs::write(dir.path().join("1-30-cccc.data"), b"newer").unwrap();
        set_current(dir.path(), &meta_at(30, "1-30-cccc")).unwrap();
        assert_eq!(current(dir.path()).unwrap().unwrap().0.snapshot_id, "1-30-cccc");
        assert!(!dir.path().join("1-20-aaaa.data").exists());
    }

    /// The archive `unpack_received` reads is the one `Hashing` hashed while writing.
    #[test]
    fn a_damaged_transfer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a"), vec![7u8; 3000]).unwrap();
        let archive_path = dir.path().join("a.tar");
        let mut w = Hashing::new(std::fs::File::create(&archive_path).unwrap());
        {
            let mut ar = tar::Builder::new(&mut w);
            ar.append_dir_all(".", &src).unwrap();
            ar.finish().unwrap();
        }
        let hash = id_hash(&w.finish());
        let meta = |id: &str| SnapshotMeta { last_log_id: None, last_membership: Default::default(), snapshot_id: id.into() };

        let mut f = std::fs::File::open(&archive_path).unwrap();
        unpack_received(&mut f, &meta(&format!("1-2-{hash}")), &dir.path().join("ok")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ok/a")).unwrap(), vec![7u8; 3000]);

        // One byte flipped inside the file's content.
        let mut bytes = std::fs::read(&archive_path).unwrap();
        bytes[512 + 100] ^= 1;
        std::fs::write(&archive_path, &bytes).unwrap();
        let mut f = std::fs::File::open(&archive_path).unwrap();
        let err = unpack_received(&mut f, &meta(&format!("1-2-{hash}")), &dir.path().join("bad")).unwrap_err();
        assert!(format!("{err:#}").contains("does not match its id"), "{err:#}");
    }
}
