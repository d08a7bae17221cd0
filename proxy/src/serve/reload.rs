//! Tenant config hot reload: SIGHUP, or `POST /reload` on the admin endpoint.
//!
//! A reload re-reads the config file and applies what can change while
//! serving: tenants (added, removed, their limits, models, keys, weights,
//! kernel limits) and the TLS files (server certificate, key, client CAs).
//! Connections stay open; requests already admitted finish under the policy
//! they were admitted with, and new requests see the new one. What the
//! running process is built from (listeners, trust domain, KV pool, models,
//! the worker plan, scheduler weights, eBPF mode) needs a restart: a reload
//! that changes any of it is refused as a whole, naming each change, and
//! nothing is applied. So is a file with errors.

use super::plan;
use crate::{
    api::{App, TenantChanges},
    ebpf::{EbpfError, KernelFlows},
    tls::{ServerTls, TlsError},
    transport::{QuicError, QuicTlsHandle, TcpTlsHandle},
};
use bulkhead_core::config::{Config, ConfigErrors};
use serde_json::{Value, json};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

/// Why a reload was refused; nothing of it was applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not parse or validate.
    #[error("the config has errors:\n{0}")]
    Config(#[from] ConfigErrors),
    /// It changes what only a restart can.
    #[error("these changes need a restart: {}", .0.join("; "))]
    NeedsRestart(Vec<String>),
    /// The TLS files named by the new config cannot be used.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The QUIC endpoint refused the new TLS configuration.
    #[error("QUIC TLS: {0}")]
    Quic(#[from] QuicError),
    /// The kernel maps could not be written (the old limits stay).
    #[error("kernel limits: {}", .0.chain())]
    Kernel(#[from] EbpfError),
    /// The API could not take the tenants.
    #[error("tenants: {0:#}")]
    Tenants(anyhow::Error),
}

/// What an applied reload changed.
#[derive(Clone, Debug, PartialEq)]
pub struct ReloadReport {
    /// Tenants added, removed and changed.
    pub tenants: TenantChanges,
    /// Kernel slots written, when kernel enforcement is on.
    pub kernel_slots: Option<u32>,
    /// This host's share of the tenants' limits (`[cluster] host_share`), now.
    pub host_share: f64,
}

impl ReloadReport {
    /// The report as JSON (the admin endpoint's answer).
    pub fn to_json(&self) -> Value {
        json!({
            "reloaded": true,
            "tenants": {
                "added": self.tenants.added.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "removed": self.tenants.removed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "changed": self.tenants.changed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            },
            "tls": "reloaded",
            "kernel_slots": self.kernel_slots,
            "host_share": self.host_share,
        })
    }
}

/// The parts of a running `serve` a reload touches.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    runtime_dir: PathBuf,
    gpu: bool,
    app: Arc<App>,
    flows: Option<Arc<KernelFlows>>,
    tcp_tls: TcpTlsHandle,
    quic_tls: QuicTlsHandle,
    /// One reload at a time.
    busy: Mutex<()>,
}

impl Reloader {
    /// Reloads of the config at `path` into a running front door.
    pub fn new(
        path: &Path,
        runtime_dir: &Path,
        gpu: bool,
        app: Arc<App>,
        flows: Option<Arc<KernelFlows>>,
        tls: (TcpTlsHandle, QuicTlsHandle),
    ) -> Self {
        Self {
            path: path.to_owned(),
            runtime_dir: runtime_dir.to_owned(),
            gpu,
            app,
            flows,
            tcp_tls: tls.0,
            quic_tls: tls.1,
            busy: Mutex::new(()),
        }
    }

    /// Re-reads the config file and applies it, or refuses it whole.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        let next = Config::from_path(&self.path)?;
        let current = self.app.config();
        let restart = restart_needed(&current, &next, &self.runtime_dir, self.gpu);
        if !restart.is_empty() {
            return Err(ReloadError::NeedsRestart(restart));
        }
        // Everything that can fail on its own is read before anything is applied.
        let tls = ServerTls::from_paths(&next.tls)?;
        let quic_tls = self.quic_tls.prepare(tls.quic)?;
        let slots_before = self.flows.as_ref().map(|flows| flows.slots());
        let kernel_slots = match &self.flows {
            Some(flows) => Some(flows.apply_config(&next)?.tenants),
            None => None,
        };
        let host_share = next.cluster.host_share;
        let tenants = match self.app.reload(next) {
            Ok(changes) => changes,
            Err(err) => {
                if let (Some(flows), Some(before)) = (&self.flows, &slots_before)
                    && let Err(back) = flows.restore(before, &current)
                {
                    tracing::error!(
                        "putting the kernel limits back after a refused reload failed: {}",
                        back.chain()
                    );
                }
                return Err(ReloadError::Tenants(err));
            }
        };
        // Nothing below can fail.
        self.quic_tls.install(quic_tls);
        self.tcp_tls.set(tls.tcp);
        Ok(ReloadReport {
            tenants,
            kernel_slots,
            host_share,
        })
    }

    /// [`Self::reload`], logged (for SIGHUP, which has no one to answer).
    pub fn reload_logged(&self) {
        match self.reload() {
            Ok(report) => tracing::info!(
                added = ?names(&report.tenants.added),
                removed = ?names(&report.tenants.removed),
                changed = ?names(&report.tenants.changed),
                host_share = report.host_share,
                "config reloaded"
            ),
            Err(err) => tracing::error!("config reload refused, nothing changed: {err}"),
        }
    }
}

fn names(ids: &[bulkhead_core::TenantId]) -> Vec<&str> {
    ids.iter().map(bulkhead_core::TenantId::as_str).collect()
}

/// What `next` changes that a running process cannot take, one line each.
pub fn restart_needed(
    current: &Config,
    next: &Config,
    runtime_dir: &Path,
    gpu: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if current.listeners != next.listeners {
        out.push("[listeners] changed".to_owned());
    }
    if current.trust_domain != next.trust_domain {
        out.push(format!(
            "trust_domain changed from {} to {}",
            current.trust_domain, next.trust_domain
        ));
    }
    if current.kv != next.kv {
        out.push("[kv] changed".to_owned());
    }
    if current.scheduler != next.scheduler {
        out.push("[scheduler] changed".to_owned());
    }
    if current.ebpf.mode != next.ebpf.mode {
        out.push("[ebpf] mode changed".to_owned());
    }
    if current.audit != next.audit {
        out.push("[audit] changed".to_owned());
    }
    if current.cluster.quic_lb != next.cluster.quic_lb {
        out.push(
            "[cluster.quic_lb] changed (the QUIC endpoint's connection ids are set at start)"
                .to_owned(),
        );
    }
    if current.models != next.models {
        out.push("[[models]] changed".to_owned());
    }
    let workers = |c: &Config| -> Vec<(Option<Vec<String>>, Option<String>)> {
        plan::plan_workers(c, runtime_dir, gpu)
            .into_iter()
            .map(|w| (w.spawn_args, w.dedicated.map(|t| t.to_string())))
            .collect()
    };
    if out.is_empty() && workers(current) != workers(next) {
        out.push(
            "the worker processes change (a tenant's isolation level, or the models of a \
             tenant with its own workers, or the first or last tenant of a model)"
                .to_owned(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_tenant: &str, isolation: &str, rps: f64) -> Config {
        let src = format!(
            "trust_domain = \"t.local\"\n[tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = [\"ca.pem\"]\n\
             [kv]\npool_blocks = 64\n[[models]]\nname = \"m\"\nmax_context_tokens = 512\n\
             [[tenants]]\nid = \"a\"\nallowed_models = [\"m\"]\nkv_block_quota = 8\nrequests_per_second = {rps:?}\n\
             [[tenants]]\nid = \"{extra_tenant}\"\nallowed_models = [\"m\"]\nkv_block_quota = 8\nisolation = \"{isolation}\"\n"
        );
        Config::from_toml_str(&src).unwrap()
    }

    #[test]
    fn tenant_changes_reload_and_the_worker_plan_does_not() {
        let dir = Path::new("/run/x");
        let now = config("b", "shared", 5.0);
        // New limits, and a shared tenant replaced by another: no restart.
        assert!(restart_needed(&now, &config("c", "shared", 50.0), dir, false).is_empty());
        // A tenant moving to its own worker process needs one.
        let why = restart_needed(&now, &config("b", "process", 5.0), dir, false);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].contains("worker processes"), "{why:?}");
        // So do the pool and the listeners, each named.
        let mut bigger = now.clone();
        bigger.kv.pool_blocks = 128;
        bigger.listeners.tcp = "127.0.0.1:1".parse().unwrap();
        let why = restart_needed(&now, &bigger, dir, false);
        assert_eq!(why, ["[listeners] changed", "[kv] changed"]);
        // This host's share of the limits reloads; its connection ids do not.
        let mut shared = now.clone();
        shared.cluster.host_share = 0.5;
        assert!(restart_needed(&now, &shared, dir, false).is_empty());
        shared.cluster.quic_lb = Some(bulkhead_core::config::QuicLb {
            config_id: 0,
            server_id: vec![1],
            nonce_len: 8,
            key_file: None,
        });
        let why = restart_needed(&now, &shared, dir, false);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].starts_with("[cluster.quic_lb] changed"), "{why:?}");
    }
}
