//! A fresh load: verify the programs, pin the maps, write the limits, attach
//! and pin the links; undo all of it if any step fails.

use super::{KernelPlane, Origin};
use crate::ebpf::EbpfError;
use crate::ebpf::error::KernelContext as _;
use crate::ebpf::pins::{LINK_EGRESS, LINK_INGRESS, MAP_NAMES, PinLayout};
use aya::EbpfLoader;
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use bulkhead_ebpf_common::{EGRESS_PROGRAM, INGRESS_PROGRAM, Settings, TenantLimits};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

impl KernelPlane {
    /// Loads `object`, pins its maps, writes the config, then attaches and pins the links.
    pub(super) fn load_fresh(
        object: &[u8],
        layout: PinLayout,
        cgroup: &Path,
        table: &[TenantLimits],
        settings: Settings,
    ) -> Result<Self, EbpfError> {
        let mut ebpf = EbpfLoader::new()
            .load(object)
            .kernel(|| "loading the eBPF object (maps, BTF relocations)".to_owned())?;
        // Verify both programs before anything is pinned or attached.
        for name in [INGRESS_PROGRAM, EGRESS_PROGRAM] {
            cgroup_skb(&mut ebpf, name)?
                .load()
                .kernel(|| format!("loading program {name} (the verifier refused it?)"))?;
        }

        let mut rollback = Rollback::default();
        let bpffs = layout
            .dir()
            .parent()
            .expect("the pin dir is <bpffs>/bulkhead/<instance>");
        rollback.create_dir(bpffs)?;
        rollback.create_dir(layout.dir())?;
        let mut maps = HashMap::new();
        for name in MAP_NAMES {
            let map = ebpf
                .take_map(name)
                .ok_or(EbpfError::Missing { kind: "map", name })?;
            let path = layout.pin(name);
            map.pin(&path)
                .kernel(|| format!("pinning map {name} at {}", path.display()))?;
            rollback.pins.push(path);
            maps.insert(name, map);
        }
        let mut plane = Self::from_maps(layout, Origin::Loaded, maps)?;
        // Limits are in place before the first packet is seen.
        plane.write_config(table, settings)?;

        let cgroup_dir = std::fs::File::open(cgroup).map_err(EbpfError::io(format!(
            "opening cgroup {}",
            cgroup.display()
        )))?;
        for (name, attach_type, pin) in [
            (INGRESS_PROGRAM, CgroupSkbAttachType::Ingress, LINK_INGRESS),
            (EGRESS_PROGRAM, CgroupSkbAttachType::Egress, LINK_EGRESS),
        ] {
            let program = cgroup_skb(&mut ebpf, name)?;
            let link_id = program
                // `Single` is flags 0, which a bpf_link attach requires (EINVAL
                // otherwise); cgroup links always coexist with other programs.
                .attach(&cgroup_dir, attach_type, CgroupAttachMode::Single)
                .kernel(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            let link = program
                .take_link(link_id)
                .kernel(|| format!("taking the link of {name}"))?;
            let link = FdLink::try_from(link).kernel(|| {
                format!("{name}: the kernel attached without a bpf_link (needs Linux 5.7+)")
            })?;
            let path = plane.layout.pin(pin);
            // The pin holds the link; our handle is closed at once, so unload detaches.
            drop(
                link.pin(&path)
                    .kernel(|| format!("pinning link {pin} at {}", path.display()))?,
            );
            rollback.pins.push(path);
        }
        rollback.commit();
        Ok(plane)
    }
}

/// Program `name` of `ebpf` as a cgroup skb program.
fn cgroup_skb<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSkb, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .kernel(|| format!("program {name} is not a cgroup_skb program"))
}

/// Undoes a half-done load: removes the pins and directories it made, in reverse.
#[derive(Debug, Default)]
struct Rollback {
    pins: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    committed: bool,
}

impl Rollback {
    /// Creates `dir` if it is absent, remembering to remove it.
    fn create_dir(&mut self, dir: &Path) -> Result<(), EbpfError> {
        match std::fs::create_dir(dir) {
            Ok(()) => {
                self.dirs.push(dir.to_owned());
                Ok(())
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(err) => Err(EbpfError::Io {
                context: format!("creating pin directory {}", dir.display()),
                source: err,
            }),
        }
    }

    /// Keeps everything.
    fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for pin in self.pins.iter().rev() {
            // A removed link pin with no other holder detaches the program.
            if let Err(err) = std::fs::remove_file(pin) {
                tracing::error!(pin = %pin.display(), %err, "rollback: could not remove pin");
            }
        }
        for dir in self.dirs.iter().rev() {
            if let Err(err) = std::fs::remove_dir(dir) {
                tracing::error!(dir = %dir.display(), %err, "rollback: could not remove directory");
            }
        }
    }
}
