//! Backups: etcd's `Maintenance.Snapshot` stream and `snapshot restore`.
//!
//! A backup file is a tar archive of a RocksDB checkpoint of the state store (every
//! machine's data, module blobs, leases, the host's records), followed by the 32-byte
//! sha256 of the archive. The layout mirrors etcd's: its snapshot stream is the bbolt file
//! with a sha256 appended, and its restore checks that hash unless told not to. A tar
//! archive is a whole number of 512-byte blocks, so `len % 512 == 32` tells a file with a
//! hash from a bare archive (such as a Raft snapshot's `snapshot/<id>.data`).
//!
//! Restoring makes a data directory for a *new* cluster from the file, the way etcd's
//! `snapshot restore` does: the state is kept, the Raft bookkeeping is replaced. The
//! state's applied log id becomes `(term 0, index I)`, where I is the snapshot's applied
//! index, and its membership the new `--initial-cluster`. The log is empty; openraft treats
//! it as purged up to I when it starts (its "hole between the log and the applied state"
//! case), so a member that was not restored, and any member added later, gets the state
//! as a Raft snapshot from the leader. Term 0 is below every term a new cluster elects.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use super::{PendingBatch, StateDb};
use crate::config::ServeConfig;
use crate::types::{LogId, StoredMembership};

/// Bytes of the sha256 that ends a backup file.
pub const HASH_LEN: usize = 32;

/// A backup archive being served; the file is removed when this is dropped.
pub struct BackupFile {
    pub path: PathBuf,
    /// Length of the archive, without the hash.
    pub len: u64,
    pub sha256: [u8; HASH_LEN],
}

impl BackupFile {
    /// Keep the archive as `dest` instead of removing it (synced, then renamed).
    pub fn persist(mut self, dest: &Path) -> Result<()> {
        File::open(&self.path)?.sync_all().with_context(|| format!("syncing {}", self.path.display()))?;
        std::fs::rename(&self.path, dest).with_context(|| format!("renaming {} to {}", self.path.display(), dest.display()))?;
        // Nothing left for `drop` to remove.
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for BackupFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Scratch space for backups under a data dir; anything in it is left by a stopped process.
pub fn scratch_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("backup")
}

/// A writer or reader that hashes what passes through it.
pub(crate) struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W> Hashing<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self { inner, hash: Sha256::new(), len: 0 }
    }

    /// The sha256 of everything that passed.
    pub(crate) fn finish(self) -> [u8; HASH_LEN] {
        self.hash.finalize().into()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Numbers this process's scratch directories.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Archive a consistent checkpoint of `db` into a file under `scratch`.
pub fn create(db: &StateDb, scratch: &Path) -> Result<BackupFile> {
    create_with(db, scratch, |_| Ok(())).map(|(file, ())| file)
}

/// [`create`], with `inspect` run on the checkpoint directory before it is archived.
pub fn create_with<T>(db: &StateDb, scratch: &Path, inspect: impl FnOnce(&Path) -> Result<T>) -> Result<(BackupFile, T)> {
    std::fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let name = format!("{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
    let checkpoint = scratch.join(&name);
    let path = scratch.join(format!("{name}.tar"));
    db.checkpoint(&checkpoint)?;
    let archived = (|| {
        let seen = inspect(&checkpoint)?;
        let out = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut ar = tar::Builder::new(Hashing::new(BufWriter::new(out)));
        ar.append_dir_all(".", &checkpoint)?;
        let mut w = ar.into_inner()?;
        w.flush()?;
        Ok::<_, anyhow::Error>((w.len, w.finish(), seen))
    })();
    let _ = std::fs::remove_dir_all(&checkpoint);
    match archived {
        Ok((len, sha256, seen)) => Ok((BackupFile { path, len, sha256 }, seen)),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e.context("archiving the state store"))
        }
    }
}

/// The archive's length in `file`, after checking the trailing hash (unless `skip_hash`,
/// for a bare archive; a file that has a hash still has it stripped).
pub fn verify(file: &mut File, skip_hash: bool) -> Result<u64> {
    let size = file.metadata()?.len();
    let has_hash = size % 512 == HASH_LEN as u64;
    if skip_hash {
        return Ok(if has_hash { size - HASH_LEN as u64 } else { size });
    }
    ensure!(
        has_hash,
        "snapshot file has no integrity hash ({size} bytes; a raftvm snapshot is a tar archive followed by its sha256); use --skip-hash-check to restore a bare archive"
    );
    let len = size - HASH_LEN as u64;
    file.seek(SeekFrom::Start(0))?;
    let mut h = Hashing::new(std::io::sink());
    std::io::copy(&mut Read::by_ref(file).take(len), &mut h)?;
    let mut want = [0u8; HASH_LEN];
    file.read_exact(&mut want)?;
    ensure!(h.finish() == want, "snapshot file's hash mismatch: the file is damaged or truncated");
    Ok(len)
}

/// Unpack the first `len` bytes of `file` (an archive) into `dir` and open it.
fn unpack(file: &mut File, len: u64, dir: &Path) -> Result<StateDb> {
    file.seek(SeekFrom::Start(0))?;
    tar::Archive::new(Read::by_ref(file).take(len)).unpack(dir).context("unpacking the snapshot archive")?;
    StateDb::open(dir).context("the snapshot archive is not a raftvm state store")
}

/// What a backup file holds, for `raftvm snapshot status`.
#[derive(Debug, serde::Serialize)]
pub struct BackupInfo {
    /// Hex sha256 of the archive.
    pub sha256: String,
    /// The Raft index of the last entry applied to the saved state.
    pub applied_index: u64,
    /// Installed machines, name → module sha256.
    pub modules: Vec<(String, String)>,
    /// Records of the data family: every machine's private store and the host's lease table.
    pub total_keys: u64,
    /// Bytes of the file.
    pub total_size: u64,
}

/// Check and describe a backup file.
pub fn status(path: &Path) -> Result<BackupInfo> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = verify(&mut file, false)?;
    let dir = std::env::temp_dir().join(format!(
        "raftvm-snapshot-status-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let info = (|| {
        let db = unpack(&mut file, len, &dir)?;
        file.seek(SeekFrom::Start(len))?;
        let mut sha = [0u8; HASH_LEN];
        file.read_exact(&mut sha)?;
        Ok::<_, anyhow::Error>(BackupInfo {
            sha256: hex::encode(sha),
            applied_index: db.applied()?.map(|l| l.index).unwrap_or(0),
            modules: db.modules()?.into_iter().map(|m| (m.name, m.sha256)).collect(),
            total_keys: db.count_data()?,
            total_size: file.metadata()?.len(),
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    info
}

/// Where and as what a restore put the state.
#[derive(Debug)]
pub struct Restored {
    pub data_dir: PathBuf,
    pub member_id: u64,
    pub applied_index: u64,
}

/// Make `cfg.data_dir()` a new member's data dir holding the state saved in `path`, for
/// the cluster `cfg` describes (`--name`, `--initial-cluster`, `--initial-cluster-token`,
/// `--initial-advertise-peer-urls`). Refuses a data dir that exists and is not empty. The
/// directory appears whole or not at all.
pub fn restore(path: &Path, cfg: &ServeConfig, skip_hash: bool) -> Result<Restored> {
    let members = cfg.members()?;
    let member_id = cfg.my_id()?;
    let data_dir = cfg.data_dir();
    if let Ok(mut entries) = std::fs::read_dir(&data_dir) {
        ensure!(entries.next().is_none(), "data-dir {:?} exists", data_dir.display().to_string());
    }
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = verify(&mut file, skip_hash)?;

    let file_name = data_dir.file_name().context("--data-dir names no directory")?.to_string_lossy().into_owned();
    let tmp = data_dir.with_file_name(format!(".{file_name}.restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        let (root, current) = crate::raft::state_machine::initial_state_dir(&tmp);
        let db = unpack(&mut file, len, &root.join(&current))?;
        let Some(applied) = db.applied()? else {
            bail!("the snapshot holds no applied state");
        };
        let applied_index = applied.index.max(1);
        let log_id = LogId::new(openraft::CommittedLeaderId::new(0, 0), applied_index);
        let voters: BTreeSet<u64> = members.keys().copied().collect();
        let membership = openraft::Membership::new(vec![voters], members.clone());
        let mut batch = PendingBatch::default();
        batch.set_applied(Some(log_id));
        batch.set_membership(&StoredMembership::new(Some(log_id), membership));
        // Alarms and published attributes name the old cluster's members.
        for (member, alarm) in db.alarms()? {
            batch.set_alarm(member, alarm, false);
        }
        for id in db.member_attrs()?.into_keys() {
            batch.remove_member_attrs(id);
        }
        // No log replays this batch: it must be on disk before the directory is in place.
        db.commit_durable(batch)?;
        drop(db);
        crate::raft::state_machine::write_atomic(&root.join("CURRENT"), current.as_bytes())?;
        if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        // An empty data dir may exist (checked above); rename needs it gone.
        let _ = std::fs::remove_dir(&data_dir);
        std::fs::rename(&tmp, &data_dir).with_context(|| format!("moving the restored state to {}", data_dir.display()))?;
        Ok(Restored { data_dir: data_dir.clone(), member_id, applied_index })
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> ServeConfig {
        ServeConfig {
            name: "n1".into(),
            data_dir: Some(dir.join("restored")),
            initial_cluster: "n1=http://127.0.0.1:1,n2=http://127.0.0.1:2".into(),
            initial_advertise_peer_urls: "http://127.0.0.1:1".into(),
            ..ServeConfig::default()
        }
    }

    /// A backup carries the data and its hash; a restore keeps the data and replaces the
    /// Raft bookkeeping; a bare archive needs `skip_hash`; a damaged file is refused.
    #[test]
    fn backups_check_their_hash_and_restore_with_new_membership() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("s")).unwrap();
        let mut b = PendingBatch::default();
        b.data.map.insert(b"kv\0k".to_vec(), Some(b"v".to_vec()));
        b.set_applied(Some(LogId::new(openraft::CommittedLeaderId::new(7, 3), 41)));
        b.set_alarm(3, 1, true);
        db.commit(b).unwrap();

        let backup = create(&db, &dir.path().join("scratch")).unwrap();
        assert_eq!(backup.len % 512, 0);
        let mut file_bytes = std::fs::read(&backup.path).unwrap();
        file_bytes.extend_from_slice(&backup.sha256);
        let whole = dir.path().join("backup.db");
        std::fs::write(&whole, &file_bytes).unwrap();
        drop(backup);
        assert_eq!(std::fs::read_dir(dir.path().join("scratch")).unwrap().count(), 0, "scratch files left");

        let info = status(&whole).unwrap();
        assert_eq!((info.applied_index, info.total_keys), (41, 1));

        let bare = dir.path().join("bare.tar");
        std::fs::write(&bare, &file_bytes[..file_bytes.len() - HASH_LEN]).unwrap();
        let c = cfg(dir.path());
        assert!(format!("{:#}", restore(&bare, &c, false).unwrap_err()).contains("no integrity hash"));
        let mut damaged = file_bytes.clone();
        damaged[100] ^= 1;
        std::fs::write(&bare, &damaged).unwrap();
        assert!(format!("{:#}", restore(&bare, &c, false).unwrap_err()).contains("hash mismatch"));
        assert!(!c.data_dir().exists());

        let r = restore(&whole, &c, false).unwrap();
        assert_eq!((r.member_id, r.applied_index), (c.my_id().unwrap(), 41));
        let (root, current) = crate::raft::state_machine::initial_state_dir(&c.data_dir());
        let restored = StateDb::open(&root.join(current)).unwrap();
        assert_eq!(restored.get_data(b"kv\0k").unwrap().as_deref(), Some(&b"v"[..]));
        let applied = restored.applied().unwrap().unwrap();
        assert_eq!((applied.leader_id.term, applied.index), (0, 41));
        let m = restored.membership().unwrap();
        assert_eq!(m.log_id(), &Some(applied));
        let voters: Vec<u64> = m.membership().voter_ids().collect();
        assert_eq!(voters, c.members().unwrap().into_keys().collect::<Vec<_>>());
        assert!(restored.alarms().unwrap().is_empty(), "the old members' alarms stay behind");
        assert!(format!("{:#}", restore(&whole, &c, false).unwrap_err()).contains("exists"));
    }
}
