//! Where an instance's pins live, and the checks made before touching the kernel.
//!
//! Layout: `<bpffs>/bulkhead/<instance>/` holds every map by its name
//! (`BH_FLOWS`, …) and the two cgroup links, `link_ingress` and
//! `link_egress`. The pinned links keep the programs attached after the
//! loading process exits; removing them (unload) detaches.

use super::EbpfError;
use std::path::{Path, PathBuf};

pub use bulkhead_ebpf_common::MAP_NAMES;
/// Pin name of the ingress link.
pub const LINK_INGRESS: &str = "link_ingress";
/// Pin name of the egress link.
pub const LINK_EGRESS: &str = "link_egress";
/// The directory under the bpffs holding every instance.
pub const PIN_ROOT: &str = "bulkhead";
/// The default instance name.
pub const DEFAULT_INSTANCE: &str = "default";
/// The usual bpffs mount point.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// `statfs` magic of a BPF filesystem.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
/// `statfs` magic of the cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// Capability bits (`linux/capability.h`).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The pin paths of one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    instance: String,
    dir: PathBuf,
}

impl PinLayout {
    /// The layout of `instance` under the bpffs at `bpffs` (the name is checked, not the paths).
    pub fn new(bpffs: &Path, instance: &str) -> Result<Self, EbpfError> {
        let valid = !instance.is_empty()
            && instance.len() <= 64
            && instance != "."
            && instance != ".."
            && instance
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(EbpfError::InstanceName {
                name: instance.to_owned(),
            });
        }
        Ok(Self {
            instance: instance.to_owned(),
            dir: bpffs.join(PIN_ROOT).join(instance),
        })
    }

    /// The instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// `<bpffs>/bulkhead/<instance>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pin of map or link `name`.
    pub fn pin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Every pin the instance has when fully loaded: the maps, then the links.
    pub fn all_pins(&self) -> impl Iterator<Item = (&'static str, PathBuf)> + '_ {
        MAP_NAMES
            .into_iter()
            .chain([LINK_INGRESS, LINK_EGRESS])
            .map(|name| (name, self.pin(name)))
    }

    /// Whether the instance is pinned: `Ok(false)` if its directory is absent or empty,
    /// `Ok(true)` if every pin is there, an error naming the first missing pin otherwise.
    pub fn is_pinned(&self) -> Result<bool, EbpfError> {
        let empty = match std::fs::read_dir(&self.dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => true,
            Err(err) => {
                return Err(EbpfError::Io {
                    context: format!("reading pin directory {}", self.dir.display()),
                    source: err,
                });
            }
        };
        if empty {
            return Ok(false);
        }
        match self.all_pins().find(|(_, path)| !path.exists()) {
            None => Ok(true),
            Some((missing, _)) => Err(EbpfError::PartialPins {
                instance: self.instance.clone(),
                dir: self.dir.clone(),
                missing: missing.to_owned(),
            }),
        }
    }
}

/// The `statfs` magic of the filesystem holding `path`, as a number or an error string.
fn fs_magic(path: &Path) -> Result<u64, String> {
    let stat = rustix::fs::statfs(path).map_err(|e| e.to_string())?;
    // `f_type`'s integer type differs between targets; the magic numbers are all below 2^32.
    u64::try_from(stat.f_type).map_err(|_| format!("odd filesystem type {}", stat.f_type))
}

/// A name for a filesystem magic, for error messages.
fn fs_name(magic: u64) -> String {
    match magic {
        0x0102_1994 => "tmpfs".to_owned(),
        0x6265_6572 => "sysfs".to_owned(),
        0xef53 => "ext4".to_owned(),
        0x794c_7630 => "overlayfs".to_owned(),
        0x0027_e0eb => "cgroup v1".to_owned(),
        other => format!("filesystem type {other:#x}"),
    }
}

/// Checks that `path` is on a mounted bpffs.
pub fn check_bpffs(path: &Path) -> Result<(), EbpfError> {
    let not = |found: String| EbpfError::NotBpffs {
        path: path.to_owned(),
        found,
    };
    match fs_magic(path) {
        Ok(BPF_FS_MAGIC) => Ok(()),
        Ok(magic) => Err(not(fs_name(magic))),
        Err(err) => Err(not(err)),
    }
}

/// Checks that `path` is a directory of the cgroup v2 hierarchy.
pub fn check_cgroup(path: &Path) -> Result<(), EbpfError> {
    if !path.exists() {
        return Err(EbpfError::NoCgroup {
            path: path.to_owned(),
        });
    }
    let not = |found: String| EbpfError::NotCgroup2 {
        path: path.to_owned(),
        found,
    };
    if !path.is_dir() {
        return Err(not("not a directory".to_owned()));
    }
    match fs_magic(path) {
        Ok(CGROUP2_SUPER_MAGIC) => Ok(()),
        Ok(magic) => Err(not(format!(
            "{}; cgroup v2 is usually at /sys/fs/cgroup or /sys/fs/cgroup/unified",
            fs_name(magic)
        ))),
        Err(err) => Err(not(err)),
    }
}

/// Whether effective capabilities `cap_eff` (the `CapEff:` of `/proc/self/status`)
/// allow loading and attaching cgroup programs.
pub fn caps_allow_bpf(cap_eff: u64) -> bool {
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    has(CAP_NET_ADMIN) && (has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)))
}

/// The `CapEff:` bits in a `/proc/<pid>/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Checks that this process may load and attach the programs.
pub fn check_privileges() -> Result<(), EbpfError> {
    let uid = rustix::process::geteuid().as_raw();
    if uid == 0 {
        return Ok(());
    }
    let cap_eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(parse_cap_eff)
        .unwrap_or(0);
    if caps_allow_bpf(cap_eff) {
        Ok(())
    } else {
        Err(EbpfError::NotPrivileged { uid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names_every_pin() {
        let layout = PinLayout::new(Path::new("/sys/fs/bpf"), "default").unwrap();
        assert_eq!(layout.dir(), Path::new("/sys/fs/bpf/bulkhead/default"));
        let pins: Vec<_> = layout.all_pins().map(|(name, _)| name).collect();
        assert_eq!(pins.len(), 10);
        assert_eq!(
            layout.pin(LINK_EGRESS),
            Path::new("/sys/fs/bpf/bulkhead/default/link_egress")
        );
    }

    #[test]
    fn instance_names_cannot_escape_the_pin_root() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é"] {
            assert!(
                matches!(
                    PinLayout::new(Path::new("/sys/fs/bpf"), bad),
                    Err(EbpfError::InstanceName { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(PinLayout::new(Path::new("/b"), "prod-1.a_b").is_ok());
    }

    #[test]
    fn capabilities_parse_from_proc_status() {
        let status = "Name:\tbulkhead\nCapPrm:\t0\nCapEff:\t000001fffeffffff\n";
        let eff = parse_cap_eff(status).unwrap();
        assert!(caps_allow_bpf(eff));
        assert!(!caps_allow_bpf(0));
        // CAP_BPF alone is not enough: attaching to a cgroup needs CAP_NET_ADMIN.
        assert!(!caps_allow_bpf(1 << CAP_BPF | 1 << CAP_PERFMON));
        assert!(caps_allow_bpf(
            1 << CAP_BPF | 1 << CAP_PERFMON | 1 << CAP_NET_ADMIN
        ));
    }

    #[test]
    fn a_missing_cgroup_is_named() {
        let err = check_cgroup(Path::new("/nonexistent/cgroup")).unwrap_err();
        assert_eq!(err.to_string(), "cgroup /nonexistent/cgroup does not exist");
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        let err = check_bpffs(Path::new("/")).unwrap_err();
        assert!(matches!(err, EbpfError::NotBpffs { .. }), "{err}");
        assert!(err.to_string().contains("mount -t bpf bpf /"), "{err}");
    }
}
