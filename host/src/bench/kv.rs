//! The KV workloads (put, range, txn-put, delete), the watch workload's putters, and
//! `--prefill`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tonic::transport::Channel;

use super::keys::Picker;
use super::stats::{status_message, Stats};
use super::{BenchArgs, Cfg, Phase, Progress, Work};
use crate::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::etcdserverpb::kv_client::KvClient;
use crate::proto::etcdserverpb::request_op::Request;
use crate::proto::etcdserverpb::response_op::Response;
use crate::proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Put,
    Range,
    TxnPut,
    Delete,
    /// A put whose value starts with the send time (big-endian nanoseconds since
    /// [`Cfg::epoch`]), for the watch workload.
    TimestampedPut,
}

pub(crate) fn kv_client(ch: &Channel) -> KvClient<Channel> {
    KvClient::new(ch.clone()).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX)
}

/// Runs `op` on `clients` loops (client `i` on channel `i mod channels`) until `work` is
/// exhausted; returns the merged stats.
pub(crate) async fn drive(
    op: Op,
    channels: &[Channel],
    cfg: &Arc<Cfg>,
    clients: usize,
    work: &Arc<Work>,
    sequential: bool,
) -> Stats {
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let kv = kv_client(&channels[i % channels.len()]);
            tokio::spawn(client_loop(op, kv, cfg.clone(), work.clone(), i as u64, sequential))
        })
        .collect();
    let mut total = Stats::new();
    for t in tasks {
        match t.await {
            Ok(s) => total.merge(&s),
            Err(e) => total.error(format!("client task failed: {e}")),
        }
    }
    total
}

/// The measured phase of a KV workload.
pub(crate) async fn run(op: Op, channels: &[Channel], cfg: &Arc<Cfg>, args: &BenchArgs) -> Phase {
    let work = Arc::new(Work::new(args.total, args.duration));
    let progress = Progress::start(args.workload.name(), &work);
    let start = Instant::now();
    let stats = drive(op, channels, cfg, args.clients, &work, cfg.sequential).await;
    let duration = start.elapsed();
    progress.finish();
    Phase { total: stats.ok + stats.errors, stats, duration, extra: Vec::new() }
}

/// Puts every key of the key space once, spread over `clients` loops (not measured).
pub(crate) async fn prefill(channels: &[Channel], cfg: &Arc<Cfg>, clients: usize) -> Result<()> {
    let work = Arc::new(Work::new(cfg.keys.space(), None));
    let progress = Progress::start("prefill", &work);
    let stats = drive(Op::Put, channels, cfg, clients, &work, true).await;
    progress.finish();
    if stats.errors > 0 {
        let mut msgs: Vec<_> = stats.messages.iter().collect();
        msgs.sort_by(|a, b| b.1.cmp(a.1));
        bail!(
            "prefill: {} of {} puts failed: {}",
            stats.errors,
            cfg.keys.space(),
            msgs.iter().take(3).map(|(m, n)| format!("{m} (x{n})")).collect::<Vec<_>>().join("; ")
        );
    }
    Ok(())
}

fn seed(client: u64) -> u64 {
    0x0123_4567_89ab_cdef ^ client.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

async fn client_loop(op: Op, mut kv: KvClient<Channel>, cfg: Arc<Cfg>, work: Arc<Work>, id: u64, sequential: bool) -> Stats {
    let mut stats = Stats::new();
    let mut keys = cfg.keys.buffer();
    let mut picker = Picker::new(cfg.keys.space(), sequential, seed(id));
    // txn-put: the mod revision this client last saw per key index (absent: 0).
    let mut known: HashMap<u64, i64> = HashMap::new();
    while let Some(n) = work.next() {
        let k = picker.pick(n);
        let key = keys.key(k).to_vec();
        match op {
            Op::Put => {
                let req = PutRequest { key, value: cfg.value.clone(), ..Default::default() };
                let t0 = Instant::now();
                record(&mut stats, t0, kv.put(req).await);
            }
            Op::TimestampedPut => {
                let mut value = Vec::with_capacity(cfg.value.len());
                value.extend_from_slice(&cfg.now_ns().to_be_bytes());
                value.extend_from_slice(&cfg.value[8..]);
                let t0 = Instant::now();
                record(&mut stats, t0, kv.put(PutRequest { key, value, ..Default::default() }).await);
            }
            Op::Range => {
                let req = RangeRequest { key, serializable: cfg.serializable, ..Default::default() };
                let t0 = Instant::now();
                record(&mut stats, t0, kv.range(req).await);
            }
            Op::Delete => {
                let t0 = Instant::now();
                record(&mut stats, t0, kv.delete_range(DeleteRangeRequest { key, ..Default::default() }).await);
            }
            Op::TxnPut => {
                let req = cas_request(key, known.get(&k).copied().unwrap_or(0), cfg.value.clone());
                let t0 = Instant::now();
                let r = kv.txn(req).await;
                let latency = t0.elapsed();
                match r {
                    Ok(r) => {
                        stats.ok(latency);
                        let (succeeded, rev) = learned_mod_revision(&r.into_inner());
                        if !succeeded {
                            stats.cas_failed += 1;
                        }
                        known.insert(k, rev);
                    }
                    Err(s) => stats.error(status_message(&s)),
                }
            }
        }
        work.finished_one();
    }
    stats
}

#[inline]
fn record<T>(stats: &mut Stats, t0: Instant, r: Result<tonic::Response<T>, tonic::Status>) {
    let latency: Duration = t0.elapsed();
    match r {
        Ok(_) => stats.ok(latency),
        Err(s) => stats.error(status_message(&s)),
    }
}

/// `if mod_revision(key) == rev { put key value } else { range key (keys only) }`.
pub(crate) fn cas_request(key: Vec<u8>, rev: i64, value: Vec<u8>) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: key.clone(),
            target_union: Some(TargetUnion::ModRevision(rev)),
            range_end: Vec::new(),
        }],
        success: vec![RequestOp { request: Some(Request::RequestPut(PutRequest { key: key.clone(), value, ..Default::default() })) }],
        failure: vec![RequestOp {
            request: Some(Request::RequestRange(RangeRequest { key, keys_only: true, ..Default::default() })),
        }],
    }
}

/// Whether the compare held, and the key's mod revision as the response shows it: the
/// header revision of the put on success, the ranged key's mod revision on failure
/// (0 if the key does not exist).
pub(crate) fn learned_mod_revision(r: &TxnResponse) -> (bool, i64) {
    if r.succeeded {
        return (true, r.header.as_ref().map_or(0, |h| h.revision));
    }
    let rev = r
        .responses
        .first()
        .and_then(|op| match &op.response {
            Some(Response::ResponseRange(rr)) => Some(rr.kvs.first().map_or(0, |kv| kv.mod_revision)),
            _ => None,
        })
        .unwrap_or(0);
    (false, rev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::{RangeResponse, ResponseHeader, ResponseOp};
    use crate::proto::mvccpb::KeyValue;

    #[test]
    fn cas_compares_mod_revision_and_learns_it_from_either_branch() {
        let req = cas_request(b"k".to_vec(), 7, b"v".to_vec());
        assert_eq!(req.compare.len(), 1);
        let c = &req.compare[0];
        assert_eq!((c.result, c.target), (CompareResult::Equal as i32, CompareTarget::Mod as i32));
        assert_eq!(c.target_union, Some(TargetUnion::ModRevision(7)));
        assert!(matches!(&req.success[0].request, Some(Request::RequestPut(p)) if p.key == b"k" && p.value == b"v"));
        assert!(matches!(&req.failure[0].request, Some(Request::RequestRange(r)) if r.key == b"k"));

        let header = Some(ResponseHeader { revision: 42, ..Default::default() });
        let ok = TxnResponse { header, succeeded: true, responses: Vec::new() };
        assert_eq!(learned_mod_revision(&ok), (true, 42));
        let range = |kvs: Vec<KeyValue>| ResponseOp {
            response: Some(Response::ResponseRange(RangeResponse { kvs, ..Default::default() })),
        };
        let failed = TxnResponse {
            header,
            succeeded: false,
            responses: vec![range(vec![KeyValue { key: b"k".to_vec(), mod_revision: 30, ..Default::default() }])],
        };
        assert_eq!(learned_mod_revision(&failed), (false, 30));
        let gone = TxnResponse { header, succeeded: false, responses: vec![range(Vec::new())] };
        assert_eq!(learned_mod_revision(&gone), (false, 0));
    }
}
