//! `bulkhead deploy ...` and `bulkhead mig ...`: the command-line side of
//! [`super::netpol`] and [`super::mig`]. Each returns the text to print.

use super::mig::{Footprint, Footprints, plan};
use super::netpol::{netpol, validate_namespace};
use anyhow::{Context as _, anyhow, bail};
use bulkhead_core::config::Config;
use bulkhead_kernels::sim::CostModel;
use std::path::{Path, PathBuf};

/// `bulkhead deploy` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DeployCommand {
    /// Write the Kubernetes network policies of the bulkhead pods: a default
    /// deny, then one per tenant admitting only its own client pods (label
    /// `bulkhead.io/tenant: <id>`, in namespaces labelled the same) to the
    /// QUIC and TLS ports.
    Netpol {
        /// The host config.
        #[arg(long)]
        config: PathBuf,
        /// Namespace the bulkhead pods run in.
        #[arg(long)]
        namespace: String,
        /// Write the YAML to this file instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `bulkhead mig` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum MigCommand {
    /// Split the host's H100 80GB GPUs among the tenants' isolation needs
    /// (whole GPUs for `dedicated`, a MIG slice sized by memory for each
    /// `mig` tenant, a whole GPU for the shared pool) and print the plan
    /// with the `nvidia-smi` commands; or name the tenant that does not fit.
    Plan {
        /// The host config.
        #[arg(long)]
        config: PathBuf,
        /// GPUs on the host.
        #[arg(long)]
        gpus: u32,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// Model sizes from a `sim` calibration file (its `weight_bytes`,
        /// `kv_bytes_per_token_layer` and `layers`): `FILE` for every model,
        /// `MODEL=FILE` for one; repeatable. Default: Llama-3-8B in bf16.
        #[arg(long, value_name = "[MODEL=]FILE")]
        calibration: Vec<String>,
    },
}

fn read_config(path: &Path) -> anyhow::Result<Config> {
    Config::from_path(path).map_err(|e| anyhow!("config {}:\n{e}", path.display()))
}

/// Runs a `bulkhead deploy` subcommand and returns what to print.
pub fn run_deploy(command: &DeployCommand) -> anyhow::Result<String> {
    match command {
        DeployCommand::Netpol {
            config,
            namespace,
            out,
        } => {
            validate_namespace(namespace).map_err(|e| anyhow!("--namespace: {e}"))?;
            let config = read_config(config)?;
            let yaml = netpol(&config, namespace);
            match out {
                None => Ok(yaml),
                Some(path) => {
                    std::fs::write(path, &yaml)
                        .with_context(|| format!("writing {}", path.display()))?;
                    Ok(format!(
                        "wrote {} NetworkPolicies (a default deny and {} tenants) to {}\n",
                        config.tenants.len() + 1,
                        config.tenants.len(),
                        path.display()
                    ))
                }
            }
        }
    }
}

/// Runs a `bulkhead mig` subcommand and returns what to print.
pub fn run_mig(command: &MigCommand) -> anyhow::Result<String> {
    match command {
        MigCommand::Plan {
            config,
            gpus,
            json,
            calibration,
        } => {
            let config = read_config(config)?;
            let footprints = footprints(&config, calibration)?;
            let plan = plan(&config, *gpus, &footprints)?;
            if *json {
                let mut text = serde_json::to_string_pretty(&plan.to_json())
                    .context("serializing the plan")?;
                text.push('\n');
                Ok(text)
            } else {
                Ok(plan.render_text())
            }
        }
    }
}

/// The footprints `--calibration` arguments name: `MODEL=FILE` where the part
/// before the first `=` is a model of the config, else `FILE` for every model.
fn footprints(config: &Config, args: &[String]) -> anyhow::Result<Footprints> {
    let mut footprints = Footprints::default();
    let mut default_set = false;
    for arg in args {
        let (model, file) = match arg.split_once('=') {
            Some((model, file)) if config.model(model).is_some() => (Some(model), file),
            _ => (None, arg.as_str()),
        };
        let cost = CostModel::from_file(Path::new(file))
            .with_context(|| format!("--calibration {arg}"))?;
        let footprint = Footprint::from_cost_model(&cost);
        match model {
            Some(model) => {
                if footprints
                    .per_model
                    .insert(model.to_owned(), footprint)
                    .is_some()
                {
                    bail!("--calibration names model {model} twice");
                }
            }
            None if default_set => {
                bail!("--calibration {arg}: a file for every model was already given")
            }
            None => {
                footprints.default = footprint;
                default_set = true;
            }
        }
    }
    Ok(footprints)
}
