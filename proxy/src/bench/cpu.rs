//! CPU time spent over a bench window, read from `/proc`: the whole
//! machine's busy time (user, system, interrupts; not idle, not steal), this
//! process's own, the part of it on the load generator's threads (named),
//! and its child processes' (the workers).
//!
//! Throughput on a shared virtual machine moves with its neighbours; CPU
//! time per request moves far less, so A/B comparisons of the proxy's cost
//! read it beside the rate.

use anyhow::Context as _;
use std::time::Duration;

/// Cumulative CPU counters at one instant, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CpuSnapshot {
    machine_busy: u64,
    own: u64,
    client: u64,
    children: u64,
}

/// CPU time between two snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CpuUse {
    /// Every CPU of the machine, busy.
    pub machine: Duration,
    /// This process but its client threads (in the benches: the proxy).
    pub proxy: Duration,
    /// This process's threads of the load generator.
    pub client: Duration,
    /// This process's children (the worker processes).
    pub children: Duration,
}

impl CpuSnapshot {
    /// Reads the counters now; threads named `client_thread` are the load
    /// generator's.
    pub(crate) fn take(client_thread: &str) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let machine_busy = machine_busy(&stat).context("parsing /proc/stat")?;
        let me = std::process::id();
        let own = std::fs::read_to_string(format!("/proc/{me}/stat"))
            .ok()
            .and_then(|s| process_ticks(&s))
            .map(|(_, ticks)| ticks)
            .context("reading this process's /proc stat")?;
        let mut client = 0;
        for (_, stat) in own_threads()? {
            if command(&stat) == Some(client_thread)
                && let Some((_, ticks)) = process_ticks(&stat)
            {
                client += ticks;
            }
        }
        let mut children = 0;
        for entry in std::fs::read_dir("/proc")
            .context("listing /proc")?
            .flatten()
        {
            let name = entry.file_name();
            if !name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                continue;
            }
            // A process may exit between the listing and the read: skip it.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some((parent, ticks)) = process_ticks(&stat)
                && parent == me
            {
                children += ticks;
            }
        }
        Ok(Self {
            machine_busy,
            own,
            client,
            children,
        })
    }

    /// What was spent from `earlier` to `self`.
    pub(crate) fn since(&self, earlier: &Self) -> CpuUse {
        let hz = rustix::param::clock_ticks_per_second().max(1);
        let time = |now: u64, then: u64| {
            Duration::from_micros(now.saturating_sub(then).saturating_mul(1_000_000) / hz)
        };
        let (own, client) = (
            time(self.own, earlier.own),
            time(self.client, earlier.client),
        );
        CpuUse {
            machine: time(self.machine_busy, earlier.machine_busy),
            proxy: own.saturating_sub(client),
            client,
            children: time(self.children, earlier.children),
        }
    }
}

/// How long this process's threads but those named `client_thread` have
/// run so far, from each thread's `/proc/self/task/TID/schedstat`, which
/// counts nanoseconds where `stat` counts clock ticks: the proxy's CPU over
/// windows of a few milliseconds. A thread that exits takes its time with it.
pub(crate) fn proxy_run_time(client_thread: &str) -> anyhow::Result<Duration> {
    threads_run_time(|name| name != client_thread)
}

/// How long this process's threads whose names `count` have run so far.
fn threads_run_time(count: impl Fn(&str) -> bool) -> anyhow::Result<Duration> {
    let mut ns = 0u64;
    for (dir, stat) in own_threads()? {
        if !command(&stat).is_some_and(&count) {
            continue;
        }
        let path = dir.join("schedstat");
        // A thread may exit between the listing and the reads: skip it.
        let Ok(schedstat) = std::fs::read_to_string(&path) else {
            continue;
        };
        ns += run_ns(&schedstat).with_context(|| format!("parsing {}", path.display()))?;
    }
    Ok(Duration::from_nanos(ns))
}

/// This process's threads: each one's `/proc/self/task/TID` and its `stat`
/// line. A thread that exits between the listing and the read is left out.
fn own_threads() -> anyhow::Result<impl Iterator<Item = (std::path::PathBuf, String)>> {
    Ok(std::fs::read_dir("/proc/self/task")
        .context("listing this process's threads")?
        .flatten()
        .filter_map(|entry| {
            let dir = entry.path();
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            Some((dir, stat))
        }))
}

/// The time on a CPU (the first field, nanoseconds) of a `schedstat` line.
fn run_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// The busy ticks of `/proc/stat`'s `cpu` line: user, nice, system, irq
/// and softirq (not idle, iowait or steal; guest time is inside user).
fn machine_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal ...
    let at = |i: usize| fields.get(i).copied();
    Some(at(0)? + at(1)? + at(2)? + at(5)? + at(6)?)
}

/// The command (thread) name of a `/proc/PID/stat` line.
fn command(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// (parent pid, utime + stime) of a `/proc/PID/stat` line. The command
/// name may hold spaces and parentheses: fields are counted after its
/// last `)`.
fn process_ticks(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime
    let parent = fields.get(1)?.parse().ok()?;
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((parent, user + system))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_busy_counts_user_nice_system_and_interrupts_not_idle_or_steal() {
        let stat = "cpu  100 2 30 5000 7 4 5 900 0 0\ncpu0 50 1 15 2500 3 2 2 450 0 0\n";
        assert_eq!(machine_busy(stat), Some(100 + 2 + 30 + 4 + 5));
        assert_eq!(machine_busy("cpu0 1 2 3\n"), None);
        assert_eq!(machine_busy("cpu  1 2 x 4 5 6 7\n"), None);
    }

    #[test]
    fn process_ticks_skip_a_command_name_with_spaces_and_parentheses() {
        let stat = "4274 (tokio (rt) worker) S 4270 4270 1 0 -1 4194560 100 0 0 0 250 75 0 0 20 0";
        assert_eq!(process_ticks(stat), Some((4270, 325)));
        assert_eq!(command(stat), Some("tokio (rt) worker"));
        assert_eq!(process_ticks("4274 (x) S 1"), None);
    }

    #[test]
    fn our_own_process_is_readable_and_time_only_moves_forward() {
        let a = CpuSnapshot::take("no-such-thread").expect("reading /proc");
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let b = CpuSnapshot::take("no-such-thread").expect("reading /proc");
        assert!(b.own >= a.own && b.machine_busy >= a.machine_busy);
        assert_eq!((a.client, b.client), (0, 0));
    }

    #[test]
    fn run_time_is_schedstat_s_first_field_and_ours_moves_forward() {
        assert_eq!(run_ns("267407059 434344 23\n"), Some(267_407_059));
        assert_eq!(run_ns(""), None);
        assert_eq!(run_ns("x 1 2"), None);
        // A thread of its own, read while it runs: the harness's other
        // threads come and go.
        let spinner = std::thread::Builder::new()
            .name("cpu-test-spin".to_owned())
            .spawn(|| {
                let mine = || threads_run_time(|name| name == "cpu-test-spin").unwrap();
                let a = mine();
                // 50 ms of work: a running thread's time is brought up to
                // date at least every scheduler tick.
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < Duration::from_millis(50) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
                }
                (a, mine())
            })
            .unwrap();
        let (a, b) = spinner.join().unwrap();
        assert!(b >= a + Duration::from_millis(20), "{a:?} then {b:?}");
        // The bench's reading counts this thread and more.
        assert!(proxy_run_time("no-such-thread").unwrap() > Duration::ZERO);
    }

    #[test]
    fn time_is_converted_from_ticks_and_a_counter_going_back_counts_nothing() {
        let hz = rustix::param::clock_ticks_per_second();
        let then = CpuSnapshot {
            machine_busy: 1_000,
            own: 500,
            client: 100,
            children: 40,
        };
        let now = CpuSnapshot {
            machine_busy: 1_000 + 4 * hz,
            own: 500 + 3 * hz,
            client: 100 + hz,
            // A child exited: its ticks left the sum.
            children: 10,
        };
        let spent = now.since(&then);
        assert_eq!(spent.machine, Duration::from_secs(4));
        assert_eq!(spent.proxy, Duration::from_secs(2));
        assert_eq!(spent.client, Duration::from_secs(1));
        assert_eq!(spent.children, Duration::ZERO);
    }
}
