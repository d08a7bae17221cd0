//! `bulkhead demo` (the README's run command) end to end, briefly: every
//! tenant gets answers, the bursting one gets 429s, the audit log verifies,
//! and nothing is left behind (eBPF pins, the demo's cgroup).

use std::process::Command;

#[test]
fn the_demo_serves_three_tenants_and_verifies_their_audit() {
    let state = std::env::temp_dir().join(format!("bh-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["demo", "--seconds", "4", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("kernel enforcement: "), "{text}");
    for tenant in ["acme", "globex", "initech"] {
        let row: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with(tenant))
            .unwrap_or_else(|| panic!("no row for {tenant}:\n{text}"))
            .split_whitespace()
            .collect();
        // tenant requests ok tokens p50 ms p99 ms 429s errors drops audit-n ok
        let ok: u64 = row[2].parse().unwrap();
        let limited: u64 = row[8].parse().unwrap();
        let requests: u64 = row[1].parse().unwrap();
        let audited: u64 = row[11].parse().unwrap();
        assert!(ok > 0, "{tenant} got answers: {text}");
        assert_eq!(row[9], "0", "{tenant} saw no errors: {text}");
        assert_eq!(row[12], "ok", "{tenant}'s audit verifies: {text}");
        assert_eq!(audited, requests, "one record per request: {text}");
        if tenant == "initech" {
            assert!(limited > 0, "initech's bursts are limited: {text}");
        }
    }
    assert!(text.contains("0 bad"), "{text}");
    let pid_dirs = std::fs::read_dir("/sys/fs/bpf/bulkhead").map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("demo-"))
            .count()
    });
    assert_eq!(pid_dirs, 0, "the demo's eBPF pins are removed");
    let _ = std::fs::remove_dir_all(&state);
}
