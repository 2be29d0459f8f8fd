use clap::Parser;
use raftvm::cli::{run_client, Cli, Command};
use raftvm::server::Server;

// mimalloc instead of glibc's malloc: the server allocates and frees small buffers on every
// request (h2 frames, prost messages, command and response bytes) from several threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAFTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(cfg) => {
                if cfg.config_file.is_some() {
                    tracing::warn!("--config-file is set: other command-line flags are ignored (as in etcd)");
                }
                let server = Server::start(cfg.resolve()?).await?;
                let removed = tokio::select! {
                    _ = shutdown_signal() => false,
                    _ = server.removed() => true,
                };
                tracing::info!("shutting down");
                server.stop().await?;
                if removed {
                    anyhow::bail!("the member has been permanently removed from the cluster");
                }
                Ok(())
            }
            other => run_client(other).await,
        }
    });
    if let Err(e) = result {
        // Like etcdctl: the message on stderr, a non-zero exit, no backtrace.
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
