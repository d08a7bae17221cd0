//! The namespace harness itself: without any program attached, every paced
//! datagram from the sending namespace arrives in the receiving one, with mark 0.
//! Needs root (CI runs as root); without it the test fails with the reason.

use bulkhead_tests::netns::{self, RX_V4, ScratchDir, TX_V4, TestCgroup, VethPair};

#[test]
fn paced_datagrams_cross_the_veth_with_mark_zero() {
    assert!(
        netns::is_root(),
        "this test needs root to create network namespaces"
    );
    let pair = VethPair::new(&format!("h{}", std::process::id() % 10_000)).unwrap();
    let cgroup = TestCgroup::new(&format!("bulkhead-test-harness-{}", std::process::id())).unwrap();
    let dir = ScratchDir::new(&format!("bh-harness-{}", std::process::id())).unwrap();
    let ready = dir.join("ready");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/udp_recv.py");
    let receiver = cgroup
        .spawn_in(
            &pair.rx,
            "python3",
            &[
                script,
                "--bind",
                &format!("{RX_V4}:9000"),
                "--idle-ms",
                "500",
                "--ready-file",
                ready.to_str().unwrap(),
            ],
        )
        .unwrap();
    for _ in 0..200 {
        if ready.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(ready.exists(), "the receiver did not start");
    let flood = netns::spawn_in_netns(
        &pair.tx,
        None,
        env!("CARGO_BIN_EXE_bh-flood"),
        &[
            "--to",
            &format!("{RX_V4}:9000"),
            "--from",
            &format!("{TX_V4}:7001"),
            "--rate",
            "500",
            "--duration-ms",
            "1000",
        ],
    )
    .unwrap()
    .wait_with_output()
    .unwrap();
    assert!(
        flood.status.success(),
        "{}",
        String::from_utf8_lossy(&flood.stderr)
    );
    let sent: serde_json::Value = serde_json::from_slice(&flood.stdout).unwrap();
    let out = receiver.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sent = sent["sent"].as_u64().unwrap();
    assert!((490..=510).contains(&sent), "sent {sent}");
    assert_eq!(got["ports"]["7001"]["packets"].as_u64(), Some(sent));
    // SO_RCVMARK reports the mark of every datagram: zero, as nothing set one.
    assert_eq!(got["unmarked"].as_u64(), Some(0));
    assert_eq!(got["ports"]["7001"]["marks"]["0"].as_u64(), Some(sent));
}
