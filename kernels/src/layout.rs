//! Memory layouts shared by every backend: the KV cache, block tables and owner tags.
//!
//! The CPU reference and the CUDA kernels index memory the same way, so that
//! the GPU tests can compare them buffer for buffer.
//!
//! # KV cache
//!
//! One flat `f32` buffer of `num_blocks` blocks, **block-major**: a block is
//! one contiguous region, so scrubbing it is one memset and a block index
//! bounds every byte an access may touch.
//!
//! ```text
//! kv[block][layer][kv: 0 = K, 1 = V][kv_head][slot in block][head_dim]
//! ```
//!
//! # Block tables
//!
//! Each sequence in a batch has a row of `max_blocks_per_seq` `u32` block
//! indices; entry `i` holds tokens `i * block_tokens ..` of the sequence.
//! Entries past the sequence's context are ignored (never read or checked).
//!
//! # Owner tags
//!
//! `owners[block]` is a `u32` tag: [`FREE_TAG`] (0) for a scrubbed block that
//! no tenant owns, otherwise the tag of the tenant owning it. A block freed by
//! its tenant keeps that tenant's tag until it is scrubbed; only then is its
//! tag reset to [`FREE_TAG`]. A sequence carries its tenant's tag (never
//! [`FREE_TAG`]). The **guard**: before a kernel reads K/V for a sequence, every
//! block its context covers must satisfy `block < num_blocks &&
//! owners[block] == tag`; before it writes a token's K/V, the same for the
//! written block. On a mismatch nothing of that block is touched, the
//! sequence's output is zeroed and its violation flag is set (see [`Violation`]).

/// The owner tag of a block that belongs to no tenant (scrubbed and free).
pub const FREE_TAG: u32 = 0;

/// Tokens per KV block.
pub const BLOCK_TOKENS: usize = 16;

/// Shape of the KV cache, from the model and the pool size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Tokens per block.
    pub block_tokens: usize,
}

impl KvShape {
    /// `f32` elements of one block (all layers, K and V).
    pub const fn block_elems(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.block_tokens * self.head_dim
    }

    /// `f32` elements of the whole cache.
    pub const fn total_elems(&self) -> usize {
        self.num_blocks * self.block_elems()
    }

    /// Offset of `kv[block][layer][which][kv_head][slot][0]` (`which`: 0 = K, 1 = V).
    pub const fn offset(
        &self,
        block: usize,
        layer: usize,
        which: usize,
        kv_head: usize,
        slot: usize,
    ) -> usize {
        ((((block * self.layers + layer) * 2 + which) * self.kv_heads + kv_head)
            * self.block_tokens
            + slot)
            * self.head_dim
    }

    /// Blocks needed to hold `tokens` tokens.
    pub const fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }
}

/// What a guarded kernel reports for one sequence (0 = clean).
///
/// Stored per sequence as a `u32` bit set, so the CUDA kernels can `atomicOr`
/// it: the same values are used by the CPU reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Violation {
    /// A K/V read of a block owned by another tenant (or by no one).
    CrossTenantRead = 1,
    /// A K/V write into a block owned by another tenant (or by no one).
    CrossTenantWrite = 2,
    /// A block index outside the pool, or a table too short for the context.
    InvalidBlock = 4,
}

impl Violation {
    /// Every kind, in bit order.
    pub const ALL: [Self; 3] = [
        Self::CrossTenantRead,
        Self::CrossTenantWrite,
        Self::InvalidBlock,
    ];

    /// The kinds set in a flag word.
    pub fn from_flags(flags: u32) -> impl Iterator<Item = Self> {
        Self::ALL
            .into_iter()
            .filter(move |v| flags & (*v as u32) != 0)
    }
}
