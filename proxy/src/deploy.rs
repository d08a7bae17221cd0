//! Per-host deployment helpers: what `bulkhead deploy` and `bulkhead mig`
//! print. Both are pure functions of the host config, so their output for a
//! sample config is checked byte for byte (`deploy/expected/`).
//!
//! - [`netpol::netpol`]: one Kubernetes `NetworkPolicy` per tenant, letting
//!   only that tenant's client pods reach the bulkhead pods' QUIC (UDP) and
//!   TLS (TCP) ports, after a default deny.
//! - [`mig::plan`]: the GPUs of a host split among the tenants' isolation
//!   needs: whole GPUs for `dedicated` tenants, an H100 MIG slice for each
//!   `mig` tenant (first-fit decreasing over the GPUs, every GPU's slices at
//!   placements the hardware accepts), a whole GPU for the shared pool; and
//!   the `nvidia-smi` commands that make it so.
//! - [`cli`]: the clap subcommands around them.
//!
//! The static artifacts live beside them in `deploy/` (systemd unit and
//! slice, Kubernetes manifests, Grafana dashboard, Prometheus alerts) and
//! are validated by `proxy/tests/deploy_artifacts.rs`.

pub mod cli;
pub mod mig;
pub mod netpol;

pub use cli::{DeployCommand, MigCommand, run_deploy, run_mig};
