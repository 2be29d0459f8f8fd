//! Errors, as the exact message strings etcd v3.4 sends to its clients.
//!
//! The guest returns `err(message)`; the host maps the message to a gRPC
//! status code. Every string kv-mvcc produces:
//!
//! | message                                                     | etcd gRPC code   | when |
//! |-------------------------------------------------------------|------------------|------|
//! | `etcdserver: key is not provided`                           | InvalidArgument  | empty key in Range/Put/DeleteRange/Compare, also nested in a txn |
//! | `etcdserver: key not found`                                 | InvalidArgument  | Put with ignore_value/ignore_lease on a missing key; an empty `RequestOp` in a txn |
//! | `etcdserver: value is provided`                             | InvalidArgument  | Put with ignore_value and a non-empty value |
//! | `etcdserver: lease is provided`                             | InvalidArgument  | Put with ignore_lease and a non-zero lease |
//! | `etcdserver: duplicate key given in txn request`            | InvalidArgument  | a txn puts a key twice or puts a key it also deletes |
//! | `etcdserver: mvcc: required revision has been compacted`    | OutOfRange       | Range below the compacted revision; Compact at or below it; HashKV at or below it |
//! | `etcdserver: mvcc: required revision is a future revision`  | OutOfRange       | Range/Compact/HashKV above the current revision |
//! | `etcdserver: requested lease not found`                     | NotFound         | Put naming a lease for which `leases.is-live` is false |
//! | `raftvm: …`                                                 | (InvalidArgument) | malformed command: empty, unknown tag, undecodable protobuf, a tag not allowed in `query` |
//! | `raftvm: kv-mvcc: corrupt store: …`                         | (Internal)       | a store record kv-mvcc cannot read back (never expected) |
//!
//! etcd's "too many operations in txn request" (`--max-txn-ops`) is not
//! here: etcd checks it in its gRPC layer before the request reaches raft,
//! and so does raftvm's host, with the limit the operator configured. The
//! guest applies a txn of any size (bounded by the host's fuel budget).
//!
//! etcd itself has no "compacted" text specific to Compact: v3.4's
//! `mvcc.ErrCompacted` serves Range, Compact and HashKV alike.

use std::fmt;

pub const EMPTY_KEY: &str = "etcdserver: key is not provided";
pub const KEY_NOT_FOUND: &str = "etcdserver: key not found";
pub const VALUE_PROVIDED: &str = "etcdserver: value is provided";
pub const LEASE_PROVIDED: &str = "etcdserver: lease is provided";
pub const DUPLICATE_KEY: &str = "etcdserver: duplicate key given in txn request";
pub const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
pub const FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
pub const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    EmptyKey,
    KeyNotFound,
    ValueProvided,
    LeaseProvided,
    DuplicateKey,
    Compacted,
    FutureRev,
    LeaseNotFound,
    /// A command the guest cannot decode; the text follows `raftvm: `.
    BadCommand(String),
    /// The store holds something kv-mvcc did not write (a bug or a foreign
    /// store); the text follows `raftvm: kv-mvcc: corrupt store: `.
    Corrupt(String),
}

impl Error {
    pub fn message(&self) -> String {
        match self {
            Error::EmptyKey => EMPTY_KEY.into(),
            Error::KeyNotFound => KEY_NOT_FOUND.into(),
            Error::ValueProvided => VALUE_PROVIDED.into(),
            Error::LeaseProvided => LEASE_PROVIDED.into(),
            Error::DuplicateKey => DUPLICATE_KEY.into(),
            Error::Compacted => COMPACTED.into(),
            Error::FutureRev => FUTURE_REV.into(),
            Error::LeaseNotFound => LEASE_NOT_FOUND.into(),
            Error::BadCommand(what) => format!("raftvm: {what}"),
            Error::Corrupt(what) => format!("raftvm: kv-mvcc: corrupt store: {what}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;
