//! `bulkhead serve`: the whole front door of one host.
//!
//! Reads the config, starts the workers it asks for ([`plan`]), and serves
//! the API over QUIC/HTTP3 and TLS/TCP (HTTP/1.1 and h2, announcing h3 with
//! `Alt-Svc`), both requiring client certificates of the tenant CAs. SIGTERM
//! or SIGINT drain: listeners stop accepting, in-flight requests finish
//! within the grace period, workers stop with the process.

pub mod plan;

use crate::{
    api::{App, metrics::Metrics},
    dispatch::Dispatcher,
    tls::ServerTls,
    transport::{QuicServer, Shutdown, TcpServer, TransportLimits},
};
use anyhow::Context as _;
use bulkhead_core::config::Config;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

/// How to run `serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The host config.
    pub config: PathBuf,
    /// Where the workers' sockets go (created 0700).
    pub runtime_dir: PathBuf,
}

/// The addresses a running front door listens on.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// QUIC (HTTP/3).
    pub quic: SocketAddr,
    /// TLS/TCP (HTTP/1.1, h2).
    pub tcp: SocketAddr,
}

/// Serves until SIGTERM or SIGINT.
pub async fn run(opts: ServeOptions) -> anyhow::Result<()> {
    let config = Config::from_path(&opts.config)
        .with_context(|| format!("config {}", opts.config.display()))?;
    let tls = ServerTls::from_paths(&config.tls)?;
    prepare_runtime_dir(&opts.runtime_dir)?;
    let specs = plan::plan_workers(
        &config,
        &opts.runtime_dir,
        bulkhead_kernels::cuda::available(),
    );
    let dispatcher = Dispatcher::start(
        config.scheduler.into(),
        &plan::tenant_slots(&config),
        specs,
        Duration::from_millis(500),
    );
    if !dispatcher.wait_ready(Duration::from_mins(2)).await {
        tracing::warn!("not every worker is up after 2 minutes; serving with those that are");
    }
    let limits = TransportLimits::default();
    let domain = config.trust_domain.clone();
    let (quic_addr, tcp_addr) = (config.listeners.quic, config.listeners.tcp);
    let app = Arc::new(App::new(config, dispatcher, Arc::new(Metrics::default()))?);
    let quic = QuicServer::bind(quic_addr, tls.quic.clone(), domain.clone(), limits)?;
    let quic_port = quic.local_addr()?.port();
    let tcp = TcpServer::bind(tcp_addr, tls.tcp.clone(), domain, limits)
        .await
        .with_context(|| format!("listening on {tcp_addr}"))?
        .with_alt_svc(quic_port);
    let bound = Bound {
        quic: quic.local_addr()?,
        tcp: tcp.local_addr()?,
    };
    tracing::info!(
        "serving HTTP/3 on udp {} and HTTP/1.1 + h2 on tcp {}",
        bound.quic,
        bound.tcp
    );
    // A machine-readable line for scripts and tests that bind port 0.
    #[expect(
        clippy::print_stdout,
        reason = "the bound addresses, for whoever started us"
    )]
    {
        println!("listening quic={} tcp={}", bound.quic, bound.tcp);
    }
    let shutdown = Shutdown::new();
    let quic_task = tokio::spawn(quic.serve(app.clone(), shutdown.signal()));
    let tcp_task = tokio::spawn(tcp.serve(app, shutdown.signal()));
    wait_for_stop_signal().await?;
    tracing::info!("draining: no new connections; in-flight requests may finish");
    shutdown.trigger();
    let _ = tokio::join!(quic_task, tcp_task);
    Ok(())
}

fn prepare_runtime_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to its owner", dir.display()))?;
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
