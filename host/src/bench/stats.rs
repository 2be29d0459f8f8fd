//! Per-client counters and latency histograms, merged into the final report.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Latencies are recorded in microseconds, 3 significant digits.
const LOWEST_US: u64 = 1;
/// Initial upper bound (60 s); the histogram grows if a latency exceeds it.
const HIGHEST_US: u64 = 60_000_000;
/// Distinct error messages one client keeps; further ones are lumped together.
const MAX_MESSAGES: usize = 64;
const OTHER_ERRORS: &str = "(other errors)";

/// What one client (or watcher) measured.
pub struct Stats {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub cas_failed: u64,
    pub messages: HashMap<String, u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        let mut hist = Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, 3).expect("valid histogram bounds");
        hist.auto(true);
        Stats { hist, ok: 0, errors: 0, cas_failed: 0, messages: HashMap::new() }
    }

    /// A successful operation and its latency.
    #[inline]
    pub fn ok(&mut self, latency: Duration) {
        self.ok += 1;
        self.record(latency);
    }

    /// Records a latency without counting an operation (watch deliveries count themselves).
    #[inline]
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(LOWEST_US);
        self.hist.saturating_record(us);
    }

    /// `n` failed operations with the same message.
    pub fn errors(&mut self, n: u64, message: String) {
        if n == 0 {
            return;
        }
        self.errors += n;
        let message = if self.messages.len() >= MAX_MESSAGES && !self.messages.contains_key(&message) {
            OTHER_ERRORS.to_string()
        } else {
            message
        };
        *self.messages.entry(message).or_default() += n;
    }

    pub fn error(&mut self, message: String) {
        self.errors(1, message);
    }

    pub fn merge(&mut self, other: &Stats) {
        self.hist.add(&other.hist).expect("auto-resizing histograms accept any values");
        self.ok += other.ok;
        self.errors += other.errors;
        self.cas_failed += other.cas_failed;
        for (m, n) in &other.messages {
            *self.messages.entry(m.clone()).or_default() += n;
        }
    }
}

/// A gRPC status as reported in `error_messages`: `Code: message`.
pub fn status_message(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency { p50: 0.0, p90: 0.0, p99: 0.0, p999: 0.0, max: 0.0, mean: 0.0 };
        }
        let ms = |us: u64| round3(us as f64 / 1000.0);
        Latency {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: round3(h.mean() / 1000.0),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The result of one run: what `--json` prints and the human table shows.
pub struct Report {
    pub workload: String,
    pub consistency: String,
    pub endpoints: Vec<String>,
    pub clients: usize,
    pub conns: usize,
    pub key_size: usize,
    pub val_size: usize,
    pub key_space: u64,
    pub key_prefix: String,
    pub sequential_keys: bool,
    pub prefill: bool,
    /// Operations attempted (for watch: puts attempted).
    pub total: u64,
    pub stats: Stats,
    pub duration: Duration,
    /// Workload-specific fields added to the JSON object (and shown by the table).
    pub extra: Vec<(&'static str, Value)>,
}

impl Report {
    pub fn ops_per_sec(&self) -> f64 {
        let s = self.duration.as_secs_f64();
        if s > 0.0 {
            (self.stats.ok as f64 / s * 10.0).round() / 10.0
        } else {
            0.0
        }
    }

    /// Error messages, most frequent first.
    pub fn top_errors(&self) -> Vec<(&str, u64)> {
        let mut v: Vec<(&str, u64)> = self.stats.messages.iter().map(|(m, n)| (m.as_str(), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }

    pub fn json(&self) -> Value {
        let l = Latency::of(&self.stats.hist);
        let messages: BTreeMap<&str, u64> = self.stats.messages.iter().map(|(m, n)| (m.as_str(), *n)).collect();
        let mut v = json!({
            "workload": self.workload,
            "consistency": self.consistency,
            "endpoints": self.endpoints,
            "clients": self.clients,
            "conns": self.conns,
            "key_size": self.key_size,
            "val_size": self.val_size,
            "key_space": self.key_space,
            "total": self.total,
            "ok": self.stats.ok,
            "errors": self.stats.errors,
            "cas_failed": self.stats.cas_failed,
            "duration_s": round3(self.duration.as_secs_f64()),
            "ops_per_sec": self.ops_per_sec(),
            "latency_ms": {"p50": l.p50, "p90": l.p90, "p99": l.p99, "p999": l.p999, "max": l.max, "mean": l.mean},
            "error_messages": messages,
            "key_prefix": self.key_prefix,
            "sequential_keys": self.sequential_keys,
            "prefill": self.prefill,
        });
        let obj = v.as_object_mut().expect("an object");
        for (k, x) in &self.extra {
            obj.insert((*k).to_string(), x.clone());
        }
        v
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        let mut row = |label: &str, value: String| {
            let _ = writeln!(s, "{label:<20} {value}");
        };
        let consistency = if self.workload == "range" { format!(" (consistency {})", self.consistency) } else { String::new() };
        row("workload", format!("{}{consistency}", self.workload));
        row("endpoints", self.endpoints.join(","));
        row("clients", format!("{} over {} conns", self.clients, self.conns));
        row(
            "keys",
            format!(
                "{}<{} digits>, key-space {}, {}{}",
                self.key_prefix,
                self.key_size,
                self.key_space,
                if self.sequential_keys { "sequential" } else { "random" },
                if self.prefill { ", prefilled" } else { "" }
            ),
        );
        row("values", format!("{} bytes", self.val_size));
        for (k, v) in &self.extra {
            let v = match v {
                Value::String(x) => x.clone(),
                Value::Object(o) if o.contains_key("p50") => latency_line(o),
                x => x.to_string(),
            };
            row(&k.replace('_', "-"), v);
        }
        row("total", self.total.to_string());
        row("ok", self.stats.ok.to_string());
        row("errors", self.stats.errors.to_string());
        if self.workload == "txn-put" {
            row("cas-failed", format!("{} (counted as ok)", self.stats.cas_failed));
        }
        row("duration", format!("{:.3} s", self.duration.as_secs_f64()));
        let unit = if self.workload == "watch" { "deliveries/s" } else { "ops/s" };
        row("throughput", format!("{:.1} {unit}", self.ops_per_sec()));
        let l = Latency::of(&self.stats.hist);
        let lj = json!({"p50": l.p50, "p90": l.p90, "p99": l.p99, "p999": l.p999, "max": l.max, "mean": l.mean});
        row("latency-ms", latency_line(lj.as_object().expect("an object")));
        let errors = self.top_errors();
        if !errors.is_empty() {
            let _ = writeln!(s, "error messages ({} distinct, most frequent first):", errors.len());
            for (m, n) in errors.iter().take(5) {
                let _ = writeln!(s, "  {n:>8}  {m}");
            }
        }
        s
    }
}

fn latency_line(o: &serde_json::Map<String, Value>) -> String {
    let f = |k: &str| o.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    format!(
        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
        f("p50"),
        f("p90"),
        f("p99"),
        f("p999"),
        f("max"),
        f("mean")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(stats: Stats, duration: Duration) -> Report {
        Report {
            workload: "put".into(),
            consistency: "l".into(),
            endpoints: vec!["http://127.0.0.1:2379".into()],
            clients: 2,
            conns: 1,
            key_size: 8,
            val_size: 8,
            key_space: 1,
            key_prefix: "raftvm-bench/".into(),
            sequential_keys: false,
            prefill: false,
            total: stats.ok + stats.errors,
            stats,
            duration,
            extra: vec![("watchers", json!(3))],
        }
    }

    #[test]
    fn percentiles_of_merged_clients_in_milliseconds() {
        // Two clients: 1..=500 ms and 501..=1000 ms; merged they are 1..=1000 ms.
        let (mut a, mut b) = (Stats::new(), Stats::new());
        for ms in 1..=1000u64 {
            let s = if ms <= 500 { &mut a } else { &mut b };
            s.ok(Duration::from_millis(ms));
        }
        a.merge(&b);
        assert_eq!(a.ok, 1000);
        let l = Latency::of(&a.hist);
        // 3 significant digits: each value is within 0.1 % of the exact one.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(l.p50, 500.0), "{l:?}");
        assert!(close(l.p90, 900.0), "{l:?}");
        assert!(close(l.p99, 990.0), "{l:?}");
        assert!(close(l.p999, 999.0), "{l:?}");
        assert!(close(l.max, 1000.0), "{l:?}");
        assert!(close(l.mean, 500.5), "{l:?}");
    }

    #[test]
    fn sub_millisecond_latencies_keep_microsecond_resolution() {
        let mut s = Stats::new();
        for us in [80u64, 90, 100, 110, 120] {
            s.ok(Duration::from_micros(us));
        }
        s.ok(Duration::from_nanos(10)); // below the 1 µs floor: recorded as 1 µs
        let l = Latency::of(&s.hist);
        assert_eq!((l.p50, l.max), (0.09, 0.12), "{l:?}");
    }

    #[test]
    fn json_report_has_the_documented_schema() {
        let mut s = Stats::new();
        for _ in 0..3 {
            s.ok(Duration::from_millis(2));
        }
        s.error("Unavailable: etcdserver: request timed out".into());
        s.cas_failed = 1;
        let v = report(s, Duration::from_millis(1500)).json();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "workload", "consistency", "endpoints", "clients", "conns", "key_size", "val_size", "key_space", "total",
            "ok", "errors", "cas_failed", "duration_s", "ops_per_sec", "latency_ms", "error_messages", "key_prefix", "watchers",
        ] {
            assert!(keys.contains(&k), "missing {k} in {v}");
        }
        assert_eq!(v["total"], 4);
        assert_eq!(v["ok"], 3);
        assert_eq!(v["errors"], 1);
        assert_eq!(v["cas_failed"], 1);
        assert_eq!(v["duration_s"], 1.5);
        assert_eq!(v["ops_per_sec"], 2.0); // ok / duration
        assert_eq!(v["endpoints"], json!(["http://127.0.0.1:2379"]));
        assert_eq!(v["error_messages"], json!({"Unavailable: etcdserver: request timed out": 1}));
        let lat = v["latency_ms"].as_object().unwrap();
        assert_eq!(lat.keys().collect::<Vec<_>>(), ["max", "mean", "p50", "p90", "p99", "p999"]);
        assert_eq!(v["latency_ms"]["p50"], 2.0);
    }

    #[test]
    fn empty_report_has_zero_latencies_not_nan() {
        let v = report(Stats::new(), Duration::ZERO).json();
        assert_eq!(v["latency_ms"]["mean"], 0.0);
        assert_eq!(v["ops_per_sec"], 0.0);
    }

    #[test]
    fn distinct_error_messages_are_capped_per_client() {
        let mut s = Stats::new();
        for i in 0..(MAX_MESSAGES + 10) {
            s.error(format!("error {i}"));
        }
        s.error("error 0".into());
        assert_eq!(s.errors, MAX_MESSAGES as u64 + 11);
        assert_eq!(s.messages.len(), MAX_MESSAGES + 1);
        assert_eq!(s.messages[OTHER_ERRORS], 10);
        assert_eq!(s.messages["error 0"], 2);
        let r = report(s, Duration::from_secs(1));
        assert_eq!(r.top_errors()[0], (OTHER_ERRORS, 10));
        assert_eq!(r.human().matches("\n  ").count(), 5, "the table shows at most 5 messages");
    }
}
