//! `bulkhead mig plan`: the GPUs of an H100 80GB host split among the
//! tenants' isolation needs, and the `nvidia-smi` commands that make it so.
//!
//! # The H100 80GB MIG geometry
//!
//! [`H100_80GB`] is NVIDIA's table for the H100 80GB (SXM5 and PCIe): the
//! MIG User Guide, "Supported MIG Profiles", H100 table, and what
//! `nvidia-smi mig -lgip` (profile ids, instance counts, memory in GiB) and
//! `nvidia-smi mig -lgipp` (placements) print on one:
//!
//! ```text
//! profile      id  compute  memory slices  placements (start:size)  max  GiB
//! 1g.10gb      19  1/7      1/8            {0,1,2,3,4,5,6}:1          7   9.75
//! 1g.10gb+me   20  1/7      1/8            {0,1,2,3,4,5,6}:1          1   9.75
//! 1g.20gb      15  1/7      2/8            {0,2,4,6}:2                4  19.62
//! 2g.20gb      14  2/7      2/8            {0,2,4}:2                  3  19.62
//! 3g.40gb       9  3/7      4/8            {0,4}:4                    2  39.50
//! 4g.40gb       5  4/7      4/8            {0}:4                      1  39.50
//! 7g.80gb       0  7/7      8/8            {0}:8                      1  79.25
//! ```
//!
//! A set of GPU instances is valid on one GPU when each sits at one of its
//! profile's placements, their memory slices do not overlap, their compute
//! slices add up to at most 7, and no profile exceeds its instance count
//! ([`validate_gpu`]). So 4g.40gb + 3g.40gb, 3g.40gb + 3g.40gb and
//! 4g.40gb + 2g.20gb + 1g.10gb are valid; 4g.40gb + 4g.40gb, 2g.20gb × 4 and
//! 1g.10gb × 8 are not. The commands name each instance's placement
//! (`-cgi <profile id>:<start>`), so the driver cannot place them otherwise.
//!
//! # What each tenant gets
//!
//! - `dedicated`: a whole GPU of its own, MIG mode off (GPUs 0, 1, … in
//!   config order).
//! - `mig`: one MIG slice of its own, of the smallest profile whose memory
//!   holds the tenant's need (below); between profiles of equal memory the
//!   one with fewer compute slices (1g.20gb before 2g.20gb, 3g.40gb before
//!   4g.40gb), leaving compute for other slices. The media-extension profile
//!   1g.10gb+me is never chosen: an LLM worker has no use for the decoders.
//!   Slices are packed first-fit decreasing (largest profile first, config
//!   order between equals) over the GPUs left for MIG: a slice goes on the
//!   first GPU where it and the slices already there have a valid placement
//!   ([`place`] searches all of them).
//! - `shared` and `process`: the shared pool, one whole GPU kept out of
//!   MIG (the last one), if any of them uses a GPU model.
//!
//! # A tenant's GPU memory need
//!
//! The config names no model sizes, so a [`Footprint`] per model gives them:
//! weight bytes and KV bytes per token, by default those of the `sim`
//! backend's cost model (Llama-3-8B in bf16: 16.06 GB of weights, 128 KiB of
//! K and V per token), or read from a calibration file (`--calibration`).
//! For every model the tenant may use that runs on a GPU (backend `cuda`, or
//! none given: a GPU host picks CUDA; `cpu` and `sim` models take no GPU
//! memory), the worker serving it needs the weights, the tenant's whole KV
//! quota (`kv_block_quota × block_tokens × KV bytes per token`: the slice
//! must hold all its policy grants) and [`CONTEXT_RESERVE_BYTES`] for the
//! CUDA context. The need is the sum over those models.

use bulkhead_core::config::{Config, ModelBackend, ModelSpec, TenantPolicy};
use bulkhead_core::{IsolationLevel, TenantId};
use bulkhead_kernels::sim::CostModel;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Compute slices (GPCs) of an H100 for MIG.
pub const COMPUTE_SLICES: u8 = 7;
/// Memory slices of an H100 for MIG.
pub const MEMORY_SLICES: u8 = 8;
/// Memory of a whole H100 80GB (HBM3) as `nvidia-smi` reports it, MiB.
pub const WHOLE_GPU_MIB: u64 = 81_559;
/// GPU memory each worker process keeps for its CUDA context, modules and
/// workspace, beyond weights and KV.
pub const CONTEXT_RESERVE_BYTES: u64 = 512 * MIB;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// One GPU instance profile of the H100 80GB.
#[derive(Debug, PartialEq, Eq)]
pub struct MigProfile {
    /// Name as `nvidia-smi` and the Kubernetes device plugin write it (`3g.40gb`).
    pub name: &'static str,
    /// GPU instance profile id for `nvidia-smi mig -cgi`.
    pub id: u32,
    /// Compute slices (of [`COMPUTE_SLICES`]).
    pub compute_slices: u8,
    /// Memory slices (of [`MEMORY_SLICES`]) an instance occupies.
    pub memory_slices: u8,
    /// Memory slices an instance may start at (`nvidia-smi mig -lgipp`).
    pub placements: &'static [u8],
    /// Most instances of this profile on one GPU.
    pub max_instances: u8,
    /// Memory of an instance, MiB (`nvidia-smi mig -lgip`, rounded down).
    pub memory_mib: u64,
    /// Whether the profile carries the media engines (`+me`).
    pub media_extensions: bool,
}

/// The H100 80GB profiles, largest first (see the module docs for the source).
pub const H100_80GB: [MigProfile; 7] = [
    MigProfile {
        name: "7g.80gb",
        id: 0,
        compute_slices: 7,
        memory_slices: 8,
        placements: &[0],
        max_instances: 1,
        memory_mib: 81_152,
        media_extensions: false,
    },
    MigProfile {
        name: "4g.40gb",
        id: 5,
        compute_slices: 4,
        memory_slices: 4,
        placements: &[0],
        max_instances: 1,
        memory_mib: 40_448,
        media_extensions: false,
    },
    MigProfile {
        name: "3g.40gb",
        id: 9,
        compute_slices: 3,
        memory_slices: 4,
        placements: &[0, 4],
        max_instances: 2,
        memory_mib: 40_448,
        media_extensions: false,
    },
    MigProfile {
        name: "2g.20gb",
        id: 14,
        compute_slices: 2,
        memory_slices: 2,
        placements: &[0, 2, 4],
        max_instances: 3,
        memory_mib: 20_090,
        media_extensions: false,
    },
    MigProfile {
        name: "1g.20gb",
        id: 15,
        compute_slices: 1,
        memory_slices: 2,
        placements: &[0, 2, 4, 6],
        max_instances: 4,
        memory_mib: 20_090,
        media_extensions: false,
    },
    MigProfile {
        name: "1g.10gb",
        id: 19,
        compute_slices: 1,
        memory_slices: 1,
        placements: &[0, 1, 2, 3, 4, 5, 6],
        max_instances: 7,
        memory_mib: 9_984,
        media_extensions: false,
    },
    MigProfile {
        name: "1g.10gb+me",
        id: 20,
        compute_slices: 1,
        memory_slices: 1,
        placements: &[0, 1, 2, 3, 4, 5, 6],
        max_instances: 1,
        memory_mib: 9_984,
        media_extensions: true,
    },
];

/// The profile named `name` (`3g.40gb`) or with GPU instance profile id `name` (`9`).
pub fn profile(name: &str) -> Option<&'static MigProfile> {
    H100_80GB
        .iter()
        .find(|p| p.name == name || name.parse::<u32>().is_ok_and(|id| id == p.id))
}

/// The profile [`plan`] gives a tenant needing `need_bytes`: the smallest
/// memory that holds it, fewer compute slices between equals, never `+me`;
/// `None` if not even 7g.80gb holds it.
pub fn profile_for(need_bytes: u64) -> Option<&'static MigProfile> {
    H100_80GB
        .iter()
        .filter(|p| !p.media_extensions && p.memory_mib * MIB >= need_bytes)
        .min_by_key(|p| (p.memory_mib, p.compute_slices))
}

/// The lowercase config name of an isolation level.
pub fn isolation_name(level: IsolationLevel) -> &'static str {
    match level {
        IsolationLevel::Shared => "shared",
        IsolationLevel::Process => "process",
        IsolationLevel::Mig => "mig",
        IsolationLevel::Dedicated => "dedicated",
    }
}

/// GPU memory a model takes: its weights, and its K and V per token of context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Bytes of weights on the device.
    pub weight_bytes: u64,
    /// Bytes of K plus V per token, all layers.
    pub kv_bytes_per_token: u64,
}

impl Footprint {
    /// The model a `sim` cost model describes (`weight_bytes`, and
    /// `kv_bytes_per_token_layer × layers`), rounded up to whole bytes.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "CostModel::validate keeps every field finite and >= 0; bytes fit u64"
    )]
    pub fn from_cost_model(model: &CostModel) -> Self {
        Self {
            weight_bytes: model.weight_bytes.ceil() as u64,
            kv_bytes_per_token: (model.kv_bytes_per_token_layer * model.layers).ceil() as u64,
        }
    }
}

impl Default for Footprint {
    /// The `sim` backend's default: Llama-3-8B in bf16.
    fn default() -> Self {
        Self::from_cost_model(&CostModel::default())
    }
}

/// Footprints of the config's models: one for every model, unless named otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprints {
    /// Footprint of a model not in `per_model`.
    pub default: Footprint,
    /// Footprints by model name.
    pub per_model: BTreeMap<String, Footprint>,
}

impl Footprints {
    /// The footprint of the model named `model`.
    pub fn of(&self, model: &str) -> Footprint {
        self.per_model.get(model).copied().unwrap_or(self.default)
    }
}

/// Whether a model's worker runs on a GPU of the host (CUDA, or no backend named).
pub fn runs_on_gpu(model: &ModelSpec) -> bool {
    matches!(model.backend, Some(ModelBackend::Cuda) | None)
}

/// GPU memory `tenant` needs for workers of its own (see the module docs),
/// or `None` if none of its models runs on a GPU.
pub fn gpu_need(config: &Config, tenant: &TenantPolicy, footprints: &Footprints) -> Option<u64> {
    let quota_tokens = u64::from(tenant.kv_block_quota) * u64::from(config.kv.block_tokens);
    config
        .models
        .iter()
        .filter(|m| tenant.allows_model(&m.name) && runs_on_gpu(m))
        .map(|m| {
            let fp = footprints.of(&m.name);
            fp.weight_bytes
                .saturating_add(quota_tokens.saturating_mul(fp.kv_bytes_per_token))
                .saturating_add(CONTEXT_RESERVE_BYTES)
        })
        .reduce(u64::saturating_add)
}

/// Memory slices `[start, start + size)` of an instance as a bit mask.
fn slot_mask(profile: &MigProfile, start: u8) -> u16 {
    ((1u16 << profile.memory_slices) - 1) << start
}

/// Checks one GPU's instances against the hardware's rules: each at one of
/// its profile's placements and inside the GPU, no two sharing a memory
/// slice, at most [`COMPUTE_SLICES`] compute slices in all, no profile over
/// its instance count. The error says which rule broke.
pub fn validate_gpu(instances: &[(&MigProfile, u8)]) -> Result<(), String> {
    let mut used: u16 = 0;
    let mut counts: BTreeMap<u32, u8> = BTreeMap::new();
    let mut compute: u32 = 0;
    for (profile, start) in instances {
        if !profile.placements.contains(start) {
            return Err(format!(
                "{} cannot start at memory slice {start}; its placements are {:?}",
                profile.name, profile.placements
            ));
        }
        if start + profile.memory_slices > MEMORY_SLICES {
            return Err(format!(
                "{} at {start} runs past memory slice {}",
                profile.name,
                MEMORY_SLICES - 1
            ));
        }
        let mask = slot_mask(profile, *start);
        if used & mask != 0 {
            return Err(format!(
                "{} at {start} overlaps memory slices already taken (mask {used:#010b})",
                profile.name
            ));
        }
        used |= mask;
        compute += u32::from(profile.compute_slices);
        let n = counts.entry(profile.id).or_default();
        *n += 1;
        if *n > profile.max_instances {
            return Err(format!(
                "{} instances of {}; at most {} fit one GPU",
                n, profile.name, profile.max_instances
            ));
        }
    }
    if compute > u32::from(COMPUTE_SLICES) {
        return Err(format!(
            "{compute} compute slices; a GPU has {COMPUTE_SLICES}"
        ));
    }
    Ok(())
}

/// A valid placement (start memory slice) for each of `profiles` on one
/// GPU, in their order, or `None` if no placement of them all is valid.
/// Exhaustive: larger instances are placed first, each at its lowest free
/// placement, backtracking when the rest cannot be placed.
pub fn place(profiles: &[&MigProfile]) -> Option<Vec<u8>> {
    let compute: u32 = profiles.iter().map(|p| u32::from(p.compute_slices)).sum();
    if compute > u32::from(COMPUTE_SLICES) {
        return None;
    }
    for p in profiles {
        let n = profiles.iter().filter(|q| q.id == p.id).count();
        if n > usize::from(p.max_instances) {
            return None;
        }
    }
    let mut order: Vec<usize> = (0..profiles.len()).collect();
    order.sort_by_key(|&i| {
        (
            std::cmp::Reverse(profiles[i].memory_slices),
            std::cmp::Reverse(profiles[i].compute_slices),
        )
    });
    let mut starts = vec![0u8; profiles.len()];
    if search(profiles, &order, 0, &mut starts) {
        Some(starts)
    } else {
        None
    }
}

fn search(profiles: &[&MigProfile], order: &[usize], used: u16, starts: &mut [u8]) -> bool {
    let Some((&i, rest)) = order.split_first() else {
        return true;
    };
    let profile = profiles[i];
    for &start in profile.placements {
        let mask = slot_mask(profile, start);
        if start + profile.memory_slices <= MEMORY_SLICES && used & mask == 0 {
            starts[i] = start;
            if search(profiles, rest, used | mask, starts) {
                return true;
            }
        }
    }
    false
}

/// First-fit decreasing of `profiles` over `gpus` GPUs: largest profile
/// first (input order between equals), each onto the first GPU where it and
/// those already there can all be placed. `Ok`: for each input its GPU and
/// start slice; `Err(i)`: input `i` fits on no GPU.
pub fn pack(profiles: &[&'static MigProfile], gpus: usize) -> Result<Vec<(usize, u8)>, usize> {
    let mut order: Vec<usize> = (0..profiles.len()).collect();
    order.sort_by_key(|&i| {
        (
            std::cmp::Reverse(profiles[i].memory_slices),
            std::cmp::Reverse(profiles[i].compute_slices),
        )
    });
    let mut on_gpu: Vec<Vec<usize>> = vec![Vec::new(); gpus];
    for &i in &order {
        let gpu = on_gpu.iter().position(|members| {
            let mut with: Vec<&MigProfile> = members.iter().map(|&m| profiles[m]).collect();
            with.push(profiles[i]);
            place(&with).is_some()
        });
        match gpu {
            Some(g) => on_gpu[g].push(i),
            None => return Err(i),
        }
    }
    let mut result = vec![(0, 0); profiles.len()];
    for (g, members) in on_gpu.iter().enumerate() {
        let with: Vec<&MigProfile> = members.iter().map(|&m| profiles[m]).collect();
        let starts = place(&with).expect("every GPU's members were placed together");
        for (&m, start) in members.iter().zip(starts) {
            result[m] = (g, start);
        }
    }
    Ok(result)
}

/// A MIG slice of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// Its profile.
    pub profile: &'static MigProfile,
    /// First memory slice it occupies.
    pub placement: u8,
    /// The tenant it serves.
    pub tenant: TenantId,
    /// The tenant's GPU memory need, bytes.
    pub need_bytes: u64,
}

/// What one GPU of the host is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuRole {
    /// Whole, MIG off, for one `dedicated` tenant.
    Dedicated {
        /// The tenant.
        tenant: TenantId,
        /// Its GPU memory need, bytes.
        need_bytes: u64,
    },
    /// MIG on, split into slices for `mig` tenants (by placement).
    Mig {
        /// The slices, by placement.
        slices: Vec<Slice>,
    },
    /// Whole, MIG off, for the shared pool: `shared` and `process` tenants with GPU models.
    Shared {
        /// The tenants, in config order, with their isolation.
        tenants: Vec<(TenantId, IsolationLevel)>,
    },
    /// Nothing planned on it.
    Unused,
}

/// The plan for the host: one role per GPU, by index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigPlan {
    /// GPU `i`'s role.
    pub gpus: Vec<GpuRole>,
}

/// Why the tenants do not fit the GPUs; each names the tenant it is about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// An isolated tenant has no model on a GPU, so no slice or GPU can be sized for it.
    #[error(
        "tenant {tenant} has isolation {isolation}, but none of its models runs on a GPU (each has backend \"cpu\" or \"sim\"); give it a CUDA model or isolation \"shared\" or \"process\""
    )]
    NoGpuModel {
        /// The tenant.
        tenant: TenantId,
        /// Its isolation level.
        isolation: &'static str,
    },
    /// A `mig` tenant needs more than the largest MIG profile holds.
    #[error(
        "tenant {tenant} (isolation mig) needs {} of GPU memory, more than the largest MIG profile 7g.80gb holds ({}); lower its kv_block_quota or give it isolation \"dedicated\"",
        gib(*need_bytes), gib(H100_80GB[0].memory_mib * MIB)
    )]
    TooLargeForMig {
        /// The tenant.
        tenant: TenantId,
        /// Its need, bytes.
        need_bytes: u64,
    },
    /// A `dedicated` tenant needs more than a whole GPU holds.
    #[error(
        "tenant {tenant} (isolation dedicated) needs {} of GPU memory, more than a whole H100 80GB holds ({}); lower its kv_block_quota",
        gib(*need_bytes), gib(WHOLE_GPU_MIB * MIB)
    )]
    TooLargeForGpu {
        /// The tenant.
        tenant: TenantId,
        /// Its need, bytes.
        need_bytes: u64,
    },
    /// More `dedicated` tenants than GPUs.
    #[error(
        "tenant {tenant} (isolation dedicated) needs a whole GPU of its own, but all {gpus} GPUs are already dedicated to {}",
        names(before)
    )]
    NoGpuForDedicated {
        /// The first tenant left without a GPU.
        tenant: TenantId,
        /// GPUs on the host.
        gpus: u32,
        /// Tenants that got them.
        before: Vec<TenantId>,
    },
    /// No GPU is left for the shared pool.
    #[error(
        "no GPU is left for the shared pool of tenant {}: the host has {gpus} GPUs and {dedicated} are dedicated",
        names(tenants)
    )]
    NoGpuForShared {
        /// The shared and process tenants with GPU models.
        tenants: Vec<TenantId>,
        /// GPUs on the host.
        gpus: u32,
        /// GPUs dedicated to tenants.
        dedicated: u32,
    },
    /// A `mig` tenant's slice fits on no GPU left for MIG.
    #[error(
        "tenant {tenant} (isolation mig) does not fit: it needs a {profile} slice ({} of GPU memory) and {}",
        gib(*need_bytes), where_mig(mig_gpus)
    )]
    MigDoesNotFit {
        /// The tenant.
        tenant: TenantId,
        /// The profile it needs.
        profile: &'static str,
        /// Its need, bytes.
        need_bytes: u64,
        /// The GPUs that were left for MIG.
        mig_gpus: Vec<u32>,
    },
}

fn names(tenants: &[TenantId]) -> String {
    tenants
        .iter()
        .map(TenantId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn where_mig(gpus: &[u32]) -> String {
    if gpus.is_empty() {
        "no GPU is left for MIG after the dedicated GPUs and the shared pool".to_owned()
    } else {
        let list = gpus
            .iter()
            .map(|g| format!("GPU {g}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "none of the GPUs left for MIG ({list}) has room for it beside the slices planned before it (largest first)"
        )
    }
}

/// `bytes` in GiB with two decimals, rounded to nearest.
pub fn gib(bytes: u64) -> String {
    let hundredths = (u128::from(bytes) * 100 + u128::from(GIB) / 2) / u128::from(GIB);
    format!("{}.{:02} GiB", hundredths / 100, hundredths % 100)
}

/// Plans the host's `gpus` H100 80GB GPUs for the config's tenants (see the
/// module docs for the rules), or says which tenant does not fit and why.
pub fn plan(config: &Config, gpus: u32, footprints: &Footprints) -> Result<MigPlan, PlanError> {
    let mut dedicated: Vec<(TenantId, u64)> = Vec::new();
    let mut mig: Vec<(TenantId, u64, &'static MigProfile)> = Vec::new();
    let mut shared: Vec<(TenantId, IsolationLevel)> = Vec::new();
    for tenant in &config.tenants {
        let need = gpu_need(config, tenant, footprints);
        let id = tenant.id.clone();
        match (tenant.isolation, need) {
            (IsolationLevel::Dedicated | IsolationLevel::Mig, None) => {
                return Err(PlanError::NoGpuModel {
                    tenant: id,
                    isolation: isolation_name(tenant.isolation),
                });
            }
            (IsolationLevel::Dedicated, Some(need_bytes)) => {
                if need_bytes > WHOLE_GPU_MIB * MIB {
                    return Err(PlanError::TooLargeForGpu {
                        tenant: id,
                        need_bytes,
                    });
                }
                dedicated.push((id, need_bytes));
            }
            (IsolationLevel::Mig, Some(need_bytes)) => {
                let profile = profile_for(need_bytes).ok_or(PlanError::TooLargeForMig {
                    tenant: id.clone(),
                    need_bytes,
                })?;
                mig.push((id, need_bytes, profile));
            }
            (IsolationLevel::Shared | IsolationLevel::Process, Some(_)) => {
                shared.push((id, tenant.isolation));
            }
            (IsolationLevel::Shared | IsolationLevel::Process, None) => {}
        }
    }

    let total = usize::try_from(gpus).unwrap_or(usize::MAX);
    if dedicated.len() > total {
        return Err(PlanError::NoGpuForDedicated {
            tenant: dedicated[total].0.clone(),
            gpus,
            before: dedicated[..total].iter().map(|(t, _)| t.clone()).collect(),
        });
    }
    let shared_gpus = usize::from(!shared.is_empty());
    if dedicated.len() + shared_gpus > total {
        return Err(PlanError::NoGpuForShared {
            tenants: shared.into_iter().map(|(t, _)| t).collect(),
            gpus,
            dedicated: u32::try_from(dedicated.len()).unwrap_or(u32::MAX),
        });
    }
    let first_mig = dedicated.len();
    let mig_count = total - dedicated.len() - shared_gpus;

    let profiles: Vec<&'static MigProfile> = mig.iter().map(|(_, _, p)| *p).collect();
    let packed = pack(&profiles, mig_count).map_err(|i| {
        let (tenant, need_bytes, profile) = &mig[i];
        PlanError::MigDoesNotFit {
            tenant: tenant.clone(),
            profile: profile.name,
            need_bytes: *need_bytes,
            mig_gpus: (first_mig..first_mig + mig_count)
                .map(|g| u32::try_from(g).unwrap_or(u32::MAX))
                .collect(),
        }
    })?;

    let mut roles: Vec<GpuRole> = dedicated
        .into_iter()
        .map(|(tenant, need_bytes)| GpuRole::Dedicated { tenant, need_bytes })
        .collect();
    let mut mig_slices: Vec<Vec<Slice>> = vec![Vec::new(); mig_count];
    for ((tenant, need_bytes, profile), (gpu, placement)) in mig.into_iter().zip(packed) {
        mig_slices[gpu].push(Slice {
            profile,
            placement,
            tenant,
            need_bytes,
        });
    }
    for mut slices in mig_slices {
        if slices.is_empty() {
            roles.push(GpuRole::Unused);
        } else {
            slices.sort_by_key(|s| s.placement);
            roles.push(GpuRole::Mig { slices });
        }
    }
    if !shared.is_empty() {
        roles.push(GpuRole::Shared { tenants: shared });
    }
    Ok(MigPlan { gpus: roles })
}

impl MigPlan {
    /// The `nvidia-smi` commands that set the GPUs up, one per line (run as
    /// root, with no process on the GPUs; enabling MIG mode may need a GPU
    /// reset). Unused GPUs are left as they are.
    pub fn commands(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, role) in self.gpus.iter().enumerate() {
            match role {
                GpuRole::Dedicated { .. } | GpuRole::Shared { .. } => {
                    out.push(format!("nvidia-smi -i {i} -mig 0"));
                }
                GpuRole::Mig { slices } => {
                    out.push(format!("nvidia-smi -i {i} -mig 1"));
                    let tuples = slices
                        .iter()
                        .map(|s| format!("{}:{}", s.profile.id, s.placement))
                        .collect::<Vec<_>>()
                        .join(",");
                    out.push(format!("nvidia-smi mig -i {i} -cgi {tuples} -C"));
                }
                GpuRole::Unused => {}
            }
        }
        if self.gpus.iter().any(|r| matches!(r, GpuRole::Mig { .. })) {
            out.push("nvidia-smi mig -lgi".to_owned());
        }
        out
    }

    /// The plan for people: one block per GPU, then the commands.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# MIG plan for {} NVIDIA H100 80GB GPUs, by `bulkhead mig plan`.",
            self.gpus.len()
        );
        out.push_str(
            "# Profiles and placements: NVIDIA MIG User Guide, \"Supported MIG Profiles\" (H100),\n\
             # as `nvidia-smi mig -lgip` and `nvidia-smi mig -lgipp` list them.\n\
             # A tenant's need: for each of its models on the GPU, the weights, its whole\n\
             # KV quota and 512 MiB of CUDA context.\n\n",
        );
        for (i, role) in self.gpus.iter().enumerate() {
            match role {
                GpuRole::Dedicated { tenant, need_bytes } => {
                    let _ = writeln!(
                        out,
                        "GPU {i}: whole (MIG off), dedicated to {tenant}: needs {} of {}",
                        gib(*need_bytes),
                        gib(WHOLE_GPU_MIB * MIB)
                    );
                }
                GpuRole::Mig { slices } => {
                    let compute: u32 = slices
                        .iter()
                        .map(|s| u32::from(s.profile.compute_slices))
                        .sum();
                    let memory: u32 = slices
                        .iter()
                        .map(|s| u32::from(s.profile.memory_slices))
                        .sum();
                    let _ = writeln!(
                        out,
                        "GPU {i}: MIG, compute slices {compute}/{COMPUTE_SLICES}, memory slices {memory}/{MEMORY_SLICES}"
                    );
                    for s in slices {
                        let _ = writeln!(
                            out,
                            "  {:<8} profile {:>2}, placement {}: {:<20} needs {} of {}, k8s resource nvidia.com/mig-{}",
                            s.profile.name,
                            s.profile.id,
                            s.placement,
                            s.tenant.as_str(),
                            gib(s.need_bytes),
                            gib(s.profile.memory_mib * MIB),
                            s.profile.name
                        );
                    }
                }
                GpuRole::Shared { tenants } => {
                    let list = tenants
                        .iter()
                        .map(|(t, level)| format!("{t} ({})", isolation_name(*level)))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let _ = writeln!(out, "GPU {i}: whole (MIG off), shared pool: {list}");
                }
                GpuRole::Unused => {
                    let _ = writeln!(out, "GPU {i}: unused, left as it is");
                }
            }
        }
        out.push_str(
            "\n# Commands, as root with no process on the GPUs (enabling MIG mode may need\n\
             # a GPU reset); `-cgi <profile id>:<placement>` fixes each slice's place.\n",
        );
        for command in self.commands() {
            out.push_str(&command);
            out.push('\n');
        }
        out
    }

    /// The plan as JSON: `gpus[i]` with `role` and its details, and `commands`.
    pub fn to_json(&self) -> serde_json::Value {
        let gpus: Vec<serde_json::Value> = self
            .gpus
            .iter()
            .enumerate()
            .map(|(i, role)| match role {
                GpuRole::Dedicated { tenant, need_bytes } => serde_json::json!({
                    "index": i, "role": "dedicated", "mig": false,
                    "tenant": tenant.as_str(), "need_bytes": need_bytes,
                }),
                GpuRole::Mig { slices } => serde_json::json!({
                    "index": i, "role": "mig", "mig": true,
                    "slices": slices.iter().map(|s| serde_json::json!({
                        "profile": s.profile.name,
                        "profile_id": s.profile.id,
                        "placement": s.placement,
                        "tenant": s.tenant.as_str(),
                        "need_bytes": s.need_bytes,
                        "memory_bytes": s.profile.memory_mib * MIB,
                        "k8s_resource": format!("nvidia.com/mig-{}", s.profile.name),
                    })).collect::<Vec<_>>(),
                }),
                GpuRole::Shared { tenants } => serde_json::json!({
                    "index": i, "role": "shared", "mig": false,
                    "tenants": tenants.iter().map(|(t, level)| serde_json::json!({
                        "tenant": t.as_str(), "isolation": isolation_name(*level),
                    })).collect::<Vec<_>>(),
                }),
                GpuRole::Unused => serde_json::json!({"index": i, "role": "unused"}),
            })
            .collect();
        serde_json::json!({ "gpus": gpus, "commands": self.commands() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> &'static MigProfile {
        profile(name).unwrap()
    }

    #[test]
    fn the_profile_table_is_consistent() {
        for prof in &H100_80GB {
            assert!(prof.compute_slices <= COMPUTE_SLICES);
            for &start in prof.placements {
                assert!(start + prof.memory_slices <= MEMORY_SLICES, "{}", prof.name);
            }
            // Without a max_instances limit of its own, the placements bound the count.
            if !prof.media_extensions {
                let alone = vec![prof; usize::from(prof.max_instances)];
                assert!(
                    place(&alone).is_some(),
                    "{} × {}",
                    prof.max_instances,
                    prof.name
                );
                let over = vec![prof; usize::from(prof.max_instances) + 1];
                assert!(
                    place(&over).is_none(),
                    "{} × {}",
                    prof.max_instances + 1,
                    prof.name
                );
            }
        }
        assert_eq!(profile("9").unwrap().name, "3g.40gb");
        assert!(profile("5g.50gb").is_none());
    }

    #[test]
    fn profiles_are_chosen_by_memory_then_fewest_compute_slices() {
        assert_eq!(profile_for(1).unwrap().name, "1g.10gb");
        assert_eq!(profile_for(9_984 * MIB).unwrap().name, "1g.10gb");
        assert_eq!(profile_for(9_984 * MIB + 1).unwrap().name, "1g.20gb");
        assert_eq!(profile_for(20_090 * MIB + 1).unwrap().name, "3g.40gb");
        assert_eq!(profile_for(40_448 * MIB + 1).unwrap().name, "7g.80gb");
        assert!(profile_for(81_152 * MIB + 1).is_none());
    }

    #[test]
    fn known_combinations() {
        for ok in [
            &["4g.40gb", "3g.40gb"][..],
            &["3g.40gb", "3g.40gb"],
            &["4g.40gb", "2g.20gb", "1g.10gb"],
            &["3g.40gb", "2g.20gb", "2g.20gb"],
            &["2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"],
            &["1g.20gb", "1g.20gb", "1g.20gb", "1g.20gb"],
            &["3g.40gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb"],
            &["1g.10gb+me", "1g.10gb", "1g.10gb"],
            &["7g.80gb"],
        ] {
            let profiles: Vec<_> = ok.iter().map(|n| p(n)).collect();
            let starts = place(&profiles).unwrap_or_else(|| panic!("{ok:?} should fit"));
            let pairs: Vec<_> = profiles.iter().copied().zip(starts).collect();
            validate_gpu(&pairs).unwrap();
        }
        for bad in [
            &["4g.40gb", "4g.40gb"][..],
            &["7g.80gb", "1g.10gb"],
            &["2g.20gb", "2g.20gb", "2g.20gb", "2g.20gb"],
            &["3g.40gb", "3g.40gb", "1g.10gb"],
            &["1g.20gb", "1g.20gb", "1g.20gb", "1g.20gb", "1g.10gb"],
            &["1g.10gb+me", "1g.10gb+me"],
        ] {
            let profiles: Vec<_> = bad.iter().map(|n| p(n)).collect();
            assert!(place(&profiles).is_none(), "{bad:?} should not fit");
        }
        assert_eq!(place(&[p("1g.10gb"); 8]), None);
    }

    #[test]
    fn validate_gpu_names_the_broken_rule() {
        let e = validate_gpu(&[(p("3g.40gb"), 2)]).unwrap_err();
        assert!(e.contains("placements"), "{e}");
        let e = validate_gpu(&[(p("4g.40gb"), 0), (p("1g.10gb"), 3)]).unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        let e =
            validate_gpu(&[(p("4g.40gb"), 0), (p("3g.40gb"), 4), (p("1g.10gb"), 6)]).unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        let four_and_twos = [(p("1g.20gb"), 0), (p("1g.20gb"), 2), (p("2g.20gb"), 4)];
        validate_gpu(&four_and_twos).unwrap();
    }

    #[test]
    fn gib_rounds_to_hundredths() {
        assert_eq!(gib(GIB), "1.00 GiB");
        assert_eq!(gib(GIB / 2 * 3), "1.50 GiB");
        assert_eq!(gib(0), "0.00 GiB");
    }
}
