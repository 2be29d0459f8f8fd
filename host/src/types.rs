//! The replicated vocabulary: what goes into the Raft log and what applying it returns.
//!
//! Everything here is serialized with postcard into log entries and peer RPCs, so
//! changing a variant's shape changes the on-disk format.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Raft node id. Derived from the member name, peer URL and cluster token the way etcd
/// derives member ids, so every node computes the same id for a member.
pub type NodeId = u64;

/// What the cluster knows about a member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub peer_url: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.peer_url)
    }
}

/// A command replicated through the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Run `apply` of machine `machine` on `payload`.
    Call {
        machine: String,
        // Byte strings are written in one piece, not element by element as serde's
        // `Vec<T>` is; postcard's bytes are a length plus the bytes either way, so the
        // encoding is the same.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// The leader's wall clock when it accepted the command (ms since the epoch).
        timestamp_ms: u64,
    },
    /// Install or upgrade a machine. `wasm` is always a component (the proposing node
    /// componentizes core modules before proposing), already validated.
    InstallModule {
        name: String,
        #[serde(with = "serde_bytes")]
        wasm: Vec<u8>,
        fuel: u64,
        memory_bytes: u64,
    },
    /// Remove a machine and all of its state.
    RemoveModule { name: String },
    /// Install a built-in default machine (the etcd `kv` module) when a cluster is new.
    /// Applied at most once per cluster: a replica that has already seen it for `name`
    /// ignores it, so a later upgrade or removal by the user is never undone.
    InstallDefault {
        name: String,
        #[serde(with = "serde_bytes")]
        wasm: Vec<u8>,
        fuel: u64,
        memory_bytes: u64,
    },
    /// Raise or clear an etcd alarm (e.g. NOSPACE) for a member, cluster-wide.
    Alarm { activate: bool, member_id: u64, alarm: i32 },
    /// Grant lease `id` for `ttl` seconds (etcd's LeaseGrant). The proposing node picks `id`
    /// when the client left it 0 and raises `ttl` to the minimum TTL, so applying it is a
    /// pure function of the log.
    LeaseGrant { id: i64, ttl: i64 },
    /// Revoke lease `id` (a client's LeaseRevoke, or the leader expiring it): every machine
    /// with keys attached to it gets `on-lease-revoked`, then the lease and its attachments
    /// are dropped.
    LeaseRevoke {
        id: i64,
        /// The leader's wall clock when it accepted the command (ms since the epoch).
        timestamp_ms: u64,
    },
    /// Several `Call`s that reached the leader together, in one log entry: applied in
    /// order, each as if it were an entry of its own (own transaction, own response), so
    /// one fsync and one replication round serve them all. They share the entry's index.
    Batch(Vec<Request>),
    /// A member's attributes for etcd's MemberList: its name and client URLs (etcd's
    /// `--advertise-client-urls`), proposed by the member itself when they are not yet
    /// what the cluster holds (etcd publishes them through raft the same way).
    PublishMember { id: u64, name: String, client_urls: Vec<String> },
}

/// What a member published about itself ([`Request::PublishMember`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAttrs {
    pub name: String,
    pub client_urls: Vec<String>,
}

/// The result of applying one log entry, handed back to the proposing client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Membership or blank entries.
    Empty,
    /// The guest's `ok` bytes.
    Output(#[serde(with = "serde_bytes")] Vec<u8>),
    Installed { sha256: String, size: u64 },
    Removed,
    /// The command did nothing, identically on every replica.
    Failed(ApplyError),
    /// One response per request of a `Request::Batch`, in order.
    Batch(Vec<Response>),
}

/// Why a command was discarded. Deterministic: every replica computes the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ApplyError {
    pub kind: ApplyErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyErrorKind {
    /// The guest returned `err`.
    Rejected,
    /// The guest trapped.
    Trap,
    OutOfFuel,
    OutOfMemory,
    NoSuchMachine,
    InvalidModule,
}

impl fmt::Display for ApplyErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApplyErrorKind::Rejected => "rejected by machine",
            ApplyErrorKind::Trap => "guest trap",
            ApplyErrorKind::OutOfFuel => "guest ran out of fuel",
            ApplyErrorKind::OutOfMemory => "guest exceeded its memory limit",
            ApplyErrorKind::NoSuchMachine => "no such machine",
            ApplyErrorKind::InvalidModule => "invalid module",
        })
    }
}

impl ApplyError {
    pub fn new(kind: ApplyErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

openraft::declare_raft_types!(
    /// openraft type configuration for raftvm.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Member,
        SnapshotData = crate::raft::snapshot::SnapshotFile,
);

pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Machine names: what may follow `raftvm module install`.
pub fn validate_machine_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid machine name {name:?}: use 1-63 characters from [a-z0-9._-], starting with a letter or digit"
        ))
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encoding into a Vec cannot fail")
}

pub fn decode<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_roundtrip_through_postcard() {
        let e = Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 7), 42),
            payload: openraft::EntryPayload::Normal(Request::Call {
                machine: "kv".into(),
                payload: vec![1, 2, 3],
                timestamp_ms: 99,
            }),
        };
        let back: Entry = decode(&encode(&e)).unwrap();
        assert_eq!(back.log_id, e.log_id);
        match back.payload {
            openraft::EntryPayload::Normal(Request::Call { machine, payload, timestamp_ms }) => {
                assert_eq!((machine.as_str(), payload, timestamp_ms), ("kv", vec![1, 2, 3], 99));
            }
            other => panic!("unexpected payload {other:?}"),
        }
        let mut nodes = std::collections::BTreeMap::new();
        nodes.insert(1u64, Member { name: "a".into(), peer_url: "http://x".into() });
        let m = openraft::Membership::new(vec![[1u64].into_iter().collect()], nodes);
        let e2 = Entry { log_id: e.log_id, payload: openraft::EntryPayload::Membership(m.clone()) };
        let back: Entry = decode(&encode(&e2)).unwrap();
        assert!(matches!(back.payload, openraft::EntryPayload::Membership(ref m2) if *m2 == m));
    }

    #[test]
    fn byte_fields_encode_as_plain_vecs_did() {
        // The log written before byte fields used serde_bytes must still decode.
        #[derive(Serialize)]
        enum OldRequest {
            Call { machine: String, payload: Vec<u8>, timestamp_ms: u64 },
        }
        let old = OldRequest::Call { machine: "kv".into(), payload: (0..=255).collect(), timestamp_ms: 7 };
        let new = Request::Call { machine: "kv".into(), payload: (0..=255).collect(), timestamp_ms: 7 };
        assert_eq!(encode(&old), encode(&new));
        #[derive(Serialize)]
        enum OldResponse {
            _Empty,
            Output(Vec<u8>),
        }
        assert_eq!(encode(&OldResponse::Output(vec![0, 200, 3])), encode(&Response::Output(vec![0, 200, 3])));
    }

    #[test]
    fn machine_names() {
        assert!(validate_machine_name("kv").is_ok());
        assert!(validate_machine_name("my-counter_2.v1").is_ok());
        for bad in ["", "Kv", "-x", "a/b", "a\0b", &"x".repeat(64)] {
            assert!(validate_machine_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
