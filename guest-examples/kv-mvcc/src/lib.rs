//! kv-mvcc: raftvm's default state machine, etcd v3.4's MVCC key-value
//! store (`etcdserverpb.KV`) as a raftvm guest.
//!
//! * [`command`]: the host <-> guest encoding (tag byte + etcd protobuf).
//! * [`mvcc`]: etcd's semantics: revisions, Range/Put/DeleteRange/Txn,
//!   compaction, HashKV, lease revocation, watch events and history.
//! * [`layout`]: how records sit in the machine's store:
//!
//! ```text
//! m/rev                       current revision (absent: 1)
//! m/compact                   compacted revision (absent: -1)
//! m/compact-todo              physical compaction still to do (absent: none)
//! k/<key>                     latest live state of <key>, 40 bytes:
//!                             mod (main, sub), create_revision, version, lease
//! h/<esc key><main><sub>      history: mvccpb.KeyValue (key left out) of a put,
//!                             0x00 for a delete
//! r/<main><sub>               <key>: every change from the compacted revision
//!                             on, in revision order
//! ```
//!
//!   Latest reads scan `k/` only (plus one `get` per returned value); reads at
//!   past revisions use `h/`; compaction, hashing and watch history use `r/`
//!   and `h/`.
//! * [`host`]: the `Store`/`Leases`/`Events` traits the engine runs on, and
//!   in-memory implementations for tests.
//!
//! On wasm32 the crate also exports the WIT world `raftvm:machine/state-machine`
//! (module `guest`), delegating to the above.

pub mod command;
mod crc32c;
pub mod error;
pub mod host;
pub mod layout;
pub mod mvcc;
pub mod pb;

#[cfg(target_arch = "wasm32")]
mod guest;

pub use error::Error;
