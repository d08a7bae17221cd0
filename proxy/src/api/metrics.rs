//! Prometheus metrics: per tenant, requests by status, tokens, queue time
//! and time to first token. Rendered as text for `GET /metrics`.

use bulkhead_core::TenantId;
use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex, time::Duration};

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    fn render(&self, out: &mut String, name: &str, tenant: &str) {
        for (b, c) in BUCKETS.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{tenant=\"{tenant}\",le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{tenant=\"{tenant}\",le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "{name}_sum{{tenant=\"{tenant}\"}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{tenant=\"{tenant}\"}} {}", self.count);
    }
}

#[derive(Clone, Debug, Default)]
struct TenantMetrics {
    requests: BTreeMap<u16, u64>,
    prompt_tokens: u64,
    output_tokens: u64,
    queue: Histogram,
    ttft: Histogram,
}

/// Every tenant's numbers.
#[derive(Debug, Default)]
pub struct Metrics {
    tenants: Mutex<BTreeMap<String, TenantMetrics>>,
}

/// Packet counters of a tenant from the kernel, for the render.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelCounts {
    /// Packets passed.
    pub passed: u64,
    /// Packets dropped.
    pub dropped: u64,
}

impl Metrics {
    fn with(&self, tenant: &str, f: impl FnOnce(&mut TenantMetrics)) {
        let mut map = self
            .tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(map.entry(tenant.to_owned()).or_default());
    }

    /// A request ended with `status` (requests refused before a tenant is known count as `unknown`).
    pub fn request(&self, tenant: Option<&TenantId>, status: u16) {
        self.with(tenant.map_or("unknown", TenantId::as_str), |m| {
            *m.requests.entry(status).or_default() += 1;
        });
    }

    /// Tokens a finished request used.
    pub fn tokens(&self, tenant: &TenantId, prompt: u64, output: u64) {
        self.with(tenant.as_str(), |m| {
            m.prompt_tokens += prompt;
            m.output_tokens += output;
        });
    }

    /// Time a request waited in the fair queue.
    pub fn queue_time(&self, tenant: &TenantId, d: Duration) {
        self.with(tenant.as_str(), |m| m.queue.observe(d));
    }

    /// Time from a request's arrival to its first token.
    pub fn ttft(&self, tenant: &TenantId, d: Duration) {
        self.with(tenant.as_str(), |m| m.ttft.observe(d));
    }

    /// The Prometheus text exposition: every tenant's series, or with
    /// `only`, that tenant's alone (what a tenant may see of the host).
    pub fn render(&self, only: Option<&str>, kernel: &BTreeMap<String, KernelCounts>) -> String {
        let all = self
            .tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let map: BTreeMap<&String, &TenantMetrics> = all
            .iter()
            .filter(|(t, _)| only.is_none_or(|o| o == t.as_str()))
            .collect();
        let kernel = kernel
            .iter()
            .filter(|(t, _)| only.is_none_or(|o| o == t.as_str()));
        let mut out = String::new();
        out.push_str("# HELP bulkhead_requests_total Requests answered, by tenant and HTTP status.\n# TYPE bulkhead_requests_total counter\n");
        for (t, m) in &map {
            for (status, n) in &m.requests {
                let _ = writeln!(
                    out,
                    "bulkhead_requests_total{{tenant=\"{t}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP bulkhead_tokens_total Tokens processed, by tenant and direction.\n# TYPE bulkhead_tokens_total counter\n");
        for (t, m) in &map {
            let _ = writeln!(
                out,
                "bulkhead_tokens_total{{tenant=\"{t}\",direction=\"in\"}} {}",
                m.prompt_tokens
            );
            let _ = writeln!(
                out,
                "bulkhead_tokens_total{{tenant=\"{t}\",direction=\"out\"}} {}",
                m.output_tokens
            );
        }
        out.push_str("# HELP bulkhead_queue_seconds Time in the fair queue.\n# TYPE bulkhead_queue_seconds histogram\n");
        for (t, m) in &map {
            m.queue.render(&mut out, "bulkhead_queue_seconds", t);
        }
        out.push_str("# HELP bulkhead_time_to_first_token_seconds Arrival to first token.\n# TYPE bulkhead_time_to_first_token_seconds histogram\n");
        for (t, m) in &map {
            m.ttft
                .render(&mut out, "bulkhead_time_to_first_token_seconds", t);
        }
        out.push_str("# HELP bulkhead_kernel_packets_total Packets seen by the eBPF programs, by tenant and verdict.\n# TYPE bulkhead_kernel_packets_total counter\n");
        for (t, k) in kernel {
            let _ = writeln!(
                out,
                "bulkhead_kernel_packets_total{{tenant=\"{t}\",verdict=\"passed\"}} {}",
                k.passed
            );
            let _ = writeln!(
                out,
                "bulkhead_kernel_packets_total{{tenant=\"{t}\",verdict=\"dropped\"}} {}",
                k.dropped
            );
        }
        out
    }
}
