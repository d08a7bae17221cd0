// The dense layers of the Llama-architecture decoder, twins of
// kernels/src/cpu/ops.rs (rms_norm, matmul, rope, swiglu) and of the glue in
// kernels/src/cpu.rs::forward (embedding gather, Q/K/V split, residual add).
// common.cuh is prepended by the host.
//
// Every reduction runs in a fixed order, so a kernel gives the same bits on
// every run. Where the CPU reference rounds twice (a * b - c * d), the kernels
// use the _rn intrinsics so that the compiler cannot fuse them into one FMA.

// out[t] = table[tokens[t]] (zeros for a token outside the vocabulary: the
// host rejects those before launching, this only keeps reads in bounds).
extern "C" __global__ void __launch_bounds__(256)
    bh_embed(const u32* __restrict__ tokens, const float* __restrict__ table, u32 vocab, u32 hidden,
             float* __restrict__ out, u32 n) {
    const u32 t = blockIdx.x;
    if (t >= n) return;
    const u32 tok = tokens[t];
    float* o = out + (u64)t * hidden;
    for (u32 i = threadIdx.x; i < hidden; i += blockDim.x) {
        o[i] = tok < vocab ? table[(u64)tok * hidden + i] : 0.0f;
    }
}

// out[r] = rms_norm(x[src_row(r)]) * w, with src_row(r) = rows_idx ? rows_idx[r] : r.
// One CTA per output row.
extern "C" __global__ void __launch_bounds__(256)
    bh_rms_norm(const float* __restrict__ x, const u32* __restrict__ rows_idx,
                const float* __restrict__ w, float eps, float* __restrict__ out, u32 rows, u32 d) {
    __shared__ float scratch[32];
    const u32 r = blockIdx.x;
    if (r >= rows) return;
    const u32 src = rows_idx != nullptr ? rows_idx[r] : r;
    const float* xr = x + (u64)src * d;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < d; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = bh_block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)d + eps);
    float* o = out + (u64)r * d;
    for (u32 i = threadIdx.x; i < d; i += blockDim.x) o[i] = __fmul_rn(__fmul_rn(xr[i], inv), w[i]);
}

// out = x · wᵀ: x [n, k], w [m, k] (row-major, a row per output feature), out [n, m].
// 64x64 output tiles, 16-deep k steps through shared memory, 4x4 outputs per thread.
#define BH_MM_TILE 64
#define BH_MM_K 16
extern "C" __global__ void __launch_bounds__(256)
    bh_matmul_nt(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
                 u32 n, u32 k, u32 m) {
    __shared__ float as[BH_MM_K][BH_MM_TILE + 4];
    __shared__ float bs[BH_MM_K][BH_MM_TILE + 4];
    const u32 tid = threadIdx.x;
    const u32 tx = tid % 16, ty = tid / 16;
    const u32 row0 = blockIdx.y * BH_MM_TILE, col0 = blockIdx.x * BH_MM_TILE;
    const u32 lr = tid / 4, lk = (tid % 4) * 4;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    const bool x_row = row0 + lr < n, w_row = col0 + lr < m;
    const float* xr = x + (u64)(row0 + lr) * k;
    const float* wr = w + (u64)(col0 + lr) * k;
    for (u32 k0 = 0; k0 < k; k0 += BH_MM_K) {
#pragma unroll
        for (u32 e = 0; e < 4; e++) {
            const u32 kk = lk + e, gk = k0 + kk;
            as[kk][lr] = (x_row && gk < k) ? xr[gk] : 0.0f;
            bs[kk][lr] = (w_row && gk < k) ? wr[gk] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (u32 kk = 0; kk < BH_MM_K; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = as[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const u32 row = row0 + ty + 16 * i;
        if (row >= n) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 col = col0 + tx + 16 * j;
            if (col < m) out[(u64)row * m + col] = acc[i][j];
        }
    }
}

// Rotary embedding in place, Llama's rotate-half pairing (element i with
// i + head_dim/2), freq_i = theta^(-2i/head_dim). x [n, heads, head_dim].
// One CTA per (token, head). The frequency and the sine/cosine are computed in
// double and rounded once, so they are the correctly rounded floats the CPU's
// libm gives (up to rare double-rounding ties).
extern "C" __global__ void __launch_bounds__(128)
    bh_rope(float* __restrict__ x, const u32* __restrict__ positions, u32 n, u32 heads, u32 head_dim,
            float theta) {
    const u32 row = blockIdx.x;
    if (row >= n * heads) return;
    const u32 t = row / heads;
    const float pos = (float)positions[t];
    const u32 half = head_dim / 2;
    float* h = x + (u64)row * head_dim;
    for (u32 i = threadIdx.x; i < half; i += blockDim.x) {
        const float e = __fdiv_rn(__fmul_rn(-2.0f, (float)i), (float)head_dim);
        const float freq = (float)pow((double)theta, (double)e);
        const float angle = __fmul_rn(pos, freq);
        double sd, cd;
        sincos((double)angle, &sd, &cd);
        const float s = (float)sd, c = (float)cd;
        const float a = h[i], b = h[i + half];
        h[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        h[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}

// out = silu(gate) * up: gate_up [n, 2 * ffn] (gate then up), out [n, ffn].
extern "C" __global__ void __launch_bounds__(256)
    bh_swiglu(const float* __restrict__ gate_up, u32 n, u32 ffn, float* __restrict__ out) {
    const u64 total = (u64)n * ffn;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const u64 t = i / ffn, j = i % ffn;
        const float g = gate_up[t * 2 * ffn + j];
        const float u = gate_up[t * 2 * ffn + ffn + j];
        const float e = (float)exp(-(double)g);
        out[i] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, e)), u);
    }
}

// x += y, element-wise over len floats.
extern "C" __global__ void __launch_bounds__(256)
    bh_add_assign(float* __restrict__ x, const float* __restrict__ y, u64 len) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (u64)gridDim.x * blockDim.x) {
        x[i] = __fadd_rn(x[i], y[i]);
    }
}

// Splits the fused projection qkv [n, q_w + 2 kv_w] into q [n, q_w], k and v [n, kv_w].
extern "C" __global__ void __launch_bounds__(256)
    bh_split_qkv(const float* __restrict__ qkv, u32 n, u32 q_w, u32 kv_w, float* __restrict__ q,
                 float* __restrict__ k, float* __restrict__ v) {
    const u32 t = blockIdx.x;
    if (t >= n) return;
    const u32 width = q_w + 2 * kv_w;
    const float* row = qkv + (u64)t * width;
    for (u32 i = threadIdx.x; i < width; i += blockDim.x) {
        const float val = row[i];
        if (i < q_w) {
            q[(u64)t * q_w + i] = val;
        } else if (i < q_w + kv_w) {
            k[(u64)t * kv_w + (i - q_w)] = val;
        } else {
            v[(u64)t * kv_w + (i - q_w - kv_w)] = val;
        }
    }
}
