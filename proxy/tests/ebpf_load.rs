//! Root only: load the real eBPF object onto a throwaway cgroup, enforce a
//! tenant's budget on loopback UDP, read counters and events, reuse the pins,
//! unload, and check that nothing is left attached or pinned.
//!
//! Skips (with a printed reason) only when not run as root. It needs a
//! binary built with the eBPF toolchain and a kernel with cgroup v2 and bpffs
//! (it mounts a private bpffs if none is at `/sys/fs/bpf`).

use bulkhead::ebpf::{EbpfError, KernelPlane, Origin, Protocol, embedded_object};
use bulkhead_core::config::{Config, EbpfMode};
use bulkhead_ebpf_common::UNKNOWN_TENANT;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const CONFIG: &str = r#"
trust_domain = "bulkhead.local"

[tls]
cert = "server.pem"
key = "server.key"
client_ca = ["ca.pem"]

[kv]
pool_blocks = 1024

[ebpf]
unknown_source_packets_per_second = 100
unknown_source_packet_burst = 20

[[models]]
name = "tiny-llama"
max_context_tokens = 2048

[[tenants]]
id = "slow"
allowed_models = ["tiny-llama"]
kv_block_quota = 512
[tenants.kernel]
packets_per_second = 100
packet_burst = 50
bytes_per_second = 100000000
byte_burst = 1048576

[[tenants]]
id = "fast"
allowed_models = ["tiny-llama"]
kv_block_quota = 512
"#;

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

fn fs_magic(path: &Path) -> Option<u64> {
    u64::try_from(rustix::fs::statfs(path).ok()?.f_type).ok()
}

/// The cgroup v2 mount point, the test's own cgroup in it, and a fresh bpffs.
struct Sandbox {
    cgroup2_root: PathBuf,
    own_cgroup: PathBuf,
    cgroup: PathBuf,
    bpffs: PathBuf,
    private_bpffs: bool,
}

impl Sandbox {
    fn new(name: &str) -> Self {
        let cgroup2_root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| fs_magic(p) == Some(CGROUP2_SUPER_MAGIC))
            .expect("cgroup v2 is mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified");
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup v2 line in /proc/self/cgroup");
        let own_cgroup = cgroup2_root.join(own.trim_start_matches('/'));
        let cgroup = cgroup2_root.join(format!("bulkhead-test-{name}-{}", std::process::id()));
        std::fs::create_dir(&cgroup).expect("creating the test cgroup");

        let default_bpffs = PathBuf::from("/sys/fs/bpf");
        let (bpffs, private_bpffs) = if fs_magic(&default_bpffs) == Some(BPF_FS_MAGIC) {
            (default_bpffs, false)
        } else {
            let dir = std::env::temp_dir().join(format!("bulkhead-bpffs-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let status = Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&dir)
                .status()
                .expect("running mount");
            assert!(status.success(), "mount -t bpf bpf {}", dir.display());
            (dir, true)
        };
        Self {
            cgroup2_root,
            own_cgroup,
            cgroup,
            bpffs,
            private_bpffs,
        }
    }

    /// Moves this whole process into `cgroup` (sockets keep the cgroup they were created in).
    fn enter(cgroup: &Path) {
        std::fs::write(cgroup.join("cgroup.procs"), "0").expect("joining a cgroup");
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = KernelPlane::unload(&self.bpffs, "itest");
        Self::enter(&self.own_cgroup);
        let _ = std::fs::remove_dir(&self.cgroup);
        if self.private_bpffs {
            let _ = Command::new("umount").arg(&self.bpffs).status();
            let _ = std::fs::remove_dir(&self.bpffs);
        }
        let _ = &self.cgroup2_root;
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Sends `n` datagrams of `len` bytes from `from` to `to`.
fn send(from: &UdpSocket, to: SocketAddr, n: usize, len: usize) {
    let payload = vec![0x5a; len];
    for _ in 0..n {
        from.send_to(&payload, to).unwrap();
    }
}

/// Reads everything queued on `socket`.
fn drain(socket: &UdpSocket) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while socket.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
}

#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario: each step depends on the kernel state the previous left"
)]
async fn load_enforce_count_reuse_unload() {
    if !is_root() {
        println!("SKIPPED: loading eBPF programs needs root (CI runs this as root)");
        return;
    }
    assert!(
        embedded_object().is_some(),
        "running as root but this binary has no eBPF object: build with the eBPF toolchain \
         (cargo xtask setup --ebpf), or BULKHEAD_EBPF was off"
    );
    let config = Config::from_toml_str(CONFIG).unwrap();
    let sandbox = Sandbox::new("load");

    // Bad input first: each refused with nothing left behind.
    let missing = sandbox.cgroup.join("does-not-exist");
    let err = KernelPlane::load(&config, &missing, "itest", &sandbox.bpffs).unwrap_err();
    assert!(matches!(err, EbpfError::NoCgroup { .. }), "{err}");
    let err = KernelPlane::load(&config, &sandbox.cgroup, "itest", Path::new("/")).unwrap_err();
    assert!(matches!(err, EbpfError::NotBpffs { .. }), "{err}");
    assert!(!sandbox.bpffs.join("bulkhead/itest").exists());

    // Load, attach, pin.
    let mut plane = KernelPlane::start(
        EbpfMode::Required,
        &config,
        &sandbox.cgroup,
        "itest",
        &sandbox.bpffs,
    )
    .unwrap()
    .expect("required mode loads");
    assert_eq!(plane.origin(), Origin::Loaded);
    assert_eq!(plane.applied().tenants, 2);
    let status = plane.status().unwrap();
    assert_eq!(status.links.len(), 2);
    assert_eq!(
        status.tenants.iter().map(|t| t.index).collect::<Vec<_>>(),
        vec![0, 1, UNKNOWN_TENANT]
    );
    assert_eq!(
        (
            status.tenants[1].limits.mark,
            status.tenants[1].limits.priority
        ),
        (2, 2)
    );
    let mut events = plane.events().unwrap();
    assert!(matches!(plane.events(), Err(EbpfError::EventsTaken)));

    // The receiver's socket is created inside the cgroup; the senders outside.
    Sandbox::enter(&sandbox.cgroup);
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    Sandbox::enter(&sandbox.own_cgroup);
    let to = receiver.local_addr().unwrap();
    let tenant_sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let unknown_sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    plane
        .register_flow(tenant_sender.local_addr().unwrap(), Protocol::Udp, 0)
        .unwrap();
    assert_eq!(
        plane
            .flow_tenant(tenant_sender.local_addr().unwrap(), Protocol::Udp)
            .unwrap(),
        Some(0)
    );

    // Tenant 0 may burst 50 packets at 100/s: most of 400 sent at once drop.
    send(&tenant_sender, to, 400, 200);
    send(&unknown_sender, to, 300, 100);
    let delivered = drain(&receiver);
    // A reply goes out through egress, tagged as tenant 0's.
    receiver
        .send_to(b"reply", tenant_sender.local_addr().unwrap())
        .unwrap();

    let counters = plane.counters().unwrap();
    let slow = counters.iter().find(|(i, _)| *i == 0).unwrap().1;
    let unknown = counters
        .iter()
        .find(|(i, _)| *i == UNKNOWN_TENANT)
        .unwrap()
        .1;
    assert_eq!(
        slow.ingress_passed_packets + slow.ingress_dropped_packets,
        400
    );
    assert!(
        (50..=100).contains(&slow.ingress_passed_packets),
        "{slow:?}"
    );
    assert_eq!(slow.egress_packets, 1, "{slow:?}");
    assert_eq!(
        unknown.ingress_passed_packets + unknown.ingress_dropped_packets,
        300
    );
    assert!(unknown.ingress_dropped_packets > 0, "{unknown:?}");
    assert_eq!(
        u64::try_from(delivered).unwrap(),
        slow.ingress_passed_packets + unknown.ingress_passed_packets
    );

    // Events plus pending drops account for every dropped packet and byte, exactly.
    for (tenant, c) in [(0, slow), (UNKNOWN_TENANT, unknown)] {
        assert_eq!(
            events.drop_tally_with_pending(tenant).unwrap(),
            (c.ingress_dropped_packets, c.ingress_dropped_bytes),
            "tenant {tenant}"
        );
        let (pending, _) = plane.pending_drops(tenant).unwrap();
        assert!(pending <= c.ingress_dropped_packets);
    }
    let first = tokio::time::timeout(Duration::from_secs(2), events.next())
        .await
        .expect("an event within 2 s")
        .unwrap();
    assert!(
        first.tenant == 0 || first.tenant == UNKNOWN_TENANT,
        "{first:?}"
    );
    assert_eq!(events.malformed(), 0);

    // Migration and removal.
    let migrated: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert!(
        plane
            .move_flow(tenant_sender.local_addr().unwrap(), migrated, Protocol::Udp)
            .unwrap()
    );
    assert_eq!(
        plane
            .flow_tenant(tenant_sender.local_addr().unwrap(), Protocol::Udp)
            .unwrap(),
        None
    );
    assert_eq!(plane.flow_tenant(migrated, Protocol::Udp).unwrap(), Some(0));
    assert!(plane.remove_flow(migrated, Protocol::Udp).unwrap());
    assert!(!plane.remove_flow(migrated, Protocol::Udp).unwrap());

    // A second load reuses the pins: same links, counters kept.
    let before = plane.status().unwrap();
    drop(events);
    drop(plane);
    let plane = KernelPlane::load(&config, &sandbox.cgroup, "itest", &sandbox.bpffs).unwrap();
    assert_eq!(plane.origin(), Origin::Reused);
    let after = plane.status().unwrap();
    assert_eq!(before.links, after.links);
    assert_eq!(before.tenants, after.tenants);

    // Unload: nothing pinned, nothing attached (counters stop moving).
    let report = KernelPlane::unload(&sandbox.bpffs, "itest").unwrap();
    assert_eq!(report.detached.len(), 2);
    assert_eq!(report.unpinned_maps.len(), 8);
    assert!(!sandbox.bpffs.join("bulkhead/itest").exists());
    let frozen = plane.counters().unwrap();
    send(&unknown_sender, to, 50, 100);
    assert_eq!(drain(&receiver), 50, "no program drops after unload");
    assert_eq!(plane.counters().unwrap(), frozen);
    assert!(
        !KernelPlane::unload(&sandbox.bpffs, "itest")
            .unwrap()
            .was_loaded()
    );
    assert!(matches!(
        KernelPlane::open(&sandbox.bpffs, "itest"),
        Err(EbpfError::NotLoaded { .. })
    ));
}
