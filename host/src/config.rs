//! Server configuration with etcd's flag names, defaults and config-file keys.
//!
//! As in etcd, when `--config-file` is given the file is the whole configuration and the
//! other command-line flags are ignored (with a warning).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::types::{Member, NodeId};

#[derive(Debug, Clone, Args, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct ServeConfig {
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: ${name}.etcd).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// List of URLs to listen on for client traffic.
    #[arg(long, default_value = "http://localhost:2379")]
    pub listen_client_urls: String,
    /// List of this member's client URLs to advertise to the public.
    #[arg(long, default_value = "http://localhost:2379")]
    pub advertise_client_urls: String,
    /// List of URLs to listen on for peer traffic.
    #[arg(long, default_value = "http://localhost:2380")]
    pub listen_peer_urls: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping (name=peer-url,...).
    #[arg(long, default_value = "default=http://localhost:2380")]
    pub initial_cluster: String,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, default_value = "new")]
    pub initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// Number of committed transactions to trigger a snapshot to disk.
    #[arg(long, default_value_t = 100_000)]
    pub snapshot_count: u64,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, default_value_t = 1000)]
    pub election_timeout: u64,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, default_value_t = 1536 * 1024)]
    pub max_request_bytes: u64,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, default_value_t = 128)]
    pub max_txn_ops: u32,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to 2 GiB, negative disables).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub quota_backend_bytes: i64,
    /// Interpret 'auto-compaction-retention' one of: periodic|revision.
    #[arg(long, default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// Auto compaction retention for mvcc key value store. 0 means disable auto compaction.
    #[arg(long, default_value = "0")]
    pub auto_compaction_retention: String,
    /// How often revision-mode auto-compaction checks (etcd: fixed at 5 minutes).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration, hide = true)]
    #[serde(skip, default = "five_minutes")]
    pub experimental_compaction_check_interval: std::time::Duration,
    /// How a leader confirms it still leads before a linearizable read: 'lease' (no
    /// message while a quorum acknowledged it within half an election timeout; else as
    /// 'quorum') or 'quorum' (a heartbeat round to a quorum for each read-index round, as
    /// etcd).
    #[arg(long, value_enum, default_value = "lease")]
    pub linearizable_reads: ReadCheck,
    /// Reject reconfiguration requests that would cause quorum loss.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub strict_reconfig_check: bool,
    /// Path to the server configuration file (YAML with etcd's keys).
    #[arg(long)]
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
}

/// See [`ServeConfig::linearizable_reads`] and [`crate::raft::lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadCheck {
    Lease,
    Quorum,
}

impl Default for ServeConfig {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            c: ServeConfig,
        }
        Wrap::parse_from(["raftvm"]).c
    }
}

impl ServeConfig {
    /// Apply `--config-file` if given.
    pub fn resolve(self) -> Result<Self> {
        let Some(path) = self.config_file.clone() else { return Ok(self) };
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut c: ServeConfig =
            serde_yaml_ng::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?;
        c.config_file = Some(path);
        Ok(c)
    }

    /// The effective backend quota in bytes (0 = none), with etcd's default of 2 GiB.
    pub fn quota_bytes(&self) -> u64 {
        match self.quota_backend_bytes {
            0 => 2 * 1024 * 1024 * 1024,
            n if n < 0 => 0,
            n => n as u64,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| PathBuf::from(format!("{}.etcd", self.name)))
    }

    pub fn members(&self) -> Result<BTreeMap<NodeId, Member>> {
        let mut out = BTreeMap::new();
        for part in self.initial_cluster.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((name, url)) = part.split_once('=') else {
                bail!("--initial-cluster: {part:?} is not name=peer-url");
            };
            let id = member_id(name, url, &self.initial_cluster_token);
            let m = Member { name: name.to_string(), peer_url: url.to_string() };
            if out.insert(id, m).is_some() {
                bail!("--initial-cluster: duplicate member {part:?}");
            }
        }
        if out.is_empty() {
            bail!("--initial-cluster is empty");
        }
        Ok(out)
    }

    /// This member's id, as found in `--initial-cluster`.
    pub fn my_id(&self) -> Result<NodeId> {
        let members = self.members()?;
        let mine: Vec<_> = members.iter().filter(|(_, m)| m.name == self.name).collect();
        match mine.as_slice() {
            [(id, m)] => {
                let adv = first_url(&self.initial_advertise_peer_urls)?;
                if m.peer_url != adv {
                    bail!(
                        "--initial-cluster has {}={} but --initial-advertise-peer-urls is {adv}",
                        self.name,
                        m.peer_url
                    );
                }
                Ok(**id)
            }
            [] => bail!("couldn't find local name {:?} in the initial cluster configuration", self.name),
            _ => bail!("name {:?} appears more than once in --initial-cluster", self.name),
        }
    }

    pub fn cluster_id(&self) -> Result<u64> {
        let mut h = Sha256::new();
        for (id, _) in self.members()? {
            h.update(id.to_be_bytes());
        }
        h.update(self.initial_cluster_token.as_bytes());
        Ok(u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes")))
    }
}

fn five_minutes() -> std::time::Duration {
    std::time::Duration::from_secs(300)
}

/// A member id from its name, peer URL and the cluster token (never 0).
pub fn member_id(name: &str, peer_url: &str, token: &str) -> NodeId {
    let mut h = Sha256::new();
    for part in [name, peer_url, token] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes")).max(1)
}

pub fn first_url(list: &str) -> Result<String> {
    list.split(',').map(str::trim).find(|s| !s.is_empty()).map(str::to_string).context("empty URL list")
}

/// `http://host:port` → a socket address to bind; `localhost` binds 127.0.0.1.
pub fn bind_addr(url: &str) -> Result<std::net::SocketAddr> {
    let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
    match uri.scheme_str() {
        Some("http") | None => {}
        Some(s) => bail!("URL {url:?}: scheme {s:?} is not supported yet (use http)"),
    }
    let host = uri.host().with_context(|| format!("URL {url:?} has no host"))?;
    let port = uri.port_u16().with_context(|| format!("URL {url:?} has no port"))?;
    let host = if host == "localhost" { "127.0.0.1" } else { host.trim_start_matches('[').trim_end_matches(']') };
    let ip: std::net::IpAddr = host.parse().with_context(|| format!("URL {url:?}: host must be an IP address or localhost"))?;
    Ok(std::net::SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_etcd() {
        let c = ServeConfig::default();
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir(), PathBuf::from("default.etcd"));
        assert_eq!(bind_addr(&c.listen_client_urls).unwrap().to_string(), "127.0.0.1:2379");
        assert_eq!(bind_addr(&c.listen_peer_urls).unwrap().to_string(), "127.0.0.1:2380");
        assert_eq!(c.members().unwrap().len(), 1);
        c.my_id().unwrap();
    }

    #[test]
    fn config_file_uses_etcd_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yml");
        std::fs::write(
            &p,
            "name: n2\ndata-dir: /tmp/x\ninitial-cluster: n1=http://127.0.0.1:1,n2=http://127.0.0.1:2\n\
             initial-advertise-peer-urls: http://127.0.0.1:2\nsnapshot-count: 7\n",
        )
        .unwrap();
        let c = ServeConfig { config_file: Some(p), ..ServeConfig::default() }.resolve().unwrap();
        assert_eq!(c.name, "n2");
        assert_eq!(c.snapshot_count, 7);
        assert_eq!(c.members().unwrap().len(), 2);
        let id = c.my_id().unwrap();
        assert_eq!(id, member_id("n2", "http://127.0.0.1:2", "etcd-cluster"));
        assert_eq!(c.heartbeat_interval, 100, "unset keys keep etcd's defaults");
        assert!(c.strict_reconfig_check, "etcd's default");
    }

    /// etcd's boolean flag forms: bare (true), `=false`, `=true`; and the YAML key.
    #[test]
    fn strict_reconfig_check_flag() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            c: ServeConfig,
        }
        let parse = |args: &[&str]| Wrap::parse_from(std::iter::once("raftvm").chain(args.iter().copied())).c;
        assert!(parse(&[]).strict_reconfig_check);
        assert!(parse(&["--strict-reconfig-check"]).strict_reconfig_check);
        assert!(!parse(&["--strict-reconfig-check=false"]).strict_reconfig_check);
        assert!(parse(&["--strict-reconfig-check=true"]).strict_reconfig_check);
        let c: ServeConfig = serde_yaml_ng::from_str("strict-reconfig-check: false\n").unwrap();
        assert!(!c.strict_reconfig_check);
    }

    #[test]
    fn bad_cluster_specs_are_refused() {
        let c = ServeConfig { initial_cluster: "x".into(), ..ServeConfig::default() };
        assert!(c.members().is_err());
        let c = ServeConfig { name: "other".into(), ..ServeConfig::default() };
        assert!(c.my_id().unwrap_err().to_string().contains("couldn't find local name"));
    }
}
