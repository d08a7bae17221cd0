// Guarded KV write (vLLM's reshape_and_cache), the twin of
// kernels/src/cpu/ops.rs::write_kv. common.cuh is prepended by the host.
//
// One CTA per token. Token t of sequence s at position pos goes to slot
// pos % block_tokens of block table[s][pos / block_tokens], only if that
// table entry exists, the block is inside the pool and owners[block] equals
// the sequence's tag. Otherwise not one byte is written and flags[s] gets
// InvalidBlock (no such entry / block outside the pool) or CrossTenantWrite
// (owned by another tenant, or by no one).

extern "C" __global__ void __launch_bounds__(128)
    bh_write_kv(float* __restrict__ kv, const u32* __restrict__ owners, u32 num_blocks, u32 layer,
                u32 layers, u32 kv_heads, u32 head_dim, u32 block_tokens,
                const u32* __restrict__ tags, const u32* __restrict__ block_tables, u32 max_blocks,
                const u32* __restrict__ tok_seq, const u32* __restrict__ tok_pos, u32 n_tokens,
                const float* __restrict__ k, const float* __restrict__ v, u32* __restrict__ flags) {
    bh_pdl_trigger();  // attention (launched with PDL) may start its guard prologue
    const u32 t = blockIdx.x;
    if (t >= n_tokens) return;
    const u32 s = tok_seq[t];
    const u32 pos = tok_pos[t];
    const u32 index = pos / block_tokens;
    u32 verdict = 0;
    u32 block = 0;
    if (index >= max_blocks) {
        verdict = BH_FLAG_INVALID_BLOCK;
    } else {
        block = block_tables[(u64)s * max_blocks + index];
        if (block >= num_blocks) {
            verdict = BH_FLAG_INVALID_BLOCK;
        } else if (owners[block] != tags[s]) {
            verdict = BH_FLAG_CROSS_TENANT_WRITE;
        }
    }
    // Every thread of the CTA computed the same verdict from the same words.
    if (verdict != 0) {
        if (threadIdx.x == 0) atomicOr(&flags[s], verdict);
        return;
    }
    const u32 slot = pos % block_tokens;
    const u32 row = kv_heads * head_dim;
    const float* ks = k + (u64)t * row;
    const float* vs = v + (u64)t * row;
    for (u32 e = threadIdx.x; e < row; e += blockDim.x) {
        const u32 head = e / head_dim, d = e % head_dim;
        const u64 kd = bh_kv_offset(block, layer, 0, head, slot, layers, kv_heads, block_tokens, head_dim) + d;
        const u64 vd = bh_kv_offset(block, layer, 1, head, slot, layers, kv_heads, block_tokens, head_dim) + d;
        kv[kd] = ks[e];
        kv[vd] = vs[e];
    }
}

// Fills a buffer with reproducible pseudo-random values in [-1, 1) (a hash of
// the index and the seed): for benchmarks and tests that need a large cache
// with non-zero contents without copying it from the host.
extern "C" __global__ void bh_fill_random(float* __restrict__ out, u64 n, u32 seed) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        u64 z = i * 0x9E3779B97F4A7C15ull + ((u64)seed << 32 | seed);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        out[i] = (float)(z >> 40) * (1.0f / 8388608.0f) - 1.0f;
    }
}
