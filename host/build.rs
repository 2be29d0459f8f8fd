//! Compiles the protos in `proto/` with protox (pure Rust), so building needs no `protoc`.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time (not env!): a cached build-script binary must not point at the
    // checkout it was first compiled in.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files = ["raftvm/peer.proto", "raftvm/admin.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;

    // etcd's v3 API, written to etcd 3.4's wire format (see proto/etcd).
    let etcd = root.join("etcd");
    let etcd_files = [
        "etcdserverpb/rpc.proto",
        "mvccpb/kv.proto",
        "authpb/auth.proto",
        "v3lockpb/v3lock.proto",
        "v3electionpb/v3election.proto",
    ];
    for f in &etcd_files {
        println!("cargo:rerun-if-changed={}", etcd.join(f).display());
    }
    let fds = protox::compile(etcd_files, [&etcd])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
