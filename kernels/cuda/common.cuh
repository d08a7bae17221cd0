// Shared definitions for every kernel file. The host prepends this text to
// each .cu source before handing it to NVRTC (NVRTC has no system headers, so
// nothing here includes any): the .cu files do not include it themselves.
//
// Conventions shared with the Rust side (kernels/src/layout.rs):
// - the KV cache is block-major, kv[block][layer][K=0/V=1][kv_head][slot][head_dim] f32;
// - owners[block] is the owning tenant's tag, 0 (FREE_TAG) for a free block;
// - flags[seq] collects Violation bits with atomicOr.

typedef unsigned int u32;
typedef unsigned long long u64;

#define BH_FLAG_CROSS_TENANT_READ 1u
#define BH_FLAG_CROSS_TENANT_WRITE 2u
#define BH_FLAG_INVALID_BLOCK 4u

// -infinity without <math.h>.
#define BH_NEG_INF __int_as_float(0xff800000)

// Element offset of kv[block][layer][which][kv_head][slot][0], in 64 bits:
// caches larger than 2^32 floats are real (16 GiB at long contexts).
__device__ __forceinline__ u64 bh_kv_offset(u32 block, u32 layer, u32 which, u32 kv_head, u32 slot,
                                            u32 layers, u32 kv_heads, u32 block_tokens,
                                            u32 head_dim) {
    return (((((u64)block * layers + layer) * 2u + which) * kv_heads + kv_head) * block_tokens +
            slot) *
           head_dim;
}

// Programmatic dependent launch (sm_90+): a kernel launched with it may start
// while the kernel before it in the stream is still running. bh_pdl_wait()
// blocks until that kernel has completed and its writes are visible; before
// it, a kernel may only read what was written before that kernel started
// (host copies: block tables, owner tags, context lengths). bh_pdl_trigger()
// lets the next kernel's CTAs be scheduled early; it changes nothing about
// what they may read before their own wait. Both are no-ops on older GPUs and
// in a kernel launched the ordinary way.
__device__ __forceinline__ void bh_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void bh_pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float bh_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float bh_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a whole block of blockDim.x threads (a multiple of 32, at most 1024),
// in a fixed order: deterministic. Every thread gets the result. `scratch`
// holds 32 floats; the call begins and ends with a barrier so it can be reused.
__device__ __forceinline__ float bh_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = bh_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    t = bh_warp_sum(t);
    __syncthreads();
    return t;
}
