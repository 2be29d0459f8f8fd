//! Compiles etcd's protos (../../proto/etcd) with protox + prost-build: pure
//! Rust, no protoc. This doubles as the check that the protos are valid proto3.

use std::path::PathBuf;

fn main() {
    // Read at run time (not env!): a cached build-script binary must not point at the
    // checkout it was first compiled in.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../../proto/etcd");
    let files = [
        root.join("mvccpb/kv.proto"),
        root.join("authpb/auth.proto"),
        root.join("etcdserverpb/rpc.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root]).unwrap_or_else(|e| panic!("protox: {e:?}"));
    prost_build::Config::new()
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("prost-build: {e}"));
}
