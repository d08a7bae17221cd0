//! `bulkhead serve`: the whole front door of one host.
//!
//! Reads the config, starts the workers it asks for ([`plan`]), and serves
//! the API over QUIC/HTTP3 and TLS/TCP (HTTP/1.1 and h2, announcing h3 with
//! `Alt-Svc`), both requiring client certificates of the tenant CAs. SIGTERM
//! or SIGINT drain: listeners stop accepting, in-flight requests finish
//! within the grace period, workers stop with the process.
//!
//! With `[ebpf] mode` on, the kernel programs are loaded (or their pins
//! reused) on this process's cgroup, each connection's address is registered
//! under its tenant after the handshake (and followed when a QUIC client's
//! address changes), and `/metrics` reports the kernel's per-tenant packets.

pub mod admin;
pub mod audit;
pub mod busy_poll;
pub mod plan;
pub mod reload;

use crate::{
    api::{App, metrics::Metrics},
    dispatch::Dispatcher,
    ebpf::{DEFAULT_BPFFS, KernelFlows, KernelPlane},
    tls::ServerTls,
    transport::{
        ConnectionIds, FlowRegistry, QuicServer, ResetKey, Shutdown, TcpServer, TenantConnections,
        TransportLimits, quic_lb::LbConfig,
    },
};
use anyhow::Context as _;
use bulkhead_core::config::{Config, EbpfMode};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

/// How to run `serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The host config.
    pub config: PathBuf,
    /// Where the workers' sockets go (created 0700).
    pub runtime_dir: PathBuf,
    /// The kernel programs' instance (their pins under `/sys/fs/bpf/bulkhead/<instance>`).
    pub ebpf_instance: String,
}

/// The proxy runtime's threads when the operator names none: every core
/// but one, which is left to the worker processes, the audit writer and the
/// kernel's network processing; at least one.
///
/// Measured on a 2-core host (`bulkhead bench proxy --proxy-threads 1|2`,
/// docs/benchmarks.md): one thread took less CPU per request, served more
/// requests/s and added less latency than two, with as many handshakes/s.
#[must_use]
pub const fn default_runtime_threads(cores: usize) -> usize {
    if cores > 1 { cores - 1 } else { 1 }
}

/// This machine's cores (as the process may use them); one when unknown.
#[must_use]
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// [`default_runtime_threads`] of this machine's [`cores`].
#[must_use]
pub fn runtime_threads_here() -> usize {
    default_runtime_threads(cores())
}

/// The addresses a running front door listens on.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// QUIC (HTTP/3).
    pub quic: SocketAddr,
    /// TLS/TCP (HTTP/1.1, h2).
    pub tcp: SocketAddr,
}

/// How the QUIC endpoint names its connections: QUIC-LB ids
/// (`[cluster.quic_lb]`) and a lasting reset key (`[listeners]
/// quic_reset_key_file`), each when configured, their keys read; logs this
/// host's place in its fleet on the way.
fn connection_ids(config: &Config) -> anyhow::Result<ConnectionIds> {
    let cluster = &config.cluster;
    if cluster.host_share < 1.0 {
        tracing::info!(
            "tenants' rates, bursts and concurrency caps here are this host's share ({}) \
             of the fleet's ([cluster] host_share)",
            cluster.host_share
        );
    }
    let mut ids = ConnectionIds::default();
    if let Some(settings) = &cluster.quic_lb {
        let lb = LbConfig::load(settings)?;
        tracing::info!("QUIC connection ids carry this host's server id (QUIC-LB): {lb:?}");
        ids.lb = Some(Arc::new(lb));
    }
    if let Some(path) = &config.listeners.quic_reset_key_file {
        ids.reset_key = Some(Arc::new(ResetKey::load(path)?));
    }
    Ok(ids)
}

/// Logs the bound addresses, then prints them on one machine-readable line
/// for scripts and tests that bind port 0.
#[expect(
    clippy::print_stdout,
    reason = "the bound addresses, for whoever started us"
)]
fn announce(bound: &Bound, metrics: Option<SocketAddr>) {
    tracing::info!(
        "serving HTTP/3 on udp {} and HTTP/1.1 + h2 on tcp {}",
        bound.quic,
        bound.tcp
    );
    if let Some(addr) = metrics {
        tracing::info!("serving /metrics and /healthz on tcp {addr}");
    }
    match metrics {
        Some(m) => println!(
            "listening quic={} tcp={} metrics={m}",
            bound.quic, bound.tcp
        ),
        None => println!("listening quic={} tcp={}", bound.quic, bound.tcp),
    }
}

/// The metrics endpoint, bound, and its address, if the config has one.
async fn bind_metrics(
    config: &Config,
) -> anyhow::Result<Option<(admin::MetricsListener, SocketAddr)>> {
    let Some(addr) = config.listeners.metrics else {
        return Ok(None);
    };
    let listener = admin::MetricsListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok(Some((listener, bound)))
}

/// Serves until SIGTERM or SIGINT.
pub async fn run(opts: ServeOptions) -> anyhow::Result<()> {
    let config = Config::from_path(&opts.config)
        .with_context(|| format!("config {}", opts.config.display()))?;
    let tls = ServerTls::from_paths(&config.tls)?;
    let ids = connection_ids(&config)?;
    // Checkpoints (config, weight headers, tokenizer) are checked before any
    // worker starts to load one.
    let texts = crate::api::text::ModelText::load_all(&config)?;
    prepare_runtime_dir(&opts.runtime_dir)?;
    let gpu = bulkhead_kernels::cuda::available();
    let specs = plan::plan_workers(&config, &opts.runtime_dir, gpu);
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
    let plane = start_kernel_plane(&config, &opts.ebpf_instance)?;
    let flows = match &plane {
        Some(plane) => Some(Arc::new(KernelFlows::new(plane.clone(), &config)?)),
        None => None,
    };
    let log = audit::open(&config.audit)?;
    tracing::info!("audit log in {}", config.audit.dir.display());
    let mut app = App::with_texts(
        config.clone(),
        dispatcher,
        Arc::new(Metrics::default()),
        texts,
    )?
    .with_audit(log.hook.clone());
    if let (Some(plane), Some(flows)) = (&plane, &flows) {
        app = app.with_kernel(plane.clone(), flows.clone());
        tokio::spawn(audit::record_kernel_drops(
            plane.clone(),
            flows.clone(),
            log.hook.clone(),
        ));
    }
    let app = Arc::new(app);
    let mut quic =
        QuicServer::bind_with_ids(quic_addr, tls.quic.clone(), domain.clone(), limits, ids)?;
    let quic_port = quic.local_addr()?.port();
    let mut tcp = TcpServer::bind(tcp_addr, tls.tcp.clone(), domain, limits)
        .await
        .with_context(|| format!("listening on {tcp_addr}"))?
        .with_alt_svc(quic_port);
    // One count of connections per tenant across both listeners.
    let connections = TenantConnections::new(limits.max_connections_per_tenant);
    quic = quic.with_connections(connections.clone());
    tcp = tcp.with_connections(connections);
    let refusals: Arc<dyn crate::transport::RefusalSink> = Arc::new(log.hook.clone());
    quic = quic.with_refusals(refusals.clone());
    tcp = tcp.with_refusals(refusals);
    if let Some(flows) = &flows {
        let registry: Arc<dyn FlowRegistry> = flows.clone();
        quic = quic.with_flows(registry.clone());
        tcp = tcp.with_flows(registry);
    }
    let reloader = Arc::new(reload::Reloader::new(
        &opts.config,
        &opts.runtime_dir,
        gpu,
        app.clone(),
        flows,
        (tcp.tls_handle(), quic.tls_handle()),
    ));
    let admin = match &config.listeners.admin {
        Some(endpoint) => Some(admin::AdminListener::bind(endpoint).await?),
        None => None,
    };
    let metrics = bind_metrics(&config).await?;
    let bound = Bound {
        quic: quic.local_addr()?,
        tcp: tcp.local_addr()?,
    };
    announce(&bound, metrics.as_ref().map(|m| m.1));
    let shutdown = Shutdown::new();
    let quic_task = tokio::spawn(quic.serve(app.clone(), shutdown.signal()));
    let tcp_task = tokio::spawn(tcp.serve(app.clone(), shutdown.signal()));
    if let Some((metrics, _)) = metrics {
        tokio::spawn(metrics.serve(app.clone(), shutdown.signal()));
    }
    if let Some(admin) = admin {
        tokio::spawn(admin.serve(app, reloader.clone(), shutdown.signal()));
    }
    wait_for_stop_signal(&reloader).await?;
    tracing::info!("draining: no new connections; in-flight requests may finish");
    shutdown.trigger();
    let _ = tokio::join!(quic_task, tcp_task);
    log.close().await
}

/// Kernel enforcement as `[ebpf] mode` says, attached to this process's own
/// cgroup (the listeners' sockets live here): `None` when off, or when
/// `auto` could not load (it warns).
fn start_kernel_plane(
    config: &Config,
    instance: &str,
) -> anyhow::Result<Option<Arc<Mutex<KernelPlane>>>> {
    if config.ebpf.mode == EbpfMode::Off {
        return KernelPlane::start(
            EbpfMode::Off,
            config,
            Path::new("/"),
            instance,
            Path::new(DEFAULT_BPFFS),
        )
        .map(|_| None)
        .map_err(Into::into);
    }
    let cgroup = own_cgroup().context("finding this process's cgroup")?;
    if is_root_cgroup(&cgroup) && in_initial_cgroup_namespace() {
        // Programs on the root cgroup would police every process of the host.
        let why = "bulkhead serve runs in the root cgroup; run it in a cgroup of its own \
                   (a systemd unit or a pod) for kernel enforcement";
        if config.ebpf.mode == EbpfMode::Required {
            anyhow::bail!("[ebpf] mode = \"required\": {why}");
        }
        tracing::warn!("kernel enforcement is OFF: {why} (ebpf.mode = \"auto\")");
        return Ok(None);
    }
    if !holds_this_process(&cgroup) {
        // E.g. a container with its own cgroup namespace but the host's
        // hierarchy mounted: the path is not where this process lives.
        let why = format!(
            "{} does not list this process in cgroup.procs; refusing to attach the programs \
             to a cgroup other than serve's own",
            cgroup.display()
        );
        if config.ebpf.mode == EbpfMode::Required {
            anyhow::bail!("[ebpf] mode = \"required\": {why}");
        }
        tracing::warn!("kernel enforcement is OFF: {why} (ebpf.mode = \"auto\")");
        return Ok(None);
    }
    let plane = KernelPlane::start(
        config.ebpf.mode,
        config,
        &cgroup,
        instance,
        Path::new(DEFAULT_BPFFS),
    )?;
    Ok(plane.map(|p| Arc::new(Mutex::new(p))))
}

/// This process's cgroup v2 directory, from `/proc/self/cgroup` (`0::<path>`).
fn own_cgroup() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 entry (`0::`) in /proc/self/cgroup")?;
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|r| r.join("cgroup.controllers").exists())
        .context("no cgroup v2 hierarchy mounted at /sys/fs/cgroup")?;
    Ok(root.join(path.trim_start_matches('/')))
}

/// The inode of the kernel's initial cgroup namespace (`PROC_CGROUP_INIT_INO`).
const INITIAL_CGROUP_NAMESPACE: &str = "cgroup:[4026531835]";

/// Whether this process is in the host's cgroup namespace. In a container's
/// own namespace (a Kubernetes pod) the hierarchy's root seen from inside is
/// the container's cgroup, not the host's. Unknown counts as the host's.
fn in_initial_cgroup_namespace() -> bool {
    std::fs::read_link("/proc/self/ns/cgroup")
        .map_or(true, |link| link.as_os_str() == INITIAL_CGROUP_NAMESPACE)
}

/// Whether `cgroup`'s `cgroup.procs` lists this process.
fn holds_this_process(cgroup: &Path) -> bool {
    let me = std::process::id().to_string();
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .is_ok_and(|procs| procs.lines().any(|p| p.trim() == me))
}

/// Whether `cgroup` is the root of the cgroup v2 hierarchy (the mount point itself).
fn is_root_cgroup(cgroup: &Path) -> bool {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .any(|root| cgroup == Path::new(root))
}

fn prepare_runtime_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to its owner", dir.display()))?;
    Ok(())
}

/// Waits for SIGTERM or SIGINT, reloading the config on each SIGHUP meanwhile.
async fn wait_for_stop_signal(reloader: &Arc<reload::Reloader>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                let reloader = reloader.clone();
                let _ = tokio::task::spawn_blocking(move || reloader.reload_logged()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_s_cgroup_namespace_and_own_cgroup_are_read() {
        // Whatever the namespace, the answer is a plain read of /proc.
        let link = std::fs::read_link("/proc/self/ns/cgroup").unwrap();
        assert_eq!(
            in_initial_cgroup_namespace(),
            link.as_os_str() == INITIAL_CGROUP_NAMESPACE
        );
        let own = own_cgroup().unwrap();
        assert!(holds_this_process(&own), "{}", own.display());
        assert!(!holds_this_process(Path::new("/nonexistent")));
    }

    #[test]
    fn the_default_runtime_leaves_one_core_to_the_workers_and_has_at_least_one_thread() {
        assert_eq!(default_runtime_threads(0), 1);
        assert_eq!(default_runtime_threads(1), 1);
        assert_eq!(default_runtime_threads(2), 1);
        assert_eq!(default_runtime_threads(16), 15);
        assert!(runtime_threads_here() >= 1);
    }

    #[test]
    fn the_root_cgroup_is_recognised_with_or_without_a_trailing_slash() {
        assert!(is_root_cgroup(&Path::new("/sys/fs/cgroup").join("")));
        assert!(is_root_cgroup(Path::new("/sys/fs/cgroup/unified/")));
        assert!(!is_root_cgroup(Path::new(
            "/sys/fs/cgroup/system.slice/bulkhead.service"
        )));
    }
}
