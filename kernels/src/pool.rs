//! The KV block pool: which tenant owns each block, the per-tenant prefix
//! cache, quotas, and scrubbing before a block changes hands.
//!
//! Security-critical: one tenant's K/V must never be readable by another
//! (invariant 1 of `docs/architecture.md`). The pool keeps the owner tag of
//! every block ([`BlockPool::owner_tags`], mirrored to device memory for the
//! kernels' guard, see [`crate::layout`]) and guarantees that a block only
//! changes owner after the caller has zeroed it.
//!
//! # Block states
//!
//! * **free**: scrubbed, tagged [`FREE_TAG`], on the clean stack.
//! * **owned**: tagged with its tenant; either referenced by running
//!   sequences (refcount > 0) or, once released, kept as an idle entry of
//!   the tenant's prefix cache (refcount 0, on the tenant's LRU list).
//! * **dirty**: released (or evicted) but not yet zeroed; it keeps its former
//!   owner's tag, so a stale block table still only reads its own tenant's
//!   bytes, and it is not allocatable until [`BlockPool::mark_scrubbed`].
//!
//! # Eviction policy, and why
//!
//! * **Quota pressure evicts only within the tenant.** A tenant at its quota
//!   recycles its *own* least-recently-used idle cached block. If it could
//!   evict another tenant's cache it could time that tenant's prefix hits
//!   (fill the pool, then see which of the victim's prompts got slower) and
//!   learn what the victim is sending.
//! * **Same-tenant reuse skips the scrub.** The bytes stay with their owner,
//!   so nothing crosses tenants; the new sequence overwrites each slot before
//!   reading it, since attention never reads past a sequence's context.
//! * **Pool pressure takes from the tenant with the most idle cached blocks**
//!   (ties: lowest tag) once no clean or dirty block is left and the
//!   requester has no idle cache of its own: idle cache is the only memory
//!   that can be reclaimed without stopping a sequence, and taking it from
//!   the largest holder means one tenant's idle cache cannot starve a tenant
//!   that is still under quota. That block changes owner, so it becomes
//!   dirty and the allocation answers [`AllocError::NeedsScrub`]: the caller
//!   zeroes it before anyone gets it.
//!
//! # Prefix cache
//!
//! Keyed by `(tenant tag, chain hash)`, never by the hash alone: two tenants
//! sending the same prompt get two entries, so a hit can never hand out (or,
//! through its timing, reveal) another tenant's blocks.
//!
//! # Cost
//!
//! Every operation is O(1) amortised per block touched (intrusive
//! index-linked LRU lists, a stack of clean blocks, a hash map for the cache),
//! except that picking the pool-pressure victim and keeping that index up to
//! date when a tenant's idle count changes costs O(log tenants).

mod prefix;
#[cfg(test)]
mod tests;

pub use self::prefix::{ChainHash, chain_hashes, extend_chain_hashes};

use crate::layout::FREE_TAG;
use bulkhead_core::TenantId;
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};

/// End of an LRU list (never a block index: blocks are `0..num_blocks`, `num_blocks <= u32::MAX`).
const NIL: u32 = u32::MAX;

/// Index of a block in the pool (the KV cache's block-major index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub u32);

/// Why [`BlockPool::allocate`] gave no block.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The tenant holds its whole quota and has no idle cached block to recycle.
    #[error(
        "tenant {tenant} holds its quota of {quota} KV blocks, all referenced by running sequences"
    )]
    QuotaExhausted {
        /// The tenant that asked.
        tenant: TenantId,
        /// Its quota, in blocks.
        quota: u32,
    },
    /// Blocks are waiting to be zeroed: scrub [`BlockPool::take_dirty`], report it
    /// with [`BlockPool::mark_scrubbed`], then retry.
    #[error("no clean KV block is free: scrub the dirty blocks, mark them scrubbed, then retry")]
    NeedsScrub,
    /// Every block is referenced by a running sequence; nothing can be reclaimed.
    #[error("the KV pool is exhausted: every block is referenced by a running sequence")]
    PoolExhausted,
}

/// Why [`BlockPool::release`] refused a block (a caller bug; the pool is left unchanged).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The index is not a block of this pool.
    #[error("block {} is outside the pool of {num_blocks} blocks", block.0)]
    OutOfRange {
        /// The bad index.
        block: BlockId,
        /// Blocks in the pool.
        num_blocks: u32,
    },
    /// The block is free: nobody holds it.
    #[error("block {} is free: there is no reference to release", .0.0)]
    NotAllocated(BlockId),
    /// The block was already released and awaits scrubbing.
    #[error("block {} is dirty (already released, awaiting scrub)", .0.0)]
    Dirty(BlockId),
    /// The block is an idle prefix-cache entry: every reference was already released.
    #[error("block {} has no reference left (double release of a cached block)", .0.0)]
    NotReferenced(BlockId),
}

/// What a block is doing (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Owned {
        tag: u32,
        refcount: u32,
        /// The chain hash it is published under in the prefix cache.
        cached: Option<ChainHash>,
    },
    Dirty {
        former_tag: u32,
        /// Still in the dirty queue, not yet handed out by `take_dirty`
        /// (so a block queued twice is handed out once).
        queued: bool,
    },
}

/// Intrusive LRU links; both [`NIL`] when the block is on no list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Link {
    prev: u32,
    next: u32,
}

const UNLINKED: Link = Link {
    prev: NIL,
    next: NIL,
};

/// Per-tenant bookkeeping, indexed by `tag - 1`.
#[derive(Clone, Debug)]
struct Tenant {
    id: TenantId,
    quota: u32,
    /// Owned blocks (referenced + idle cached).
    used: u32,
    /// Idle cached blocks (refcount 0), the length of the LRU list.
    idle: u32,
    /// Least recently used idle block.
    lru_head: u32,
    /// Most recently used idle block.
    lru_tail: u32,
}

/// Counts recomputed from the block states by `check_invariants`.
struct Tally {
    used: Vec<u32>,
    idle: Vec<u32>,
    free: usize,
    dirty: u32,
    cached: usize,
}

/// The KV block pool of one worker (see the module doc).
#[derive(Debug)]
pub struct BlockPool {
    states: Vec<State>,
    links: Vec<Link>,
    owners: Vec<u32>,
    /// Clean free blocks; popped from the end.
    free: Vec<u32>,
    /// Blocks made dirty since the last `take_dirty` (may hold stale entries, see `State::Dirty`).
    dirty_queue: Vec<u32>,
    dirty_count: u32,
    tags: HashMap<TenantId, u32>,
    tenants: Vec<Tenant>,
    cache: HashMap<(u32, ChainHash), u32>,
    /// Tenants with idle cached blocks, most idle first, then lowest tag.
    pressure: BTreeSet<(Reverse<u32>, u32)>,
    /// Blocks whose owner tag changed since the last `take_tag_updates`, once each.
    tag_changed: Vec<bool>,
    tag_change_list: Vec<u32>,
}

/// `u32` to `usize` (lossless on every target this crate supports).
const fn ix(i: u32) -> usize {
    i as usize
}

/// A block index from a position in the per-block arrays (which have `num_blocks: u32` entries).
fn block_u32(i: usize) -> u32 {
    u32::try_from(i).expect("block index fits u32")
}

/// Position of a tenant's slot in `tenants`.
const fn slot(tag: u32) -> usize {
    (tag - 1) as usize
}

impl BlockPool {
    /// A pool of `num_blocks` clean, free blocks, all tagged [`FREE_TAG`].
    pub fn new(num_blocks: u32) -> Self {
        let n = ix(num_blocks);
        Self {
            states: vec![State::Free; n],
            links: vec![UNLINKED; n],
            owners: vec![FREE_TAG; n],
            // Reversed so that block 0 is handed out first (predictable in tests and traces).
            free: (0..num_blocks).rev().collect(),
            dirty_queue: Vec::new(),
            dirty_count: 0,
            tags: HashMap::new(),
            tenants: Vec::new(),
            cache: HashMap::new(),
            pressure: BTreeSet::new(),
            tag_changed: vec![false; n],
            tag_change_list: Vec::new(),
        }
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> u32 {
        u32::try_from(self.states.len()).expect("the pool was built from a u32 block count")
    }

    /// The tenant's owner tag: nonzero, assigned on first use and never
    /// given to another tenant in this pool's life (a stale tag in a block
    /// table or on a dirty block can only ever match its own tenant).
    pub fn tenant_tag(&mut self, tenant: &TenantId) -> u32 {
        if let Some(&tag) = self.tags.get(tenant) {
            return tag;
        }
        let tag = u32::try_from(self.tenants.len() + 1)
            .ok()
            .filter(|&t| t != NIL)
            .expect("fewer than 2^32 - 1 tenants in one pool's life");
        self.tenants.push(Tenant {
            id: tenant.clone(),
            quota: 0,
            used: 0,
            idle: 0,
            lru_head: NIL,
            lru_tail: NIL,
        });
        self.tags.insert(tenant.clone(), tag);
        tag
    }

    /// Sets the most blocks the tenant may own (referenced + idle cached).
    /// Lowering it below current use frees nothing (running sequences keep
    /// their blocks) but blocks further growth.
    pub fn set_quota(&mut self, tenant: &TenantId, quota: u32) {
        let tag = self.tenant_tag(tenant);
        self.tenants[slot(tag)].quota = quota;
    }

    /// The tenant's quota; 0 if never set (an unknown tenant gets nothing).
    pub fn quota(&self, tenant: &TenantId) -> u32 {
        self.tenant(tenant).map_or(0, |t| t.quota)
    }

    /// A block for `tenant`, referenced once and tagged with its tag.
    ///
    /// In order: (1) at or over quota, recycle the tenant's own LRU idle
    /// cached block, else [`AllocError::QuotaExhausted`]; (2) a clean free
    /// block; (3) if dirty blocks exist, [`AllocError::NeedsScrub`]; (4)
    /// recycle the tenant's own LRU idle cached block, else evict the LRU
    /// idle block of the tenant with the most idle blocks (it becomes dirty)
    /// and answer [`AllocError::NeedsScrub`]; (5) [`AllocError::PoolExhausted`].
    /// Only recycling one's own block skips the scrub.
    pub fn allocate(&mut self, tenant: &TenantId) -> Result<BlockId, AllocError> {
        // No tag means no quota was ever set: refuse without minting a tag.
        let Some(&tag) = self.tags.get(tenant) else {
            return Err(AllocError::QuotaExhausted {
                tenant: tenant.clone(),
                quota: 0,
            });
        };
        let t = &self.tenants[slot(tag)];
        if t.used >= t.quota {
            let quota = t.quota;
            return self
                .recycle_own(tag)
                .ok_or_else(|| AllocError::QuotaExhausted {
                    tenant: tenant.clone(),
                    quota,
                });
        }
        if let Some(i) = self.free.pop() {
            self.states[ix(i)] = State::Owned {
                tag,
                refcount: 1,
                cached: None,
            };
            self.set_owner(i, tag);
            self.tenants[slot(tag)].used += 1;
            return Ok(BlockId(i));
        }
        if self.dirty_count > 0 {
            return Err(AllocError::NeedsScrub);
        }
        if let Some(block) = self.recycle_own(tag) {
            return Ok(block);
        }
        if let Some(&(_, victim)) = self.pressure.first() {
            self.evict_to_dirty(victim);
            return Err(AllocError::NeedsScrub);
        }
        Err(AllocError::PoolExhausted)
    }

    /// Drops one reference to `block`. At zero, a block published in the
    /// prefix cache stays with its tenant as the most recently used idle
    /// entry; any other block becomes dirty (keeps its tag, stops counting
    /// against the quota, awaits scrubbing).
    pub fn release(&mut self, block: BlockId) -> Result<(), PoolError> {
        let i = block.0;
        let Some(state) = self.states.get_mut(ix(i)) else {
            return Err(PoolError::OutOfRange {
                block,
                num_blocks: self.num_blocks(),
            });
        };
        match *state {
            State::Free => Err(PoolError::NotAllocated(block)),
            State::Dirty { .. } => Err(PoolError::Dirty(block)),
            State::Owned { refcount: 0, .. } => Err(PoolError::NotReferenced(block)),
            State::Owned {
                tag,
                refcount,
                cached,
            } => {
                if refcount > 1 {
                    *state = State::Owned {
                        tag,
                        refcount: refcount - 1,
                        cached,
                    };
                } else if cached.is_some() {
                    *state = State::Owned {
                        tag,
                        refcount: 0,
                        cached,
                    };
                    self.lru_push_back(tag, i);
                    self.set_idle(tag, self.tenants[slot(tag)].idle + 1);
                } else {
                    *state = State::Dirty {
                        former_tag: tag,
                        queued: true,
                    };
                    self.dirty_queue.push(i);
                    self.dirty_count += 1;
                    self.tenants[slot(tag)].used -= 1;
                }
                Ok(())
            }
        }
    }

    /// The blocks cached under `(tenant, hashes[0..n])` for the longest such
    /// run, each referenced once more (and so no longer idle). The key holds
    /// the tenant, so another tenant's blocks are never returned.
    pub fn lookup_prefix(&mut self, tenant: &TenantId, hashes: &[ChainHash]) -> Vec<BlockId> {
        let Some(&tag) = self.tags.get(tenant) else {
            return Vec::new();
        };
        let mut hits = Vec::new();
        for hash in hashes {
            let Some(&i) = self.cache.get(&(tag, *hash)) else {
                break;
            };
            let State::Owned {
                tag: owner,
                refcount,
                cached,
            } = self.states[ix(i)]
            else {
                break;
            };
            // Re-checked although the key already says so: this is the one
            // place a block reaches a second sequence. A saturated refcount
            // ends the run rather than wrapping.
            if owner != tag || cached != Some(*hash) || refcount == u32::MAX {
                break;
            }
            if refcount == 0 {
                self.lru_remove(tag, i);
                self.set_idle(tag, self.tenants[slot(tag)].idle - 1);
            }
            self.states[ix(i)] = State::Owned {
                tag,
                refcount: refcount + 1,
                cached,
            };
            hits.push(BlockId(i));
        }
        hits
    }

    /// Publishes `block` in the prefix cache under `(tenant, hash)`; true if
    /// it is (now) that entry. False, changing nothing, if the block is not a
    /// referenced block of this tenant, is already published under another
    /// hash, or another block holds the entry. The caller vouches that the
    /// block is full and holds exactly the prefix `hash` names.
    pub fn publish(&mut self, tenant: &TenantId, hash: ChainHash, block: BlockId) -> bool {
        let Some(&tag) = self.tags.get(tenant) else {
            return false;
        };
        let Some(state) = self.states.get_mut(ix(block.0)) else {
            return false;
        };
        match *state {
            State::Owned {
                tag: owner,
                refcount,
                cached,
            } if owner == tag && refcount > 0 => {
                if let Some(existing) = cached {
                    return existing == hash;
                }
                if self.cache.contains_key(&(tag, hash)) {
                    return false;
                }
                self.cache.insert((tag, hash), block.0);
                *state = State::Owned {
                    tag,
                    refcount,
                    cached: Some(hash),
                };
                true
            }
            _ => false,
        }
    }

    /// Dirty blocks not yet handed out, each once: zero them on the device,
    /// then report them with [`Self::mark_scrubbed`].
    pub fn take_dirty(&mut self) -> Vec<BlockId> {
        let queue = std::mem::take(&mut self.dirty_queue);
        let mut out = Vec::with_capacity(queue.len());
        for i in queue {
            if let State::Dirty {
                queued: queued @ true,
                ..
            } = &mut self.states[ix(i)]
            {
                *queued = false;
                out.push(BlockId(i));
            }
        }
        out
    }

    /// The caller zeroed these blocks: each dirty one becomes clean and free,
    /// tagged [`FREE_TAG`]. Blocks that are not dirty (or out of range) are
    /// ignored, so a stale or repeated report cannot free a live block.
    pub fn mark_scrubbed(&mut self, blocks: &[BlockId]) {
        for &BlockId(i) in blocks {
            if let Some(State::Dirty { .. }) = self.states.get(ix(i)) {
                // A still-queued entry goes stale: `take_dirty` skips non-dirty blocks.
                self.states[ix(i)] = State::Free;
                self.set_owner(i, FREE_TAG);
                self.free.push(i);
                self.dirty_count -= 1;
            }
        }
    }

    /// The block's owner tag; [`FREE_TAG`] for an index outside the pool.
    pub fn owner_tag(&self, block: BlockId) -> u32 {
        self.owners.get(ix(block.0)).copied().unwrap_or(FREE_TAG)
    }

    /// Every block's owner tag, as mirrored to device memory for the guard.
    pub fn owner_tags(&self) -> &[u32] {
        &self.owners
    }

    /// `(block, current tag)` for each block whose tag changed since the last
    /// call, once per block in order of first change; a backend applies them
    /// to its device mirror before the next launch. Drained.
    pub fn take_tag_updates(&mut self) -> Vec<(BlockId, u32)> {
        let list = std::mem::take(&mut self.tag_change_list);
        list.into_iter()
            .map(|i| {
                self.tag_changed[ix(i)] = false;
                (BlockId(i), self.owners[ix(i)])
            })
            .collect()
    }

    /// Blocks the tenant owns: referenced plus idle cached (dirty ones are not counted).
    pub fn used_blocks(&self, tenant: &TenantId) -> u32 {
        self.tenant(tenant).map_or(0, |t| t.used)
    }

    /// The tenant's idle (unreferenced) cached blocks.
    pub fn cached_blocks(&self, tenant: &TenantId) -> u32 {
        self.tenant(tenant).map_or(0, |t| t.idle)
    }

    /// Clean free blocks, allocatable at once.
    pub fn free_blocks(&self) -> u32 {
        u32::try_from(self.free.len()).expect("the free stack holds at most num_blocks entries")
    }

    /// Blocks awaiting scrubbing (handed out by `take_dirty` or not).
    pub fn dirty_blocks(&self) -> u32 {
        self.dirty_count
    }

    /// `(tenant, used, quota)` for every tenant with a tag and some use or quota, sorted by tenant.
    pub fn tenants(&self) -> Vec<(TenantId, u32, u32)> {
        let mut out: Vec<_> = self
            .tenants
            .iter()
            .filter(|t| t.used > 0 || t.quota > 0)
            .map(|t| (t.id.clone(), t.used, t.quota))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// References to the block (0 if it is not owned, or out of range).
    pub fn refcount(&self, block: BlockId) -> u32 {
        match self.states.get(ix(block.0)) {
            Some(State::Owned { refcount, .. }) => *refcount,
            _ => 0,
        }
    }

    /// Recomputes every derived structure from the block states and
    /// compares; the first discrepancy is described. O(blocks + tenants), for tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.states.len();
        if self.links.len() != n || self.owners.len() != n || self.tag_changed.len() != n {
            return Err("per-block arrays differ in length".into());
        }
        if self.tags.len() != self.tenants.len() {
            return Err(format!(
                "{} tags for {} tenant slots",
                self.tags.len(),
                self.tenants.len()
            ));
        }
        for (id, &tag) in &self.tags {
            if tag == FREE_TAG || ix(tag) > self.tenants.len() || self.tenants[slot(tag)].id != *id
            {
                return Err(format!("tag {tag} of {id} does not name its slot"));
            }
        }
        let tally = self.tally_blocks()?;
        self.check_free_and_dirty(&tally)?;
        self.check_cache(&tally)?;
        self.check_tenants(&tally)?;
        let total = tally.used.iter().map(|&u| ix(u)).sum::<usize>() + tally.free + ix(tally.dirty);
        if total != n {
            return Err(format!("used + free + dirty = {total}, not {n}"));
        }
        let changed: HashSet<u32> = self.tag_change_list.iter().copied().collect();
        if changed.len() != self.tag_change_list.len()
            || (0..n).any(|i| self.tag_changed[i] != changed.contains(&block_u32(i)))
        {
            return Err("tag change list and flags disagree".into());
        }
        Ok(())
    }

    /// One pass over the blocks: each block's tag agrees with its state, and the counts.
    fn tally_blocks(&self) -> Result<Tally, String> {
        let valid_tag = |tag: u32| tag != FREE_TAG && ix(tag) <= self.tenants.len();
        let mut tally = Tally {
            used: vec![0; self.tenants.len()],
            idle: vec![0; self.tenants.len()],
            free: 0,
            dirty: 0,
            cached: 0,
        };
        for (i, state) in self.states.iter().enumerate() {
            let owner = self.owners[i];
            match *state {
                State::Free => {
                    tally.free += 1;
                    if owner != FREE_TAG {
                        return Err(format!("free block {i} is tagged {owner}"));
                    }
                }
                State::Dirty { former_tag, .. } => {
                    tally.dirty += 1;
                    if owner != former_tag || !valid_tag(former_tag) {
                        return Err(format!(
                            "dirty block {i} is tagged {owner}, former owner {former_tag}"
                        ));
                    }
                }
                State::Owned {
                    tag,
                    refcount,
                    cached,
                } => {
                    if owner != tag || !valid_tag(tag) {
                        return Err(format!("block {i} owned by tag {tag} is tagged {owner}"));
                    }
                    tally.used[slot(tag)] += 1;
                    if refcount == 0 {
                        tally.idle[slot(tag)] += 1;
                        if cached.is_none() {
                            return Err(format!("unreferenced block {i} is not cached"));
                        }
                    }
                    if let Some(hash) = cached {
                        tally.cached += 1;
                        if self.cache.get(&(tag, hash)).map(|&b| ix(b)) != Some(i) {
                            return Err(format!(
                                "block {i} cached as {hash:?} is not that cache entry"
                            ));
                        }
                    }
                }
            }
            let idle_block = matches!(state, State::Owned { refcount: 0, .. });
            if self.links[i] != UNLINKED && !idle_block {
                return Err(format!("block {i} is linked into an LRU list but not idle"));
            }
        }
        Ok(tally)
    }

    /// The free stack holds exactly the free blocks; every unhanded dirty block is queued.
    fn check_free_and_dirty(&self, tally: &Tally) -> Result<(), String> {
        if tally.free != self.free.len() {
            return Err(format!(
                "{} free blocks but {} on the free stack",
                tally.free,
                self.free.len()
            ));
        }
        let mut seen = HashSet::new();
        for &i in &self.free {
            if self.states.get(ix(i)) != Some(&State::Free) || !seen.insert(i) {
                return Err(format!("free stack entry {i} is not a distinct free block"));
            }
        }
        if tally.dirty != self.dirty_count {
            return Err(format!(
                "{} dirty blocks but dirty_count is {}",
                tally.dirty, self.dirty_count
            ));
        }
        if self.dirty_queue.iter().any(|&i| ix(i) >= self.states.len()) {
            return Err("dirty queue holds an out-of-range block".into());
        }
        let queued: HashSet<u32> = self.dirty_queue.iter().copied().collect();
        for (i, state) in self.states.iter().enumerate() {
            if matches!(state, State::Dirty { queued: true, .. }) && !queued.contains(&block_u32(i))
            {
                return Err(format!(
                    "dirty block {i} awaits take_dirty but is not queued"
                ));
            }
        }
        Ok(())
    }

    /// Every cache entry points at a block its key's tenant owns, published under that hash.
    fn check_cache(&self, tally: &Tally) -> Result<(), String> {
        if tally.cached != self.cache.len() {
            return Err(format!(
                "{} cached blocks but {} cache entries",
                tally.cached,
                self.cache.len()
            ));
        }
        for (&(tag, hash), &b) in &self.cache {
            match self.states.get(ix(b)) {
                Some(&State::Owned {
                    tag: owner,
                    cached: Some(h),
                    ..
                }) if owner == tag && h == hash => {}
                _ => {
                    return Err(format!(
                        "cache entry ({tag}, {hash:?}) points at block {b} not owned by it"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Per-tenant counters, LRU lists and the pressure index match the blocks.
    fn check_tenants(&self, tally: &Tally) -> Result<(), String> {
        for (s, t) in self.tenants.iter().enumerate() {
            let tag = u32::try_from(s + 1).expect("tenant count fits u32");
            if t.used != tally.used[s] || t.idle != tally.idle[s] {
                return Err(format!(
                    "tenant {}: counted used {} idle {}, actual used {} idle {}",
                    t.id, t.used, t.idle, tally.used[s], tally.idle[s]
                ));
            }
            self.check_lru(tag, t)?;
            if self.pressure.contains(&(Reverse(t.idle), tag)) != (t.idle > 0) {
                return Err(format!(
                    "tenant {} is misplaced in the pressure index",
                    t.id
                ));
            }
        }
        if self.pressure.len() != tally.idle.iter().filter(|&&c| c > 0).count() {
            return Err("pressure index holds stale entries".into());
        }
        Ok(())
    }

    /// Walks one tenant's LRU list both ways: exactly its idle blocks, links consistent.
    fn check_lru(&self, tag: u32, t: &Tenant) -> Result<(), String> {
        let (mut len, mut prev, mut cur) = (0u32, NIL, t.lru_head);
        while cur != NIL {
            if len >= t.idle || ix(cur) >= self.states.len() {
                return Err(format!(
                    "tenant {}: LRU list longer than its {} idle blocks",
                    t.id, t.idle
                ));
            }
            let link = self.links[ix(cur)];
            if link.prev != prev {
                return Err(format!(
                    "tenant {}: block {cur} has a broken prev link",
                    t.id
                ));
            }
            if !matches!(self.states[ix(cur)], State::Owned { tag: o, refcount: 0, .. } if o == tag)
            {
                return Err(format!(
                    "tenant {}: LRU block {cur} is not its idle block",
                    t.id
                ));
            }
            len += 1;
            prev = cur;
            cur = link.next;
        }
        if len != t.idle || t.lru_tail != prev {
            return Err(format!(
                "tenant {}: LRU list of {len} (tail {}) for {} idle",
                t.id, t.lru_tail, t.idle
            ));
        }
        Ok(())
    }

    fn tenant(&self, tenant: &TenantId) -> Option<&Tenant> {
        self.tags.get(tenant).map(|&tag| &self.tenants[slot(tag)])
    }

    /// Hands the tenant's LRU idle block back to it, referenced once, out of
    /// the cache; no scrub, as the bytes stay with their owner.
    fn recycle_own(&mut self, tag: u32) -> Option<BlockId> {
        let i = self.tenants[slot(tag)].lru_head;
        if i == NIL {
            return None;
        }
        self.uncache(i);
        self.lru_remove(tag, i);
        self.set_idle(tag, self.tenants[slot(tag)].idle - 1);
        self.states[ix(i)] = State::Owned {
            tag,
            refcount: 1,
            cached: None,
        };
        Some(BlockId(i))
    }

    /// Takes the tenant's LRU idle block from it: out of the cache, dirty
    /// (still tagged with the tenant until scrubbed).
    fn evict_to_dirty(&mut self, tag: u32) {
        let i = self.tenants[slot(tag)].lru_head;
        debug_assert_ne!(i, NIL, "a tenant in the pressure index has idle blocks");
        if i == NIL {
            return;
        }
        self.uncache(i);
        self.lru_remove(tag, i);
        self.set_idle(tag, self.tenants[slot(tag)].idle - 1);
        self.tenants[slot(tag)].used -= 1;
        self.states[ix(i)] = State::Dirty {
            former_tag: tag,
            queued: true,
        };
        self.dirty_queue.push(i);
        self.dirty_count += 1;
    }

    /// Removes the block's prefix-cache entry, if any.
    fn uncache(&mut self, i: u32) {
        if let State::Owned {
            tag,
            cached: Some(hash),
            ..
        } = self.states[ix(i)]
        {
            self.cache.remove(&(tag, hash));
        }
    }

    /// Sets a tenant's idle count, keeping the pressure index in step.
    fn set_idle(&mut self, tag: u32, idle: u32) {
        let t = &mut self.tenants[slot(tag)];
        if t.idle > 0 {
            self.pressure.remove(&(Reverse(t.idle), tag));
        }
        t.idle = idle;
        if idle > 0 {
            self.pressure.insert((Reverse(idle), tag));
        }
    }

    fn set_owner(&mut self, i: u32, tag: u32) {
        if self.owners[ix(i)] != tag {
            self.owners[ix(i)] = tag;
            if !self.tag_changed[ix(i)] {
                self.tag_changed[ix(i)] = true;
                self.tag_change_list.push(i);
            }
        }
    }

    /// Appends the block at the tenant's MRU end.
    fn lru_push_back(&mut self, tag: u32, i: u32) {
        let t = &mut self.tenants[slot(tag)];
        let tail = t.lru_tail;
        self.links[ix(i)] = Link {
            prev: tail,
            next: NIL,
        };
        if tail == NIL {
            t.lru_head = i;
        } else {
            self.links[ix(tail)].next = i;
        }
        t.lru_tail = i;
    }

    /// Unlinks the block from the tenant's LRU list.
    fn lru_remove(&mut self, tag: u32, i: u32) {
        let t = &mut self.tenants[slot(tag)];
        let Link { prev, next } = self.links[ix(i)];
        if prev == NIL {
            t.lru_head = next;
        } else {
            self.links[ix(prev)].next = next;
        }
        if next == NIL {
            t.lru_tail = prev;
        } else {
            self.links[ix(next)].prev = prev;
        }
        self.links[ix(i)] = UNLINKED;
    }
}
