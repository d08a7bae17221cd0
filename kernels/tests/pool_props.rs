//! Property tests of the KV block pool: random operation sequences over a few
//! tenants, checked after every step against the pool's own invariants and
//! against an independent model of who wrote which block.
//!
//! The model's key security check: each block remembers which tenant last
//! wrote it (set when `allocate` hands it out, cleared only when the test
//! itself scrubbed it). A block may be handed to tenant T only if it is clean
//! or T's own, and a prefix hit must hold T's bytes published under exactly
//! the hash looked up.

use bulkhead_core::TenantId;
use bulkhead_kernels::layout::FREE_TAG;
use bulkhead_kernels::pool::{AllocError, BlockId, BlockPool, ChainHash, chain_hashes};
use proptest::prelude::*;
use std::collections::HashMap;

/// Distinct prompts in play, each `BLOCKS_PER_PROMPT` full blocks.
const PROMPTS: usize = 3;
const BLOCKS_PER_PROMPT: usize = 4;

#[derive(Clone, Debug)]
enum Op {
    Allocate(usize),
    /// Release the `k % held`-th held reference.
    Release(usize),
    /// Release a block the model holds no reference to: must be refused.
    BadRelease(u32),
    /// Publish the `k % held`-th held block under `hashes[prompt][block]`.
    Publish(usize, usize, usize),
    /// `lookup_prefix(tenant, hashes[prompt][start..start + len])`.
    Lookup(usize, usize, usize, usize),
    /// `take_dirty`, into the model's to-scrub list.
    TakeDirty,
    /// Scrub the first `n` of the to-scrub list.
    Scrub(usize),
    /// `mark_scrubbed` on a block that is not dirty: must change nothing.
    BogusScrub(u32),
    SetQuota(usize, u32),
}

fn op(tenants: usize, blocks: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..tenants).prop_map(Op::Allocate),
        4 => any::<usize>().prop_map(Op::Release),
        1 => (0..blocks + 2).prop_map(Op::BadRelease),
        4 => (any::<usize>(), 0..PROMPTS, 0..BLOCKS_PER_PROMPT).prop_map(|(k, p, b)| Op::Publish(k, p, b)),
        4 => (0..tenants, 0..PROMPTS, 0..BLOCKS_PER_PROMPT, 1..=BLOCKS_PER_PROMPT)
            .prop_map(|(t, p, s, l)| Op::Lookup(t, p, s, l)),
        2 => Just(Op::TakeDirty),
        2 => (0..4usize).prop_map(Op::Scrub),
        1 => (0..blocks + 2).prop_map(Op::BogusScrub),
        1 => (0..tenants, 0..=blocks / 2 + 1).prop_map(|(t, q)| Op::SetQuota(t, q)),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, u32, Vec<u32>, Vec<Op>)> {
    (3..=4usize, 8..=64u32).prop_flat_map(|(tenants, blocks)| {
        (
            Just(tenants),
            Just(blocks),
            proptest::collection::vec(0..=blocks / 2 + 1, tenants),
            proptest::collection::vec(op(tenants, blocks), 1..300),
        )
    })
}

/// The pool under test and what the test knows independently of it.
struct Harness {
    pool: BlockPool,
    blocks: u32,
    ids: Vec<TenantId>,
    tags: Vec<u32>,
    /// References the test holds: (tenant, block).
    held: Vec<(usize, BlockId)>,
    /// Tenant whose bytes a block holds (`None`: zeroed by the test).
    content: Vec<Option<usize>>,
    /// What a block was last successfully published as, while its bytes are unchanged.
    published: HashMap<BlockId, (usize, ChainHash)>,
    /// Handed out by `take_dirty`, not yet scrubbed.
    to_scrub: Vec<BlockId>,
    hashes: Vec<Vec<ChainHash>>,
    /// Owner tags as a backend would mirror them, from reported updates only.
    mirror: Vec<u32>,
}

/// The pool as it was just before the operation being checked.
struct Before {
    step: usize,
    used: Vec<u32>,
    tags: Vec<u32>,
}

impl Harness {
    fn new(tenants: usize, blocks: u32, quotas: &[u32]) -> Self {
        let mut pool = BlockPool::new(blocks);
        let ids: Vec<TenantId> = (0..tenants)
            .map(|t| TenantId::new(&format!("tenant-{t}")).expect("valid id"))
            .collect();
        let tags: Vec<u32> = ids.iter().map(|id| pool.tenant_tag(id)).collect();
        for (id, &q) in ids.iter().zip(quotas) {
            pool.set_quota(id, q);
        }
        let hashes = (0..PROMPTS)
            .map(|prompt| {
                let tokens: Vec<u32> = (0..BLOCKS_PER_PROMPT * 4)
                    .map(|i| u32::try_from(i * 31 + prompt * 1000).expect("small"))
                    .collect();
                chain_hashes(&tokens, 4)
            })
            .collect();
        let mirror = pool.owner_tags().to_vec();
        Self {
            pool,
            blocks,
            ids,
            tags,
            held: Vec::new(),
            content: vec![None; blocks as usize],
            published: HashMap::new(),
            to_scrub: Vec::new(),
            hashes,
            mirror,
        }
    }

    fn refs(&self, block: BlockId) -> u32 {
        u32::try_from(self.held.iter().filter(|&&(_, b)| b == block).count()).expect("few refs")
    }

    /// Applies one operation, checking what it returned; the tenant that allocated, if any.
    fn apply(&mut self, op: &Op, before: &Before) -> Result<Option<usize>, TestCaseError> {
        let step = before.step;
        match *op {
            Op::Allocate(t) => {
                self.allocate(t, before)?;
                return Ok(Some(t));
            }
            Op::Release(k) => {
                if !self.held.is_empty() {
                    let (_, b) = self.held.swap_remove(k % self.held.len());
                    prop_assert!(
                        self.pool.release(b).is_ok(),
                        "step {step}: release of a held block failed"
                    );
                }
            }
            Op::BadRelease(b) => {
                let b = BlockId(b);
                if self.refs(b) == 0 {
                    prop_assert!(
                        self.pool.release(b).is_err(),
                        "step {step}: released unheld block {b:?}"
                    );
                }
            }
            Op::Publish(k, prompt, index) => self.publish(k, self.hashes[prompt][index], step)?,
            Op::Lookup(t, prompt, start, len) => {
                let end = (start + len).min(BLOCKS_PER_PROMPT);
                let query = self.hashes[prompt][start..end].to_vec();
                self.lookup(t, &query, step)?;
            }
            Op::TakeDirty => {
                for b in self.pool.take_dirty() {
                    prop_assert_eq!(
                        self.refs(b),
                        0,
                        "step {}: dirty block {:?} is still referenced",
                        step,
                        b
                    );
                    prop_assert!(
                        !self.to_scrub.contains(&b),
                        "step {step}: {b:?} handed out twice"
                    );
                    self.to_scrub.push(b);
                }
            }
            Op::Scrub(n) => {
                let n = n.min(self.to_scrub.len());
                let batch: Vec<BlockId> = self.to_scrub.drain(..n).collect();
                self.pool.mark_scrubbed(&batch);
                for b in batch {
                    prop_assert_eq!(self.pool.owner_tag(b), FREE_TAG);
                    self.content[b.0 as usize] = None;
                    self.published.remove(&b);
                }
            }
            Op::BogusScrub(b) => {
                let b = BlockId(b);
                if self.refs(b) > 0 || b.0 >= self.blocks {
                    self.pool.mark_scrubbed(&[b]);
                    prop_assert_eq!(
                        self.pool.owner_tags(),
                        &before.tags[..],
                        "step {}: bogus scrub changed tags",
                        step
                    );
                }
            }
            Op::SetQuota(t, q) => {
                self.pool.set_quota(&self.ids[t], q);
                prop_assert_eq!(self.pool.quota(&self.ids[t]), q);
            }
        }
        Ok(None)
    }

    fn allocate(&mut self, t: usize, before: &Before) -> Result<(), TestCaseError> {
        let step = before.step;
        let id = &self.ids[t];
        let quota = self.pool.quota(id);
        let idle = self.pool.cached_blocks(id);
        match self.pool.allocate(id) {
            Ok(b) => {
                let old_tag = before.tags[b.0 as usize];
                prop_assert!(
                    old_tag == FREE_TAG || old_tag == self.tags[t],
                    "step {step}: block {b:?} tagged {old_tag} handed to tag {}",
                    self.tags[t]
                );
                prop_assert!(
                    self.content[b.0 as usize].is_none_or(|w| w == t),
                    "step {step}: block {b:?} still holds tenant {:?}'s bytes, handed to {t}",
                    self.content[b.0 as usize]
                );
                prop_assert_eq!(
                    self.refs(b),
                    0,
                    "step {}: handed out a referenced block",
                    step
                );
                prop_assert_eq!(self.pool.owner_tag(b), self.tags[t]);
                prop_assert_eq!(self.pool.refcount(b), 1);
                if before.used[t] >= quota {
                    prop_assert_eq!(
                        self.pool.used_blocks(id),
                        before.used[t],
                        "step {}: grew past quota",
                        step
                    );
                }
                self.content[b.0 as usize] = Some(t);
                self.published.remove(&b);
                self.held.push((t, b));
            }
            Err(AllocError::QuotaExhausted { tenant, quota: q }) => {
                prop_assert_eq!(&tenant, id);
                prop_assert_eq!(q, quota);
                prop_assert!(
                    before.used[t] >= quota && idle == 0,
                    "step {step}: spurious quota error"
                );
            }
            Err(AllocError::NeedsScrub) => prop_assert!(self.pool.dirty_blocks() > 0),
            Err(AllocError::PoolExhausted) => {
                prop_assert_eq!(self.pool.free_blocks(), 0);
                prop_assert_eq!(self.pool.dirty_blocks(), 0);
                for other in &self.ids {
                    prop_assert_eq!(
                        self.pool.cached_blocks(other),
                        0,
                        "step {}: idle cache left",
                        step
                    );
                }
            }
        }
        Ok(())
    }

    fn publish(&mut self, k: usize, hash: ChainHash, step: usize) -> Result<(), TestCaseError> {
        if self.held.is_empty() {
            return Ok(());
        }
        let (t, b) = self.held[k % self.held.len()];
        if self.pool.publish(&self.ids[t], hash, b) {
            // A block keeps one hash for as long as it is cached.
            if let Some(&old) = self.published.get(&b) {
                prop_assert_eq!(
                    old,
                    (t, hash),
                    "step {}: block republished differently",
                    step
                );
            }
            self.published.insert(b, (t, hash));
        }
        let other = (t + 1) % self.ids.len();
        prop_assert!(
            !self.pool.publish(&self.ids[other], hash, b),
            "step {step}: cross-tenant publish"
        );
        Ok(())
    }

    fn lookup(&mut self, t: usize, query: &[ChainHash], step: usize) -> Result<(), TestCaseError> {
        let hits = self.pool.lookup_prefix(&self.ids[t], query);
        prop_assert!(hits.len() <= query.len());
        for (hash, &b) in query.iter().zip(&hits) {
            prop_assert_eq!(
                self.pool.owner_tag(b),
                self.tags[t],
                "step {}: hit {:?} of another tenant",
                step,
                b
            );
            prop_assert_eq!(
                self.content[b.0 as usize],
                Some(t),
                "step {}: hit holds foreign bytes",
                step
            );
            prop_assert_eq!(
                self.published.get(&b).copied(),
                Some((t, *hash)),
                "step {}: hit {:?} was not published as this hash",
                step,
                b
            );
            self.held.push((t, b));
        }
        Ok(())
    }

    /// The properties that hold after every operation.
    fn check(
        &mut self,
        op: &Op,
        before: &Before,
        actor: Option<usize>,
    ) -> Result<(), TestCaseError> {
        let step = before.step;
        if let Err(e) = self.pool.check_invariants() {
            return Err(TestCaseError::fail(format!("step {step} ({op:?}): {e}")));
        }
        let mut total = self.pool.free_blocks() + self.pool.dirty_blocks();
        for (t, id) in self.ids.iter().enumerate() {
            let used = self.pool.used_blocks(id);
            total += used;
            prop_assert!(
                used <= self.pool.quota(id).max(before.used[t]),
                "step {step}: tenant {t} uses {used} > quota {} (was {})",
                self.pool.quota(id),
                before.used[t]
            );
            if actor != Some(t) {
                prop_assert!(
                    used <= before.used[t],
                    "step {step}: tenant {t} grew without allocating"
                );
            }
            prop_assert!(self.pool.cached_blocks(id) <= used);
        }
        prop_assert_eq!(total, self.blocks, "step {}: used + free + dirty", step);
        for b in (0..self.blocks).map(BlockId) {
            prop_assert_eq!(
                self.pool.refcount(b),
                self.refs(b),
                "step {}: refcount of {:?}",
                step,
                b
            );
        }
        for (b, tag) in self.pool.take_tag_updates() {
            self.mirror[b.0 as usize] = tag;
        }
        prop_assert_eq!(
            &self.mirror[..],
            self.pool.owner_tags(),
            "step {}: tag updates missed a change",
            step
        );
        Ok(())
    }
}

fn run(tenants: usize, blocks: u32, quotas: &[u32], ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(tenants, blocks, quotas);
    for (step, op) in ops.iter().enumerate() {
        let before = Before {
            step,
            used: h.ids.iter().map(|id| h.pool.used_blocks(id)).collect(),
            tags: h.pool.owner_tags().to_vec(),
        };
        let actor = h.apply(op, &before)?;
        h.check(op, &before, actor)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_operations_keep_tenants_apart((tenants, blocks, quotas, ops) in scenario()) {
        run(tenants, blocks, &quotas, &ops)?;
    }
}

/// A deterministic heavy-traffic run, so the steady state (full pool, cache
/// eviction, scrub cycles) is exercised even if random runs rarely reach it.
#[test]
fn steady_state_cycle() {
    let mut ops = Vec::new();
    for round in 0..200usize {
        let t = round % 3;
        ops.push(Op::Lookup(t, round % PROMPTS, 0, BLOCKS_PER_PROMPT));
        ops.extend([Op::Allocate(t), Op::Allocate(t)]);
        ops.push(Op::Publish(
            round,
            round % PROMPTS,
            round % BLOCKS_PER_PROMPT,
        ));
        ops.push(Op::Publish(
            round + 1,
            (round + 1) % PROMPTS,
            (round + 1) % BLOCKS_PER_PROMPT,
        ));
        ops.extend([Op::Release(round), Op::Release(round + 3), Op::Release(0)]);
        if round % 2 == 0 {
            ops.extend([Op::TakeDirty, Op::Scrub(4)]);
        }
    }
    run(3, 8, &[4, 4, 4], &ops).expect("steady state holds every property");
}
