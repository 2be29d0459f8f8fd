//! gRPC services on the client URL, and the one place internal errors become gRPC status.

pub mod admin;
pub mod authority;
pub mod cluster;
pub mod concurrency;
pub mod etcd_kv;
pub mod etcd_lease;
pub mod etcd_watch;
pub mod maintenance;
pub mod quota;

use crate::node::NodeError;
use crate::types::{ApplyError, ApplyErrorKind};

pub fn node_status(e: NodeError) -> tonic::Status {
    match e {
        NodeError::NoLeader | NodeError::LeaderChanged => tonic::Status::unavailable(e.to_string()),
        NodeError::Timeout => tonic::Status::unavailable(e.to_string()),
        NodeError::Internal(m) => tonic::Status::internal(m),
    }
}

pub fn apply_status(e: ApplyError) -> tonic::Status {
    let msg = e.to_string();
    match e.kind {
        ApplyErrorKind::Rejected => tonic::Status::failed_precondition(msg),
        ApplyErrorKind::Trap => tonic::Status::aborted(msg),
        ApplyErrorKind::OutOfFuel | ApplyErrorKind::OutOfMemory => tonic::Status::resource_exhausted(msg),
        ApplyErrorKind::NoSuchMachine => tonic::Status::not_found(msg),
        ApplyErrorKind::InvalidModule => tonic::Status::invalid_argument(msg),
    }
}

/// A `kv` machine's error as etcd reports it: a rejection carries etcd's own message (mapped
/// by [`etcd_status`]); traps and resource limits keep raftvm's codes.
pub fn kv_error_status(e: ApplyError) -> tonic::Status {
    match e.kind {
        ApplyErrorKind::Rejected => etcd_status(&e.message),
        _ => apply_status(e),
    }
}

/// etcd's error strings → the gRPC codes etcd uses for them (clients map them back to
/// typed errors by code and message, so both must match etcd's `rpctypes`).
pub fn etcd_status(msg: &str) -> tonic::Status {
    use tonic::Code;
    let code = match msg {
        "etcdserver: mvcc: required revision has been compacted"
        | "etcdserver: mvcc: required revision is a future revision" => Code::OutOfRange,
        "etcdserver: requested lease not found" => Code::NotFound,
        "etcdserver: lease already exists" => Code::FailedPrecondition,
        "etcdserver: too large lease TTL" => Code::OutOfRange,
        "etcdserver: mvcc: database space exceeded" => Code::ResourceExhausted,
        "etcdserver: no leader" | "etcdserver: request timed out" | "etcdserver: leader changed" => Code::Unavailable,
        m if m.starts_with("etcdserver: ") => Code::InvalidArgument,
        _ => Code::Unknown,
    };
    tonic::Status::new(code, msg)
}
