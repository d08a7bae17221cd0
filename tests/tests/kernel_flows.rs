//! The transports' flow registry backed by the real kernel map: a
//! connection's address registered under its tenant's slot, moved when a
//! QUIC client migrates, removed when it closes. Needs root (CI runs as root)
//! and the embedded eBPF object.

use bulkhead::{
    ebpf::{KernelFlows, KernelPlane, Protocol},
    transport::{FlowRegistry, FlowTransport},
};
use bulkhead_core::{TenantId, config::Config};
use bulkhead_tests::netns::{self, PrivateBpffs, ScratchDir, TestCgroup};
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

const CONFIG: &str = r#"
trust_domain = "bulkhead.test"
[tls]
cert = "unused.pem"
key = "unused.key"
client_ca = ["unused-ca.pem"]
[kv]
pool_blocks = 16
[[models]]
name = "tiny"
max_context_tokens = 64
[[tenants]]
id = "acme"
allowed_models = ["tiny"]
kv_block_quota = 8
[[tenants]]
id = "globex"
allowed_models = ["tiny"]
kv_block_quota = 8
"#;

#[test]
fn flows_land_in_the_kernel_map_under_the_tenants_slot() {
    assert!(netns::is_root(), "the kernel flow tests need root");
    let pid = std::process::id() % 10_000;
    let cgroup = TestCgroup::new(&format!("bulkhead-test-flows-{pid}")).unwrap();
    let dir = ScratchDir::new(&format!("bh-flows-{pid}")).unwrap();
    let bpffs = PrivateBpffs::new(dir.join("bpffs")).unwrap();
    let config = Config::from_toml_str(CONFIG).unwrap();
    let plane = KernelPlane::load(
        &config,
        cgroup.path(),
        &format!("test-flows-{pid}"),
        bpffs.path(),
    )
    .unwrap_or_else(|e| panic!("loading the kernel programs: {}", e.chain()));
    let plane = Arc::new(Mutex::new(plane));
    let flows = KernelFlows::new(plane.clone(), &config).unwrap();
    let tenant_of =
        |remote: SocketAddr, p: Protocol| plane.lock().unwrap().flow_tenant(remote, p).unwrap();
    let (acme, globex) = (
        TenantId::new("acme").unwrap(),
        TenantId::new("globex").unwrap(),
    );
    let tcp: SocketAddr = "198.18.7.1:40000".parse().unwrap();
    let udp: SocketAddr = "[2001:db8::7]:50000".parse().unwrap();
    let moved: SocketAddr = "[2001:db8::8]:50001".parse().unwrap();

    flows.register(&acme, tcp, FlowTransport::Tcp);
    flows.register(&globex, udp, FlowTransport::Udp);
    assert_eq!(tenant_of(tcp, Protocol::Tcp), Some(0));
    assert_eq!(
        tenant_of(tcp, Protocol::Udp),
        None,
        "protocols are separate flows"
    );
    assert_eq!(tenant_of(udp, Protocol::Udp), Some(1));

    flows.migrate(&globex, udp, moved);
    assert_eq!(tenant_of(udp, Protocol::Udp), None);
    assert_eq!(tenant_of(moved, Protocol::Udp), Some(1));
    // A migration from an address never registered registers the new one.
    let other: SocketAddr = "198.18.7.2:1234".parse().unwrap();
    flows.migrate(&acme, "198.18.7.3:1".parse().unwrap(), other);
    assert_eq!(tenant_of(other, Protocol::Udp), Some(0));

    flows.unregister(tcp, FlowTransport::Tcp);
    flows.unregister(moved, FlowTransport::Udp);
    assert_eq!(tenant_of(tcp, Protocol::Tcp), None);
    assert_eq!(tenant_of(moved, Protocol::Udp), None);
    // An unknown tenant is never registered (its packets stay under the unknown-source budget).
    flows.register(&TenantId::new("initech").unwrap(), tcp, FlowTransport::Tcp);
    assert_eq!(tenant_of(tcp, Protocol::Tcp), None);

    // A reload: acme leaves, initech arrives, the order changes. globex keeps
    // its slot (its flow stays right), initech gets a slot never used, and
    // acme's slot goes inactive in the kernel.
    flows.register(&globex, udp, FlowTransport::Udp);
    let reloaded = CONFIG
        .replace("id = \"acme\"", "id = \"initech\"")
        .replace("id = \"globex\"", "id = \"acme-gone\"")
        .replace("id = \"initech\"", "id = \"globex\"")
        .replace("id = \"acme-gone\"", "id = \"initech\"");
    let reloaded = Config::from_toml_str(&reloaded).unwrap();
    assert_eq!(
        reloaded
            .tenants
            .iter()
            .map(|t| t.id.as_str())
            .collect::<Vec<_>>(),
        ["globex", "initech"]
    );
    let report = flows.apply_config(&reloaded).unwrap();
    // Slots 0..3 written, acme's slot 0 as inactive.
    assert_eq!(report.tenants, 3, "{report:?}");
    assert_eq!(
        tenant_of(udp, Protocol::Udp),
        Some(1),
        "globex's flow kept its slot"
    );
    flows.register(&TenantId::new("initech").unwrap(), tcp, FlowTransport::Tcp);
    assert_eq!(tenant_of(tcp, Protocol::Tcp), Some(2));
    flows.register(&acme, other, FlowTransport::Tcp);
    assert_eq!(
        tenant_of(other, Protocol::Tcp),
        None,
        "a removed tenant registers nothing"
    );
    let active: Vec<u32> = plane
        .lock()
        .unwrap()
        .status()
        .unwrap()
        .tenants
        .iter()
        .map(|t| t.index)
        .filter(|&i| i < bulkhead_ebpf_common::UNKNOWN_TENANT)
        .collect();
    assert_eq!(active, [1, 2], "acme's slot 0 is inactive");
    assert_eq!(flows.tenant_of(0), None);
    assert_eq!(
        flows.tenant_of(2).map(|t| t.to_string()),
        Some("initech".to_owned())
    );
    drop(flows);
    drop(plane);
    drop(bpffs);
    drop(dir);
    drop(cgroup);
}
