//! `bulkhead tenants`: a running `serve`'s tenants, asked through its admin
//! endpoint (real processes).

mod common;

use common::{BIN, Host, start, tenant};
use std::{
    process::Command,
    time::{Duration, Instant},
};

/// `bulkhead tenants --admin <host's dir>/<socket> extra…`: success, stdout, stderr.
fn tenants(host: &Host, socket: &str, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["tenants", "--admin"])
        .arg(host.dir.join(socket))
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn tenants_lists_what_the_running_serve_serves() {
    // This host is half the fleet: it enforces half of each tenant's limits.
    let host = start(
        "tenants-cli",
        &(tenant("acme", "sk-acme", 5.0)
            + &tenant("globex", "sk-globex", 20.0)
            + "[cluster]\nhost_share = 0.5\n"),
    );
    // The table once the worker is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    let table = loop {
        let (ok, out, err) = tenants(&host, "admin.sock", &[]);
        if ok && out.contains("(1 alive)") {
            break out;
        }
        assert!(Instant::now() < deadline, "no live worker: {out}{err}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("tenant"), "{table}");
    let row = |id: &str| -> Vec<&str> {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"))
            .split_whitespace()
            .collect()
    };
    // tenant, weight, isolation, req/s, tokens/min, concurrent, KV blocks, models
    assert_eq!(row("acme")[..4], ["acme", "1", "shared", "2.5"], "{table}");
    assert_eq!(row("globex")[3], "10.0", "{table}");
    assert_eq!(row("acme")[7], "tiny", "{table}");
    assert_eq!(
        lines[lines.len() - 2..],
        [
            "workers: 1 (1 alive)",
            "limits: this host's share (0.5) of the fleet's ([cluster] host_share)"
        ]
    );

    let (ok, json, err) = tenants(&host, "admin.sock", &["--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["tenants"].as_array().unwrap().len(), 2);
    assert_eq!(v["host_share"], 0.5);
    assert_eq!(v["tenants"][0]["requests_per_second"], 2.5);
    assert_eq!(v["workers"][0]["alive"], true);

    // A wrong endpoint is named, and nothing is printed.
    let (ok, out, err) = tenants(&host, "nowhere.sock", &[]);
    assert!(!ok);
    assert!(out.is_empty());
    assert!(err.contains("nowhere.sock"), "{err}");
}
