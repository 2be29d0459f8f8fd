//! `raftvm bench`: a load generator for any etcd v3 gRPC endpoint (etcd itself or a raftvm
//! cluster), in the spirit of etcd's `tools/benchmark`.
//!
//! ```text
//! raftvm bench put --endpoints 127.0.0.1:2379 --clients 16 --conns 4 --total 100000 --val-size 256
//! raftvm bench range --consistency s --prefill --key-space 10000 --duration 30s --json
//! ```
//!
//! Workloads: `put`, `range` (`--consistency l|s`), `txn-put` (compare-and-swap on the
//! key's mod revision), `delete`, `watch` (put→watch delivery latency), `lease-keepalive`.
//!
//! Keys are `--key-prefix` (default `raftvm-bench/`) followed by the key index in
//! decimal, zero-padded to exactly `--key-size` bytes (see [`keys`]), so
//! `etcdctl get --prefix raftvm-bench/` shows what a run wrote.
//!
//! Measurement: `--clients` request loops (tokio tasks on the multi-thread runtime) share
//! `--conns` gRPC channels (client `i` uses channel `i mod conns`; channel `j` dials
//! endpoint `j mod endpoints`). Each loop keeps exactly one request outstanding and
//! records its latency into its own HDR histogram (µs, 3 significant digits); histograms
//! are merged at the end. Connecting, `--prefill`, lease grants and watch creation happen
//! before the measured phase. `ops_per_sec` is `ok / duration_s` of the measured phase.
//!
//! Output: a short table, or with `--json` exactly one JSON object on stdout (see
//! [`stats::Report::json`]). The progress bar goes to stderr, only when it is a terminal.
//! The exit status is non-zero when no operation succeeded or a setup step (connect,
//! prefill, lease grant, watch creation) failed.

pub mod keys;
pub mod stats;

mod kv;
mod lease;
mod watch;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::transport::{Channel, Endpoint};

use keys::KeySpace;
use stats::{Report, Stats};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// PutRequest of one key.
    Put,
    /// RangeRequest of one key (see --consistency).
    Range,
    /// Txn: if mod_revision(key) == last seen then put else range (compare-and-swap).
    TxnPut,
    /// DeleteRangeRequest of one key.
    Delete,
    /// Put→watch-event delivery latency, over --watchers watch streams on the key prefix.
    Watch,
    /// LeaseKeepAlive round trips, one lease and one outstanding request per client.
    LeaseKeepalive,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Range => "range",
            Workload::TxnPut => "txn-put",
            Workload::Delete => "delete",
            Workload::Watch => "watch",
            Workload::LeaseKeepalive => "lease-keepalive",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    /// Linearizable.
    L,
    /// Serializable.
    S,
}

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub workload: Workload,
    /// gRPC endpoints, comma separated (`host:port` or `http://host:port`).
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub endpoints: String,
    /// Concurrent request loops (each keeps one request outstanding).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// gRPC channels (HTTP/2 connections); clients are assigned round-robin to channels,
    /// channels round-robin to endpoints.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Operations to run (for watch: puts). Ignored when --duration is given.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// Run for this long instead of --total operations (e.g. 10s, 1m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Bytes of the key after the prefix: the key index in zero-padded decimal.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Bytes of each value.
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Number of distinct keys (like etcd benchmark's --key-space-size).
    #[arg(long, default_value_t = 1)]
    pub key_space: u64,
    /// Keys 0, 1, 2, ... (mod --key-space) in operation order, instead of uniformly random.
    #[arg(long)]
    pub sequential_keys: bool,
    /// Before measuring, put every key of the key space once (not timed).
    #[arg(long)]
    pub prefill: bool,
    /// Range consistency: l (linearizable) or s (serializable).
    #[arg(long, value_enum, default_value = "l")]
    pub consistency: Consistency,
    /// Print exactly one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Dial timeout for each connection.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,
    /// Timeout of each request.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub command_timeout: Duration,
    /// watch: number of watch streams (default: --clients).
    #[arg(long)]
    pub watchers: Option<usize>,
    /// watch: how long after the last put to wait for events still missing.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub watch_timeout: Duration,
    /// Prefix of every bench key.
    #[arg(long, default_value = keys::DEFAULT_PREFIX)]
    pub key_prefix: String,
}

impl BenchArgs {
    /// Endpoints as URLs (`http://` added when no scheme is given).
    pub fn endpoint_urls(&self) -> Vec<String> {
        crate::cli::endpoint_urls(&self.endpoints)
    }
}

/// What every client loop of a run shares (read-only).
pub(crate) struct Cfg {
    pub keys: KeySpace,
    pub sequential: bool,
    /// The value every put sends (watch: bytes 8.. follow the timestamp).
    pub value: Vec<u8>,
    pub serializable: bool,
    pub command_timeout: Duration,
    /// The clock watch timestamps are taken against (nanoseconds since this instant).
    pub epoch: Instant,
}

impl Cfg {
    /// Nanoseconds since [`Cfg::epoch`].
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Hands out operation numbers until the total is reached or the deadline has passed.
pub(crate) struct Work {
    total: Option<u64>,
    deadline: Option<Instant>,
    issued: AtomicU64,
    /// Completed operations (ok or not), for the progress bar.
    pub done: AtomicU64,
}

impl Work {
    /// `total` operations, or, if `duration` is given, as many as fit from now on.
    pub fn new(total: u64, duration: Option<Duration>) -> Work {
        match duration {
            Some(d) => {
                Work { total: None, deadline: Some(Instant::now() + d), issued: AtomicU64::new(0), done: AtomicU64::new(0) }
            }
            None => Work { total: Some(total), deadline: None, issued: AtomicU64::new(0), done: AtomicU64::new(0) },
        }
    }

    /// The next operation number, or `None` when the run is over.
    #[inline]
    pub fn next(&self) -> Option<u64> {
        if let Some(d) = self.deadline {
            if Instant::now() >= d {
                return None;
            }
        }
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        match self.total {
            Some(t) if i >= t => None,
            _ => Some(i),
        }
    }

    #[inline]
    pub fn finished_one(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// The measured phase of a workload.
pub(crate) struct Phase {
    pub stats: Stats,
    pub duration: Duration,
    /// Operations attempted (watch: puts).
    pub total: u64,
    pub extra: Vec<(&'static str, serde_json::Value)>,
}

/// A progress bar on stderr (only if stderr is a terminal), fed from [`Work::done`].
pub(crate) struct Progress {
    bar: ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn start(label: &str, work: &Arc<Work>) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { bar: ProgressBar::hidden(), ticker: None };
        }
        let (bar, template) = match work.total {
            Some(t) => (
                ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
                "{prefix:>8} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
            ),
            None => (
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
                "{prefix:>8} {spinner} [{elapsed_precise}] {pos} ops ({per_sec})",
            ),
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_prefix(label.to_string());
        let (b, w) = (bar.clone(), work.clone());
        let ticker = tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(100));
            loop {
                iv.tick().await;
                b.set_position(w.done.load(Ordering::Relaxed));
            }
        });
        Progress { bar, ticker: Some(ticker) }
    }

    pub fn finish(self) {
        if let Some(t) = self.ticker {
            t.abort();
        }
        self.bar.finish_and_clear();
    }
}

/// Dials every channel up front: a run fails early if an endpoint cannot be reached.
async fn connect(args: &BenchArgs, endpoints: &[String]) -> Result<Vec<Channel>> {
    // Each channel queues requests in a tower buffer before its connection task; make it
    // large enough that clients never wait for a slot.
    let per_conn = args.clients.max(args.watchers.unwrap_or(0)).div_ceil(args.conns);
    let dials = (0..args.conns).map(|j| {
        let url = endpoints[j % endpoints.len()].clone();
        async move {
            let ep = Endpoint::from_shared(url.clone())
                .with_context(|| format!("bad endpoint {url:?}"))?
                .connect_timeout(args.dial_timeout)
                .timeout(args.command_timeout)
                .tcp_nodelay(true)
                // Large static flow-control windows: responses (ranges, watch events)
                // never stall on WINDOW_UPDATEs.
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(32 << 20)
                .buffer_size((2 * per_conn).max(1024));
            match tokio::time::timeout(args.dial_timeout, ep.connect()).await {
                Ok(Ok(ch)) => Ok(ch),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!("connecting to {url}"))),
                Err(_) => Err(anyhow!("connecting to {url}: timed out after {:?}", args.dial_timeout)),
            }
        }
    });
    futures::future::try_join_all(dials).await
}

fn validate(args: &BenchArgs) -> Result<()> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if args.conns == 0 {
        bail!("--conns must be at least 1");
    }
    if args.watchers == Some(0) {
        bail!("--watchers must be at least 1");
    }
    if args.duration.is_none() && args.total == 0 {
        bail!("--total must be at least 1");
    }
    if args.duration == Some(Duration::ZERO) {
        bail!("--duration must be positive");
    }
    if args.workload == Workload::Watch && args.val_size < 8 {
        bail!("watch needs --val-size of at least 8: values start with an 8-byte send timestamp");
    }
    Ok(())
}

/// Runs `raftvm bench` and prints its report on stdout.
pub async fn run(args: BenchArgs) -> Result<()> {
    validate(&args)?;
    let keys = KeySpace::new(&args.key_prefix, args.key_size, args.key_space)?;
    let endpoints = args.endpoint_urls();
    if endpoints.is_empty() {
        bail!("no endpoints given");
    }
    let channels = connect(&args, &endpoints).await?;
    let cfg = Arc::new(Cfg {
        keys,
        sequential: args.sequential_keys,
        value: keys::value(args.val_size, 0x5eed),
        serializable: args.consistency == Consistency::S,
        command_timeout: args.command_timeout,
        epoch: Instant::now(),
    });

    if args.prefill {
        kv::prefill(&channels, &cfg, args.clients).await?;
    }

    let phase = match args.workload {
        Workload::Put => kv::run(kv::Op::Put, &channels, &cfg, &args).await,
        Workload::Range => kv::run(kv::Op::Range, &channels, &cfg, &args).await,
        Workload::TxnPut => kv::run(kv::Op::TxnPut, &channels, &cfg, &args).await,
        Workload::Delete => kv::run(kv::Op::Delete, &channels, &cfg, &args).await,
        Workload::Watch => watch::run(&channels, &cfg, &args).await?,
        Workload::LeaseKeepalive => lease::run(&channels, &cfg, &args).await?,
    };

    let report = Report {
        workload: args.workload.name().to_string(),
        consistency: match args.consistency {
            Consistency::L => "l".into(),
            Consistency::S => "s".into(),
        },
        endpoints,
        clients: args.clients,
        conns: args.conns,
        key_size: args.key_size,
        val_size: args.val_size,
        key_space: args.key_space,
        key_prefix: args.key_prefix.clone(),
        sequential_keys: args.sequential_keys,
        prefill: args.prefill,
        total: phase.total,
        stats: phase.stats,
        duration: phase.duration,
        extra: phase.extra,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report.json())?);
    } else {
        print!("{}", report.human());
    }
    if report.stats.ok == 0 {
        let first = report.top_errors().first().map(|(m, _)| (*m).to_string()).unwrap_or_default();
        bail!("all {} operations failed (most frequent error: {first})", report.stats.errors);
    }
    Ok(())
}
