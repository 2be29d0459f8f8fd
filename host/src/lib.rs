//! raftvm: a Raft cluster that replicates opaque commands and applies them through
//! WebAssembly state machines.
//!
//! # Layout
//! - [`config`]: etcd-compatible server flags and config file.
//! - [`types`]: what goes into the Raft log (`Request`) and comes out (`Response`).
//! - [`storage`]: the RocksDB state store and the per-batch/per-command write sets.
//! - [`runtime`]: wasmtime: validation, compiled-module cache, host imports, limits.
//!   Never sees openraft.
//! - [`raft`]: openraft glue: RocksDB log store, the state-machine driver, peer network.
//!   Never sees wasmtime (it calls [`runtime::Runtime`]).
//! - [`node`]: the facade services use: propose (with forwarding), read-index, query.
//! - [`api`]: gRPC services on the client URL and the error → status mapping.
//! - [`server`]: wiring and lifecycle; [`cli`]: the command line.
//! - [`bench`]: `raftvm bench`, a load generator for any etcd v3 endpoint.

pub mod api;
pub mod bench;
pub mod cli;
pub mod compactor;
pub mod config;
pub mod lessor;
pub mod node;
pub mod raft;
pub mod runtime;
pub mod server;
pub mod storage;
pub mod types;

pub mod proto {
    pub mod peer {
        tonic::include_proto!("raftvm.peer.v1");
    }
    pub mod admin {
        tonic::include_proto!("raftvm.admin.v1");
    }
    // etcd's packages are siblings so their cross-references (`super::mvccpb`) resolve.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}
