//! The `bulkhead` command.

use anyhow::Context as _;
use bulkhead::ebpf::{self, KernelPlane, Origin, PlaneStatus};
use bulkhead::serve::{self, ServeOptions};
use bulkhead::simulate::{self, SimulateOptions};
use bulkhead::worker::{self, BackendChoice, WorkerOptions};
use bulkhead_core::config::Config;
use bulkhead_kernels::engine::EngineConfig;
use clap::{Parser, Subcommand};
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// bulkhead: serve LLMs to many tenants on one GPU host, isolated at every layer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole product on its built-in defaults: a development PKI for three
    /// tenants, `serve` with a CPU worker (and the eBPF programs, as root), a
    /// short mixed load over HTTP/3, then a per-tenant table and the audit
    /// log verified.
    Demo {
        /// Where the PKI, config, audit log and sockets go.
        #[arg(long, default_value = "bulkhead-demo")]
        state_dir: PathBuf,
        /// Seconds of load.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Run the seeded fairness simulation of the scheduler and print its table.
    Simulate {
        /// Seed of the simulated arrivals.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print per-tenant lines for every scenario and policy.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Kernel enforcement: load, inspect or unload the eBPF programs (as root).
    #[command(subcommand)]
    Ebpf(EbpfCommand),
    /// Serve the API over HTTP/3 and TLS/TCP with mutual TLS, starting the
    /// workers the config names.
    Serve {
        /// The host config.
        #[arg(long)]
        config: PathBuf,
        /// Directory for the workers' sockets.
        #[arg(long, default_value = "/run/bulkhead")]
        runtime_dir: PathBuf,
        /// The kernel programs' instance name (pins under /sys/fs/bpf/bulkhead/<name>).
        #[arg(long, default_value = bulkhead::ebpf::DEFAULT_INSTANCE)]
        ebpf_instance: String,
        /// Threads of the proxy's async runtime (default: every core but
        /// one, at least one; the one left is the workers'). See
        /// docs/benchmarks.md, "bench proxy".
        #[arg(long)]
        runtime_threads: Option<std::num::NonZeroUsize>,
        /// Busy polling: after a request or a worker's message, the
        /// runtime's threads keep polling their sockets up to this many
        /// microseconds before they sleep, adaptively (the window grows
        /// while activity comes within it, halves when none comes within
        /// the limit), so it polls only while activity is that dense; 0:
        /// off. Saves a sleeping thread's wake-up on each hand-off, at the
        /// price of the CPU it polls with. See docs/benchmarks.md.
        #[arg(
            long,
            default_value_t = bulkhead::serve::busy_poll::DEFAULT_LIMIT_US,
            value_parser = clap::value_parser!(u64).range(0..=bulkhead::serve::busy_poll::MAX_LIMIT_US)
        )]
        busy_poll_us: u64,
    },
    /// Reload the tenants and TLS files of a running `serve` through its
    /// admin endpoint (as SIGHUP does), and print what changed or why not.
    Reload {
        /// The running host's config: its `[listeners] admin` is asked.
        #[arg(long, required_unless_present = "admin")]
        config: Option<PathBuf>,
        /// The admin endpoint instead: a unix socket path or a loopback address.
        #[arg(long)]
        admin: Option<String>,
    },
    /// The tenants a running `serve` serves now, from its admin endpoint:
    /// weights, isolation, limits, models and the KV blocks each holds.
    Tenants {
        /// The running host's config: its `[listeners] admin` is asked.
        #[arg(long, required_unless_present = "admin")]
        config: Option<PathBuf>,
        /// The admin endpoint instead: a unix socket path or a loopback address.
        #[arg(long)]
        admin: Option<String>,
        /// Print the admin endpoint's JSON (`/tenants` and `/workers`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a worker: the engine (KV pool, batching, kernels) behind a unix socket.
    Worker(WorkerArgs),
    /// Write a development PKI: server and tenant CAs, a server certificate
    /// for localhost, one client certificate per tenant.
    Certs(CertsArgs),
    /// Measure the performance and fairness goals, against baselines
    /// measured in the same run, and print a table.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The audit log: keys, verify, query, report, live tail.
    #[command(subcommand)]
    Audit(bulkhead::audit::cli::AuditCommand),
    /// Per-host deployment: the Kubernetes network policies of the tenants.
    #[command(subcommand)]
    Deploy(bulkhead::deploy::DeployCommand),
    /// MIG partition plans for the tenants' isolation needs (H100 80GB).
    #[command(subcommand)]
    Mig(bulkhead::deploy::MigCommand),
}

/// `bulkhead bench` subcommands.
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// A light tenant's time to first token beside a saturating tenant:
    /// alone, under the fair queue, and under FIFO.
    Fairness {
        /// Seconds of arrivals in each of the three runs.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Seed of the arrivals.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// The proxy as the bottleneck: requests/s over one HTTP/3 connection,
    /// added latency against a direct worker call, mTLS handshakes/s.
    Proxy {
        /// Seconds of measurement in all.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Threads of the proxy's runtime (as `serve --runtime-threads`;
        /// default: as `serve`'s).
        #[arg(long)]
        proxy_threads: Option<std::num::NonZeroUsize>,
        /// The proxy's busy-poll limit (as `serve --busy-poll-us`, and its
        /// default); the latency part also measures rounds without.
        #[arg(
            long,
            default_value_t = bulkhead::serve::busy_poll::DEFAULT_LIMIT_US,
            value_parser = clap::value_parser!(u64).range(0..=bulkhead::serve::busy_poll::MAX_LIMIT_US)
        )]
        busy_poll_us: u64,
    },
    /// An open-loop load generator over HTTP/3 with mTLS: per-tenant rates,
    /// bursts and lengths; percentiles, throughput, fairness, JSON, chart.
    Load(Box<bulkhead::bench::load::LoadArgs>),
    /// The seed's table: A at 10 req/s beside B bursting at 200 req/s under
    /// FIFO, rate limits, fair queues and dedicated workers (70B on an H100, `sim`).
    Seed(bulkhead::bench::seed::SeedArgs),
}

/// `bulkhead certs` options.
#[derive(Debug, clap::Args)]
struct CertsArgs {
    /// Directory to write into (created 0700 if missing).
    #[arg(long)]
    out: PathBuf,
    /// SPIFFE trust domain of the tenants' ids (the config's `trust_domain`).
    #[arg(long)]
    trust_domain: String,
    /// Tenants to issue client certificates for, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    tenants: Vec<String>,
    /// Replace files already in the directory.
    #[arg(long)]
    force: bool,
}

/// `bulkhead worker` options.
#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// Compute backend.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendChoice,
    /// Unix socket to listen on (created 0600; a stale one is replaced).
    #[arg(long)]
    listen: PathBuf,
    /// GPU index for `--backend cuda`.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Tenants this worker serves, comma-separated (default: any the proxy sends).
    #[arg(long, value_delimiter = ',')]
    tenants: Option<Vec<String>>,
    /// KV cache blocks (16 tokens each).
    #[arg(long, default_value_t = 2048)]
    blocks: usize,
    /// Batch slots (sequences running at once).
    #[arg(long, default_value_t = 32)]
    slots: usize,
    /// Most tokens in one step: decodes plus prompt chunks. A request that
    /// arrives mid-step waits for the step's end, so this bounds time to
    /// first token; larger steps use the device better.
    #[arg(long, default_value_t = EngineConfig::default().max_step_tokens)]
    step_tokens: usize,
    /// Most prompt tokens per step of the tenants at or over their equal
    /// share of the slots while a tenant under its share is running: what a
    /// busy tenant's prompts can add to a quiet tenant's time to first token.
    /// `--step-tokens` or more for no cap.
    #[arg(long, default_value_t = EngineConfig::default().over_share_prompt_tokens)]
    over_share_prompt_tokens: usize,
    /// Seed of the built-in model's weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Cost-model calibration file for `--backend sim` (TOML).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// The id the proxy gave this worker (echoed in its Hello).
    #[arg(long, default_value_t = 0)]
    worker_id: u32,
    /// For `--backend sim`: return at once instead of sleeping each step's modelled time.
    #[arg(long)]
    sim_fast: bool,
    /// Another name requests may use for the model (the config's model name).
    #[arg(long = "model-name")]
    model_names: Vec<String>,
    /// Serve the Llama-family checkpoint in this directory (`config.json`,
    /// `model.safetensors` or its shards) instead of the built-in model.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Lower the checkpoint's context to this many tokens.
    #[arg(long)]
    max_context: Option<usize>,
    /// Exit when this process (the `serve` that started us) exits, however it ends.
    #[arg(long)]
    parent_pid: Option<i32>,
}

/// Where an instance's pins live.
#[derive(Debug, clap::Args)]
struct PinArgs {
    /// Name of the instance: its pins are `<bpffs>/bulkhead/<instance>/`.
    #[arg(long, default_value = ebpf::DEFAULT_INSTANCE)]
    instance: String,
    /// Mount point of the BPF filesystem.
    #[arg(long, default_value = ebpf::DEFAULT_BPFFS)]
    bpffs: PathBuf,
}

#[derive(Debug, Subcommand)]
enum EbpfCommand {
    /// Load and attach the programs to a cgroup and pin them (or reuse the
    /// pins of an earlier load), then write the config's kernel limits.
    Load {
        /// The host config: tenants' `kernel` limits and `[ebpf]` settings.
        #[arg(long)]
        config: PathBuf,
        /// The cgroup (v2 directory) whose sockets are enforced: the proxy's.
        #[arg(long)]
        cgroup: PathBuf,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Detach the programs and remove every pin of the instance.
    Unload {
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Print the links and each tenant's counters from the pinned maps.
    Status {
        /// The host config, to name tenants by id instead of index.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        pins: PinArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let output = match cli.command {
        Command::Simulate { seed, verbose } => Ok(simulate::run(SimulateOptions { seed, verbose })),
        Command::Demo { state_dir, seconds } => {
            bulkhead::demo::run(&bulkhead::demo::DemoOptions { state_dir, seconds })
        }
        Command::Ebpf(command) => run_ebpf(command),
        Command::Serve {
            config,
            runtime_dir,
            ebpf_instance,
            runtime_threads,
            busy_poll_us,
        } => run_serve(
            ServeOptions {
                config,
                runtime_dir,
                ebpf_instance,
            },
            runtime_threads,
            Duration::from_micros(busy_poll_us),
        ),
        Command::Reload { config, admin } => run_reload(config.as_deref(), admin.as_deref()),
        Command::Tenants {
            config,
            admin,
            json,
        } => run_tenants(config.as_deref(), admin.as_deref(), json),
        Command::Worker(args) => run_worker(args),
        Command::Certs(args) => run_certs(&args),
        Command::Bench(command) => run_bench(&command),
        Command::Audit(command) => bulkhead::audit::cli::run(command),
        Command::Deploy(command) => bulkhead::deploy::run_deploy(&command),
        Command::Mig(command) => bulkhead::deploy::run_mig(&command),
    };
    match output {
        Ok(text) => {
            #[expect(clippy::print_stdout, reason = "the command's output")]
            {
                print!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bulkhead: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes a development PKI and says what went where.
fn run_certs(args: &CertsArgs) -> anyhow::Result<String> {
    use bulkhead::certs;
    let domain = bulkhead_core::identity::TrustDomain::new(&args.trust_domain)
        .with_context(|| format!("--trust-domain `{}`", args.trust_domain))?;
    let tenants = args
        .tenants
        .iter()
        .map(|n| {
            bulkhead_core::TenantId::new(n.trim())
                .with_context(|| format!("--tenants: `{n}` is not a tenant id"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pki = certs::generate(&domain, &tenants)?;
    let written = pki.write_to(&args.out, args.force)?;
    let dir = args.out.display();
    let mut out = format!("wrote {} files to {dir}\n", written.len());
    let _ = writeln!(
        out,
        "  server: tls.cert = \"{dir}/{}\", tls.key = \"{dir}/{}\" (for {})",
        certs::SERVER_CERT_FILE,
        certs::SERVER_KEY_FILE,
        certs::SERVER_NAMES.join(", ")
    );
    let _ = writeln!(
        out,
        "  tls.client_ca = [\"{dir}/{}\"]",
        certs::TENANT_CA_FILE
    );
    let _ = writeln!(out, "  clients trust {dir}/{}", certs::SERVER_CA_FILE);
    for tenant in &tenants {
        let _ = writeln!(
            out,
            "  {tenant}: {dir}/{} + {dir}/{} ({})",
            certs::client_cert_file(tenant),
            certs::client_key_file(tenant),
            certs::spiffe_id(&domain, tenant)
        );
    }
    let _ = writeln!(
        out,
        "  untrusted (for refusal tests): {dir}/{} + {dir}/{}, issued by {dir}/{}",
        certs::UNTRUSTED_CLIENT_CERT_FILE,
        certs::UNTRUSTED_CLIENT_KEY_FILE,
        certs::UNTRUSTED_CA_FILE
    );
    Ok(out)
}

/// Runs the front door until SIGTERM or SIGINT.
fn run_serve(
    opts: ServeOptions,
    threads: Option<std::num::NonZeroUsize>,
    busy_poll: Duration,
) -> anyhow::Result<String> {
    let threads = threads.map_or_else(serve::runtime_threads_here, std::num::NonZero::get);
    let poll = serve::busy_poll::process();
    poll.set_limit(busy_poll);
    let runtime = serve::busy_poll::runtime(threads, poll).context("starting the async runtime")?;
    runtime.block_on(serve::run(opts))?;
    Ok(String::new())
}

/// Asks a running `serve` to reload; returns its report.
fn run_reload(config: Option<&Path>, admin: Option<&str>) -> anyhow::Result<String> {
    let endpoint = admin_endpoint(config, admin, "send the process SIGHUP instead")?;
    let body = current_thread()?.block_on(serve::admin::request_reload(&endpoint))?;
    Ok(format!("{body}\n"))
}

/// Asks a running `serve` which tenants it serves.
fn run_tenants(config: Option<&Path>, admin: Option<&str>, json: bool) -> anyhow::Result<String> {
    let endpoint = admin_endpoint(config, admin, "add one to ask a running serve")?;
    current_thread()?.block_on(serve::admin::tenants_report(&endpoint, json))
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The admin endpoint `--admin` names, else the one `--config` has (`hint`
/// says what to do when it has none).
fn admin_endpoint(
    config: Option<&Path>,
    admin: Option<&str>,
    hint: &str,
) -> anyhow::Result<bulkhead_core::config::AdminEndpoint> {
    use bulkhead_core::config::AdminEndpoint;
    Ok(match (admin, config) {
        (Some(a), _) => match a.parse() {
            Ok(addr) => AdminEndpoint::Tcp(addr),
            Err(_) if a.starts_with('/') => AdminEndpoint::Unix(a.into()),
            Err(_) => anyhow::bail!(
                "--admin {a:?}: give a socket address such as 127.0.0.1:9090 or an absolute unix socket path"
            ),
        },
        (None, Some(path)) => Config::from_path(path)
            .with_context(|| format!("config {}", path.display()))?
            .listeners
            .admin
            .with_context(|| {
                format!(
                    "{} has no [listeners] admin endpoint; {hint}",
                    path.display()
                )
            })?,
        (None, None) => anyhow::bail!("give --config or --admin"),
    })
}

/// Runs a bench and returns its table.
fn run_bench(command: &BenchCommand) -> anyhow::Result<String> {
    use bulkhead::bench;
    match *command {
        BenchCommand::Fairness { seconds, seed } => {
            bench::fairness::run(&bench::fairness::FairnessOptions {
                seconds,
                seed,
                program: None,
            })
        }
        BenchCommand::Proxy {
            seconds,
            proxy_threads,
            busy_poll_us,
        } => bench::proxy::run(&bench::proxy::ProxyOptions {
            seconds,
            program: None,
            proxy_threads,
            busy_poll: Duration::from_micros(busy_poll_us),
        }),
        BenchCommand::Load(ref args) => bench::load::run(args),
        BenchCommand::Seed(ref args) => bench::seed::run(args),
    }
}

/// Runs a worker until a proxy shuts it down.
fn run_worker(args: WorkerArgs) -> anyhow::Result<String> {
    let tenants = args
        .tenants
        .map(|names| {
            names
                .iter()
                .map(|n| {
                    bulkhead_core::TenantId::new(n.trim())
                        .with_context(|| format!("--tenants: `{n}` is not a tenant id"))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .transpose()?;
    if let Some(parent) = args.parent_pid {
        exit_with_parent(parent)?;
    }
    if args.blocks == 0 || args.slots == 0 {
        anyhow::bail!("--blocks and --slots must be at least 1");
    }
    if args.step_tokens == 0 || args.over_share_prompt_tokens == 0 {
        anyhow::bail!("--step-tokens and --over-share-prompt-tokens must be at least 1");
    }
    worker::serve(&WorkerOptions {
        backend: args.backend,
        listen: args.listen,
        device: args.device,
        tenants,
        blocks: args.blocks,
        slots: args.slots,
        step_tokens: args.step_tokens,
        over_share_prompt_tokens: args.over_share_prompt_tokens,
        seed: args.seed,
        calibration: args.calibration,
        worker_id: args.worker_id,
        sim_realtime: !args.sim_fast,
        model_aliases: args.model_names,
        model_dir: args.model_dir,
        max_context: args.max_context,
    })?;
    Ok(String::new())
}

/// Asks the kernel to kill this worker when its parent dies (a `serve` killed
/// with SIGKILL runs no cleanup), then checks the parent is still `parent`:
/// if it died before the request, go now.
fn exit_with_parent(parent: i32) -> anyhow::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .context("setting the parent-death signal")?;
    if rustix::process::getppid().map(rustix::process::Pid::as_raw_nonzero)
        != Some(parent).and_then(std::num::NonZeroI32::new)
    {
        anyhow::bail!("the process that started this worker (pid {parent}) is gone");
    }
    Ok(())
}

/// Runs an `ebpf` subcommand and returns what to print.
fn run_ebpf(command: EbpfCommand) -> anyhow::Result<String> {
    match command {
        EbpfCommand::Load {
            config,
            cgroup,
            pins,
        } => {
            let config = read_config(&config)?;
            let plane = KernelPlane::load(&config, &cgroup, &pins.instance, &pins.bpffs)?;
            let applied = plane.applied();
            let mut out = String::new();
            let what = match plane.origin() {
                Origin::Loaded => {
                    format!("loaded and attached to cgroup {}; pinned", cgroup.display())
                }
                Origin::Reused | Origin::Opened => {
                    "already loaded: reused the pinned programs (not re-attached)".to_owned()
                }
            };
            let _ = writeln!(
                out,
                "instance {:?}: {what} at {}",
                pins.instance,
                plane.pin_dir().display()
            );
            let _ = writeln!(
                out,
                "limits written for {} tenant(s) (mark = priority = index + 1); {} stale slot(s) cleared",
                applied.tenants, applied.cleared
            );
            if config.ebpf.mode == bulkhead_core::config::EbpfMode::Off {
                let _ = writeln!(
                    out,
                    "note: the config says [ebpf] mode = \"off\"; a proxy started with it will not use these programs"
                );
            }
            for (index, tenant) in config.tenants.iter().enumerate() {
                let k = &tenant.kernel;
                let _ = writeln!(
                    out,
                    "  [{index}] {}: {} pkt/s (burst {}), {} B/s (burst {}), mark {}",
                    tenant.id,
                    k.packets_per_second,
                    k.packet_burst,
                    k.bytes_per_second,
                    k.byte_burst,
                    index + 1
                );
            }
            Ok(out)
        }
        EbpfCommand::Unload { pins } => {
            let report = KernelPlane::unload(&pins.bpffs, &pins.instance)?;
            Ok(if report.was_loaded() {
                format!(
                    "instance {:?}: detached {}; unpinned {} map(s); removed {}\n",
                    pins.instance,
                    report.detached.join(", "),
                    report.unpinned_maps.len(),
                    report.pin_dir.display()
                )
            } else {
                format!(
                    "instance {:?}: nothing loaded (no pins at {})\n",
                    pins.instance,
                    report.pin_dir.display()
                )
            })
        }
        EbpfCommand::Status { config, pins } => {
            let config = config.as_deref().map(read_config).transpose()?;
            let plane = KernelPlane::open(&pins.bpffs, &pins.instance)?;
            let status = plane.status()?;
            Ok(status_table(&pins.instance, &status, config.as_ref()))
        }
    }
}

fn read_config(path: &Path) -> anyhow::Result<Config> {
    Config::from_path(path).with_context(|| format!("config {}", path.display()))
}

/// The `status` output: links, then one row per tenant slot.
fn status_table(instance: &str, status: &PlaneStatus, config: Option<&Config>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "instance {instance:?}: pins at {}",
        status.pin_dir.display()
    );
    for link in &status.links {
        let _ = writeln!(
            out,
            "  {}: link {} → program {}",
            link.name, link.link_id, link.program_id
        );
    }
    let _ = writeln!(
        out,
        "{:<20} {:>12} {:>14} {:>12} {:>14} {:>12} {:>14}",
        "tenant",
        "passed pkts",
        "passed bytes",
        "dropped pkts",
        "dropped bytes",
        "egress pkts",
        "egress bytes"
    );
    for row in &status.tenants {
        let name = if row.index == bulkhead_ebpf_common::UNKNOWN_TENANT {
            "(unknown sources)".to_owned()
        } else {
            config
                .and_then(|c| c.tenants.get(usize::try_from(row.index).ok()?))
                .map_or_else(|| format!("#{}", row.index), |t| t.id.to_string())
        };
        let c = &row.counters;
        let _ = writeln!(
            out,
            "{name:<20} {:>12} {:>14} {:>12} {:>14} {:>12} {:>14}",
            c.ingress_passed_packets,
            c.ingress_passed_bytes,
            c.ingress_dropped_packets,
            c.ingress_dropped_bytes,
            c.egress_packets,
            c.egress_bytes
        );
    }
    out
}
