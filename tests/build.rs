//! Generates a tonic gRPC client for etcd's v3 API from `proto/etcd` (the same
//! protos the server is built from), with protox, so no `protoc` is needed.
//! Used by `it/etcd_diff.rs`, which talks raw gRPC to etcd and to raftvm.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let etcd = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto/etcd");
    let files = ["etcdserverpb/rpc.proto", "mvccpb/kv.proto", "authpb/auth.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", etcd.join(f).display());
    }
    let fds = protox::compile(files, [&etcd])?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(fds)?;
    Ok(())
}
