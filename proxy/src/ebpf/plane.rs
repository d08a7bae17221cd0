//! [`KernelPlane`]: load, attach and pin the programs (or reuse the pins), then use the maps.

use super::EbpfError;
use super::error::KernelContext as _;
use super::event::{self, EventStream};
use super::flow::{Protocol, flow_key};
use super::limits;
use super::pins::{self, LINK_EGRESS, LINK_INGRESS, MAP_NAMES, PIN_ROOT, PinLayout};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use bulkhead_core::config::{Config, EbpfMode};
use bulkhead_ebpf_common::{
    COUNTERS_MAP, DROP_AGG_MAP, DropAggregate, EVENTS_MAP, FLOWS_MAP, FlowKey, FlowValue,
    LIMITS_ACTIVE, SETTINGS_MAP, Settings, TENANT_LIMITS_MAP, TenantCounters, TenantLimits,
    UNKNOWN_TENANT,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod attach;

/// The eBPF object built by `build.rs`, if this binary was built with the eBPF toolchain.
#[cfg(bulkhead_ebpf_object)]
pub fn embedded_object() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(env!("BULKHEAD_EBPF_OBJECT")))
}

/// The eBPF object built by `build.rs`: none, this binary was built without the eBPF toolchain.
#[cfg(not(bulkhead_ebpf_object))]
pub fn embedded_object() -> Option<&'static [u8]> {
    None
}

/// How a [`KernelPlane`] came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This process loaded, attached and pinned the programs.
    Loaded,
    /// A previous `load` had pinned them; this process reuses the pins
    /// (enforcement never stopped).
    Reused,
    /// Opened from the pins for reading only ([`KernelPlane::open`]); no cgroup was named.
    Opened,
}

/// What [`KernelPlane::apply_config`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyReport {
    /// Tenant slots written (`0..tenants`).
    pub tenants: u32,
    /// Slots of tenants no longer configured that were cleared.
    pub cleared: u32,
}

/// One pinned link, as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStatus {
    /// Its pin name (`link_ingress`, `link_egress`).
    pub name: &'static str,
    /// The kernel's link id.
    pub link_id: u32,
    /// The id of the attached program.
    pub program_id: u32,
}

/// One tenant slot's limits and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantStatus {
    /// The tenant index ([`UNKNOWN_TENANT`] for unregistered sources).
    pub index: u32,
    /// Its limits (all zero for the unknown slot).
    pub limits: TenantLimits,
    /// Its counters, summed over CPUs.
    pub counters: TenantCounters,
}

/// What `status` shows: the pins, the links and every active slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaneStatus {
    /// The instance's pin directory.
    pub pin_dir: PathBuf,
    /// The pinned links.
    pub links: Vec<LinkStatus>,
    /// Active tenant slots, then the unknown slot.
    pub tenants: Vec<TenantStatus>,
}

/// What [`KernelPlane::unload`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnloadReport {
    /// The instance's pin directory.
    pub pin_dir: PathBuf,
    /// Links unpinned and detached.
    pub detached: Vec<&'static str>,
    /// Map pins removed.
    pub unpinned_maps: Vec<&'static str>,
}

impl UnloadReport {
    /// Whether anything was loaded.
    pub fn was_loaded(&self) -> bool {
        !self.detached.is_empty() || !self.unpinned_maps.is_empty()
    }
}

/// The kernel side of enforcement: the programs attached to the proxy's
/// cgroup, and handles on their maps.
///
/// The programs stay attached through the pinned links, not this value:
/// dropping it (or the process exiting) leaves enforcement running; only
/// [`KernelPlane::unload`] stops it.
pub struct KernelPlane {
    layout: PinLayout,
    origin: Origin,
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    limits: Array<MapData, TenantLimits>,
    settings: Array<MapData, Settings>,
    counters: PerCpuArray<MapData, TenantCounters>,
    drop_agg: PerCpuArray<MapData, DropAggregate>,
    events: Option<RingBuf<MapData>>,
    /// What the last config write did.
    applied: ApplyReport,
}

impl std::fmt::Debug for KernelPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPlane")
            .field("pin_dir", &self.layout.dir())
            .field("origin", &self.origin)
            .field("events_taken", &self.events.is_none())
            .finish_non_exhaustive()
    }
}

impl KernelPlane {
    /// Starts kernel enforcement as `mode` says.
    ///
    /// - `Off` ([`EbpfMode::Off`]): `Ok(None)`.
    /// - `Required`: [`KernelPlane::load`]; its error if it fails.
    /// - `Auto`: [`KernelPlane::load`]; if it fails, a warning
    ///   "kernel enforcement is OFF: <reason>" and `Ok(None)`.
    pub fn start(
        mode: EbpfMode,
        config: &Config,
        cgroup: &Path,
        instance: &str,
        bpffs: &Path,
    ) -> Result<Option<Self>, EbpfError> {
        match mode {
            EbpfMode::Off => {
                tracing::info!(instance, "kernel enforcement is off (ebpf.mode = \"off\")");
                Ok(None)
            }
            EbpfMode::Required => Self::load(config, cgroup, instance, bpffs).map(Some),
            EbpfMode::Auto => match Self::load(config, cgroup, instance, bpffs) {
                Ok(plane) => Ok(Some(plane)),
                Err(err) => {
                    let reason = err.chain();
                    tracing::warn!(
                        instance,
                        cgroup = %cgroup.display(),
                        "kernel enforcement is OFF: {reason} (ebpf.mode = \"auto\"; limits are \
                         enforced in userspace only; set mode = \"required\" to refuse to start)"
                    );
                    Ok(None)
                }
            },
        }
    }

    /// Loads and attaches the programs to `cgroup`, pinned as `instance`, and
    /// writes `config`'s limits; if the instance is already pinned (a previous
    /// load), reuses it without re-attaching and writes the limits.
    ///
    /// On any failure nothing stays attached or pinned that this call added.
    pub fn load(
        config: &Config,
        cgroup: &Path,
        instance: &str,
        bpffs: &Path,
    ) -> Result<Self, EbpfError> {
        let layout = PinLayout::new(bpffs, instance)?;
        // Everything that can be refused is checked before the kernel is touched.
        let table = limits::tenant_table(config)?;
        let settings = limits::settings(&config.ebpf)?;
        pins::check_cgroup(cgroup)?;
        pins::check_privileges()?;
        pins::check_bpffs(bpffs)?;

        if layout.is_pinned()? {
            let mut plane = Self::open_pinned(layout, Origin::Reused)?;
            plane.write_config(&table, settings)?;
            tracing::info!(
                instance,
                pins = %plane.pin_dir().display(),
                "kernel enforcement: reusing pinned programs and maps"
            );
            return Ok(plane);
        }
        let object = embedded_object().ok_or(EbpfError::NoObject)?;
        let plane = Self::load_fresh(object, layout, cgroup, &table, settings)?;
        tracing::info!(
            instance,
            cgroup = %cgroup.display(),
            pins = %plane.pin_dir().display(),
            "kernel enforcement: programs loaded, attached and pinned"
        );
        Ok(plane)
    }

    /// Opens a pinned instance's maps, to read or update them; attaches nothing.
    pub fn open(bpffs: &Path, instance: &str) -> Result<Self, EbpfError> {
        let layout = PinLayout::new(bpffs, instance)?;
        pins::check_privileges()?;
        pins::check_bpffs(bpffs)?;
        if !layout.is_pinned()? {
            return Err(EbpfError::NotLoaded {
                instance: instance.to_owned(),
                dir: layout.dir().to_owned(),
            });
        }
        Self::open_pinned(layout, Origin::Opened)
    }

    /// Detaches the programs of `instance` and removes all its pins.
    ///
    /// Afterwards nothing of the instance is attached or pinned (maps live on
    /// only while some process still holds them open). Unloading an instance
    /// that is not loaded does nothing and says so in the report.
    pub fn unload(bpffs: &Path, instance: &str) -> Result<UnloadReport, EbpfError> {
        let layout = PinLayout::new(bpffs, instance)?;
        pins::check_privileges()?;
        pins::check_bpffs(bpffs)?;
        let mut report = UnloadReport {
            pin_dir: layout.dir().to_owned(),
            ..UnloadReport::default()
        };
        if !layout.dir().exists() {
            return Ok(report);
        }
        for name in [LINK_INGRESS, LINK_EGRESS] {
            let path = layout.pin(name);
            if !path.exists() {
                continue;
            }
            let link = PinnedLink::from_pin(&path)
                .kernel(|| format!("opening pinned link {}", path.display()))?;
            // Unpinning drops the last reference but ours; dropping ours detaches.
            let link = link
                .unpin()
                .map_err(EbpfError::io(format!("unpinning {}", path.display())))?;
            drop(link);
            report.detached.push(name);
        }
        for name in MAP_NAMES {
            let path = layout.pin(name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .map_err(EbpfError::io(format!("unpinning {}", path.display())))?;
                report.unpinned_maps.push(name);
            }
        }
        std::fs::remove_dir(layout.dir()).map_err(EbpfError::io(format!(
            "removing {} (does it hold pins that are not bulkhead's?)",
            layout.dir().display()
        )))?;
        // The shared parent goes too once no instance is left in it.
        let _ = std::fs::remove_dir(bpffs.join(PIN_ROOT));
        tracing::info!(
            instance,
            "kernel enforcement: programs detached, pins removed"
        );
        Ok(report)
    }

    /// How this plane came to be.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// What the last config write ([`KernelPlane::load`] or [`KernelPlane::apply_config`]) did.
    pub fn applied(&self) -> ApplyReport {
        self.applied
    }

    /// The instance's pin directory.
    pub fn pin_dir(&self) -> &Path {
        self.layout.dir()
    }

    /// Writes every tenant's limits and the settings from `config`, and
    /// clears the slots of tenants no longer in it.
    ///
    /// Tenant `i` of `config.tenants` is slot `i`: a reload that reorders or
    /// removes tenants moves them to other slots, so flows must be registered
    /// again after it.
    pub fn apply_config(&mut self, config: &Config) -> Result<ApplyReport, EbpfError> {
        let table = limits::tenant_table(config)?;
        let settings = limits::settings(&config.ebpf)?;
        self.write_config(&table, settings)
    }

    /// Writes `table` (slot by slot; see `TenantSlots`) and `settings`,
    /// and clears active slots beyond the table.
    pub fn apply_table(
        &mut self,
        table: &[TenantLimits],
        settings: Settings,
    ) -> Result<ApplyReport, EbpfError> {
        self.write_config(table, settings)
    }

    /// Registers the flow of `remote` to tenant `tenant` (replacing any earlier registration).
    pub fn register_flow(
        &mut self,
        remote: SocketAddr,
        protocol: Protocol,
        tenant: u32,
    ) -> Result<(), EbpfError> {
        limits::check_tenant_index(tenant)?;
        let key = flow_key(remote, protocol);
        self.flows
            .insert(key, FlowValue { tenant, pad: 0 }, 0)
            .kernel(|| format!("registering flow {remote} ({protocol:?}) to tenant {tenant}"))?;
        tracing::debug!(tenant, %remote, ?protocol, "flow registered");
        Ok(())
    }

    /// Moves a registration from `old` to `new` (QUIC connection migration);
    /// `false` if `old` was not registered.
    pub fn move_flow(
        &mut self,
        old: SocketAddr,
        new: SocketAddr,
        protocol: Protocol,
    ) -> Result<bool, EbpfError> {
        let old_key = flow_key(old, protocol);
        let value = match self.flows.get(&old_key, 0) {
            Ok(value) => value,
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(err) => return Err(err).kernel(|| format!("looking up flow {old}")),
        };
        // Insert first: the flow is never unregistered in between.
        self.flows
            .insert(flow_key(new, protocol), value, 0)
            .kernel(|| format!("registering migrated flow {new}"))?;
        if flow_key(new, protocol) != old_key {
            self.remove_key(&old_key, old)?;
        }
        tracing::debug!(tenant = value.tenant, %old, %new, ?protocol, "flow migrated");
        Ok(true)
    }

    /// Unregisters the flow of `remote`; `false` if it was not registered.
    pub fn remove_flow(
        &mut self,
        remote: SocketAddr,
        protocol: Protocol,
    ) -> Result<bool, EbpfError> {
        let removed = self.remove_key(&flow_key(remote, protocol), remote)?;
        if removed {
            tracing::debug!(%remote, ?protocol, "flow removed");
        }
        Ok(removed)
    }

    /// The tenant `remote` is registered to, if any.
    pub fn flow_tenant(
        &self,
        remote: SocketAddr,
        protocol: Protocol,
    ) -> Result<Option<u32>, EbpfError> {
        match self.flows.get(&flow_key(remote, protocol), 0) {
            Ok(value) => Ok(Some(value.tenant)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(err).kernel(|| format!("looking up flow {remote}")),
        }
    }

    /// The counters of every active tenant slot, then of [`UNKNOWN_TENANT`], summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(u32, TenantCounters)>, EbpfError> {
        self.active_slots()?
            .into_iter()
            .map(|(index, _)| index)
            .chain([UNKNOWN_TENANT])
            .map(|index| Ok((index, self.tenant_counters(index)?)))
            .collect()
    }

    /// The counters of slot `tenant`, summed over CPUs.
    pub fn tenant_counters(&self, tenant: u32) -> Result<TenantCounters, EbpfError> {
        let values = self
            .counters
            .get(&tenant, 0)
            .kernel(|| format!("reading {COUNTERS_MAP}[{tenant}]"))?;
        Ok(values
            .iter()
            .fold(TenantCounters::default(), |sum, cpu| sum.wrapping_add(*cpu)))
    }

    /// Drops of `tenant` not yet reported in an event: `(packets, bytes)` summed over CPUs.
    pub fn pending_drops(&self, tenant: u32) -> Result<(u64, u64), EbpfError> {
        event::pending_drops(&self.drop_agg, tenant)
    }

    /// The stream of audit events (one consumer: a second call fails).
    ///
    /// Must be called inside a tokio runtime with I/O enabled.
    pub fn events(&mut self) -> Result<EventStream, EbpfError> {
        let ring = self.events.take().ok_or(EbpfError::EventsTaken)?;
        // The stream reads pending drops through its own handle on the map.
        let drop_agg = open_map(&self.layout, DROP_AGG_MAP)?;
        match EventStream::new(ring, typed(DROP_AGG_MAP, drop_agg)?) {
            Ok(stream) => Ok(stream),
            Err(err) => {
                // The ring buffer is gone with the failed stream: reopen it from its pin.
                self.events = open_map(&self.layout, EVENTS_MAP)
                    .and_then(|m| typed(EVENTS_MAP, m))
                    .ok();
                Err(err)
            }
        }
    }

    /// The pinned links and every active slot's limits and counters.
    pub fn status(&self) -> Result<PlaneStatus, EbpfError> {
        let mut links = Vec::new();
        for name in [LINK_INGRESS, LINK_EGRESS] {
            let path = self.layout.pin(name);
            let link = FdLink::from(
                PinnedLink::from_pin(&path)
                    .kernel(|| format!("opening pinned link {}", path.display()))?,
            );
            let info = link
                .info()
                .kernel(|| format!("reading link info of {}", path.display()))?;
            links.push(LinkStatus {
                name,
                link_id: info.id(),
                program_id: info.program_id(),
            });
        }
        let mut tenants = Vec::new();
        for (index, limits) in self.active_slots()? {
            tenants.push(TenantStatus {
                index,
                limits,
                counters: self.tenant_counters(index)?,
            });
        }
        tenants.push(TenantStatus {
            index: UNKNOWN_TENANT,
            limits: TenantLimits::default(),
            counters: self.tenant_counters(UNKNOWN_TENANT)?,
        });
        Ok(PlaneStatus {
            pin_dir: self.layout.dir().to_owned(),
            links,
            tenants,
        })
    }

    /// Slots below [`UNKNOWN_TENANT`] whose limits are active, with those limits.
    fn active_slots(&self) -> Result<Vec<(u32, TenantLimits)>, EbpfError> {
        let mut active = Vec::new();
        for index in 0..UNKNOWN_TENANT {
            let limits = self
                .limits
                .get(&index, 0)
                .kernel(|| format!("reading {TENANT_LIMITS_MAP}[{index}]"))?;
            if limits.flags & LIMITS_ACTIVE != 0 {
                active.push((index, limits));
            }
        }
        Ok(active)
    }

    fn write_config(
        &mut self,
        table: &[TenantLimits],
        settings: Settings,
    ) -> Result<ApplyReport, EbpfError> {
        self.settings
            .set(0, settings, 0)
            .kernel(|| format!("writing {SETTINGS_MAP}"))?;
        let mut tenants = 0;
        for (index, limits) in (0..).zip(table) {
            self.limits
                .set(index, limits, 0)
                .kernel(|| format!("writing {TENANT_LIMITS_MAP}[{index}]"))?;
            tenants = index + 1;
        }
        let mut cleared = 0;
        for (index, _) in self.active_slots()? {
            if index >= tenants {
                self.limits
                    .set(index, TenantLimits::default(), 0)
                    .kernel(|| format!("clearing {TENANT_LIMITS_MAP}[{index}]"))?;
                cleared += 1;
            }
        }
        self.applied = ApplyReport { tenants, cleared };
        Ok(self.applied)
    }

    fn remove_key(&mut self, key: &FlowKey, remote: SocketAddr) -> Result<bool, EbpfError> {
        match self.flows.remove(key) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(err))
                if err.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(false)
            }
            Err(err) => Err(err).kernel(|| format!("unregistering flow {remote}")),
        }
    }

    /// Opens every map from its pin.
    fn open_pinned(layout: PinLayout, origin: Origin) -> Result<Self, EbpfError> {
        let mut maps = HashMap::new();
        for name in MAP_NAMES {
            maps.insert(name, open_map(&layout, name)?);
        }
        Self::from_maps(layout, origin, maps)
    }

    /// Checks the maps against the contract's key and value sizes and keeps the ones used here.
    fn from_maps(
        layout: PinLayout,
        origin: Origin,
        mut maps: HashMap<&'static str, Map>,
    ) -> Result<Self, EbpfError> {
        let mut take = |name: &'static str| {
            maps.remove(name)
                .ok_or(EbpfError::Missing { kind: "map", name })
        };
        Ok(Self {
            flows: typed(FLOWS_MAP, take(FLOWS_MAP)?)?,
            limits: typed(TENANT_LIMITS_MAP, take(TENANT_LIMITS_MAP)?)?,
            settings: typed(SETTINGS_MAP, take(SETTINGS_MAP)?)?,
            counters: typed(COUNTERS_MAP, take(COUNTERS_MAP)?)?,
            drop_agg: typed(DROP_AGG_MAP, take(DROP_AGG_MAP)?)?,
            events: Some(typed(EVENTS_MAP, take(EVENTS_MAP)?)?),
            applied: ApplyReport {
                tenants: 0,
                cleared: 0,
            },
            layout,
            origin,
        })
    }
}

/// A map of the instance, opened from its pin.
fn open_map(layout: &PinLayout, name: &'static str) -> Result<Map, EbpfError> {
    let path = layout.pin(name);
    let data =
        MapData::from_pin(&path).kernel(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).kernel(|| format!("pinned map {name} has an unknown type"))
}

/// `map` as the typed map `T`, checked against the contract's sizes.
fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, map: Map) -> Result<T, EbpfError> {
    T::try_from(map).kernel(|| {
        format!("map {name} does not match bulkhead-ebpf-common (kind, key or value size)")
    })
}
