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
    let flows = KernelFlows::new(plane.clone(), &config);
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
    drop(flows);
    drop(plane);
    drop(bpffs);
    drop(dir);
    drop(cgroup);
}
