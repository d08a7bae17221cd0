//! The dispatcher with real worker processes (`sim` backend): requests of
//! two tenants flow through the fair queue to workers and back, a dropped
//! ticket cancels its request, and a worker killed mid-request fails exactly
//! its requests and comes back.

use bulkhead::dispatch::{DispatchError, Dispatcher, Event, Job, TenantSlot, WorkerSpec};
use bulkhead_core::{
    TenantId,
    fair_queue::ServiceWeights,
    wire::{FinishReason, Sampling},
};
use std::{path::PathBuf, time::Duration};

fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn job(who: &str, max_tokens: u32) -> Job {
    Job {
        tenant: tenant(who),
        model: "tiny".to_owned(),
        prompt_tokens: (0..20).collect(),
        max_tokens,
        sampling: Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: Some(1),
            stop: vec![],
        },
        kv_block_quota: 64,
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bh-dispatch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn start(name: &str, workers: u32, realtime: bool) -> (Dispatcher, PathBuf) {
    let d = dir(name);
    let specs = (0..workers)
        .map(|id| {
            let mut args: Vec<String> = [
                "--backend",
                "sim",
                "--model-name",
                "tiny",
                "--blocks",
                "512",
                "--slots",
                "4",
            ]
            .map(str::to_owned)
            .to_vec();
            if !realtime {
                args.push("--sim-fast".to_owned());
            }
            WorkerSpec {
                id,
                socket: d.join(format!("w{id}.sock")),
                spawn_args: Some(args),
                dedicated: None,
                program: Some(PathBuf::from(env!("CARGO_BIN_EXE_bulkhead"))),
            }
        })
        .collect();
    let tenants = ["acme", "globex"].map(|t| TenantSlot {
        id: tenant(t),
        weight: 1,
        max_queued: 8,
        dedicated: false,
    });
    let dispatcher = Dispatcher::start(
        ServiceWeights::default(),
        &tenants,
        specs,
        Duration::from_millis(100),
    );
    (dispatcher, d)
}

/// Waits up to 20 s for `cond`.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn collect(mut ticket: bulkhead::dispatch::Ticket) -> (Vec<u32>, Option<Event>) {
    let mut tokens = Vec::new();
    while let Some(e) = ticket.next().await {
        match e {
            Event::Tokens {
                first_index,
                tokens: t,
            } => {
                assert_eq!(first_index as usize, tokens.len());
                tokens.extend(t);
            }
            e @ (Event::Finished(_) | Event::Failed(_)) => return (tokens, Some(e)),
            _ => {}
        }
    }
    (tokens, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_two_tenants_run_and_queue_limits_hold() {
    let (d, dir) = start("basic", 2, false);
    assert!(
        d.wait_ready(Duration::from_mins(1)).await,
        "workers never came up"
    );
    let tickets: Vec<_> = (0..12)
        .map(|i| {
            d.submit(job(if i % 2 == 0 { "acme" } else { "globex" }, 10))
                .unwrap()
        })
        .collect();
    for t in tickets {
        let (tokens, end) = collect(t).await;
        assert_eq!(tokens.len(), 10);
        assert!(matches!(end, Some(Event::Finished(f)) if f.reason == FinishReason::Length));
    }
    assert!(matches!(
        d.submit(Job {
            model: "gpt-9".into(),
            ..job("acme", 1)
        }),
        Err(DispatchError::NoWorker(_))
    ));
    assert!(matches!(
        d.submit(job("initech", 1)),
        Err(DispatchError::UnknownTenant(_))
    ));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_ticket_cancels_and_a_dead_worker_fails_only_its_requests() {
    let (d, dir) = start("dies", 2, true);
    assert!(d.wait_ready(Duration::from_mins(1)).await);
    // Long requests (paced in real time by the sim): one per worker at least.
    let mut tickets: Vec<_> = (0..4)
        .map(|_| d.submit(job("acme", 100_000)).unwrap())
        .collect();
    let running = |d: &Dispatcher| d.workers().iter().map(|w| w.2).sum::<u32>();
    eventually("4 requests running", || running(&d) == 4).await;
    assert!(d.workers().iter().all(|w| w.2 > 0), "{:?}", d.workers());
    // Drop one: its slot is freed once the worker confirms the cancel.
    drop(tickets.pop());
    eventually("the dropped request's slot freed", || running(&d) == 3).await;

    // Kill worker 0's process: find it by its socket's owner is overkill;
    // pkill by the socket path in its command line.
    let sock0 = dir.join("w0.sock");
    // Read before the kill: the dispatcher may notice the death at once.
    let on_0 = d.workers()[0].2;
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &sock0.display().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut failed = 0;
    let mut alive = Vec::new();
    for mut t in tickets {
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match t.next().await {
                    Some(Event::Failed(why)) => return Some(why),
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await;
        match outcome {
            Ok(Some(why)) => {
                assert!(why.contains("worker 0"), "{why}");
                failed += 1;
            }
            Ok(None) => panic!("a ticket ended without an event"),
            Err(_) => alive.push(t), // still streaming from worker 1
        }
    }
    assert_eq!(failed, on_0, "exactly worker 0's requests fail");
    assert!(!alive.is_empty(), "worker 1's requests go on");
    // Worker 0 comes back and takes new work.
    assert!(
        d.wait_ready(Duration::from_mins(1)).await,
        "worker 0 did not come back"
    );
    drop(alive);
    let (tokens, end) = collect(d.submit(job("globex", 5)).unwrap()).await;
    assert_eq!(tokens.len(), 5);
    assert!(matches!(end, Some(Event::Finished(_))));
    let _ = std::fs::remove_dir_all(dir);
}
