//! The lease-keepalive workload: each client grants one lease (TTL 60 s) and opens a
//! LeaseKeepAlive stream before the measured phase, then sends one keep-alive at a time
//! and measures the round trip. A broken stream is reopened by the next operation (whose
//! latency then includes the reopening). Every lease is revoked at the end.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

use super::stats::{status_message, Stats};
use super::{BenchArgs, Cfg, Phase, Progress, Work};
use crate::proto::etcdserverpb::lease_client::LeaseClient;
use crate::proto::etcdserverpb::{LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest};

pub const LEASE_TTL_S: i64 = 60;

struct Keeper {
    client: LeaseClient<Channel>,
    id: i64,
    stream: Option<(mpsc::Sender<LeaseKeepAliveRequest>, Streaming<LeaseKeepAliveResponse>)>,
}

impl Keeper {
    /// Opens the keep-alive stream with a first round trip (a gRPC server sends the
    /// response headers with its first message).
    async fn open(&mut self) -> Result<(), String> {
        self.stream = None;
        let (tx, rx) = mpsc::channel(1);
        tx.send(LeaseKeepAliveRequest { id: self.id }).await.map_err(|_| "keepalive request stream closed")?;
        let mut s = self
            .client
            .lease_keep_alive(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("keepalive: {}", status_message(&s)))?
            .into_inner();
        check(s.message().await)?;
        self.stream = Some((tx, s));
        Ok(())
    }

    async fn round_trip(&mut self) -> Result<(), String> {
        let Some((tx, s)) = self.stream.as_mut() else {
            return self.open().await;
        };
        tx.send(LeaseKeepAliveRequest { id: self.id }).await.map_err(|_| "keepalive request stream closed")?;
        check(s.message().await)
    }
}

fn check(r: Result<Option<LeaseKeepAliveResponse>, tonic::Status>) -> Result<(), String> {
    match r {
        Ok(Some(resp)) if resp.ttl > 0 => Ok(()),
        Ok(Some(_)) => Err("keepalive: lease not found (TTL 0)".into()),
        Ok(None) => Err("keepalive: the server closed the stream".into()),
        Err(s) => Err(format!("keepalive: {}", status_message(&s))),
    }
}

async fn setup(ch: Channel, cfg: Arc<Cfg>) -> Result<Keeper, (String, Option<Keeper>)> {
    let mut client = LeaseClient::new(ch);
    let g = client
        .lease_grant(LeaseGrantRequest { ttl: LEASE_TTL_S, id: 0 })
        .await
        .map_err(|s| (format!("lease grant: {}", status_message(&s)), None))?
        .into_inner();
    if !g.error.is_empty() {
        return Err((format!("lease grant: {}", g.error), None));
    }
    let mut k = Keeper { client, id: g.id, stream: None };
    match tokio::time::timeout(cfg.command_timeout, k.open()).await {
        Ok(Ok(())) => Ok(k),
        Ok(Err(e)) => Err((e, Some(k))),
        Err(_) => Err(("keepalive: no response within --command-timeout".into(), Some(k))),
    }
}

/// Revokes every lease; returns how many revocations failed.
async fn revoke_all(keepers: Vec<Keeper>) -> usize {
    let revokes = keepers.into_iter().map(|mut k| async move {
        drop(k.stream.take()); // close the keep-alive stream first
        k.client.lease_revoke(LeaseRevokeRequest { id: k.id }).await.is_err()
    });
    futures::future::join_all(revokes).await.into_iter().filter(|failed| *failed).count()
}

pub(crate) async fn run(channels: &[Channel], cfg: &Arc<Cfg>, args: &BenchArgs) -> Result<Phase> {
    let set = futures::future::join_all((0..args.clients).map(|i| setup(channels[i % channels.len()].clone(), cfg.clone())))
        .await;
    let mut keepers = Vec::new();
    let mut failures = Vec::new();
    for r in set {
        match r {
            Ok(k) => keepers.push(k),
            Err((e, k)) => {
                failures.push(e);
                keepers.extend(k);
            }
        }
    }
    if let Some(first) = failures.first() {
        revoke_all(keepers).await;
        bail!("lease-keepalive setup: {} of {} clients failed: {first}", failures.len(), args.clients);
    }

    let work = Arc::new(Work::new(args.total, args.duration));
    let progress = Progress::start("keepalive", &work);
    let start = Instant::now();
    let tasks: Vec<_> = keepers
        .into_iter()
        .map(|k| tokio::spawn(keepalive_loop(k, cfg.clone(), work.clone())))
        .collect();
    let mut stats = Stats::new();
    let mut keepers = Vec::new();
    for t in tasks {
        match t.await {
            Ok((s, k)) => {
                stats.merge(&s);
                keepers.push(k);
            }
            Err(e) => stats.error(format!("client task failed: {e}")),
        }
    }
    let duration = start.elapsed();
    progress.finish();
    let revoke_failed = revoke_all(keepers).await;
    if revoke_failed > 0 {
        eprintln!("warning: {revoke_failed} lease revocations failed (the leases expire after {LEASE_TTL_S} s)");
    }
    Ok(Phase {
        total: stats.ok + stats.errors,
        stats,
        duration,
        extra: vec![("lease_ttl_s", json!(LEASE_TTL_S)), ("revoke_failed", json!(revoke_failed))],
    })
}

async fn keepalive_loop(mut k: Keeper, cfg: Arc<Cfg>, work: Arc<Work>) -> (Stats, Keeper) {
    let mut stats = Stats::new();
    while work.next().is_some() {
        let t0 = Instant::now();
        match tokio::time::timeout(cfg.command_timeout, k.round_trip()).await {
            Ok(Ok(())) => stats.ok(t0.elapsed()),
            Ok(Err(e)) => {
                stats.error(e);
                k.stream = None;
            }
            Err(_) => {
                stats.error("keepalive: no response within --command-timeout".into());
                k.stream = None;
            }
        }
        work.finished_one();
    }
    (stats, k)
}
