// Guarded paged attention, the twin of kernels/src/cpu/ops.rs::paged_attention
// (and check_sequence). common.cuh is prepended by the host.
//
// Two paths:
// - decode (one query per sequence at position ctx_len - 1): split-K flash
//   decoding. bh_decode_part_* runs one CTA per (sequence, KV head, partition
//   of part_tokens tokens) and handles every query head of the KV head's group,
//   so each K/V byte is read once; bh_decode_reduce_* combines the partitions.
// - generic (any tokens, e.g. prefill chunks): bh_attn_check computes each
//   sequence's verdict first, then bh_attn_generic_* runs one warp per
//   (token, query head) with an online softmax.
//
// The guard: before any K/V byte of a block is loaded, the block must be
// inside the pool and owned by the sequence's tag. A partition CTA checks all
// blocks its partition covers with a block-wide vote (__syncthreads_or); if
// one fails it ORs the violation bits into flags[seq], loads no K/V at all,
// and marks its partition denied, so the reduce writes zeros for the whole
// sequence. A context longer than the block table holds is InvalidBlock.
// Each kernel has an UNGUARDED twin (GUARD = false) that exists only to
// measure the guard's cost: the host validates the tables before launching
// it, and the engine never runs it.

#define BH_BT 16           // tokens per KV block (layout::BLOCK_TOKENS)
#define BH_BT_SHIFT 4
#define BH_DEC_THREADS 256
#define BH_DEC_WARPS 8
#define BH_DEC_MAX_BLOCKS 256  // blocks per partition: part_tokens <= 4096

// ---------------------------------------------------------------------------
// Decode: partition kernel.

// Tuning knobs: CTAs resident per SM the register budget must allow, query
// floats a lane holds in the QK pass, float4 loads in flight per thread in the
// QK and PV passes, and whether K/V loads use the evict-first (streaming)
// cache policy. Measured with bh-gpu-bench on an H100 (32/8 heads, head_dim
// 128, f32): these defaults reach 87-88% of peak DRAM bandwidth from 16k
// tokens; streaming loads gained 1-3% over __ldg and halved the guard's cost
// at short contexts (the owner tags stay in L2); 3 CTAs per SM (QREGS 32,
// KLOADS 4) lost up to 15% at mid contexts to wave quantisation.
#ifndef BH_DEC_MIN_CTAS
#define BH_DEC_MIN_CTAS 2
#endif
#ifndef BH_DEC_QREGS
#define BH_DEC_QREGS 64
#endif
#ifndef BH_DEC_KLOADS
#define BH_DEC_KLOADS 8
#endif
#ifndef BH_DEC_UV
#define BH_DEC_UV 8
#endif
#ifndef BH_DEC_STREAM
#define BH_DEC_STREAM 1
#endif

#if BH_DEC_STREAM
#define BH_KV_LOAD(p) __ldcs(p)
#else
#define BH_KV_LOAD(p) __ldg(p)
#endif

template <int HD, int G>
struct DecodeShape {
    // Lanes that share one key token in the QK pass: enough that each lane
    // holds at most BH_DEC_QREGS floats of queries (G heads x HD / LPT), at least 8.
    static constexpr int LPT_WANT = (G * HD / BH_DEC_QREGS > 8) ? G * HD / BH_DEC_QREGS : 8;
    static constexpr int LPT = LPT_WANT > HD / 4 ? HD / 4 : LPT_WANT;
    // float4 chunks of a key row per lane.
    static constexpr int C4 = HD / (4 * LPT);
    // Key tokens per CTA per step, and steps unrolled so that each thread has
    // about BH_DEC_KLOADS float4 loads in flight.
    static constexpr int TG = BH_DEC_THREADS / LPT;
    static constexpr int UK = C4 >= BH_DEC_KLOADS ? 1 : BH_DEC_KLOADS / C4;
    // V pass: lanes per value row (a float4 each), rows per warp, rows per CTA step.
    static constexpr int VL = HD / 4;
    static constexpr int TPW = 32 / VL;
    static constexpr int TPC = BH_DEC_WARPS * TPW;
    static constexpr int UV = BH_DEC_UV;
};

__device__ __forceinline__ float bh_dot4(float4 a, float4 b, float acc) {
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
    acc = fmaf(a.z, b.z, acc);
    return fmaf(a.w, b.w, acc);
}

// Dynamic shared memory: max(G * part_tokens, WARPS * G * HD) floats (scores,
// then the cross-warp reduction of the output).
template <int HD, int G, bool GUARD>
__device__ __forceinline__ void bh_decode_part(
    const float* __restrict__ kv, const u32* __restrict__ owners, u32 num_blocks, u32 layer,
    u32 layers, u32 kv_heads, const u32* __restrict__ tags, const u32* __restrict__ ctx_lens,
    const u32* __restrict__ block_tables, u32 max_blocks, const float* __restrict__ q, u32 heads,
    float scale, u32 part_tokens, u32 direct, float* __restrict__ out,
    float* __restrict__ part_acc, float* __restrict__ part_ml, u32 max_parts,
    u32* __restrict__ flags) {
    typedef DecodeShape<HD, G> S;
    extern __shared__ __align__(16) float bh_smem[];
    __shared__ u32 blk_s[BH_DEC_MAX_BLOCKS];
    __shared__ float red_s[BH_DEC_WARPS * G];
    __shared__ float m_s[G], l_s[G];

    // Launched with programmatic dependent launch, this kernel may run while
    // the kernel before it (write_kv, or the previous attention) still runs.
    // Until bh_pdl_wait() it reads only host-written tables, owner tags and
    // context lengths, and writes nothing but flag bits (atomicOr): the guard
    // verdict overlaps the previous kernel's tail. Queries, K/V and outputs
    // come after the wait.
    bh_pdl_trigger();
    const u32 s = blockIdx.x, kvh = blockIdx.y, p = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 ctx = ctx_lens[s];
    const u32 start = p * part_tokens;
    const u64 head0 = (u64)s * heads + (u64)kvh * G;  // first query head of the group

    if (ctx == 0) {
        // No key at all: the query (at position -1) is outside the context.
        bh_pdl_wait();
        if (direct && p == 0) {
            if (GUARD && tid == 0 && kvh == 0) atomicOr(&flags[s], BH_FLAG_INVALID_BLOCK);
            for (int i = tid; i < G * HD; i += BH_DEC_THREADS) out[head0 * HD + i] = 0.0f;
        }
        return;  // split mode: the reduce handles it
    }
    if (start >= ctx) return;  // past this sequence's context (uniform over the CTA)

    const u32 need = (u32)(((u64)ctx + BH_BT - 1) >> BH_BT_SHIFT);
    const u32 first_blk = start >> BH_BT_SHIFT;
    const u32 part_blocks = part_tokens >> BH_BT_SHIFT;
    const u32 nblk = min(part_blocks, need - first_blk);
    const u32 ntok = min(part_tokens, ctx - start);

    bool denied = false;
    if (GUARD) {
        if (need > max_blocks) {
            // The table cannot cover the context: nothing is checked or read.
            if (tid == 0) atomicOr(&flags[s], BH_FLAG_INVALID_BLOCK);
            denied = true;
        } else {
            u32 bad = 0;
            if ((u32)tid < nblk) {
                u32 b = block_tables[(u64)s * max_blocks + first_blk + tid];
                if (b >= num_blocks) {
                    bad = BH_FLAG_INVALID_BLOCK;
                    b = 0;
                } else if (owners[b] != tags[s]) {
                    bad = BH_FLAG_CROSS_TENANT_READ;
                }
                blk_s[tid] = b;
            }
            // The vote is also the barrier that publishes blk_s.
            if (__syncthreads_or(bad != 0)) {
                const int rd = __syncthreads_or(bad & BH_FLAG_CROSS_TENANT_READ);
                const int inv = __syncthreads_or(bad & BH_FLAG_INVALID_BLOCK);
                if (tid == 0) {
                    atomicOr(&flags[s], (rd ? BH_FLAG_CROSS_TENANT_READ : 0u) |
                                            (inv ? BH_FLAG_INVALID_BLOCK : 0u));
                }
                denied = true;
            }
        }
    } else {
        if ((u32)tid < nblk) blk_s[tid] = block_tables[(u64)s * max_blocks + first_blk + tid];
        __syncthreads();
    }
    bh_pdl_wait();  // the previous kernel's writes (K/V, queries) are visible from here
    if (denied) {
        // Not one K/V byte of this sequence is loaded by this CTA.
        if (direct) {
            for (int i = tid; i < G * HD; i += BH_DEC_THREADS) out[head0 * HD + i] = 0.0f;
        } else if (tid < G) {
            float* ml = part_ml + ((head0 + tid) * max_parts + p) * 2;
            ml[0] = 0.0f;
            ml[1] = -1.0f;  // the reduce zeroes a sequence with any denied partition
        }
        return;
    }

    // ---- QK: scores[g][j] = q_g . k_j * scale -----------------------------
    float* sc_s = bh_smem;
    const int grp = tid / S::LPT, gl = tid % S::LPT;
    float4 qr[G][S::C4];
#pragma unroll
    for (int g = 0; g < G; g++) {
        const float4* qp = reinterpret_cast<const float4*>(q + (head0 + g) * HD);
#pragma unroll
        for (int c = 0; c < S::C4; c++) qr[g][c] = qp[gl + S::LPT * c];
    }
    const u64 layer_stride = (u64)kv_heads * BH_BT * HD;  // K -> V of the same layer
    const u64 k_base = ((u64)layer * 2 * kv_heads + kvh) * BH_BT * HD;
    const u64 block_elems = (u64)layers * 2 * layer_stride;

    for (u32 j0 = 0; j0 < ntok; j0 += S::TG * S::UK) {
        float4 kr[S::UK][S::C4];
#pragma unroll
        for (int u = 0; u < S::UK; u++) {
            const u32 j = j0 + u * S::TG + grp;
            if (j < ntok) {
                const u32 b = blk_s[j >> BH_BT_SHIFT];
                const float4* kp = reinterpret_cast<const float4*>(
                    kv + (u64)b * block_elems + k_base + (u64)(j & (BH_BT - 1)) * HD);
#pragma unroll
                for (int c = 0; c < S::C4; c++) kr[u][c] = BH_KV_LOAD(kp + gl + S::LPT * c);
            } else {
#pragma unroll
                for (int c = 0; c < S::C4; c++) kr[u][c] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
#pragma unroll
        for (int u = 0; u < S::UK; u++) {
            const u32 j = j0 + u * S::TG + grp;
#pragma unroll
            for (int g = 0; g < G; g++) {
                float d = 0.0f;
#pragma unroll
                for (int c = 0; c < S::C4; c++) d = bh_dot4(qr[g][c], kr[u][c], d);
#pragma unroll
                for (int o = S::LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                if (gl == 0 && j < ntok) sc_s[g * part_tokens + j] = d * scale;
            }
        }
    }
    __syncthreads();

    // ---- softmax within the partition ---------------------------------------
    {
        float lm[G];
#pragma unroll
        for (int g = 0; g < G; g++) lm[g] = BH_NEG_INF;
        for (u32 j = tid; j < ntok; j += BH_DEC_THREADS) {
#pragma unroll
            for (int g = 0; g < G; g++) lm[g] = fmaxf(lm[g], sc_s[g * part_tokens + j]);
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            lm[g] = bh_warp_max(lm[g]);
            if (lane == 0) red_s[warp * G + g] = lm[g];
        }
        __syncthreads();
        if (tid < G) {
            float m = red_s[tid];
            for (int w = 1; w < BH_DEC_WARPS; w++) m = fmaxf(m, red_s[w * G + tid]);
            m_s[tid] = m;
        }
        __syncthreads();
        float ls[G];
#pragma unroll
        for (int g = 0; g < G; g++) ls[g] = 0.0f;
        for (u32 j = tid; j < ntok; j += BH_DEC_THREADS) {
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float e = expf(sc_s[g * part_tokens + j] - m_s[g]);
                sc_s[g * part_tokens + j] = e;
                ls[g] += e;
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            ls[g] = bh_warp_sum(ls[g]);
            if (lane == 0) red_s[warp * G + g] = ls[g];
        }
        __syncthreads();
        if (tid < G) {
            float l = red_s[tid];
            for (int w = 1; w < BH_DEC_WARPS; w++) l += red_s[w * G + tid];
            l_s[tid] = l;
        }
        // l_s is read only after the barriers below.
    }

    // ---- PV: acc[g] = sum_j p[g][j] * v_j -----------------------------------
    const int vg = lane / S::VL, vl = lane % S::VL;
    float4 acc[G];
#pragma unroll
    for (int g = 0; g < G; g++) acc[g] = make_float4(0.f, 0.f, 0.f, 0.f);
    const u64 v_base = k_base + layer_stride;
    for (u32 j0 = 0; j0 < ntok; j0 += S::TPC * S::UV) {
        float4 vr[S::UV];
#pragma unroll
        for (int u = 0; u < S::UV; u++) {
            const u32 j = j0 + u * S::TPC + warp * S::TPW + vg;
            if (j < ntok) {
                const u32 b = blk_s[j >> BH_BT_SHIFT];
                const float4* vp = reinterpret_cast<const float4*>(
                    kv + (u64)b * block_elems + v_base + (u64)(j & (BH_BT - 1)) * HD);
                vr[u] = BH_KV_LOAD(vp + vl);
            } else {
                vr[u] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
#pragma unroll
        for (int u = 0; u < S::UV; u++) {
            const u32 j = j0 + u * S::TPC + warp * S::TPW + vg;
            if (j < ntok) {
#pragma unroll
                for (int g = 0; g < G; g++) {
                    const float pj = sc_s[g * part_tokens + j];
                    acc[g].x = fmaf(pj, vr[u].x, acc[g].x);
                    acc[g].y = fmaf(pj, vr[u].y, acc[g].y);
                    acc[g].z = fmaf(pj, vr[u].z, acc[g].z);
                    acc[g].w = fmaf(pj, vr[u].w, acc[g].w);
                }
            }
        }
    }
    // Rows handled by the sub-groups of one warp.
#pragma unroll
    for (int o = S::VL; o < 32; o <<= 1) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            acc[g].x += __shfl_xor_sync(0xffffffffu, acc[g].x, o);
            acc[g].y += __shfl_xor_sync(0xffffffffu, acc[g].y, o);
            acc[g].z += __shfl_xor_sync(0xffffffffu, acc[g].z, o);
            acc[g].w += __shfl_xor_sync(0xffffffffu, acc[g].w, o);
        }
    }
    __syncthreads();  // every read of the scores is done: reuse the space
    float4* red4 = reinterpret_cast<float4*>(bh_smem);
    if (vg == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) red4[(warp * G + g) * S::VL + vl] = acc[g];
    }
    __syncthreads();
    for (int i = tid; i < G * S::VL; i += BH_DEC_THREADS) {
        const int g = i / S::VL, d4 = i % S::VL;
        float4 sum = red4[g * S::VL + d4];
        for (int w = 1; w < BH_DEC_WARPS; w++) {
            const float4 r = red4[(w * G + g) * S::VL + d4];
            sum.x += r.x;
            sum.y += r.y;
            sum.z += r.z;
            sum.w += r.w;
        }
        if (direct) {
            const float inv = 1.0f / l_s[g];
            float4 o;
            o.x = sum.x * inv;
            o.y = sum.y * inv;
            o.z = sum.z * inv;
            o.w = sum.w * inv;
            reinterpret_cast<float4*>(out + (head0 + g) * HD)[d4] = o;
        } else {
            reinterpret_cast<float4*>(part_acc + ((head0 + g) * max_parts + p) * HD)[d4] = sum;
        }
    }
    if (!direct && tid < G) {
        float* ml = part_ml + ((head0 + tid) * max_parts + p) * 2;
        ml[0] = m_s[tid];
        ml[1] = l_s[tid];
    }
}

// ---------------------------------------------------------------------------
// Decode: combine the partitions of one (sequence, query head).
// Block: 128 threads; dynamic shared memory: max_parts floats.
template <int HD, bool GUARD>
__device__ __forceinline__ void bh_decode_reduce(const u32* __restrict__ ctx_lens, u32 part_tokens,
                                                 const float* __restrict__ part_acc,
                                                 const float* __restrict__ part_ml, u32 max_parts,
                                                 u32 heads, float* __restrict__ out,
                                                 u32* __restrict__ flags) {
    extern __shared__ __align__(16) float bh_smem[];
    __shared__ float stat_s[2];
    __shared__ int denied_s;
    bh_pdl_trigger();  // the next attention call's guard prologue may start
    const u32 s = blockIdx.x, h = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 ctx = ctx_lens[s];
    const u32 nparts = (u32)(((u64)ctx + part_tokens - 1) / part_tokens);
    const u64 head = (u64)s * heads + h;
    float* o = out + head * HD;
    if (nparts == 0) {
        if (GUARD && tid == 0 && h == 0) atomicOr(&flags[s], BH_FLAG_INVALID_BLOCK);
        for (int d = tid; d < HD; d += blockDim.x) o[d] = 0.0f;
        return;
    }
    const float* ml = part_ml + head * max_parts * 2;
    if (warp == 0) {
        float m = BH_NEG_INF;
        int denied = 0;
        for (u32 p = lane; p < nparts; p += 32) {
            m = fmaxf(m, ml[p * 2]);
            denied |= ml[p * 2 + 1] < 0.0f;
        }
        m = bh_warp_max(m);
        denied = __any_sync(0xffffffffu, denied);
        float l = 0.0f;
        for (u32 p = lane; p < nparts; p += 32) {
            const float w = expf(ml[p * 2] - m);
            bh_smem[p] = w;
            l = fmaf(w, ml[p * 2 + 1], l);
        }
        l = bh_warp_sum(l);
        if (lane == 0) {
            stat_s[0] = m;
            stat_s[1] = l;
            denied_s = denied;
        }
    }
    __syncthreads();
    if (denied_s) {
        for (int d = tid; d < HD; d += blockDim.x) o[d] = 0.0f;
        return;
    }
    const float inv = 1.0f / stat_s[1];
    const float* acc = part_acc + head * max_parts * HD;
    for (int d = tid; d < HD; d += blockDim.x) {
        float sum = 0.0f;
        for (u32 p = 0; p < nparts; p++) sum = fmaf(bh_smem[p], acc[(u64)p * HD + d], sum);
        o[d] = sum * inv;
    }
}

#define BH_DECODE_PART(HD, G, GUARD, NAME)                                                        \
    extern "C" __global__ void __launch_bounds__(BH_DEC_THREADS, BH_DEC_MIN_CTAS) NAME(                          \
        const float* __restrict__ kv, const u32* __restrict__ owners, u32 num_blocks, u32 layer,  \
        u32 layers, u32 kv_heads, const u32* __restrict__ tags, const u32* __restrict__ ctx_lens, \
        const u32* __restrict__ block_tables, u32 max_blocks, const float* __restrict__ q,        \
        u32 heads, float scale, u32 part_tokens, u32 direct, float* __restrict__ out,             \
        float* __restrict__ part_acc, float* __restrict__ part_ml, u32 max_parts,                 \
        u32* __restrict__ flags) {                                                                 \
        bh_decode_part<HD, G, GUARD>(kv, owners, num_blocks, layer, layers, kv_heads, tags,       \
                                     ctx_lens, block_tables, max_blocks, q, heads, scale,         \
                                     part_tokens, direct, out, part_acc, part_ml, max_parts,      \
                                     flags);                                                       \
    }

// Which (head_dim, group) instantiations this compile builds: all of them by
// default (the CI check); the host compiles each shape it meets on its own,
// so that starting a backend does not assemble kernels it will never launch.
#ifndef BH_WANT
#define BH_WANT(HD, G) 1
#endif
#ifndef BH_WANT_HD
#define BH_WANT_HD(HD) 1
#endif

#if BH_WANT(32, 1)
BH_DECODE_PART(32, 1, true, bh_decode_part_h32_g1_guard)
BH_DECODE_PART(32, 1, false, bh_decode_part_h32_g1_noguard)
#endif
#if BH_WANT(32, 2)
BH_DECODE_PART(32, 2, true, bh_decode_part_h32_g2_guard)
BH_DECODE_PART(32, 2, false, bh_decode_part_h32_g2_noguard)
#endif
#if BH_WANT(32, 4)
BH_DECODE_PART(32, 4, true, bh_decode_part_h32_g4_guard)
BH_DECODE_PART(32, 4, false, bh_decode_part_h32_g4_noguard)
#endif
#if BH_WANT(32, 8)
BH_DECODE_PART(32, 8, true, bh_decode_part_h32_g8_guard)
BH_DECODE_PART(32, 8, false, bh_decode_part_h32_g8_noguard)
#endif
#if BH_WANT(64, 1)
BH_DECODE_PART(64, 1, true, bh_decode_part_h64_g1_guard)
BH_DECODE_PART(64, 1, false, bh_decode_part_h64_g1_noguard)
#endif
#if BH_WANT(64, 2)
BH_DECODE_PART(64, 2, true, bh_decode_part_h64_g2_guard)
BH_DECODE_PART(64, 2, false, bh_decode_part_h64_g2_noguard)
#endif
#if BH_WANT(64, 4)
BH_DECODE_PART(64, 4, true, bh_decode_part_h64_g4_guard)
BH_DECODE_PART(64, 4, false, bh_decode_part_h64_g4_noguard)
#endif
#if BH_WANT(64, 8)
BH_DECODE_PART(64, 8, true, bh_decode_part_h64_g8_guard)
BH_DECODE_PART(64, 8, false, bh_decode_part_h64_g8_noguard)
#endif
#if BH_WANT(128, 1)
BH_DECODE_PART(128, 1, true, bh_decode_part_h128_g1_guard)
BH_DECODE_PART(128, 1, false, bh_decode_part_h128_g1_noguard)
#endif
#if BH_WANT(128, 2)
BH_DECODE_PART(128, 2, true, bh_decode_part_h128_g2_guard)
BH_DECODE_PART(128, 2, false, bh_decode_part_h128_g2_noguard)
#endif
#if BH_WANT(128, 4)
BH_DECODE_PART(128, 4, true, bh_decode_part_h128_g4_guard)
BH_DECODE_PART(128, 4, false, bh_decode_part_h128_g4_noguard)
#endif
#if BH_WANT(128, 8)
BH_DECODE_PART(128, 8, true, bh_decode_part_h128_g8_guard)
BH_DECODE_PART(128, 8, false, bh_decode_part_h128_g8_noguard)
#endif

#define BH_DECODE_REDUCE(HD, GUARD, NAME)                                                         \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                        \
        const u32* __restrict__ ctx_lens, u32 part_tokens, const float* __restrict__ part_acc,    \
        const float* __restrict__ part_ml, u32 max_parts, u32 heads, float* __restrict__ out,     \
        u32* __restrict__ flags) {                                                                 \
        bh_decode_reduce<HD, GUARD>(ctx_lens, part_tokens, part_acc, part_ml, max_parts, heads,   \
                                    out, flags);                                                   \
    }

#if BH_WANT_HD(32)
BH_DECODE_REDUCE(32, true, bh_decode_reduce_h32_guard)
BH_DECODE_REDUCE(32, false, bh_decode_reduce_h32_noguard)
#endif
#if BH_WANT_HD(64)
BH_DECODE_REDUCE(64, true, bh_decode_reduce_h64_guard)
BH_DECODE_REDUCE(64, false, bh_decode_reduce_h64_noguard)
#endif
#if BH_WANT_HD(128)
BH_DECODE_REDUCE(128, true, bh_decode_reduce_h128_guard)
BH_DECODE_REDUCE(128, false, bh_decode_reduce_h128_noguard)
#endif

#ifndef BH_NO_GENERIC  // defined by the host when it compiles one decode shape alone

// ---------------------------------------------------------------------------
// Generic path: the per-sequence verdict, then one warp per (token, head).

// One CTA per sequence. verdict[s] = the index of the first token of s that
// must not be computed: 0 when check_sequence fails (every token of s gets
// zeros), the first token (in batch order) whose position is past the
// context otherwise (it and later tokens of s get zeros, as in the CPU
// reference), or 0xffffffff when all of s is computed. Reads only tables and
// owner tags, never the KV cache.
extern "C" __global__ void __launch_bounds__(256)
    bh_attn_check(const u32* __restrict__ owners, u32 num_blocks, u32 block_tokens,
                  const u32* __restrict__ tags, const u32* __restrict__ ctx_lens,
                  const u32* __restrict__ block_tables, u32 max_blocks,
                  const u32* __restrict__ tok_seq, const u32* __restrict__ tok_pos, u32 n_tokens,
                  u32* __restrict__ flags, u32* __restrict__ verdict) {
    __shared__ u32 bits_s, first_s;
    const u32 s = blockIdx.x;
    if (threadIdx.x == 0) {
        bits_s = 0;
        first_s = 0xffffffffu;
    }
    __syncthreads();
    const u32 ctx = ctx_lens[s];
    const u64 need = ((u64)ctx + block_tokens - 1) / block_tokens;
    if (need > max_blocks) {
        if (threadIdx.x == 0) bits_s = BH_FLAG_INVALID_BLOCK;
    } else {
        const u32 tag = tags[s];
        u32 local = 0;
        for (u32 i = threadIdx.x; i < need; i += blockDim.x) {
            const u32 b = block_tables[(u64)s * max_blocks + i];
            if (b >= num_blocks) {
                local |= BH_FLAG_INVALID_BLOCK;
            } else if (owners[b] != tag) {
                local |= BH_FLAG_CROSS_TENANT_READ;
            }
        }
        if (local) atomicOr(&bits_s, local);
    }
    __syncthreads();
    const u32 bits = bits_s;
    if (bits == 0) {
        for (u32 t = threadIdx.x; t < n_tokens; t += blockDim.x) {
            if (tok_seq[t] == s && tok_pos[t] >= ctx) atomicMin(&first_s, t);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 f = bits;
        if (bits != 0) {
            verdict[s] = 0;
        } else {
            verdict[s] = first_s;
            if (first_s != 0xffffffffu) f |= BH_FLAG_INVALID_BLOCK;
        }
        if (f) atomicOr(&flags[s], f);
    }
}

// 4 warps per CTA, one (token, query head) per warp; head_dim <= 32 * EPL.
template <int EPL, bool GUARD>
__device__ __forceinline__ void bh_attn_generic(
    const float* __restrict__ kv, u32 layer, u32 layers, u32 kv_heads, u32 head_dim,
    u32 block_tokens, const u32* __restrict__ block_tables, u32 max_blocks,
    const u32* __restrict__ tok_seq, const u32* __restrict__ tok_pos, u32 n_tokens,
    const u32* __restrict__ verdict, const float* __restrict__ q, u32 heads, float scale,
    float* __restrict__ out) {
    __shared__ float qs[4][32 * EPL];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u64 item = (u64)blockIdx.x * 4 + warp;
    if (item >= (u64)n_tokens * heads) return;  // warp-uniform; only warp-level sync below
    const u32 t = (u32)(item / heads), h = (u32)(item % heads);
    const u32 s = tok_seq[t];
    const u32 pos = tok_pos[t];
    float* o = out + item * head_dim;
    if (GUARD && t >= verdict[s]) {
        for (u32 d = lane; d < head_dim; d += 32) o[d] = 0.0f;
        return;
    }
    const u32 kvh = h / (heads / kv_heads);
    const float* qrow = q + item * head_dim;
    for (u32 d = lane; d < head_dim; d += 32) qs[warp][d] = qrow[d];
    __syncwarp();
    const u32* table = block_tables + (u64)s * max_blocks;
    const u32 ctx = pos + 1;
    float m = BH_NEG_INF, l = 0.0f;
    float acc[EPL];
#pragma unroll
    for (int e = 0; e < EPL; e++) acc[e] = 0.0f;
    for (u32 c = 0; c < ctx; c += 32) {
        const u32 j = c + lane;
        float sc = BH_NEG_INF;
        if (j < ctx) {
            const u32 b = table[j / block_tokens];
            const float* kp = kv + bh_kv_offset(b, layer, 0, kvh, j % block_tokens, layers,
                                                kv_heads, block_tokens, head_dim);
            float dot = 0.0f;
            for (u32 d = 0; d < head_dim; d++) dot = fmaf(qs[warp][d], kp[d], dot);
            sc = dot * scale;
        }
        const float mn = fmaxf(m, bh_warp_max(sc));
        const float corr = expf(m - mn);
        const float pj = j < ctx ? expf(sc - mn) : 0.0f;
        l = fmaf(l, corr, bh_warp_sum(pj));
#pragma unroll
        for (int e = 0; e < EPL; e++) acc[e] *= corr;
        m = mn;
        const u32 cnt = min(32u, ctx - c);
        for (u32 jj = 0; jj < cnt; jj++) {
            const float w = __shfl_sync(0xffffffffu, pj, jj);
            const u32 jv = c + jj;
            const u32 b = table[jv / block_tokens];
            const float* vp = kv + bh_kv_offset(b, layer, 1, kvh, jv % block_tokens, layers,
                                                kv_heads, block_tokens, head_dim);
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                const u32 d = lane + 32 * e;
                if (d < head_dim) acc[e] = fmaf(w, vp[d], acc[e]);
            }
        }
    }
    const float inv = 1.0f / l;
#pragma unroll
    for (int e = 0; e < EPL; e++) {
        const u32 d = lane + 32 * e;
        if (d < head_dim) o[d] = acc[e] * inv;
    }
}

#define BH_ATTN_GENERIC(EPL, GUARD, NAME)                                                         \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                        \
        const float* __restrict__ kv, u32 layer, u32 layers, u32 kv_heads, u32 head_dim,          \
        u32 block_tokens, const u32* __restrict__ block_tables, u32 max_blocks,                    \
        const u32* __restrict__ tok_seq, const u32* __restrict__ tok_pos, u32 n_tokens,            \
        const u32* __restrict__ verdict, const float* __restrict__ q, u32 heads, float scale,      \
        float* __restrict__ out) {                                                                 \
        bh_attn_generic<EPL, GUARD>(kv, layer, layers, kv_heads, head_dim, block_tokens,          \
                                    block_tables, max_blocks, tok_seq, tok_pos, n_tokens,          \
                                    verdict, q, heads, scale, out);                                \
    }

BH_ATTN_GENERIC(1, true, bh_attn_generic_e1_guard)
BH_ATTN_GENERIC(1, false, bh_attn_generic_e1_noguard)
BH_ATTN_GENERIC(2, true, bh_attn_generic_e2_guard)
BH_ATTN_GENERIC(2, false, bh_attn_generic_e2_noguard)
BH_ATTN_GENERIC(4, true, bh_attn_generic_e4_guard)
BH_ATTN_GENERIC(4, false, bh_attn_generic_e4_noguard)
BH_ATTN_GENERIC(8, true, bh_attn_generic_e8_guard)
BH_ATTN_GENERIC(8, false, bh_attn_generic_e8_noguard)

#endif  // BH_NO_GENERIC
