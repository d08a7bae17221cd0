//! [`EbpfError`]: why kernel enforcement could not be set up or used.

use std::path::PathBuf;

/// Why the eBPF control plane failed; each variant names the thing at fault.
///
/// Errors from aya and the OS are carried as the `source` of [`EbpfError::Kernel`]
/// and [`EbpfError::Io`]; print the chain (`{:#}` with anyhow, or
/// [`EbpfError::chain`]) to see them.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// This binary was built without the eBPF toolchain, so it carries no object.
    #[error(
        "no eBPF object is embedded in this binary (it was built without the eBPF toolchain: \
         run `cargo xtask setup --ebpf` and rebuild)"
    )]
    NoObject,
    /// The process may not load BPF programs.
    #[error(
        "loading eBPF programs needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON); \
         this process runs as uid {uid} without them"
    )]
    NotPrivileged {
        /// The effective uid.
        uid: u32,
    },
    /// The bpffs path is missing or is not a mounted BPF filesystem.
    #[error(
        "{} is not a mounted BPF filesystem ({found}); mount one with `mount -t bpf bpf {}`",
        path.display(),
        path.display()
    )]
    NotBpffs {
        /// The path given.
        path: PathBuf,
        /// What is there instead.
        found: String,
    },
    /// The cgroup directory does not exist.
    #[error("cgroup {} does not exist", path.display())]
    NoCgroup {
        /// The path given.
        path: PathBuf,
    },
    /// The path exists but is not a directory of the cgroup v2 hierarchy.
    #[error("{} is not a cgroup v2 directory ({found})", path.display())]
    NotCgroup2 {
        /// The path given.
        path: PathBuf,
        /// What is there instead.
        found: String,
    },
    /// The instance name cannot name a directory under `<bpffs>/bulkhead`.
    #[error("invalid instance name {name:?}: use letters, digits, `-`, `_` and `.`, not `.`/`..`")]
    InstanceName {
        /// The name given.
        name: String,
    },
    /// A tenant's kernel limit cannot be enforced.
    #[error("tenant {tenant:?}: kernel limit `{field}`: {problem}")]
    Limit {
        /// The tenant's id (or `[ebpf]` for the unknown-source budget).
        tenant: String,
        /// The config key.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// More tenants than the kernel maps have slots for.
    #[error("{count} tenants configured; kernel enforcement holds at most {max}")]
    TooManyTenants {
        /// Tenants in the config.
        count: usize,
        /// Usable slots.
        max: u32,
    },
    /// A tenant index at or above `UNKNOWN_TENANT`.
    #[error("tenant index {index} is out of range (tenant slots are 0..{max})")]
    TenantIndex {
        /// The index given.
        index: u32,
        /// One past the largest usable index.
        max: u32,
    },
    /// Nothing is pinned for this instance.
    #[error(
        "instance {instance:?} is not loaded: nothing pinned at {} (run `bulkhead ebpf load`)",
        dir.display()
    )]
    NotLoaded {
        /// The instance.
        instance: String,
        /// Its pin directory.
        dir: PathBuf,
    },
    /// Some pins of the instance exist and others do not.
    #[error(
        "the pins of instance {instance:?} in {} are incomplete (missing {missing}); \
         run `bulkhead ebpf unload --instance {instance}` and load again",
        dir.display()
    )]
    PartialPins {
        /// The instance.
        instance: String,
        /// Its pin directory.
        dir: PathBuf,
        /// The first missing pin.
        missing: String,
    },
    /// The embedded object lacks a map or program of the contract.
    #[error("the eBPF object has no {kind} named {name} (object and loader are out of step)")]
    Missing {
        /// `map` or `program`.
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// The ring buffer already has its one consumer.
    #[error("the event stream was already taken from this kernel plane")]
    EventsTaken,
    /// A BPF syscall (through aya) failed.
    #[error("{context}")]
    Kernel {
        /// What was being done.
        context: String,
        /// aya's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file system or OS call failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl EbpfError {
    /// The error and its sources in one line, `: `-separated.
    pub fn chain(&self) -> String {
        let mut line = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(err) = source {
            line.push_str(": ");
            line.push_str(&err.to_string());
            source = err.source();
        }
        line
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// Adds context to an aya (or other) error, making it an [`EbpfError::Kernel`].
pub(crate) trait KernelContext<T> {
    /// Wraps the error with what was being done.
    fn kernel(self, context: impl FnOnce() -> String) -> Result<T, EbpfError>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> KernelContext<T> for Result<T, E> {
    fn kernel(self, context: impl FnOnce() -> String) -> Result<T, EbpfError> {
        self.map_err(|source| EbpfError::Kernel {
            context: context(),
            source: Box::new(source),
        })
    }
}
