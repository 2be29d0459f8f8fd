//! The apply path without Raft: the built-in kv-mvcc machine through the host runtime and
//! the RocksDB state store, as the state-machine driver runs it (one write batch per
//! applied batch). Reports puts per second on one core.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message;
use raftvm::proto::etcdserverpb::PutRequest;
use raftvm::runtime::{ApplyContext, Runtime, DEFAULT_FUEL, DEFAULT_MEMORY_BYTES};
use raftvm::server::DEFAULT_KV_MODULE;
use raftvm::storage::{ModuleRecord, PendingBatch, StateDb};

// The server's allocator (src/main.rs), so the bench measures what a node runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 256;
const KEY_SPACE: usize = 100_000;

fn put_command(i: usize) -> Vec<u8> {
    // Keys hop through the key space (7919 is prime to 100,000: a permutation), so the
    // store sees random keys, not an append-only pattern.
    let k = i.wrapping_mul(7919) % KEY_SPACE;
    let req = PutRequest { key: format!("key-{k:08}").into_bytes(), value: vec![b'v'; 256], ..Default::default() };
    let mut b = vec![2u8];
    req.encode(&mut b).unwrap();
    b
}

/// The next `BATCH` put commands from command number `*next` on.
fn next_batch(next: &mut usize) -> Vec<Vec<u8>> {
    let cmds = (0..BATCH).map(|k| put_command(*next + k)).collect();
    *next += BATCH;
    cmds
}

/// Applies `cmds` as one batch, as the state-machine driver does; `index` is the last
/// log index applied so far.
fn apply_batch(rt: &Runtime, db: &Arc<StateDb>, index: &mut u64, cmds: &[Vec<u8>]) -> PendingBatch {
    let mut batch = PendingBatch::default();
    for cmd in cmds {
        *index += 1;
        let ctx = ApplyContext { index: *index, term: 1, timestamp_ms: 0 };
        let out = rt.apply("kv", db, &mut batch.data, ctx, cmd).unwrap();
        assert!(out.is_ok(), "{out:?}");
    }
    batch
}

fn apply_puts(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(StateDb::open(&dir.path().join("state")).unwrap());
    let rt = Runtime::new(&dir.path().join("cache")).unwrap();
    // RAFTVM_BENCH_KV=path.wasm measures another kv-mvcc build than the embedded one, but
    // only the embedded one keeps a warm instance (any other module gets an instance per
    // log entry, see `runtime`): to compare builds, replace host/assets/kv-mvcc.wasm.
    let module = match std::env::var_os("RAFTVM_BENCH_KV") {
        Some(p) => std::fs::read(&p).expect("reading RAFTVM_BENCH_KV"),
        None => DEFAULT_KV_MODULE.to_vec(),
    };
    let wasm = rt.validate(&module).expect("kv module validates");
    let record = ModuleRecord::for_component("kv".into(), &wasm, DEFAULT_FUEL, DEFAULT_MEMORY_BYTES, 1);
    rt.load(record, &wasm).unwrap();

    let mut next = 0usize;
    let mut index = 1u64;
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("kv-mvcc put, 256 B values, batches of 256", |b| {
        b.iter_batched(
            || next_batch(&mut next),
            |cmds| db.commit(apply_batch(&rt, &db, &mut index, &cmds)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    // The same batches, dropped instead of committed: what the guest, the host runtime
    // and the store's reads cost without the RocksDB write. The store holds every key of
    // the key space first, so each put updates one, as in the steady state above.
    while next < KEY_SPACE {
        let cmds = next_batch(&mut next);
        db.commit(apply_batch(&rt, &db, &mut index, &cmds)).unwrap();
    }
    group.bench_function("kv-mvcc put, 256 B values, batches of 256, not committed", |b| {
        b.iter_batched(
            || next_batch(&mut next),
            |cmds| apply_batch(&rt, &db, &mut index, &cmds),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, apply_puts);
criterion_main!(benches);
