//! gRPC services on the client URL, and the one place internal errors become gRPC status.

pub mod admin;

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
