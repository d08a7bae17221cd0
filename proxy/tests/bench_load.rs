//! `bulkhead bench load`: a short in-process run writes its JSON and SVG;
//! Jain's index, the fair shares and the burst arrivals are right; a target
//! off loopback is refused. No timing is asserted.

use bulkhead::bench::load::{self, Burst, LoadArgs, TenantLoad};
use std::{path::PathBuf, time::Duration};

/// A count as a float (counts here are far below 2^52).
fn count(n: usize) -> f64 {
    f64::from(u32::try_from(n).unwrap())
}

fn program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bulkhead"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bulkhead-bench-load-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn a_short_run_writes_json_and_an_svg_chart() {
    let (json, svg) = (scratch("run.json"), scratch("run.svg"));
    let args =
        LoadArgs {
            tenants: vec![
            "name=alpha,rate=4,prompt=16..48,max_tokens=8".parse().unwrap(),
            "name=bravo,rate=2,burst_rate=8,burst_on=0.5,burst_period=1,max_tokens=4..8,weight=2"
                .parse()
                .unwrap(),
        ],
            seconds: Some(2.0),
            seed: Some(3),
            json: Some(json.clone()),
            chart: Some(svg.clone()),
            chart_metric: "latency".to_owned(),
            program: Some(program()),
            ..LoadArgs::default()
        };
    let table = load::run(&args).unwrap();
    assert!(
        table.contains("alpha") && table.contains("bravo"),
        "{table}"
    );
    assert!(table.contains("Jain's fairness index"), "{table}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for field in [
        "window_s",
        "measured_from_s",
        "throughput_rps",
        "throughput_tokens_per_s",
        "jain",
        "worst_send_lag_ms",
        "unfinished",
    ] {
        assert!(report[field].is_number(), "no number `{field}` in {report}");
    }
    let tenants = report["tenants"].as_array().unwrap();
    assert_eq!(tenants.len(), 2);
    for t in tenants {
        for field in [
            "sent",
            "ok",
            "rejected_429",
            "unavailable_503",
            "errors",
            "output_tokens_per_s",
            "demand_tokens_per_s",
            "fair_share_tokens_per_s",
        ] {
            assert!(t[field].is_number(), "no number `{field}` in {t}");
        }
        for field in ["ttft", "latency"] {
            for p in ["p50_ms", "p90_ms", "p99_ms"] {
                assert!(t[field][p].is_number(), "no {field}.{p} in {t}");
            }
        }
        assert!(t["sent"].as_u64().unwrap() > 0, "{t}");
        assert_eq!(t["errors"], 0, "{t}");
        assert_eq!(t["sent"], t["ok"], "nothing is limited here: {t}");
    }
    let samples = report["samples"].as_array().unwrap();
    let sent: u64 = tenants.iter().map(|t| t["sent"].as_u64().unwrap()).sum();
    assert_eq!(samples.len() as u64, sent);
    for s in samples {
        assert_eq!(s["status"], 200, "{s}");
        assert!(s["sent_s"].is_number() && s["ttft_s"].is_number() && s["latency_s"].is_number());
        assert!(s["ttft_s"].as_f64() <= s["latency_s"].as_f64(), "{s}");
    }

    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.trim_start().starts_with("<svg"),
        "{}",
        &chart[..80.min(chart.len())]
    );
    assert!(chart.trim_end().ends_with("</svg>"));
    assert!(chart.contains("<circle"), "no points drawn");
    assert!(
        chart.contains("alpha") && chart.contains("bravo"),
        "no legend"
    );
    // Balanced tags: every element opened is closed (self-closing or paired).
    let opened = chart.matches('<').count();
    let closed = chart.matches("/>").count() + chart.matches("</").count() * 2;
    assert_eq!(opened, closed, "unbalanced SVG");
    let _ = std::fs::remove_dir_all(json.parent().unwrap());
}

#[test]
fn jains_index_and_fair_shares() {
    assert!((load::jain(&[1.0, 1.0]) - 1.0).abs() < 1e-12);
    assert!((load::jain(&[3.0, 3.0, 3.0]) - 1.0).abs() < 1e-12);
    assert!((load::jain(&[1.0, 0.0]) - 0.5).abs() < 1e-12);
    assert!((load::jain(&[5.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
    assert!((load::jain(&[]) - 1.0).abs() < 1e-12);

    // Both backlogged, weights 2:1: shares 2:1.
    let s = load::fair_shares(&[1000.0, 1000.0], &[2.0, 1.0], 900.0);
    assert!(
        (s[0] - 600.0).abs() < 1e-9 && (s[1] - 300.0).abs() < 1e-9,
        "{s:?}"
    );
    // A light tenant gets its demand; the rest goes to the backlogged one.
    let s = load::fair_shares(&[100.0, 5000.0], &[1.0, 1.0], 1000.0);
    assert!(
        (s[0] - 100.0).abs() < 1e-9 && (s[1] - 900.0).abs() < 1e-9,
        "{s:?}"
    );
    // Demands that fit: each its demand.
    let s = load::fair_shares(&[100.0, 200.0], &[1.0, 1.0], 1000.0);
    assert_eq!(s, [100.0, 200.0]);
}

#[test]
fn burst_arrivals_match_their_rates_over_long_windows() {
    let window = Duration::from_secs(2000);
    let burst = Burst {
        rate: 200.0,
        on_secs: 1.0,
        period_secs: 4.0,
    };
    let times = load::arrival_times(11, 10.0, Some(burst), window);
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "arrivals in order");
    assert!(times.iter().all(|t| *t < window));
    let (mut on, mut off) = (0usize, 0usize);
    for t in &times {
        if t.as_secs_f64() % 4.0 < 1.0 {
            on += 1;
        } else {
            off += 1;
        }
    }
    let rate_on = count(on) / 500.0; // 500 one-second bursts
    let rate_off = count(off) / 1500.0;
    assert!((rate_on - 200.0).abs() < 4.0, "burst rate {rate_on}");
    assert!((rate_off - 10.0).abs() < 0.5, "base rate {rate_off}");
    let mean = count(times.len()) / 2000.0;
    assert!((mean - burst.mean_rate(10.0)).abs() < 1.5, "mean {mean}");
    // No base rate: nothing between bursts.
    let only = load::arrival_times(5, 0.0, Some(burst), Duration::from_secs(100));
    assert!(only.iter().all(|t| t.as_secs_f64() % 4.0 < 1.0));
    // The same seed, the same arrivals.
    assert_eq!(
        only,
        load::arrival_times(5, 0.0, Some(burst), Duration::from_secs(100))
    );
    // Plain Poisson.
    let plain = load::arrival_times(2, 50.0, None, Duration::from_secs(200));
    assert!((count(plain.len()) / 200.0 - 50.0).abs() < 2.0);
}

#[test]
fn a_target_off_loopback_is_refused() {
    let err = load::loopback_only("192.0.2.10:4433")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(load::loopback_only("127.0.0.1:4433").is_ok());
    assert!(load::loopback_only("[::1]:4433").is_ok());

    // The whole command refuses before sending anything.
    let args = LoadArgs {
        tenants: vec![TenantLoad::new("alpha", 1.0)],
        quic: Some("10.1.2.3:443".to_owned()),
        pki: Some(PathBuf::from("/nonexistent")),
        server_name: "localhost".to_owned(),
        chart_metric: "ttft".to_owned(),
        ..LoadArgs::default()
    };
    let err = format!("{:#}", load::run(&args).unwrap_err());
    assert!(err.contains("refusing to load-test 10.1.2.3:443"), "{err}");
}

#[test]
fn tenant_flags_parse_and_bad_ones_are_refused() {
    let t: TenantLoad =
        "name=bravo,burst_rate=200,burst_on=1,burst_period=2,prompt=32..96,max_tokens=32"
            .parse()
            .unwrap();
    assert_eq!(t.name, "bravo");
    assert!((t.burst.unwrap().rate - 200.0).abs() < 1e-12);
    assert!((t.mean_rate() - 100.0).abs() < 1e-9);
    assert_eq!((t.prompt_tokens.min, t.prompt_tokens.max), (32, 96));
    assert!("name=a,burst_rate=5".parse::<TenantLoad>().is_err());
    assert!("name=a,colour=red".parse::<TenantLoad>().is_err());
    assert!("name=a,prompt=9..3".parse::<TenantLoad>().is_err());
}
