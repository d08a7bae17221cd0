//! `bh-kernel-bench`: what kernel drop saves against a userspace
//! receive-and-drop loop, at the same offered flood rate, and what the
//! ingress program costs per packet. Run it as root through
//! `cargo xtask bench-kernel`.
//!
//! # Setup
//!
//! Two network namespaces joined by veth (`198.18.0.1` sends, `198.18.0.2`
//! receives; RFC 2544 benchmarking addresses, nothing leaves them), a
//! throwaway cgroup and a private bpffs. One tenant, "flood", limited to
//! 1,000 packets/s with a burst of 100; the flood's source flow is registered
//! to it, so nearly every packet is dropped. Audit events are on, with the
//! settings the loader always writes (a drop event every 64 drops or 1 ms,
//! flow events), and this process reads them from the ring buffer as the
//! proxy would.
//!
//! # Offered load
//!
//! `bh-flood --rate R` (default 100,000 packets/s, 64-byte payload; at
//! 150,000 the sender fell to ~141,000 on a 2-core VM once the userspace-drop
//! receive path shared its CPU; the report warns below 98%) from the sending
//! namespace for D seconds (default 5), pinned to CPU 1. The receiver sits in
//! the cgroup in the receiving namespace, pinned to CPU 0. All variants run
//! in the same invocation, one after the other, at the same rate:
//!
//! - sender alone: the receiving end of the veth is down, so veth drops every
//!   packet on transmit; nothing of the receive path runs.
//! - userspace drop (U): no programs attached; the receiver is a tight loop
//!   of one `recv` per datagram into a discarded buffer, with an 8 MiB
//!   `SO_RCVBUF`. It reports how many datagrams it read and the growth of
//!   `RcvbufErrors` in the receiving namespace (datagrams the socket queue
//!   dropped because the loop fell behind).
//! - kernel drop (K): bulkhead's programs attached to the cgroup; the same
//!   receiver reads what the limit lets through.
//!
//! # CPU attribution
//!
//! A veth transmit hands the packet to `netif_rx` on the sender's CPU, and
//! the `NET_RX` softirq that runs the whole receive path (IP, UDP, the cgroup
//! ingress program, the socket queue, waking the receiver) runs right there,
//! on CPU 1, in the sender's system time: per-CPU or per-process time cannot
//! tell it from the cost of sending. (The `NET_RX` counts per CPU from
//! `/proc/softirqs` are printed as evidence.) So the receive cost of a
//! variant is everything but generating the packets: the busy time of both
//! CPUs over the variant's window (`/proc/stat` user + nice + system + irq +
//! softirq; not steal, from the start of the flood until the receiver has
//! drained its queue and exited) per offered packet, minus the same for the
//! sender alone. Both variants are counted the same way, and the userspace
//! loop's own CPU (on CPU 0) is inside it. The subtraction is conservative
//! for kernel drop: a busier CPU 1 makes the paced sender sleep less per
//! packet, so more of the sender's own cost is subtracted from U than from K.
//!
//! Cross-check: the same two variants with RPS on `veth-rx` (`rps_cpus` = CPU
//! 0), which moves the receive path to CPU 0 next to the receiver; there the
//! receive cost is CPU 0's busy time alone, with no subtraction, but each
//! packet now pays an inter-processor interrupt (the flood is paced, so the
//! backlog rarely batches), a cost common to both variants that a NIC's NAPI
//! would amortise; it pulls that ratio towards 1. Both ratios are printed;
//! the goal is judged on the first.
//!
//! On a small VM the numbers move a lot from run to run, so the whole
//! sequence runs `--rounds` times (default 3), each round in a fresh world,
//! and the goals are judged on the median of the rounds.
//!
//! This process is pinned to CPU 0, so reading the audit events is charged
//! to kernel drop. CPU time is counted in ticks (the kernel here has no
//! precise irq-time accounting), so anything else running during a window
//! is counted as well: the bench measures the machine's background load
//! before each variant, waits up to 30 s for it to settle, and prints it.
//!
//! # Program cost
//!
//! During the kernel-drop variants BPF run-time statistics are on (the
//! `BPF_ENABLE_STATS` file descriptor, which flips the same static key as
//! `kernel.bpf_stats_enabled` = 1 and switches it back off when it closes,
//! even if the bench is killed). The ingress program's `run_time_ns` and
//! `run_cnt` (from its fdinfo) over each window give ns/packet; their
//! timestamps add a little to kernel drop's CPU time as well.

use bulkhead::ebpf::{KernelPlane, Protocol};
use bulkhead_core::config::Config;
use bulkhead_tests::netns::{self, PrivateBpffs, RX_V4, ScratchDir, TX_V4, TestCgroup, VethPair};
use std::error::Error;
use std::fmt::Write as _;
use std::net::UdpSocket;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Output};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The receiver's port.
const PORT: u16 = 9000;
/// The flood's source port (registered to tenant "flood").
const FLOOD_PORT: u16 = 7000;
/// CPU of the receive path and the receiver.
const RX_CPU: usize = 0;
/// CPU of the sender.
const TX_CPU: usize = 1;
/// `/proc/stat` counts in `USER_HZ`, which Linux fixes at 100 for userspace.
const USER_HZ: f64 = 100.0;
/// A receiver with no datagram for this long after the first one is done.
const IDLE_MS: u64 = 300;
/// Background load (fraction of a CPU) above which a measurement is flagged.
const QUIET: f64 = 0.10;
/// Goal: kernel drop's CPU per packet over userspace drop's.
const RATIO_GOAL: f64 = 0.6;
/// Goal: the ingress program's run time per packet, with audit events on.
const NS_GOAL: f64 = 350.0;

/// One tenant whose packet limit drops nearly all of the flood.
const CONFIG: &str = r#"
trust_domain = "bulkhead.bench"
[tls]
cert = "server.pem"
key = "server.key"
client_ca = ["ca.pem"]
[kv]
pool_blocks = 64
[ebpf]
mode = "required"
[[models]]
name = "m"
max_context_tokens = 64
[[tenants]]
id = "flood"
allowed_models = ["m"]
kv_block_quota = 8
kernel = { packets_per_second = 1000, packet_burst = 100, bytes_per_second = 1000000000, byte_burst = 10000000 }
"#;

/// The bench's flags.
#[derive(Debug)]
struct Options {
    /// Offered packets per second.
    rate: u64,
    /// Flood length per variant.
    seconds: f64,
    /// UDP payload bytes.
    size: u32,
    /// The receiver's `SO_RCVBUF`.
    rcvbuf: usize,
    /// The `bh-flood` binary.
    flood: PathBuf,
    /// How many times to run every variant (each round in a fresh world).
    rounds: u32,
}

const USAGE: &str = "usage: bh-kernel-bench [--rate PPS] [--seconds S] [--size BYTES] \
                     [--rcvbuf BYTES] [--rounds N] [--flood PATH-TO-bh-flood]";

fn parse(args: impl Iterator<Item = String>) -> Result<Options> {
    let mut opts = Options {
        rate: 100_000,
        seconds: 5.0,
        size: 64,
        rcvbuf: 8 << 20,
        flood: std::env::current_exe()?.with_file_name("bh-flood"),
        rounds: 3,
    };
    let mut args = args;
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--rate" => opts.rate = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => opts.seconds = value.parse().map_err(|e| bad(&e))?,
            "--size" => opts.size = value.parse().map_err(|e| bad(&e))?,
            "--rcvbuf" => opts.rcvbuf = value.parse().map_err(|e| bad(&e))?,
            "--flood" => opts.flood = PathBuf::from(value),
            "--rounds" => opts.rounds = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}").into()),
        }
    }
    if opts.rate == 0 || !(0.5..=60.0).contains(&opts.seconds) || !(1..=10).contains(&opts.rounds) {
        return Err("--rate must be > 0, --seconds within 0.5..=60, --rounds within 1..=10".into());
    }
    if !opts.flood.exists() {
        return Err(format!(
            "{} not found: build it with `cargo build --release -p bulkhead-tests --bins` \
             (or pass --flood)",
            opts.flood.display()
        )
        .into());
    }
    Ok(opts)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("recv") {
        args.next();
        return match receiver::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bh-kernel-bench recv: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bh-kernel-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !netns::is_root() {
        eprintln!(
            "bh-kernel-bench: must run as root: it creates network namespaces, a cgroup and a \
             bpffs mount, and loads eBPF programs (try `sudo -E cargo xtask bench-kernel`)"
        );
        return ExitCode::FAILURE;
    }
    match bench(&opts) {
        Ok(report) => {
            #[expect(clippy::print_stdout, reason = "the report")]
            {
                print!("{report}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bh-kernel-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Namespaces, cgroup and private bpffs; all removed on drop, programs first.
struct World {
    pair: VethPair,
    cgroup: TestCgroup,
    instance: String,
    // Dropped in this order: the bpffs is unmounted before its directory goes.
    bpffs: PrivateBpffs,
    dir: ScratchDir,
}

impl World {
    fn new() -> Result<Self> {
        let pid = std::process::id() % 10_000;
        let pair = VethPair::new(&format!("kb{pid}"))?;
        let cgroup = TestCgroup::new(&format!("bulkhead-bench-{pid}"))?;
        let dir = ScratchDir::new(&format!("bh-kernel-bench-{pid}"))?;
        let bpffs = PrivateBpffs::new(dir.join("bpffs"))?;
        // VethPair's static neighbour entries let the sender transmit while
        // the receiving end is down (the baseline) without waiting for ARP.
        let world = Self {
            pair,
            cgroup,
            instance: format!("bench-{pid}"),
            bpffs,
            dir,
        };
        Ok(world)
    }

    /// Puts the receive path of `veth-rx` on CPU 0 (RPS) or back on the sender's CPU.
    fn set_rps(&self, on: bool) -> Result<()> {
        let mask = if on { 1_u64 << RX_CPU } else { 0 };
        netns::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.pair.rx,
                "sh",
                "-c",
                &format!("echo {mask:x} > /sys/class/net/veth-rx/queues/rx-0/rps_cpus"),
            ],
        )?;
        Ok(())
    }

    /// Brings the receiving end up or down (down: veth drops every packet on transmit).
    fn set_rx_link(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        netns::run(
            "ip",
            &["-n", &self.pair.rx, "link", "set", "veth-rx", state],
        )?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    }

    fn load(&self) -> Result<KernelPlane> {
        let config = Config::from_toml_str(CONFIG)?;
        let mut plane = KernelPlane::load(
            &config,
            self.cgroup.path(),
            &self.instance,
            self.bpffs.path(),
        )
        .map_err(|e| format!("loading the kernel programs: {}", e.chain()))?;
        let from = format!("{TX_V4}:{FLOOD_PORT}").parse()?;
        plane
            .register_flow(from, Protocol::Udp, 0)
            .map_err(|e| e.chain())?;
        Ok(plane)
    }

    /// Starts the receiver in the cgroup and the receiving namespace, on CPU 0.
    fn receiver(&self, opts: &Options) -> Result<Reaped> {
        let ready = self.dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let exe = std::env::current_exe()?;
        let max_ms = duration(opts).as_millis() + 5_000;
        let child = self.cgroup.spawn_in(
            &self.pair.rx,
            "taskset",
            &[
                "-c",
                &RX_CPU.to_string(),
                path_str(&exe)?,
                "recv",
                "--bind",
                &format!("{RX_V4}:{PORT}"),
                "--rcvbuf",
                &opts.rcvbuf.to_string(),
                "--max-ms",
                &max_ms.to_string(),
                "--ready-file",
                path_str(&ready)?,
            ],
        )?;
        let mut child = Reaped(Some(child), "the receiver");
        for _ in 0..400 {
            if ready.exists() {
                return Ok(child);
            }
            if let Some(status) = child.get().try_wait()? {
                let out = child.finish()?;
                return Err(format!(
                    "the receiver exited early ({status}): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err("the receiver did not start within 10 s".into())
    }

    /// Starts the flood in the sending namespace, on CPU 1.
    fn flood(&self, opts: &Options) -> Result<Reaped> {
        let child = netns::spawn_in_netns(
            &self.pair.tx,
            Some(u32::try_from(TX_CPU)?),
            path_str(&opts.flood)?,
            &[
                "--to",
                &format!("{RX_V4}:{PORT}"),
                "--from",
                &format!("{TX_V4}:{FLOOD_PORT}"),
                "--rate",
                &opts.rate.to_string(),
                "--duration-ms",
                &duration(opts).as_millis().to_string(),
                "--size",
                &opts.size.to_string(),
            ],
        )?;
        Ok(Reaped(Some(child), "the sender (bh-flood)"))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Detaches the programs and removes the pins, if they were loaded; then
        // the namespaces, the cgroup, the bpffs and the directory (their own drops).
        let _ = KernelPlane::unload(self.bpffs.path(), &self.instance);
    }
}

/// A child process that is killed and reaped unless it was waited for.
struct Reaped(Option<Child>, &'static str);

impl Reaped {
    fn get(&mut self) -> &mut Child {
        self.0.as_mut().expect("a child until finished")
    }

    /// Waits for it to exit; fails, with its stderr, if it did not succeed.
    fn finish(mut self) -> Result<Output> {
        let out = self
            .0
            .take()
            .expect("a child until finished")
            .wait_with_output()?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}): {}",
                self.1,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        Ok(out)
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()).into())
}

fn duration(opts: &Options) -> Duration {
    Duration::from_secs_f64(opts.seconds)
}

/// Busy and total `USER_HZ` ticks of one CPU.
#[derive(Clone, Copy, Debug, Default)]
struct CpuTicks {
    busy: u64,
    total: u64,
}

/// `/proc/stat`'s ticks of CPUs 0 and 1.
fn cpu_ticks() -> Result<[CpuTicks; 2]> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let mut out = [CpuTicks::default(); 2];
    for (cpu, slot) in out.iter_mut().enumerate() {
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&format!("cpu{cpu}")))
            .ok_or_else(|| format!("no cpu{cpu} in /proc/stat"))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()?;
        // user nice system idle iowait irq softirq steal (guest is inside user);
        // steal is time the hypervisor ran something else: not busy here.
        let field = |i: usize| v.get(i).copied().unwrap_or(0);
        slot.busy = field(0) + field(1) + field(2) + field(5) + field(6);
        slot.total = slot.busy + field(3) + field(4) + field(7);
    }
    Ok(out)
}

/// `/proc/softirqs` `NET_RX` counts of CPUs 0 and 1.
fn net_rx_softirqs() -> Result<[u64; 2]> {
    let text = std::fs::read_to_string("/proc/softirqs")?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("NET_RX:"))
        .ok_or("no NET_RX in /proc/softirqs")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()?;
    Ok([
        v.first().copied().unwrap_or(0),
        v.get(1).copied().unwrap_or(0),
    ])
}

#[expect(clippy::cast_precision_loss, reason = "tick counts")]
fn ticks_to_s(ticks: u64) -> f64 {
    ticks as f64 / USER_HZ
}

/// Background load of CPUs 0 and 1 (fractions of a CPU): waits up to 30 s
/// for both to fall below [`QUIET`], and returns the last sample.
fn background() -> Result<[f64; 2]> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = cpu_ticks()?;
        std::thread::sleep(Duration::from_secs(1));
        let after = cpu_ticks()?;
        let load = [0, 1].map(|i| {
            let busy = after[i].busy - before[i].busy;
            let total = (after[i].total - before[i].total).max(1);
            ticks_to_s(busy) / ticks_to_s(total)
        });
        if load.iter().all(|&l| l < QUIET) || Instant::now() > deadline {
            return Ok(load);
        }
    }
}

/// The ingress program's `(run_time_ns, run_cnt)` from its fdinfo.
fn program_stats(program_id: u32) -> Result<(u64, u64)> {
    let info = aya::programs::loaded_programs()
        .filter_map(std::result::Result::ok)
        .find(|p| p.id() == program_id)
        .ok_or_else(|| format!("program {program_id} is not loaded"))?;
    let fd = info.fd()?;
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd()))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .ok_or_else(|| format!("no {name} in the program's fdinfo"))?
            .trim()
            .parse()
            .map_err(Into::into)
    };
    Ok((field("run_time_ns:")?, field("run_cnt:")?))
}

/// `"key":<number>` of a one-line JSON object.
fn json_u64(text: &str, key: &str) -> Result<u64> {
    let pattern = format!("\"{key}\":");
    let at = text
        .find(&pattern)
        .ok_or_else(|| format!("no {key} in {text:?}"))?;
    let rest = &text[at + pattern.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Ok(rest[..end].parse()?)
}

/// `key=<number>` of the receiver's report.
fn kv_u64(text: &str, key: &str) -> Result<u64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .ok_or_else(|| format!("no {key} in {text:?}"))?
        .parse()
        .map_err(Into::into)
}

/// What one variant measured.
#[derive(Debug, Default)]
struct Sample {
    background: [f64; 2],
    sent: u64,
    flood_elapsed_s: f64,
    received: u64,
    rcvbuf_errors: u64,
    /// Busy seconds of CPUs 0 and 1 over the window.
    busy_s: [f64; 2],
    window_s: f64,
    net_rx: [u64; 2],
    events: u64,
}

impl Sample {
    /// Busy CPU-µs of CPU 0 per offered packet.
    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    fn cpu0_us_per_packet(&self) -> f64 {
        self.busy_s[0] * 1e6 / self.sent.max(1) as f64
    }

    /// Busy CPU-µs of both CPUs per offered packet.
    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    fn total_us_per_packet(&self) -> f64 {
        (self.busy_s[0] + self.busy_s[1]) * 1e6 / self.sent.max(1) as f64
    }

    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    fn achieved_pps(&self) -> f64 {
        self.sent as f64 / self.flood_elapsed_s.max(1e-9)
    }
}

/// Runs one variant: receiver up (unless `receive` is false), flood,
/// receiver drained; CPU 0 and 1 ticks around it. `poll` is called every
/// 10 ms while waiting (to read the audit events).
fn run_variant(
    world: &World,
    opts: &Options,
    receive: bool,
    poll: &mut dyn FnMut() -> u64,
) -> Result<Sample> {
    let background = background()?;
    let mut receiver = if receive {
        Some(world.receiver(opts)?)
    } else {
        None
    };
    let (ticks_before, irq_before, start) = (cpu_ticks()?, net_rx_softirqs()?, Instant::now());
    let mut flood = world.flood(opts)?;
    let mut events = 0;
    let deadline = start + duration(opts) + Duration::from_secs(10);
    for child in std::iter::once(&mut flood).chain(receiver.as_mut()) {
        while child.get().try_wait()?.is_none() {
            if Instant::now() > deadline {
                return Err("a child did not finish in time".into());
            }
            events += poll();
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let (ticks_after, irq_after, window) = (cpu_ticks()?, net_rx_softirqs()?, start.elapsed());
    events += poll();
    let flood = String::from_utf8(flood.finish()?.stdout)?;
    let recv_report = match receiver {
        Some(receiver) => String::from_utf8(receiver.finish()?.stdout)?,
        None => "received=0 rcvbuf_errors=0".to_owned(),
    };
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds")]
    let flood_elapsed_s = json_u64(&flood, "elapsed_ns")? as f64 / 1e9;
    Ok(Sample {
        background,
        sent: json_u64(&flood, "sent")?,
        flood_elapsed_s,
        received: kv_u64(&recv_report, "received")?,
        rcvbuf_errors: kv_u64(&recv_report, "rcvbuf_errors")?,
        busy_s: [0, 1].map(|i| ticks_to_s(ticks_after[i].busy - ticks_before[i].busy)),
        window_s: window.as_secs_f64(),
        net_rx: [0, 1].map(|i| irq_after[i] - irq_before[i]),
        events,
    })
}

/// `--rounds` rounds, each in a fresh world; every round's report, then the medians.
fn bench(opts: &Options) -> Result<String> {
    // This process (and so the audit-event reader) on the receive CPU.
    let mut cpus = rustix::thread::CpuSet::new();
    cpus.set(RX_CPU);
    rustix::thread::sched_setaffinity(None, &cpus)?;
    let mut out = String::new();
    let (mut ratios, mut ns) = (Vec::new(), Vec::new());
    for round in 1..=opts.rounds {
        let (text, ratio, program_ns) = one_round(opts)?;
        let _ = writeln!(out, "--- round {round} of {}", opts.rounds);
        out.push_str(&text);
        ratios.push(ratio);
        ns.push(program_ns);
    }
    let (ratio, ns) = (median(&mut ratios), median(&mut ns));
    let _ = writeln!(
        out,
        "=== median of {} rounds: ratio {ratio:.2} (goal <= {RATIO_GOAL}: {}), ingress program \
         {ns:.0} ns/packet (goal <= {NS_GOAL} with audit events on: {})",
        opts.rounds,
        verdict(ratio <= RATIO_GOAL),
        verdict(ns <= NS_GOAL)
    );
    Ok(out)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    }
}

/// One round: every variant in a fresh world; the report, the ratio, the program's ns/packet.
fn one_round(opts: &Options) -> Result<(String, f64, f64)> {
    let world = World::new()?;
    // Sender alone: the receiving end is down, veth drops each packet on transmit.
    world.set_rx_link(false)?;
    let baseline = run_variant(&world, opts, false, &mut || 0)?;
    world.set_rx_link(true)?;
    // Userspace drop: nothing attached to the cgroup yet.
    let user = run_variant(&world, opts, true, &mut || 0)?;
    world.set_rps(true)?;
    let user_rps = run_variant(&world, opts, true, &mut || 0)?;

    // Kernel drop, with audit events read as the proxy reads them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _reactor = runtime.enter();
    let mut plane = world.load()?;
    let mut stream = plane.events().map_err(|e| e.chain())?;
    let ingress = plane
        .status()
        .map_err(|e| e.chain())?
        .links
        .iter()
        .find(|l| l.name.contains("ingress"))
        .ok_or("no ingress link")?
        .program_id;
    let stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let mut read_events = || std::iter::from_fn(|| stream.try_next()).count() as u64;
    let (time0, runs0) = program_stats(ingress)?;
    let kernel_rps = run_variant(&world, opts, true, &mut read_events)?;
    let (time1, runs1) = program_stats(ingress)?;
    world.set_rps(false)?;
    let dropped_before = plane
        .tenant_counters(0)
        .map_err(|e| e.chain())?
        .ingress_dropped_packets;
    let kernel = run_variant(&world, opts, true, &mut read_events)?;
    let (time2, runs2) = program_stats(ingress)?;
    drop(stats_on);
    let counters = plane.tenant_counters(0).map_err(|e| e.chain())?;
    drop(stream);
    drop(plane);
    drop(world);

    Ok(report(
        opts,
        &Samples {
            baseline,
            user,
            kernel,
            user_rps,
            kernel_rps,
        },
        [
            (time2 - time1, runs2 - runs1),
            (time1 - time0, runs1 - runs0),
        ],
        counters.ingress_dropped_packets - dropped_before,
    ))
}

/// Every variant's sample.
struct Samples {
    /// The sender alone (receiving end down).
    baseline: Sample,
    /// Userspace drop, receive path on the sender's CPU.
    user: Sample,
    /// Kernel drop, receive path on the sender's CPU.
    kernel: Sample,
    /// Userspace drop, receive path on CPU 0 (RPS).
    user_rps: Sample,
    /// Kernel drop, receive path on CPU 0 (RPS).
    kernel_rps: Sample,
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "packet rates, positive and far below 2^53"
)]
fn report(
    opts: &Options,
    s: &Samples,
    program: [(u64, u64); 2],
    dropped: u64,
) -> (String, f64, f64) {
    let mut r = String::new();
    let all = [
        ("sender alone", &s.baseline),
        ("userspace drop", &s.user),
        ("kernel drop", &s.kernel),
        ("userspace, RPS", &s.user_rps),
        ("kernel, RPS", &s.kernel_rps),
    ];
    let achieved: Vec<String> = all
        .iter()
        .map(|(_, v)| thousands(v.achieved_pps().round() as u64))
        .collect();
    let _ = writeln!(
        r,
        "offered {} pps for {:.1} s per variant (achieved {} pps), UDP payload {} B, \
         veth 198.18.0.1 -> 198.18.0.2",
        thousands(opts.rate),
        opts.seconds,
        achieved.join(" / "),
        opts.size
    );
    if all
        .iter()
        .any(|(_, v)| v.achieved_pps() < 0.98 * rate_f64(opts.rate))
    {
        let _ = writeln!(
            r,
            "WARNING: a variant fell short of the offered rate; lower --rate for equal load"
        );
    }
    let _ = writeln!(
        r,
        "receive CPU = busy CPU time of both CPUs (/proc/stat user+nice+system+irq+softirq) \
         per offered packet, minus the same with the receiving end down (the sender alone)"
    );
    variant_lines(&mut r, &all);
    let base = s.baseline.total_us_per_packet();
    let kernel = s.kernel.total_us_per_packet() - base;
    let user = s.user.total_us_per_packet() - base;
    let _ = writeln!(r, "sender alone  : {base:.3} CPU-µs/pkt (subtracted below)");
    let _ = writeln!(
        r,
        "kernel drop   : {kernel:.3} CPU-µs/pkt (offered {}, delivered {}, dropped in kernel {}, \
         audit events read {})",
        thousands(s.kernel.sent),
        thousands(s.kernel.received),
        thousands(dropped),
        thousands(s.kernel.events + s.kernel_rps.events)
    );
    let _ = writeln!(
        r,
        "userspace drop: {user:.3} CPU-µs/pkt (offered {}, received {}, socket drops {}{})",
        thousands(s.user.sent),
        thousands(s.user.received),
        thousands(s.user.rcvbuf_errors),
        keep_up(&s.user)
    );
    let ratio = kernel / user.max(1e-12);
    let _ = writeln!(
        r,
        "ratio {ratio:.2} (goal <= {RATIO_GOAL}: {})",
        verdict(ratio <= RATIO_GOAL)
    );
    let (kernel_rps, user_rps) = (
        s.kernel_rps.cpu0_us_per_packet(),
        s.user_rps.cpu0_us_per_packet(),
    );
    let _ = writeln!(
        r,
        "cross-check, receive path moved to CPU 0 by RPS (an IPI per packet), CPU 0 busy per \
         packet: kernel {kernel_rps:.3}, userspace {user_rps:.3} (received {}, socket drops {}{}), \
         ratio {:.2}",
        thousands(s.user_rps.received),
        thousands(s.user_rps.rcvbuf_errors),
        keep_up(&s.user_rps),
        kernel_rps / user_rps.max(1e-12)
    );
    let mut primary_ns = f64::NAN;
    for ((run_ns, runs), path) in program.into_iter().zip(["", " (RPS cross-check)"]) {
        #[expect(clippy::cast_precision_loss, reason = "nanoseconds")]
        let ns = run_ns as f64 / runs.max(1) as f64;
        if primary_ns.is_nan() {
            primary_ns = ns;
        }
        let _ = writeln!(
            r,
            "ingress program{path}: {ns:.0} ns/packet over {} runs (goal <= {NS_GOAL} with audit \
             events on: {})",
            thousands(runs),
            verdict(runs > 0 && ns <= NS_GOAL)
        );
    }
    (r, ratio, primary_ns)
}

/// One line of raw numbers per variant.
fn variant_lines(r: &mut String, all: &[(&str, &Sample)]) {
    for &(name, v) in all {
        let _ = writeln!(
            r,
            "  {name:<14}: busy cpu0 {:.2} s cpu1 {:.2} s in {:.2} s; NET_RX softirqs cpu0 +{} \
             cpu1 +{}; background before cpu0 {:.0}% cpu1 {:.0}%{}",
            v.busy_s[0],
            v.busy_s[1],
            v.window_s,
            thousands(v.net_rx[0]),
            thousands(v.net_rx[1]),
            v.background[0] * 100.0,
            v.background[1] * 100.0,
            if v.background.iter().any(|&b| b >= QUIET) {
                " (WARNING: other load on the machine; it is counted too)"
            } else {
                ""
            }
        );
    }
}

#[expect(clippy::cast_precision_loss, reason = "packet rates")]
fn rate_f64(rate: u64) -> f64 {
    rate as f64
}

/// Whether a userspace loop kept up with the flood.
fn keep_up(v: &Sample) -> &'static str {
    if v.received + v.rcvbuf_errors < v.sent {
        ", some lost before the socket"
    } else if v.rcvbuf_errors > 0 {
        ": the loop did not keep up"
    } else {
        ": the loop kept up"
    }
}

/// `bh-kernel-bench recv`: the receiver both variants use.
mod receiver {
    use super::{Result, UdpSocket};
    use std::io::ErrorKind;
    use std::time::{Duration, Instant};

    /// Reads datagrams one `recv` at a time and discards them; prints
    /// `received=N rcvbuf_errors=M` once no datagram has come for
    /// [`super::IDLE_MS`] after the first, or after `--max-ms`.
    pub fn run(mut args: impl Iterator<Item = String>) -> Result<()> {
        let (mut bind, mut rcvbuf, mut max_ms, mut ready) = (None, 8 << 20, 30_000, None);
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--bind" => bind = Some(value),
                "--rcvbuf" => rcvbuf = value.parse()?,
                "--max-ms" => max_ms = value.parse()?,
                "--ready-file" => ready = Some(value),
                _ => return Err(format!("unknown flag {flag}").into()),
            }
        }
        let socket = UdpSocket::bind(bind.ok_or("--bind is required")?)?;
        rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, rcvbuf)?;
        let tick = Duration::from_millis(50);
        socket.set_read_timeout(Some(tick))?;
        let errors_before = rcvbuf_errors()?;
        if let Some(ready) = ready {
            std::fs::write(ready, "ready\n")?;
        }
        let start = Instant::now();
        let max = Duration::from_millis(max_ms);
        let idle_ticks = super::IDLE_MS / 50;
        let mut buf = vec![0_u8; 65_536];
        let (mut received, mut seen, mut idle) = (0_u64, 0_u64, 0_u64);
        loop {
            match socket.recv(&mut buf) {
                Ok(_) => received += 1,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if received > 0 && received == seen {
                        idle += 1;
                        if idle >= idle_ticks {
                            break;
                        }
                    } else {
                        idle = 0;
                        seen = received;
                    }
                    if start.elapsed() > max {
                        break;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let errors = rcvbuf_errors()? - errors_before;
        #[expect(clippy::print_stdout, reason = "the report")]
        {
            println!("received={received} rcvbuf_errors={errors}");
        }
        Ok(())
    }

    /// `Udp: RcvbufErrors` of this network namespace.
    fn rcvbuf_errors() -> Result<u64> {
        let snmp = std::fs::read_to_string("/proc/net/snmp")?;
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (
            udp.next().ok_or("no Udp in /proc/net/snmp")?,
            udp.next().ok_or("no Udp values")?,
        );
        let at = names
            .split_whitespace()
            .position(|n| n == "RcvbufErrors")
            .ok_or("no RcvbufErrors")?;
        Ok(values
            .split_whitespace()
            .nth(at)
            .ok_or("short Udp line")?
            .parse()?)
    }
}
