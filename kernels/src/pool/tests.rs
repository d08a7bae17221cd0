use super::*;

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).expect("valid test tenant id")
}

/// A pool with tenants `a` and `b`, each with the given quota.
fn pool_ab(blocks: u32, quota: u32) -> (BlockPool, TenantId, TenantId) {
    let (a, b) = (tenant("a"), tenant("b"));
    let mut pool = BlockPool::new(blocks);
    pool.set_quota(&a, quota);
    pool.set_quota(&b, quota);
    (pool, a, b)
}

fn hashes(n: u32, salt: u32) -> Vec<ChainHash> {
    let tokens: Vec<u32> = (0..n * 4).map(|t| t * 7 + salt).collect();
    chain_hashes(&tokens, 4)
}

fn check(pool: &BlockPool) {
    pool.check_invariants().expect("pool invariants hold");
}

/// Scrubs everything dirty, as a backend would.
fn scrub(pool: &mut BlockPool) -> Vec<BlockId> {
    let dirty = pool.take_dirty();
    pool.mark_scrubbed(&dirty);
    dirty
}

#[test]
fn chain_hashes_are_prefix_stable() {
    let tokens: Vec<u32> = (0..64).collect();
    let full = chain_hashes(&tokens, 16);
    assert_eq!(full.len(), 4);
    for n in 0..=64 {
        let part = chain_hashes(&tokens[..n], 16);
        assert_eq!(part.len(), n / 16, "only full blocks get a hash");
        assert_eq!(
            part[..],
            full[..n / 16],
            "a prefix's hashes are a prefix of the hashes"
        );
    }
}

#[test]
fn chain_hashes_partial_block_has_no_hash() {
    assert!(chain_hashes(&[1, 2, 3], 4).is_empty());
    assert!(chain_hashes(&[], 4).is_empty());
    assert_eq!(chain_hashes(&[1, 2, 3, 4, 5], 4).len(), 1);
    assert!(
        chain_hashes(&[1, 2, 3, 4], 0).is_empty(),
        "block size 0 gives no hash, no panic"
    );
}

#[test]
fn chain_hashes_differ_on_any_token_and_on_block_size() {
    let base: Vec<u32> = (0..32).collect();
    let h = chain_hashes(&base, 8);
    for pos in 0..32 {
        let mut other = base.clone();
        other[pos] ^= 1;
        let g = chain_hashes(&other, 8);
        let first = pos / 8;
        assert_eq!(
            g[..first],
            h[..first],
            "blocks before the change keep their hash"
        );
        for i in first..4 {
            assert_ne!(g[i], h[i], "block {i} after a change at {pos} must change");
        }
    }
    // Same tokens, other block size: the first block's hash differs.
    assert_ne!(
        chain_hashes(&base[..8], 8)[0],
        chain_hashes(&base[..16], 16)[0]
    );
    // Block 1 of a sequence is not block 0 of its tail.
    assert_ne!(chain_hashes(&base[8..16], 8)[0], h[1]);
}

#[test]
fn chain_hash_matches_spec() {
    use sha2::{Digest, Sha256};
    let mut h0 = Sha256::new();
    h0.update(b"bulkhead-kv-prefix-v1");
    h0.update(2u32.to_le_bytes());
    h0.update(5u32.to_le_bytes());
    h0.update(6u32.to_le_bytes());
    let h0: [u8; 32] = h0.finalize().into();
    let mut h1 = Sha256::new();
    h1.update(h0);
    h1.update(7u32.to_le_bytes());
    h1.update(8u32.to_le_bytes());
    let h1: [u8; 32] = h1.finalize().into();
    assert_eq!(
        chain_hashes(&[5, 6, 7, 8, 9], 2),
        vec![ChainHash(h0), ChainHash(h1)]
    );
    assert!(format!("{:?}", ChainHash(h0)).contains(&hex::encode(&h0[..8])));
}

#[test]
fn new_pool_is_clean() {
    let pool = BlockPool::new(5);
    assert_eq!(pool.num_blocks(), 5);
    assert_eq!(pool.free_blocks(), 5);
    assert_eq!(pool.dirty_blocks(), 0);
    assert!(pool.owner_tags().iter().all(|&t| t == FREE_TAG));
    assert_eq!(pool.owner_tag(BlockId(99)), FREE_TAG);
    assert!(pool.tenants().is_empty());
    check(&pool);
}

#[test]
fn tenant_tags_are_stable_nonzero_and_distinct() {
    let mut pool = BlockPool::new(1);
    let (a, b) = (tenant("a"), tenant("b"));
    let ta = pool.tenant_tag(&a);
    let tb = pool.tenant_tag(&b);
    assert_ne!(ta, FREE_TAG);
    assert_ne!(tb, FREE_TAG);
    assert_ne!(ta, tb);
    assert_eq!(pool.tenant_tag(&a), ta);
    check(&pool);
}

#[test]
fn unknown_tenant_gets_nothing() {
    let mut pool = BlockPool::new(4);
    let x = tenant("x");
    assert_eq!(pool.quota(&x), 0);
    assert_eq!(
        pool.allocate(&x),
        Err(AllocError::QuotaExhausted {
            tenant: x.clone(),
            quota: 0
        })
    );
    assert!(pool.lookup_prefix(&x, &hashes(1, 0)).is_empty());
    assert!(!pool.publish(&x, hashes(1, 0)[0], BlockId(0)));
    assert_eq!(pool.free_blocks(), 4);
    check(&pool);
}

#[test]
fn freed_block_is_dirty_until_scrubbed() {
    let (mut pool, a, b) = pool_ab(1, 4);
    let ta = pool.tenant_tag(&a);
    let blk = pool.allocate(&a).expect("a gets the only block");
    assert_eq!(pool.owner_tag(blk), ta);
    pool.release(blk).expect("a holds it");
    check(&pool);
    assert_eq!(pool.dirty_blocks(), 1);
    assert_eq!(
        pool.used_blocks(&a),
        0,
        "a dirty block no longer counts against a"
    );
    assert_eq!(
        pool.owner_tag(blk),
        ta,
        "a dirty block keeps its former owner's tag"
    );
    assert_eq!(pool.allocate(&b), Err(AllocError::NeedsScrub));
    assert_eq!(pool.allocate(&a), Err(AllocError::NeedsScrub));
    assert_eq!(pool.take_dirty(), vec![blk]);
    assert!(pool.take_dirty().is_empty(), "handed out once");
    assert_eq!(
        pool.allocate(&b),
        Err(AllocError::NeedsScrub),
        "not allocatable while being scrubbed"
    );
    pool.mark_scrubbed(&[blk]);
    check(&pool);
    assert_eq!(pool.owner_tag(blk), FREE_TAG);
    assert_eq!(pool.dirty_blocks(), 0);
    let got = pool.allocate(&b).expect("clean now");
    assert_eq!(got, blk);
    assert_eq!(pool.owner_tag(blk), pool.tenant_tag(&b));
    check(&pool);
}

#[test]
fn mark_scrubbed_ignores_live_and_bogus_blocks() {
    let (mut pool, a, _) = pool_ab(2, 2);
    let ta = pool.tenant_tag(&a);
    let blk = pool.allocate(&a).expect("free block");
    pool.mark_scrubbed(&[blk, BlockId(1), BlockId(77)]);
    assert_eq!(
        pool.owner_tag(blk),
        ta,
        "a referenced block is never reset by a bogus scrub"
    );
    assert_eq!(pool.refcount(blk), 1);
    assert_eq!(pool.free_blocks(), 1);
    check(&pool);
}

#[test]
fn scrubbed_before_take_dirty_is_not_handed_out_again() {
    let (mut pool, a, _) = pool_ab(1, 1);
    let blk = pool.allocate(&a).expect("free");
    pool.release(blk).expect("held");
    pool.mark_scrubbed(&[blk]); // Scrubbed without take_dirty: its queue entry goes stale.
    let again = pool.allocate(&a).expect("clean again");
    pool.release(again).expect("held");
    assert_eq!(
        pool.take_dirty(),
        vec![blk],
        "queued twice, handed out once"
    );
    check(&pool);
}

#[test]
fn quota_eviction_only_takes_own_blocks() {
    let (mut pool, a, b) = pool_ab(8, 2);
    let (ha, hb) = (hashes(2, 1), hashes(2, 2));
    let tb = pool.tenant_tag(&b);
    // b parks two idle cached blocks.
    let b_blocks: Vec<BlockId> = (0..2)
        .map(|_| pool.allocate(&b).expect("b under quota"))
        .collect();
    for (blk, h) in b_blocks.iter().zip(&hb) {
        assert!(pool.publish(&b, *h, *blk));
        pool.release(*blk).expect("b holds it");
    }
    // a fills its quota with two cached idle blocks, oldest first.
    let a0 = pool.allocate(&a).expect("a under quota");
    let a1 = pool.allocate(&a).expect("a under quota");
    assert!(pool.publish(&a, ha[0], a0));
    assert!(pool.publish(&a, ha[1], a1));
    pool.release(a0).expect("held");
    pool.release(a1).expect("held");
    assert_eq!(pool.cached_blocks(&a), 2);
    check(&pool);
    // At quota: a recycles its own LRU block (a0), no scrub, b untouched.
    let got = pool.allocate(&a).expect("a recycles its own idle block");
    assert_eq!(got, a0);
    assert_eq!(pool.used_blocks(&a), 2);
    assert_eq!(pool.cached_blocks(&a), 1);
    assert_eq!(pool.cached_blocks(&b), 2);
    assert_eq!(pool.dirty_blocks(), 0);
    assert!(
        pool.lookup_prefix(&a, &ha[..1]).is_empty(),
        "a0's cache entry is gone"
    );
    let got = pool.allocate(&a).expect("then a1");
    assert_eq!(got, a1);
    check(&pool);
    // Nothing idle left: quota exhausted, although 4 blocks are free.
    assert_eq!(
        pool.allocate(&a),
        Err(AllocError::QuotaExhausted {
            tenant: a.clone(),
            quota: 2
        })
    );
    assert_eq!(pool.cached_blocks(&b), 2);
    for blk in &b_blocks {
        assert_eq!(pool.owner_tag(*blk), tb);
    }
    assert_eq!(
        pool.lookup_prefix(&b, &hb),
        b_blocks,
        "b's cache survived a's pressure"
    );
    check(&pool);
}

#[test]
fn lowering_quota_frees_nothing_but_blocks_growth() {
    let (mut pool, a, _) = pool_ab(8, 4);
    let held: Vec<BlockId> = (0..3)
        .map(|_| pool.allocate(&a).expect("under quota"))
        .collect();
    pool.set_quota(&a, 1);
    assert_eq!(pool.used_blocks(&a), 3);
    assert!(matches!(
        pool.allocate(&a),
        Err(AllocError::QuotaExhausted { quota: 1, .. })
    ));
    for blk in held {
        assert_eq!(pool.refcount(blk), 1);
    }
    assert_eq!(pool.tenants(), vec![(a.clone(), 3, 1), (tenant("b"), 0, 4)]);
    check(&pool);
}

#[test]
fn pool_pressure_evicts_from_biggest_idle_cache() {
    let (mut pool, a, b) = pool_ab(6, 6);
    let c = tenant("c");
    pool.set_quota(&c, 6);
    let (ha, hb) = (hashes(2, 1), hashes(3, 2));
    let (ta, tb) = (pool.tenant_tag(&a), pool.tenant_tag(&b));
    // a: 2 idle cached, b: 3 idle cached, c: 1 running.
    let a_blocks: Vec<_> = ha
        .iter()
        .map(|h| (pool.allocate(&a).expect("free"), *h))
        .collect();
    let b_blocks: Vec<_> = hb
        .iter()
        .map(|h| (pool.allocate(&b).expect("free"), *h))
        .collect();
    let c0 = pool.allocate(&c).expect("last free block");
    for &(blk, h) in &a_blocks {
        assert!(pool.publish(&a, h, blk));
        pool.release(blk).expect("held");
    }
    for &(blk, h) in &b_blocks {
        assert!(pool.publish(&b, h, blk));
        pool.release(blk).expect("held");
    }
    assert_eq!(pool.free_blocks(), 0);
    check(&pool);
    // c has no idle cache: b (3 idle > a's 2) loses its LRU block, which must be scrubbed.
    assert_eq!(pool.allocate(&c), Err(AllocError::NeedsScrub));
    check(&pool);
    assert_eq!(pool.cached_blocks(&b), 2);
    assert_eq!(pool.used_blocks(&b), 2);
    assert_eq!(pool.cached_blocks(&a), 2);
    let victim = b_blocks[0].0;
    assert_eq!(
        pool.owner_tag(victim),
        tb,
        "evicted block keeps b's tag until scrubbed"
    );
    assert_eq!(pool.refcount(victim), 0);
    assert_eq!(scrub(&mut pool), vec![victim]);
    assert_eq!(pool.owner_tag(victim), FREE_TAG);
    assert_eq!(pool.allocate(&c), Ok(victim));
    // b's first block is gone from its cache, so its lookup stops at once.
    assert!(pool.lookup_prefix(&b, &hb).is_empty());
    assert_eq!(pool.lookup_prefix(&b, &hb[1..]).len(), 2);
    // Now a (2 idle) is the biggest: a tie with nobody; its LRU goes next.
    assert_eq!(pool.allocate(&c), Err(AllocError::NeedsScrub));
    assert_eq!(pool.owner_tag(a_blocks[0].0), ta);
    assert_eq!(pool.cached_blocks(&a), 1);
    assert_eq!(scrub(&mut pool), vec![a_blocks[0].0]);
    check(&pool);
    pool.release(c0).expect("held");
    let _ = pool.take_dirty();
}

#[test]
fn pool_pressure_ties_go_to_lowest_tag_and_own_cache_first() {
    let (mut pool, a, b) = pool_ab(4, 4);
    let (ha, hb) = (hashes(2, 1), hashes(2, 2));
    for (t, hs) in [(&a, &ha), (&b, &hb)] {
        for h in hs {
            let blk = pool.allocate(t).expect("free");
            assert!(pool.publish(t, *h, blk));
            pool.release(blk).expect("held");
        }
    }
    // b has idle cache of its own: it reuses it rather than evicting a's.
    let got = pool.allocate(&b).expect("b recycles its own");
    assert_eq!(pool.owner_tag(got), pool.tenant_tag(&b));
    assert_eq!(pool.cached_blocks(&a), 2);
    pool.release(got).expect("held"); // not published: becomes dirty
    scrub(&mut pool);
    let got = pool.allocate(&b).expect("the scrubbed block");
    let _ = got;
    // A third tenant with nothing idle: a (2 idle) beats b (1 idle).
    let c = tenant("c");
    pool.set_quota(&c, 4);
    assert_eq!(pool.allocate(&c), Err(AllocError::NeedsScrub));
    assert_eq!(pool.cached_blocks(&a), 1);
    scrub(&mut pool);
    pool.allocate(&c).expect("scrubbed");
    // Tie 1 vs 1: the lowest tag (a) loses.
    assert_eq!(pool.allocate(&c), Err(AllocError::NeedsScrub));
    assert_eq!(pool.cached_blocks(&a), 0);
    assert_eq!(pool.cached_blocks(&b), 1);
    check(&pool);
}

#[test]
fn pool_exhausted_when_everything_is_referenced() {
    let (mut pool, a, b) = pool_ab(2, 4);
    pool.allocate(&a).expect("free");
    pool.allocate(&b).expect("free");
    assert_eq!(pool.allocate(&a), Err(AllocError::PoolExhausted));
    check(&pool);
}

#[test]
fn prefix_cache_is_per_tenant() {
    let (mut pool, a, b) = pool_ab(8, 8);
    let h = hashes(2, 0);
    let a_blocks: Vec<_> = (0..2).map(|_| pool.allocate(&a).expect("free")).collect();
    let b_blocks: Vec<_> = (0..2).map(|_| pool.allocate(&b).expect("free")).collect();
    for i in 0..2 {
        assert!(pool.publish(&a, h[i], a_blocks[i]));
        assert!(
            pool.publish(&b, h[i], b_blocks[i]),
            "same hash, other tenant: its own entry"
        );
    }
    // b cannot publish a's block, nor a hash twice.
    assert!(!pool.publish(&b, hashes(1, 9)[0], a_blocks[0]));
    let extra = pool.allocate(&a).expect("free");
    assert!(
        !pool.publish(&a, h[0], extra),
        "(a, h0) is already cached by another block"
    );
    assert!(
        pool.publish(&a, h[0], a_blocks[0]),
        "republishing the same entry is a no-op success"
    );
    assert!(
        !pool.publish(&a, hashes(1, 9)[0], a_blocks[0]),
        "a block has one hash"
    );
    for blk in a_blocks.iter().chain(&b_blocks) {
        pool.release(*blk).expect("held");
    }
    check(&pool);
    let (ta, tb) = (pool.tenant_tag(&a), pool.tenant_tag(&b));
    let hit_a = pool.lookup_prefix(&a, &h);
    let hit_b = pool.lookup_prefix(&b, &h);
    assert_eq!(hit_a, a_blocks);
    assert_eq!(hit_b, b_blocks);
    assert!(hit_a.iter().all(|&x| pool.owner_tag(x) == ta));
    assert!(hit_b.iter().all(|&x| pool.owner_tag(x) == tb));
    // A tenant that never published gets nothing for the same hashes.
    let c = tenant("c");
    pool.set_quota(&c, 8);
    assert!(pool.lookup_prefix(&c, &h).is_empty());
    check(&pool);
}

#[test]
fn second_lookup_hits_and_refcounts() {
    let (mut pool, a, _) = pool_ab(8, 8);
    let h = hashes(3, 4);
    let blocks: Vec<_> = (0..3).map(|_| pool.allocate(&a).expect("free")).collect();
    // Only the first two are published: the run stops at the third.
    assert!(pool.publish(&a, h[0], blocks[0]));
    assert!(pool.publish(&a, h[1], blocks[1]));
    for blk in &blocks {
        pool.release(*blk).expect("held");
    }
    assert_eq!(pool.cached_blocks(&a), 2);
    assert_eq!(pool.dirty_blocks(), 1);
    let first = pool.lookup_prefix(&a, &h);
    assert_eq!(first, blocks[..2]);
    assert_eq!(pool.cached_blocks(&a), 0, "hits leave the LRU list");
    let second = pool.lookup_prefix(&a, &h);
    assert_eq!(second, first, "a second lookup hits the same blocks");
    assert_eq!(pool.refcount(blocks[0]), 2);
    check(&pool);
    for blk in first.iter().chain(&second) {
        pool.release(*blk).expect("held");
    }
    assert_eq!(pool.cached_blocks(&a), 2, "back to idle, still cached");
    assert_eq!(
        pool.lookup_prefix(&a, &h[1..]),
        vec![blocks[1]],
        "lookup by a non-first hash alone"
    );
    // A miss in the middle ends the run.
    let gap = [h[0], hashes(1, 99)[0], h[1]];
    assert_eq!(pool.lookup_prefix(&a, &gap), vec![blocks[0]]);
    check(&pool);
}

#[test]
fn lru_order_follows_release_and_lookup() {
    let (mut pool, a, _) = pool_ab(3, 3);
    let h = hashes(3, 5);
    let blocks: Vec<_> = (0..3).map(|_| pool.allocate(&a).expect("free")).collect();
    for i in 0..3 {
        assert!(pool.publish(&a, h[i], blocks[i]));
    }
    // Release in order 2, 0, 1: LRU is block 2.
    for i in [2, 0, 1] {
        pool.release(blocks[i]).expect("held");
    }
    // Touch block 2 (lookup + release): now block 0 is LRU.
    let hit = pool.lookup_prefix(&a, &h[2..]);
    assert_eq!(hit, vec![blocks[2]]);
    pool.release(blocks[2]).expect("held");
    check(&pool);
    assert_eq!(pool.allocate(&a), Ok(blocks[0]));
    assert_eq!(pool.allocate(&a), Ok(blocks[1]));
    assert_eq!(pool.allocate(&a), Ok(blocks[2]));
    check(&pool);
}

#[test]
fn double_release_is_a_typed_error() {
    let (mut pool, a, _) = pool_ab(4, 4);
    let blk = pool.allocate(&a).expect("free");
    assert_eq!(
        pool.release(BlockId(4)),
        Err(PoolError::OutOfRange {
            block: BlockId(4),
            num_blocks: 4
        })
    );
    assert_eq!(
        pool.release(BlockId(3)),
        Err(PoolError::NotAllocated(BlockId(3)))
    );
    pool.release(blk).expect("held once");
    assert_eq!(pool.release(blk), Err(PoolError::Dirty(blk)));
    scrub(&mut pool);
    assert_eq!(pool.release(blk), Err(PoolError::NotAllocated(blk)));
    let cached = pool.allocate(&a).expect("free");
    assert!(pool.publish(&a, hashes(1, 0)[0], cached));
    pool.release(cached).expect("held once");
    assert_eq!(pool.release(cached), Err(PoolError::NotReferenced(cached)));
    check(&pool);
    assert!(PoolError::Dirty(blk).to_string().contains("dirty"));
}

#[test]
fn tag_updates_are_reported_once_per_block() {
    let (mut pool, a, b) = pool_ab(2, 2);
    let (ta, tb) = (pool.tenant_tag(&a), pool.tenant_tag(&b));
    assert!(pool.take_tag_updates().is_empty());
    let bx = pool.allocate(&a).expect("free");
    let by = pool.allocate(&b).expect("free");
    assert_eq!(pool.take_tag_updates(), vec![(bx, ta), (by, tb)]);
    assert!(pool.take_tag_updates().is_empty(), "drained");
    pool.release(bx).expect("held");
    assert!(
        pool.take_tag_updates().is_empty(),
        "a dirty block keeps its tag: no update"
    );
    scrub(&mut pool);
    assert_eq!(pool.take_tag_updates(), vec![(bx, FREE_TAG)]);
    pool.release(by).expect("held");
    scrub(&mut pool);
    let bz = pool.allocate(&a).expect("free");
    assert_eq!(bz, by);
    // by went b -> free -> a since the last call: reported once, with its current tag.
    assert_eq!(pool.take_tag_updates(), vec![(by, ta)]);
    check(&pool);
}

#[test]
fn alloc_error_messages_are_clear() {
    let e = AllocError::QuotaExhausted {
        tenant: tenant("acme"),
        quota: 3,
    };
    let msg = e.to_string();
    assert!(msg.contains("acme") && msg.contains('3'), "{msg}");
    assert!(AllocError::NeedsScrub.to_string().contains("scrub"));
    assert!(AllocError::PoolExhausted.to_string().contains("exhausted"));
}

#[test]
fn check_invariants_catches_corruption() {
    let (mut pool, a, _) = pool_ab(4, 4);
    let blk = pool.allocate(&a).expect("free");
    check(&pool);
    pool.owners[ix(blk.0)] = FREE_TAG;
    assert!(pool.check_invariants().is_err(), "owned block tagged free");
    pool.owners[ix(blk.0)] = pool.tenant_tag(&a);
    pool.tenants[0].used += 1;
    assert!(pool.check_invariants().is_err(), "used count off");
    pool.tenants[0].used -= 1;
    pool.free.push(blk.0);
    assert!(
        pool.check_invariants().is_err(),
        "owned block on the free stack"
    );
}
