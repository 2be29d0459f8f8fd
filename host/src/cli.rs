//! The `raftvm` command line: `serve`, and client commands that talk to a cluster's admin
//! API with etcdctl-style `--endpoints`.

use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use crate::config::ServeConfig;
use crate::proto::admin::admin_client::AdminClient;
use crate::proto::admin::*;
use crate::proto::etcdserverpb::maintenance_client::MaintenanceClient;

#[derive(Parser)]
#[command(name = "raftvm", version, about = "A Raft cluster of WebAssembly state machines, speaking etcd's v3 API")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a cluster member (etcd's flags).
    Serve(ServeConfig),
    /// Install, list and remove state-machine modules.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Apply a command through a machine (replicated); prints the machine's response.
    Call {
        machine: String,
        /// The command's bytes: any bytes the shell can pass (`$'\xff'`), not only UTF-8.
        #[arg(value_parser = clap::value_parser!(std::ffi::OsString))]
        payload: std::ffi::OsString,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run a read-only query on a machine (linearizable unless --serializable).
    Query {
        machine: String,
        /// The request's bytes, as for `call`.
        #[arg(value_parser = clap::value_parser!(std::ffi::OsString))]
        payload: std::ffi::OsString,
        #[arg(long)]
        serializable: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print each endpoint's state hashes, to compare replicas.
    Hash {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print each endpoint's Raft status.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Save a member's state to a file, check a saved file, or restore one into a new
    /// cluster member's data dir (etcdctl's `snapshot` commands).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Load-generate against any etcd v3 endpoint (etcd or raftvm) and report throughput
    /// and latency percentiles.
    Bench(crate::bench::BenchArgs),
}

#[derive(Subcommand)]
pub enum ModuleCommand {
    /// Validate and install (or upgrade) a module under NAME.
    Install {
        name: String,
        file: PathBuf,
        /// Per-command fuel budget (default 500M).
        #[arg(long, default_value_t = 0)]
        fuel: u64,
        /// Linear-memory cap in MiB (default 128).
        #[arg(long, default_value_t = 0)]
        memory_mb: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List installed modules.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a module and all of its state.
    Remove {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Stream the state of the one member named by --endpoints into FILE (etcd's
    /// Maintenance.Snapshot, as `etcdctl snapshot save` does).
    Save {
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check FILE's integrity hash and print what it holds.
    Status {
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make a new member's data dir from FILE. Restore every member of the new cluster
    /// from the same file, then start each with the same flags.
    Restore {
        file: PathBuf,
        /// Path to the data directory (default: ${name}.etcd).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Human-readable name for this member.
        #[arg(long, default_value = "default")]
        name: String,
        /// Initial cluster configuration for restore bootstrap.
        #[arg(long, default_value = "default=http://localhost:2380")]
        initial_cluster: String,
        /// Initial cluster token for the cluster during restore bootstrap.
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
        /// List of this member's peer URLs to advertise to the rest of the cluster.
        #[arg(long, default_value = "http://localhost:2380")]
        initial_advertise_peer_urls: String,
        /// Ignore the integrity hash (to restore a bare archive, such as a Raft snapshot's
        /// `snapshot/<id>.data` copied from a data dir).
        #[arg(long)]
        skip_hash_check: bool,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum WriteOut {
    Simple,
    Json,
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// gRPC endpoints (comma separated).
    #[arg(long, default_value = "127.0.0.1:2379", global = true)]
    pub endpoints: String,
    /// Timeout for short running command (excluding dial timeout) [default: 5s; 5m for
    /// `module install`, which compiles the module first]
    #[arg(long, value_parser = humantime::parse_duration, global = true)]
    pub command_timeout: Option<Duration>,
    /// Dial timeout for client connections.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub dial_timeout: Duration,
    /// Output format: simple or json.
    #[arg(short = 'w', long, value_enum, default_value = "simple", global = true)]
    pub write_out: WriteOut,
}

/// A comma-separated `--endpoints` list as URLs (`http://` added when no scheme is given).
pub fn endpoint_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|e| if e.contains("://") { e.to_string() } else { format!("http://{e}") })
        .collect()
}

/// `--command-timeout` when not given (etcdctl's).
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// `--command-timeout` of `module install` when not given: the receiving member compiles
/// the module before it proposes it, and a large one (a JavaScript guest carries its
/// engine, ~12 MB) takes seconds to minutes.
const INSTALL_COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

impl ClientArgs {
    fn command_timeout(&self) -> Duration {
        self.command_timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT)
    }

    fn endpoints(&self) -> Vec<String> {
        endpoint_urls(&self.endpoints)
    }

    async fn connect_to(&self, ep: &str) -> Result<AdminClient<Channel>> {
        let ch = Endpoint::from_shared(ep.to_string())?
            .connect_timeout(self.dial_timeout)
            .timeout(self.command_timeout())
            .connect()
            .await
            .with_context(|| format!("connecting to {ep}"))?;
        Ok(AdminClient::new(ch).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX))
    }

    /// The first endpoint that accepts a connection.
    async fn connect(&self) -> Result<AdminClient<Channel>> {
        let mut last = anyhow!("no endpoints given");
        for ep in self.endpoints() {
            match self.connect_to(&ep).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}", s.message())
}

pub async fn run_client(cmd: Command) -> Result<()> {
    match cmd {
        Command::Serve(_) => unreachable!("handled by main"),
        Command::Snapshot(cmd) => run_snapshot(cmd).await?,
        Command::Bench(args) => crate::bench::run(args).await?,
        Command::Module(ModuleCommand::Install { name, file, fuel, memory_mb, mut client }) => {
            client.command_timeout = client.command_timeout.or(Some(INSTALL_COMMAND_TIMEOUT));
            let wasm = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let r = client
                .connect()
                .await?
                .install_module(InstallModuleRequest { name: name.clone(), wasm, fuel, memory_bytes: memory_mb * 1024 * 1024 })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("installed {name} sha256={}", r.sha256);
        }
        Command::Module(ModuleCommand::List { client }) => {
            let r = client.connect().await?.list_modules(ListModulesRequest { serializable: false }).await.map_err(status_err)?;
            let modules = r.into_inner().modules;
            if client.write_out == WriteOut::Json {
                let v: Vec<_> = modules
                    .iter()
                    .map(|m| json!({"name": m.name, "sha256": m.sha256, "size": m.size, "fuel": m.fuel,
                                    "memory_bytes": m.memory_bytes, "installed_index": m.installed_index}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for m in modules {
                    println!("{}\t{}\t{}", m.name, m.sha256, m.size);
                }
            }
        }
        Command::Module(ModuleCommand::Remove { name, client }) => {
            client.connect().await?.remove_module(RemoveModuleRequest { name: name.clone() }).await.map_err(status_err)?;
            println!("removed {name}");
        }
        Command::Call { machine, payload, client } => {
            let r = client
                .connect()
                .await?
                .call(CallRequest { machine, payload: payload.into_vec() })
                .await
                .map_err(status_err)?;
            println!("{}", String::from_utf8_lossy(&r.into_inner().output));
        }
        Command::Query { machine, payload, serializable, client } => {
            let r = client
                .connect()
                .await?
                .query(QueryRequest { machine, payload: payload.into_vec(), serializable })
                .await
                .map_err(status_err)?;
            println!("{}", String::from_utf8_lossy(&r.into_inner().output));
        }
        Command::Hash { client } => {
            let mut rows = Vec::new();
            let mut failed = false;
            for ep in client.endpoints() {
                let r = async { client.connect_to(&ep).await?.hash(HashRequest {}).await.map_err(status_err) }.await;
                match r {
                    Ok(h) => {
                        let h = h.into_inner();
                        let machines: std::collections::BTreeMap<_, _> = h.machines.into_iter().collect();
                        rows.push(json!({"endpoint": ep, "applied_index": h.applied_index,
                                         "store_hash": h.store_hash, "machines": machines}));
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("{ep}: {e:#}");
                    }
                }
            }
            print_rows(&client, &rows, &["endpoint", "applied_index", "store_hash"])?;
            if failed {
                bail!("some endpoints failed");
            }
        }
        Command::Status { client } => {
            let mut rows = Vec::new();
            let mut failed = false;
            for ep in client.endpoints() {
                let r = async { client.connect_to(&ep).await?.status(StatusRequest {}).await.map_err(status_err) }.await;
                match r {
                    Ok(s) => {
                        let s = s.into_inner();
                        let leader = if s.leader_id == 0 { String::new() } else { format!("{:x}", s.leader_id) };
                        rows.push(json!({"endpoint": ep, "member_id": format!("{:x}", s.member_id), "name": s.name,
                            "leader_id": leader, "is_leader": s.leader_id == s.member_id, "term": s.term,
                            "last_log_index": s.last_log_index, "applied_index": s.applied_index,
                            "cluster_id": format!("{:x}", s.cluster_id), "lease_reads": s.lease_reads,
                            "read_index_rounds": s.read_index_rounds}));
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("{ep}: {e:#}");
                    }
                }
            }
            print_rows(&client, &rows, &["endpoint", "member_id", "name", "is_leader", "term", "applied_index"])?;
            if failed {
                bail!("some endpoints failed");
            }
        }
    }
    Ok(())
}

async fn run_snapshot(cmd: SnapshotCommand) -> Result<()> {
    use crate::storage::backup;
    match cmd {
        SnapshotCommand::Save { file, client } => {
            let eps = client.endpoints();
            let [ep] = eps.as_slice() else {
                bail!("snapshot must be requested to one selected node, not multiple {eps:?}");
            };
            // No command timeout: a big state takes as long as it takes to stream.
            let ch = Endpoint::from_shared(ep.clone())?
                .connect_timeout(client.dial_timeout)
                .connect()
                .await
                .with_context(|| format!("connecting to {ep}"))?;
            let mut stream = MaintenanceClient::new(ch)
                .max_decoding_message_size(usize::MAX)
                .snapshot(crate::proto::etcdserverpb::SnapshotRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            let mut part = file.clone().into_os_string();
            part.push(".part");
            let part = PathBuf::from(part);
            let result = async {
                let mut out = std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
                while let Some(msg) = stream.message().await.map_err(status_err)? {
                    std::io::Write::write_all(&mut out, &msg.blob)?;
                }
                out.sync_all()?;
                drop(out);
                backup::verify(&mut std::fs::File::open(&part)?, false)?;
                std::fs::rename(&part, &file)?;
                Ok::<_, anyhow::Error>(())
            }
            .await;
            if result.is_err() {
                let _ = std::fs::remove_file(&part);
            }
            result?;
            println!("Snapshot saved at {}", file.display());
        }
        SnapshotCommand::Status { file, client } => {
            let info = tokio::task::spawn_blocking(move || backup::status(&file)).await??;
            if client.write_out == WriteOut::Json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                let modules: Vec<String> = info.modules.iter().map(|(n, sha)| format!("{n}={}", &sha[..12.min(sha.len())])).collect();
                println!("sha256, applied index, total keys, total size, modules");
                println!("{}, {}, {}, {}, {}", info.sha256, info.applied_index, info.total_keys, info.total_size, modules.join(" "));
            }
        }
        SnapshotCommand::Restore {
            file,
            data_dir,
            name,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            skip_hash_check,
        } => {
            let cfg = ServeConfig {
                name,
                data_dir,
                initial_cluster,
                initial_cluster_token,
                initial_advertise_peer_urls,
                ..ServeConfig::default()
            };
            let r = tokio::task::spawn_blocking(move || backup::restore(&file, &cfg, skip_hash_check)).await??;
            println!(
                "restored member {:x} at applied index {} into {}",
                r.member_id,
                r.applied_index,
                r.data_dir.display()
            );
        }
    }
    Ok(())
}

fn print_rows(client: &ClientArgs, rows: &[serde_json::Value], cols: &[&str]) -> Result<()> {
    if client.write_out == WriteOut::Json {
        println!("{}", serde_json::to_string(rows)?);
    } else {
        for r in rows {
            let line: Vec<String> = cols
                .iter()
                .map(|c| match &r[*c] {
                    serde_json::Value::String(s) => s.clone(),
                    v => v.to_string(),
                })
                .collect();
            println!("{}", line.join(", "));
        }
    }
    Ok(())
}
