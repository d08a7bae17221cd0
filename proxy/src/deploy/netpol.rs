//! `bulkhead deploy netpol`: a Kubernetes `NetworkPolicy` per tenant.
//!
//! The bulkhead pods (label `app.kubernetes.io/name: bulkhead`, as
//! `deploy/k8s/daemonset.yaml` sets it) first get a default deny of all
//! ingress. Each tenant's policy then admits, to the QUIC (UDP) and TLS
//! (TCP) listener ports of the config and to nothing else, the pods
//! labelled `bulkhead.io/tenant: <id>` in namespaces labelled the same. A
//! pod of one tenant therefore cannot even open a handshake as another:
//! the network layer agrees with the certificate, the eBPF maps and the
//! scheduler on who a client is.
//!
//! With a metrics endpoint in the config (`[listeners] metrics`), one more
//! policy admits pods labelled `bulkhead.io/metrics-scraper: "true"`, in
//! namespaces labelled the same (where Prometheus runs), to that TCP port
//! only.
//!
//! Policies are additive in Kubernetes, so a pod admitted by one tenant's
//! policy is admitted: label client namespaces and pods with exactly one
//! tenant. Policies apply to pod networking only: the `DaemonSet` uses
//! `hostPort`, not `hostNetwork`, for that reason.

use super::mig::isolation_name;
use bulkhead_core::config::Config;
use std::fmt::Write as _;

/// Label selecting the bulkhead pods (set by `deploy/k8s/daemonset.yaml`).
pub const APP_LABEL: &str = "app.kubernetes.io/name";
/// Value of [`APP_LABEL`] on the bulkhead pods.
pub const APP_NAME: &str = "bulkhead";
/// Label naming the tenant of a client pod and of its namespace.
pub const TENANT_LABEL: &str = "bulkhead.io/tenant";
/// Name of the default-deny policy.
pub const DEFAULT_DENY_NAME: &str = "bulkhead-default-deny";
/// Label of the pods (and their namespace) that may scrape `/metrics`.
pub const SCRAPER_LABEL: &str = "bulkhead.io/metrics-scraper";
/// Name of the policy admitting the scrapers.
pub const METRICS_POLICY_NAME: &str = "bulkhead-metrics";
/// Prefix of each tenant's policy name (`bulkhead-tenant-<id>`).
pub const TENANT_POLICY_PREFIX: &str = "bulkhead-tenant-";

/// Whether `namespace` is a valid Kubernetes namespace name (an RFC 1123
/// label: 1–63 of `[a-z0-9-]`, starting and ending alphanumeric); the error
/// says what is wrong.
pub fn validate_namespace(namespace: &str) -> Result<(), String> {
    if namespace.is_empty() {
        return Err("namespace is empty".to_owned());
    }
    if namespace.len() > 63 {
        return Err(format!(
            "namespace {namespace:?} is {} characters long; the limit is 63",
            namespace.len()
        ));
    }
    if let Some(c) = namespace
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "namespace {namespace:?} contains {c:?}; only lowercase letters, digits and '-' are allowed"
        ));
    }
    if namespace.starts_with('-') || namespace.ends_with('-') {
        return Err(format!(
            "namespace {namespace:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// The policies for the bulkhead pods in `namespace`, as one YAML stream:
/// the default deny, then one document per tenant in config order, then
/// the scrapers' policy if the config has a metrics endpoint.
///
/// Every string is double-quoted, so a tenant id such as `no` or `1e3`
/// stays a string under any YAML reader. `namespace` must pass
/// [`validate_namespace`] (the CLI checks it).
pub fn netpol(config: &Config, namespace: &str) -> String {
    let quic = config.listeners.quic.port();
    let tcp = config.listeners.tcp.port();
    let mut out = format!(
        "\
# NetworkPolicies of the bulkhead pods in namespace \"{namespace}\", written by
# `bulkhead deploy netpol` from the host config. The first denies all ingress
# to the bulkhead pods; each tenant's then admits only that tenant's client
# pods (label {TENANT_LABEL}=<id>, in a namespace labelled the same) to
# the QUIC port (UDP {quic}) and the TLS port (TCP {tcp}). Regenerate and apply
# after adding or removing a tenant.
"
    );
    policy(&mut out, "", DEFAULT_DENY_NAME, namespace, None, "");
    for tenant in &config.tenants {
        let id = tenant.id.as_str();
        policy(
            &mut out,
            &format!(
                "# Tenant {id} (isolation {}).\n",
                isolation_name(tenant.isolation)
            ),
            &format!("{TENANT_POLICY_PREFIX}{id}"),
            namespace,
            Some((TENANT_LABEL, id)),
            &admit(TENANT_LABEL, id, &[("UDP", quic), ("TCP", tcp)]),
        );
    }
    if let Some(metrics) = config.listeners.metrics {
        let port = metrics.port();
        policy(
            &mut out,
            &format!(
                "# Prometheus: pods labelled {SCRAPER_LABEL}=true, in a namespace labelled\n\
                 # the same, to the metrics endpoint (TCP {port}: GET /metrics and /healthz).\n"
            ),
            METRICS_POLICY_NAME,
            namespace,
            None,
            &admit(SCRAPER_LABEL, "true", &[("TCP", port)]),
        );
    }
    out
}

/// One policy document of the bulkhead pods: `---`, `comment`, then the
/// policy named `name` (with `label` added to its own labels) whose
/// `ingress` (YAML under `spec`; empty denies everything) follows.
fn policy(
    out: &mut String,
    comment: &str,
    name: &str,
    namespace: &str,
    label: Option<(&str, &str)>,
    ingress: &str,
) {
    let label = label.map_or_else(String::new, |(k, v)| format!("    \"{k}\": \"{v}\"\n"));
    let _ = write!(
        out,
        "\
---
{comment}apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: \"{name}\"
  namespace: \"{namespace}\"
  labels:
    \"{APP_LABEL}\": \"{APP_NAME}\"
    \"app.kubernetes.io/managed-by\": \"bulkhead-deploy-netpol\"
{label}spec:
  podSelector:
    matchLabels:
      \"{APP_LABEL}\": \"{APP_NAME}\"
  policyTypes:
    - Ingress
{ingress}"
    );
}

/// The `ingress` admitting pods labelled `label: value`, in namespaces
/// labelled the same, to `ports` (protocol, port) and nothing else.
fn admit(label: &str, value: &str, ports: &[(&str, u16)]) -> String {
    let mut out = format!(
        "  ingress:
    - from:
        - namespaceSelector:
            matchLabels:
              \"{label}\": \"{value}\"
          podSelector:
            matchLabels:
              \"{label}\": \"{value}\"
      ports:
"
    );
    for (protocol, port) in ports {
        let _ = write!(
            out,
            "        - protocol: {protocol}\n          port: {port}\n"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
trust_domain = "example.org"
[listeners]
quic = "0.0.0.0:4433"
tcp = "0.0.0.0:8443"
[tls]
cert = "/c.pem"
key = "/k.pem"
client_ca = ["/ca.pem"]
[kv]
pool_blocks = 64
[[models]]
name = "m"
max_context_tokens = 128
[[tenants]]
id = "no"
allowed_models = ["m"]
kv_block_quota = 8
[[tenants]]
id = "acme"
allowed_models = ["m"]
kv_block_quota = 8
isolation = "mig"
"#;

    #[test]
    fn one_default_deny_then_one_policy_per_tenant_with_both_ports() {
        let config = Config::from_toml_str(CONFIG).unwrap();
        let yaml = netpol(&config, "serving");
        let docs: Vec<&str> = yaml.split("\n---\n").skip(1).collect();
        assert_eq!(docs.len(), 3, "{yaml}");
        assert!(docs[0].contains("name: \"bulkhead-default-deny\""));
        assert!(!docs[0].contains("ingress:"), "default deny admits nothing");
        for (doc, id) in docs[1..].iter().zip(["no", "acme"]) {
            assert!(doc.contains(&format!("name: \"bulkhead-tenant-{id}\"")));
            assert_eq!(
                doc.matches(&format!("\"bulkhead.io/tenant\": \"{id}\""))
                    .count(),
                3,
                "label on the policy, the namespace and the pod selector:\n{doc}"
            );
            assert!(
                doc.contains("protocol: UDP\n          port: 4433\n"),
                "{doc}"
            );
            assert!(
                doc.trim_end()
                    .ends_with("protocol: TCP\n          port: 8443"),
                "{doc}"
            );
            assert!(doc.contains("namespace: \"serving\""));
        }
    }

    #[test]
    fn a_metrics_endpoint_gets_one_policy_for_the_scrapers_and_its_port_only() {
        let with_metrics = CONFIG.replace(
            "tcp = \"0.0.0.0:8443\"\n",
            "tcp = \"0.0.0.0:8443\"\nmetrics = \"0.0.0.0:9464\"\n",
        );
        let config = Config::from_toml_str(&with_metrics).unwrap();
        let yaml = netpol(&config, "serving");
        let docs: Vec<&str> = yaml.split("\n---\n").skip(1).collect();
        assert_eq!(docs.len(), 4, "{yaml}");
        let scrapers = docs[3];
        assert!(
            scrapers.contains("name: \"bulkhead-metrics\""),
            "{scrapers}"
        );
        assert_eq!(
            scrapers
                .matches("\"bulkhead.io/metrics-scraper\": \"true\"")
                .count(),
            2,
            "the namespace and the pod selector:\n{scrapers}"
        );
        assert!(
            scrapers
                .trim_end()
                .ends_with("ports:\n        - protocol: TCP\n          port: 9464"),
            "{scrapers}"
        );
        assert!(
            !docs[1..3].iter().any(|d| d.contains("9464")),
            "tenants do not reach the metrics port"
        );
        let without = netpol(&Config::from_toml_str(CONFIG).unwrap(), "serving");
        assert!(!without.contains("bulkhead-metrics"));
    }

    #[test]
    fn namespaces_are_rfc1123_labels() {
        assert!(validate_namespace("bulkhead").is_ok());
        assert!(validate_namespace("team-7").is_ok());
        for (bad, why) in [
            ("", "empty"),
            ("Bulkhead", "'B'"),
            ("a.b", "'.'"),
            ("-a", "start and end"),
            (&"x".repeat(64), "limit is 63"),
        ] {
            let err = validate_namespace(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
