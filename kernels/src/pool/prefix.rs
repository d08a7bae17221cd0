//! Chain hashes: the prefix-cache key of a full KV block.
//!
//! A block's K/V depends on every token before it, not only its own, so its
//! key hashes the whole prefix: each hash chains the previous one. The domain
//! string and the block size go into the first hash so that a pool with
//! another block size (or another scheme) never shares a key.

use sha2::{Digest, Sha256};
use std::fmt;

/// Domain separator of the first block's hash; bump the version on any change.
const DOMAIN: &[u8] = b"bulkhead-kv-prefix-v1";

/// SHA-256 of a token prefix that ends on a block boundary (see [`chain_hashes`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChainHash(pub [u8; 32]);

impl fmt::Debug for ChainHash {
    /// The first 8 bytes in hex: enough to tell hashes apart in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({}…)", hex::encode(&self.0[..8]))
    }
}

/// The chain hash of every **full** block of `tokens`, in order.
///
/// `h_0 = SHA-256(b"bulkhead-kv-prefix-v1" || block_tokens as u32 LE || block 0's
/// tokens as u32 LE)`, `h_i = SHA-256(h_{i-1} || block i's tokens as u32 LE)`.
/// A trailing partial block gets no hash: its K/V is still being written, so
/// it must not be shared. A `block_tokens` of 0 or one that does not fit a
/// `u32` yields no hash at all (nothing is cached rather than a panic).
pub fn chain_hashes(tokens: &[u32], block_tokens: usize) -> Vec<ChainHash> {
    let mut out = Vec::new();
    extend_chain_hashes(&mut out, tokens, block_tokens);
    out
}

/// Extends `chain`, the chain hashes of the first `chain.len()` full blocks
/// of `tokens`, with those of its further full blocks: a growing sequence
/// hashes each block once instead of its whole prefix again.
pub fn extend_chain_hashes(chain: &mut Vec<ChainHash>, tokens: &[u32], block_tokens: usize) {
    let Ok(block_tokens_u32) = u32::try_from(block_tokens) else {
        return;
    };
    if block_tokens == 0 {
        return;
    }
    let done = chain.len() * block_tokens;
    let Some(rest) = tokens.get(done..) else {
        return;
    };
    for block in rest.chunks_exact(block_tokens) {
        let mut hasher = Sha256::new();
        if let Some(prev) = chain.last() {
            hasher.update(prev.0);
        } else {
            hasher.update(DOMAIN);
            hasher.update(block_tokens_u32.to_le_bytes());
        }
        for token in block {
            hasher.update(token.to_le_bytes());
        }
        chain.push(ChainHash(hasher.finalize().into()));
    }
}
