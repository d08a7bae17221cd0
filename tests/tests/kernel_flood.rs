//! The kernel data plane against real floods, in network namespaces this
//! test creates: a sender namespace and a receiver namespace joined by veth,
//! the receiver's socket in a throwaway cgroup with bulkhead's programs
//! attached. Needs root (CI runs as root) and the embedded eBPF object; it
//! fails, naming the reason, without either.
//!
//! The tests share the two CPUs, so they run one at a time.

use bulkhead::ebpf::{KernelPlane, Origin, Protocol};
use bulkhead_core::config::Config;
use bulkhead_tests::netns::{
    self, PrivateBpffs, RX_V4, RX_V6, ScratchDir, TX_V4, TX_V6, TestCgroup, VethPair,
};
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Child;
use std::sync::Mutex;
use std::time::Duration;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const PORT: u16 = 9000;

/// Tenant 0 ("a"): generous limits. Tenant 1 ("b"): 5,000 packets/s, burst
/// 500. Tenant 2 ("c"): 1 MB/s, burst 65,535 bytes. Unknown sources: 100
/// packets/s, burst 10.
const CONFIG: &str = r#"
trust_domain = "bulkhead.test"
[tls]
cert = "server.pem"
key = "server.key"
client_ca = ["ca.pem"]
[kv]
pool_blocks = 64
[ebpf]
mode = "required"
unknown_source_packets_per_second = 100
unknown_source_packet_burst = 10
[[models]]
name = "m"
max_context_tokens = 64
[[tenants]]
id = "a"
allowed_models = ["m"]
kv_block_quota = 8
kernel = { packets_per_second = 100000, packet_burst = 10000, bytes_per_second = 1000000000, byte_burst = 10000000 }
[[tenants]]
id = "b"
allowed_models = ["m"]
kv_block_quota = 8
kernel = { packets_per_second = 5000, packet_burst = 500, bytes_per_second = 1000000000, byte_burst = 10000000 }
[[tenants]]
id = "c"
allowed_models = ["m"]
kv_block_quota = 8
kernel = { packets_per_second = 1000000, packet_burst = 100000, bytes_per_second = 1000000, byte_burst = 65535 }
"#;

/// One test's world: namespaces, cgroup, and the programs attached to it.
struct World {
    pair: VethPair,
    cgroup: TestCgroup,
    instance: String,
    // Dropped in this order: the bpffs is unmounted before its directory goes.
    bpffs: PrivateBpffs,
    dir: ScratchDir,
}

impl World {
    fn new(tag: &str) -> (Self, KernelPlane) {
        assert!(netns::is_root(), "the kernel data plane tests need root");
        let pid = std::process::id() % 10_000;
        let pair = VethPair::new(&format!("{tag}{pid}")).unwrap();
        let cgroup = TestCgroup::new(&format!("bulkhead-test-{tag}-{pid}")).unwrap();
        let instance = format!("test-{tag}-{pid}");
        let dir = ScratchDir::new(&format!("bh-{tag}-{pid}")).unwrap();
        let bpffs = PrivateBpffs::new(dir.join("bpffs")).unwrap();
        let config = Config::from_toml_str(CONFIG).unwrap();
        let plane = KernelPlane::load(&config, cgroup.path(), &instance, bpffs.path())
            .unwrap_or_else(|e| panic!("loading the kernel programs: {}", e.chain()));
        assert_eq!(plane.origin(), Origin::Loaded);
        (
            Self {
                pair,
                cgroup,
                instance,
                bpffs,
                dir,
            },
            plane,
        )
    }

    /// Starts the receiver in the cgroup and the receiving namespace, on IPv4.
    fn receiver(&self, idle_ms: u32) -> Child {
        self.receiver_at(&format!("{RX_V4}:{PORT}"), idle_ms)
    }

    /// Starts the receiver in the cgroup and the receiving namespace, bound to `bind`.
    fn receiver_at(&self, bind: &str, idle_ms: u32) -> Child {
        let ready = self.dir.join("ready");
        let _ = std::fs::remove_file(&ready);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/udp_recv.py");
        let mut child = self
            .cgroup
            .spawn_in(
                &self.pair.rx,
                "python3",
                &[
                    script,
                    "--bind",
                    bind,
                    "--idle-ms",
                    &idle_ms.to_string(),
                    "--ready-file",
                    ready.to_str().unwrap(),
                ],
            )
            .unwrap();
        for _ in 0..400 {
            if ready.exists() {
                return child;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the receiver did not start");
    }

    /// Starts a sender from `port` in the sending namespace, over IPv4.
    fn sender(&self, port: u16, rate: &str, millis: u32, size: u32, cpu: Option<u32>) -> Child {
        let (to, from) = (format!("{RX_V4}:{PORT}"), format!("{TX_V4}:{port}"));
        self.sender_between(&to, &from, rate, millis, size, cpu)
    }

    /// Starts a sender from `from` to `to` in the sending namespace.
    fn sender_between(
        &self,
        to: &str,
        from: &str,
        rate: &str,
        millis: u32,
        size: u32,
        cpu: Option<u32>,
    ) -> Child {
        netns::spawn_in_netns(
            &self.pair.tx,
            cpu,
            env!("CARGO_BIN_EXE_bh-flood"),
            &[
                "--to",
                to,
                "--from",
                from,
                "--rate",
                rate,
                "--duration-ms",
                &millis.to_string(),
                "--size",
                &size.to_string(),
            ],
        )
        .unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Detach first; the bpffs unmounts (its own drop) before the directory goes.
        let _ = KernelPlane::unload(self.bpffs.path(), &self.instance);
    }
}

fn json_of(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn from(port: u16) -> SocketAddr {
    format!("{TX_V4}:{port}").parse().unwrap()
}

fn received(report: &Value, port: u16) -> u64 {
    report["ports"][port.to_string()]["packets"]
        .as_u64()
        .unwrap_or(0)
}

fn marks(report: &Value, port: u16) -> Value {
    report["ports"][port.to_string()]["marks"].clone()
}

#[expect(clippy::cast_precision_loss, reason = "packet counts in a test")]
fn assert_within_1pct(got: u64, expected: f64, what: &str) {
    let error = (got as f64 - expected).abs() / expected;
    eprintln!(
        "{what}: delivered {got}, expected {expected:.1} ({:+.3}%)",
        (got as f64 - expected) / expected * 100.0
    );
    assert!(
        error <= 0.01,
        "{what}: delivered {got}, expected {expected:.0} (off by {:.2}%)",
        error * 100.0
    );
}

#[test]
fn a_flood_is_cut_to_its_rate_while_the_quiet_tenant_loses_nothing() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (world, mut plane) = World::new("fl");
    // The event stream registers the ring buffer with a tokio reactor.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _reactor = runtime.enter();
    let mut events = plane.events().unwrap();
    plane.register_flow(from(7001), Protocol::Udp, 0).unwrap();
    // Two senders of tenant b, one per CPU.
    plane.register_flow(from(7002), Protocol::Udp, 1).unwrap();
    plane.register_flow(from(7003), Protocol::Udp, 1).unwrap();

    let receiver = world.receiver(1_000);
    let quiet = world.sender(7001, "500", 2_000, 64, None);
    let flood0 = world.sender(7002, "max", 2_000, 64, Some(0));
    let flood1 = world.sender(7003, "max", 2_000, 64, Some(1));
    let (quiet, flood0, flood1) = (json_of(quiet), json_of(flood0), json_of(flood1));
    let report = json_of(receiver);

    // Every packet of the quiet tenant arrives, tagged with its mark.
    let quiet_sent = quiet["sent"].as_u64().unwrap();
    assert_eq!(received(&report, 7001), quiet_sent);
    assert_eq!(marks(&report, 7001), serde_json::json!({"1": quiet_sent}));

    // The flood: 5,000/s over the senders' time, plus the burst of 500.
    let offered = flood0["sent"].as_u64().unwrap() + flood1["sent"].as_u64().unwrap();
    let elapsed = flood0["elapsed_ns"]
        .as_u64()
        .unwrap()
        .max(flood1["elapsed_ns"].as_u64().unwrap());
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds in a test")]
    let expected = 5_000.0 * elapsed as f64 / 1e9 + 500.0;
    let delivered = received(&report, 7002) + received(&report, 7003);
    assert!(
        offered > 4 * delivered,
        "the flood was too weak to test: {offered} offered"
    );
    assert_within_1pct(delivered, expected, "tenant b, two senders on two CPUs");
    assert_eq!(report["unmarked"].as_u64(), Some(0));
    for port in [7002, 7003] {
        let n = received(&report, port);
        assert_eq!(marks(&report, port), serde_json::json!({"2": n}));
    }

    // The kernel's counters agree with what arrived, and the ring buffer's
    // drop counts (plus what is still aggregated per CPU) equal the counters.
    let b = plane.tenant_counters(1).unwrap();
    assert_eq!(b.ingress_passed_packets, delivered);
    assert_eq!(
        b.ingress_passed_packets + b.ingress_dropped_packets,
        offered
    );
    let (dropped, dropped_bytes) = events.drop_tally_with_pending(1).unwrap();
    assert_eq!(dropped, b.ingress_dropped_packets);
    assert_eq!(dropped_bytes, b.ingress_dropped_bytes);
    assert!(
        events.drop_tally(1).0 > 0,
        "no drop event was read from the ring"
    );
    assert_eq!(events.malformed(), 0);
    let a = plane.tenant_counters(0).unwrap();
    assert_eq!(a.ingress_dropped_packets, 0);
    assert_eq!(a.ingress_passed_packets, quiet_sent);
    drop(world);
}

#[test]
fn a_byte_limit_holds_the_same_way() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (world, mut plane) = World::new("by");
    plane.register_flow(from(7004), Protocol::Udp, 2).unwrap();
    let receiver = world.receiver(1_000);
    let flood = json_of(world.sender(7004, "max", 2_000, 1_000, None));
    let report = json_of(receiver);
    let elapsed = flood["elapsed_ns"].as_u64().unwrap();
    // On the wire at the cgroup hook each datagram is 1,000 + 8 (UDP) + 20 (IPv4) bytes.
    #[expect(clippy::cast_precision_loss, reason = "bytes in a test")]
    let expected_packets = (1_000_000.0 * elapsed as f64 / 1e9 + 65_535.0) / 1_028.0;
    assert_within_1pct(
        received(&report, 7004),
        expected_packets,
        "tenant c, byte limit",
    );
    let c = plane.tenant_counters(2).unwrap();
    assert_eq!(c.ingress_passed_bytes, received(&report, 7004) * 1_028);
    drop(world);
}

#[test]
fn a_migrated_flow_keeps_its_tenant_and_a_removed_one_falls_back_to_the_unknown_budget() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (world, mut plane) = World::new("mg");
    plane.register_flow(from(7005), Protocol::Udp, 0).unwrap();

    let receiver = world.receiver(400);
    let before = json_of(world.sender(7005, "200", 300, 64, None));
    // QUIC migration: the client's port changes; the proxy moves the flow.
    assert!(
        plane
            .move_flow(from(7005), from(7006), Protocol::Udp)
            .unwrap()
    );
    assert_eq!(plane.flow_tenant(from(7005), Protocol::Udp).unwrap(), None);
    assert_eq!(
        plane.flow_tenant(from(7006), Protocol::Udp).unwrap(),
        Some(0)
    );
    let after = json_of(world.sender(7006, "200", 300, 64, None));
    let report = json_of(receiver);
    let (before, after) = (
        before["sent"].as_u64().unwrap(),
        after["sent"].as_u64().unwrap(),
    );
    assert_eq!(marks(&report, 7005), serde_json::json!({"1": before}));
    assert_eq!(marks(&report, 7006), serde_json::json!({"1": after}));

    // Removed: the same source is now unknown, held to 100/s with a burst of 10, unmarked.
    assert!(plane.remove_flow(from(7006), Protocol::Udp).unwrap());
    let receiver = world.receiver(400);
    let unknown = json_of(world.sender(7006, "2000", 500, 64, None));
    let report = json_of(receiver);
    let elapsed = unknown["elapsed_ns"].as_u64().unwrap();
    let got = received(&report, 7006);
    #[expect(clippy::cast_precision_loss, reason = "packet counts in a test")]
    let expected = 100.0 * elapsed as f64 / 1e9 + 10.0;
    #[expect(clippy::cast_precision_loss, reason = "packet counts in a test")]
    let off = (got as f64 - expected).abs();
    assert!(
        off <= 2.0,
        "unknown budget: delivered {got}, expected {expected:.1}"
    );
    assert_eq!(marks(&report, 7006), serde_json::json!({"0": got}));
    drop(world);
}

#[test]
fn pinned_programs_keep_enforcing_across_a_restart_and_unload_leaves_nothing() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (world, mut plane) = World::new("pn");
    plane.register_flow(from(7007), Protocol::Udp, 1).unwrap();
    let pin_dir = plane.pin_dir().to_owned();
    // The userspace side goes away: the pinned links keep the programs attached.
    drop(plane);
    let receiver = world.receiver(500);
    let flood = json_of(world.sender(7007, "max", 1_000, 64, None));
    let report = json_of(receiver);
    let elapsed = flood["elapsed_ns"].as_u64().unwrap();
    #[expect(clippy::cast_precision_loss, reason = "packet counts in a test")]
    let expected = 5_000.0 * elapsed as f64 / 1e9 + 500.0;
    assert_within_1pct(
        received(&report, 7007),
        expected,
        "enforced with no userspace",
    );

    // A restarted proxy reuses the pinned instance, flows and all.
    let config = Config::from_toml_str(CONFIG).unwrap();
    let plane = KernelPlane::load(
        &config,
        world.cgroup.path(),
        &world.instance,
        world.bpffs.path(),
    )
    .unwrap();
    assert_eq!(plane.origin(), Origin::Reused);
    assert_eq!(
        plane.flow_tenant(from(7007), Protocol::Udp).unwrap(),
        Some(1)
    );
    drop(plane);

    let report = KernelPlane::unload(world.bpffs.path(), &world.instance).unwrap();
    assert!(report.was_loaded());
    assert!(!pin_dir.exists(), "{} still exists", pin_dir.display());
    // Nothing is attached any more: the same flood now passes whole, unmarked.
    let receiver = world.receiver(500);
    let flood = json_of(world.sender(7007, "20000", 500, 64, None));
    let report = json_of(receiver);
    assert_eq!(received(&report, 7007), flood["sent"].as_u64().unwrap());
    assert_eq!(marks(&report, 7007)["0"], flood["sent"]);
    drop(world);
}

#[test]
fn ipv6_flows_are_limited_and_tagged_the_same_way() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (world, mut plane) = World::new("v6");
    let source: SocketAddr = format!("[{TX_V6}]:7010").parse().unwrap();
    plane.register_flow(source, Protocol::Udp, 1).unwrap();
    let receiver = world.receiver_at(&format!("[{RX_V6}]:{PORT}"), 1_000);
    let flood = json_of(world.sender_between(
        &format!("[{RX_V6}]:{PORT}"),
        &source.to_string(),
        "max",
        1_000,
        64,
        None,
    ));
    let report = json_of(receiver);
    let elapsed = flood["elapsed_ns"].as_u64().unwrap();
    #[expect(clippy::cast_precision_loss, reason = "packet counts in a test")]
    let expected = 5_000.0 * elapsed as f64 / 1e9 + 500.0;
    let got = received(&report, 7010);
    assert_within_1pct(got, expected, "tenant b over IPv6");
    assert_eq!(marks(&report, 7010), serde_json::json!({"2": got}));
    drop(world);
}
