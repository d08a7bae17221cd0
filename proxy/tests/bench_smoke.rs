//! `bulkhead bench fairness` and `bulkhead bench proxy` run end to end with
//! tiny durations and print their tables. No timing is asserted: goals are
//! measured by the bench commands, never by tests.

use bulkhead::bench::{fairness, proxy};
use std::path::PathBuf;

fn program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bulkhead"))
}

#[test]
fn fairness_bench_prints_its_table() {
    let table = fairness::run(&fairness::FairnessOptions {
        seconds: 1,
        seed: 7,
        program: Some(program()),
    })
    .unwrap();
    for row in [
        "A alone",
        "A + B, fair queue",
        "A + B, FIFO",
        "p99 TTFT(A with B, fair)",
    ] {
        assert!(table.contains(row), "no `{row}` in:\n{table}");
    }
}

#[test]
fn proxy_bench_prints_its_table() {
    let table = proxy::run(&proxy::ProxyOptions {
        seconds: 1,
        program: Some(program()),
        proxy_threads: std::num::NonZeroUsize::new(1),
        busy_poll: std::time::Duration::from_micros(bulkhead::serve::busy_poll::DEFAULT_LIMIT_US),
    })
    .unwrap();
    assert!(table.contains("the proxy's 1,"), "{table}");
    for row in [
        "requests/s",
        "CPU per request: the proxy",
        "CPU per request: the load generator",
        "requests/s the proxy's CPU per request allows",
        "the h3 crate's client: requests/s, its CPU per request",
        "added latency p50",
        "busy polling as serve's default, adaptive up to 200 µs (serve --busy-poll-us 200)",
        "busy polling off (serve --busy-poll-us 0)",
        "ms after each (sparser than the limit)",
        "the proxy's CPU per request (not its worker's)",
        "handshakes/s, TLS/TCP",
        "handshakes/s, QUIC",
    ] {
        assert!(table.contains(row), "no `{row}` in:\n{table}");
    }
    assert!(
        table.contains("failed requests in the throughput part: 0"),
        "{table}"
    );
}
