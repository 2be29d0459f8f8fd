//! The watch workload: `--watchers` watch streams on the key prefix (spread over the
//! channels), `--clients` putters writing values that start with their send time.
//! Latency is delivery time minus send time, recorded once per watcher that got the put.
//!
//! Counting: `total` = puts attempted, `ok` = deliveries (up to ok-puts × watchers),
//! `errors` = failed puts + deliveries still missing `--watch-timeout` after the last put
//! (or lost with a broken stream). The measured phase ends when every watcher has seen
//! every successful put, or at that timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use tokio::sync::{mpsc, watch as signal};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

use super::kv::{self, Op};
use super::stats::{status_message, Latency, Stats};
use super::{BenchArgs, Cfg, Phase, Progress, Work};
use crate::proto::etcdserverpb::watch_client::WatchClient;
use crate::proto::etcdserverpb::watch_request::RequestUnion;
use crate::proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use crate::proto::mvccpb::event::EventType;

/// A created watch: the request side (kept open: closing it ends the watch) and the events.
type WatchStream = (mpsc::Sender<WatchRequest>, Streaming<WatchResponse>);

/// Once the putters are done: how many puts succeeded, and until when to wait for them.
type Finish = Option<(u64, Instant)>;

pub(crate) async fn run(channels: &[Channel], cfg: &Arc<Cfg>, args: &BenchArgs) -> Result<Phase> {
    let watchers = args.watchers.unwrap_or(args.clients);
    let opened = futures::future::join_all((0..watchers).map(|w| open(&channels[w % channels.len()], cfg))).await;
    let failed: Vec<String> = opened.iter().filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}"))).collect();
    if let Some(first) = failed.first() {
        bail!("creating watches: {} of {watchers} failed: {first}", failed.len());
    }
    let (finish_tx, finish_rx) = signal::channel::<Finish>(None);

    let start = Instant::now();
    let tasks: Vec<_> = opened
        .into_iter()
        .flatten()
        .map(|ws| tokio::spawn(watcher(ws, cfg.clone(), finish_rx.clone())))
        .collect();
    let work = Arc::new(Work::new(args.total, args.duration));
    let progress = Progress::start("watch", &work);
    let puts = kv::drive(Op::TimestampedPut, channels, cfg, args.clients, &work, cfg.sequential).await;
    progress.finish();
    let _ = finish_tx.send(Some((puts.ok, Instant::now() + args.watch_timeout)));

    let mut stats = Stats::new();
    for t in tasks {
        match t.await {
            Ok(s) => stats.merge(&s),
            Err(e) => stats.errors(puts.ok, format!("watcher task failed: {e}")),
        }
    }
    let duration = start.elapsed();
    for (m, n) in &puts.messages {
        stats.errors(*n, format!("put: {m}"));
    }
    let pl = Latency::of(&puts.hist);
    let extra = vec![
        ("watchers", json!(watchers)),
        ("puts_ok", json!(puts.ok)),
        ("deliveries_expected", json!(puts.ok * watchers as u64)),
        (
            "put_latency_ms",
            json!({"p50": pl.p50, "p90": pl.p90, "p99": pl.p99, "p999": pl.p999, "max": pl.max, "mean": pl.mean}),
        ),
    ];
    Ok(Phase { total: puts.ok + puts.errors, stats, duration, extra })
}

/// Creates one watch on the bench prefix and waits for its `created` response.
async fn open(ch: &Channel, cfg: &Cfg) -> Result<WatchStream> {
    let (tx, rx) = mpsc::channel(1);
    let create = WatchCreateRequest { key: cfg.keys.prefix().to_vec(), range_end: cfg.keys.range_end(), ..Default::default() };
    tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) })
        .await
        .map_err(|_| anyhow!("watch request stream closed"))?;
    let mut client = WatchClient::new(ch.clone()).max_decoding_message_size(usize::MAX);
    let mut stream =
        client.watch(ReceiverStream::new(rx)).await.map_err(|s| anyhow!("{}", status_message(&s)))?.into_inner();
    match tokio::time::timeout(cfg.command_timeout, stream.message()).await {
        Err(_) => bail!("no response within --command-timeout {:?}", cfg.command_timeout),
        Ok(Err(s)) => bail!("{}", status_message(&s)),
        Ok(Ok(None)) => bail!("the server closed the watch stream"),
        Ok(Ok(Some(r))) if r.canceled || !r.created => {
            bail!("watch not created (canceled={}, reason {:?})", r.canceled, r.cancel_reason)
        }
        Ok(Ok(Some(_))) => Ok((tx, stream)),
    }
}

async fn watcher(ws: WatchStream, cfg: Arc<Cfg>, mut finish: signal::Receiver<Finish>) -> Stats {
    let (_keep_open, mut stream) = ws;
    let mut stats = Stats::new();
    let mut seen = 0u64;
    let mut broken: Option<String> = None;
    loop {
        let target = *finish.borrow_and_update();
        if matches!(target, Some((n, _)) if seen >= n) {
            break;
        }
        let timeout = async {
            match target {
                Some((_, deadline)) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(resp)) => {
                    if resp.canceled {
                        broken = Some(format!("watch canceled by the server: {}", resp.cancel_reason));
                        break;
                    }
                    let now = cfg.now_ns();
                    for ev in &resp.events {
                        if ev.r#type != EventType::Put as i32 {
                            continue;
                        }
                        let Some(ts) = ev.kv.as_ref().and_then(|kv| kv.value.get(..8)) else { continue };
                        let sent = u64::from_be_bytes(ts.try_into().expect("8 bytes"));
                        stats.ok(Duration::from_nanos(now.saturating_sub(sent)));
                        seen += 1;
                    }
                }
                Ok(None) => {
                    broken = Some("the server closed the watch stream".into());
                    break;
                }
                Err(s) => {
                    broken = Some(format!("watch stream: {}", status_message(&s)));
                    break;
                }
            },
            r = finish.changed(), if target.is_none() => {
                if r.is_err() {
                    break; // the run was abandoned
                }
            }
            _ = timeout => break,
        }
    }
    // How many deliveries were due is known once the putters are done.
    let expected = loop {
        if let Some((n, _)) = *finish.borrow_and_update() {
            break n;
        }
        if finish.changed().await.is_err() {
            break seen;
        }
    };
    let missing = expected.saturating_sub(seen);
    let why = broken.unwrap_or_else(|| "watch: event not delivered within --watch-timeout".into());
    stats.errors(missing, why);
    stats
}
