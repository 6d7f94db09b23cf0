/*
 * feather-export: CUDA kernels for one BTP stage (the SelectBalanced op). See btp_select_kernel.h
 * for the exact semantics.
 *
 * Five launches, no host synchronisation:
 *   1. rank by logit (exact rank counting with the SelectTokens keys: deterministic, no sort);
 *   2. the attention set A from the ranks (front priority for indices < budget);
 *   3. unit feature rows (one thread per row sums its squares in index order, then divides);
 *   4. D = 1 - unit . unit^T (16 x 16 shared-memory tiles, products added in index order without
 *      fused multiply-add, so a plain CPU loop reproduces it bit for bit);
 *   5. one block runs the whole greedy fill (budget - attention_count steps, two block-wide
 *      argmax reductions per step on 64-bit keys, ties to the lower index) and writes kept.
 * N is at most a few thousand image tokens; D is N x N floats in the workspace.
 */
#include "btp_select_kernel.h"
#include "score_keys.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <math.h>
#include <stdint.h>

namespace
{

using feather::keyIndex;
using feather::scoreKey;
using feather::tokenKey;

constexpr int kBlock = 256;
constexpr int kTile = 16;
constexpr int kFillBlock = 1024;
constexpr float kCosineEps = 1e-12f;

// rank[i] = #{ j : key(j) > key(i) } over the logits.
__global__ void __launch_bounds__(kBlock) rankKernel(float const* __restrict__ logits, int32_t n, int32_t* __restrict__ rank)
{
    __shared__ uint64_t tile[kBlock];
    int32_t const i = blockIdx.x * kBlock + threadIdx.x;
    uint64_t const mine = i < n ? tokenKey(logits[i], i) : 0ull;
    int32_t r = 0;
    for (int32_t base = 0; base < n; base += kBlock)
    {
        int32_t const j = base + threadIdx.x;
        tile[threadIdx.x] = j < n ? tokenKey(logits[j], j) : 0ull;
        __syncthreads();
        int32_t const limit = min(kBlock, n - base);
        for (int32_t t = 0; t < limit; ++t)
        {
            r += tile[t] > mine ? 1 : 0;
        }
        __syncthreads();
    }
    if (i < n)
    {
        rank[i] = r;
    }
}

// chosen[i] = 1 for the members of A: pool = rank < pool; order key = (i >= budget) * pool + rank.
__global__ void __launch_bounds__(kBlock) attentionSetKernel(int32_t const* __restrict__ rank, int32_t n,
    int32_t budget, int32_t attention, int32_t pool, int32_t* __restrict__ chosen)
{
    int32_t const i = blockIdx.x * kBlock + threadIdx.x;
    if (i >= n)
    {
        return;
    }
    int32_t const ri = rank[i];
    int32_t inA = 0;
    if (ri < pool && attention > 0)
    {
        int64_t const mine = (i >= budget ? pool : 0) + static_cast<int64_t>(ri);
        int32_t before = 0;
        for (int32_t j = 0; j < n; ++j)
        {
            int32_t const rj = rank[j];
            if (rj < pool && (j >= budget ? pool : 0) + static_cast<int64_t>(rj) < mine)
            {
                ++before;
            }
        }
        inA = before < attention ? 1 : 0;
    }
    chosen[i] = inA;
}

// norm[i] = max(sqrt(sum_k x[i,k]^2), eps), summed in k order.
__global__ void __launch_bounds__(kBlock) rowNormKernel(float const* __restrict__ x, int32_t n, int32_t dim, float* __restrict__ norm)
{
    int32_t const i = blockIdx.x * kBlock + threadIdx.x;
    if (i >= n)
    {
        return;
    }
    float const* row = x + static_cast<int64_t>(i) * dim;
    float s = 0.0f;
    for (int32_t k = 0; k < dim; ++k)
    {
        s = __fadd_rn(s, __fmul_rn(row[k], row[k]));
    }
    norm[i] = fmaxf(sqrtf(s), kCosineEps);
}

__global__ void __launch_bounds__(kBlock) unitKernel(float const* __restrict__ x, float const* __restrict__ norm,
    int64_t total, int32_t dim, float* __restrict__ unit)
{
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; e < total;
         e += static_cast<int64_t>(gridDim.x) * kBlock)
    {
        unit[e] = __fdiv_rn(x[e], norm[e / dim]);
    }
}

// dist[i, j] = 1 - sum_k unit[i, k] * unit[j, k], k in order, no FMA.
__global__ void distanceKernel(float const* __restrict__ unit, int32_t n, int32_t dim, float* __restrict__ dist)
{
    __shared__ float a[kTile][kTile + 1];
    __shared__ float b[kTile][kTile + 1];
    int32_t const i = blockIdx.y * kTile + threadIdx.y;
    int32_t const j = blockIdx.x * kTile + threadIdx.x;
    float acc = 0.0f;
    for (int32_t base = 0; base < dim; base += kTile)
    {
        int32_t const k = base + threadIdx.x;
        int32_t const ib = blockIdx.y * kTile + threadIdx.y;
        int32_t const jb = blockIdx.x * kTile + threadIdx.y;
        a[threadIdx.y][threadIdx.x] = (ib < n && k < dim) ? unit[static_cast<int64_t>(ib) * dim + k] : 0.0f;
        b[threadIdx.y][threadIdx.x] = (jb < n && k < dim) ? unit[static_cast<int64_t>(jb) * dim + k] : 0.0f;
        __syncthreads();
        int32_t const limit = min(kTile, dim - base);
        for (int32_t t = 0; t < limit; ++t)
        {
            acc = __fadd_rn(acc, __fmul_rn(a[threadIdx.y][t], b[threadIdx.x][t]));
        }
        __syncthreads();
    }
    if (i < n && j < n)
    {
        dist[static_cast<int64_t>(i) * n + j] = __fsub_rn(1.0f, acc);
    }
}

__device__ uint64_t blockMax(uint64_t v, uint64_t* scratch)
{
    for (int32_t o = 16; o > 0; o >>= 1)
    {
        uint64_t const other = __shfl_down_sync(0xFFFFFFFFu, v, o);
        v = other > v ? other : v;
    }
    int32_t const lane = threadIdx.x & 31;
    int32_t const warp = threadIdx.x >> 5;
    if (lane == 0)
    {
        scratch[warp] = v;
    }
    __syncthreads();
    if (warp == 0)
    {
        v = lane < static_cast<int32_t>(blockDim.x >> 5) ? scratch[lane] : 0ull;
        for (int32_t o = 16; o > 0; o >>= 1)
        {
            uint64_t const other = __shfl_down_sync(0xFFFFFFFFu, v, o);
            v = other > v ? other : v;
        }
        if (lane == 0)
        {
            scratch[0] = v;
        }
    }
    __syncthreads();
    uint64_t const result = scratch[0];
    __syncthreads();
    return result;
}

// One block: nearest from A, then `steps` fill steps, then kept (ascending).
__global__ void __launch_bounds__(kFillBlock) fillKernel(float const* __restrict__ dist,
    float const* __restrict__ seedPriority, int32_t n, int32_t steps, int32_t* __restrict__ chosen,
    float* __restrict__ nearest, int64_t* __restrict__ kept, int32_t budget)
{
    __shared__ uint64_t scratch[kFillBlock / 32];
    for (int32_t j = threadIdx.x; j < n; j += blockDim.x)
    {
        float m = INFINITY;
        for (int32_t i = 0; i < n; ++i)
        {
            if (chosen[i])
            {
                m = fminf(m, dist[static_cast<int64_t>(i) * n + j]);
            }
        }
        nearest[j] = m;
    }
    __syncthreads();
    for (int32_t step = 0; step < steps; ++step)
    {
        uint64_t seedBest = 0ull;
        uint64_t farBest = 0ull;
        for (int32_t j = threadIdx.x; j < n; j += blockDim.x)
        {
            if (chosen[j])
            {
                continue;
            }
            float const p = seedPriority[j];
            if (p > 0.0f)
            {
                uint64_t const k = tokenKey(p, j);
                seedBest = k > seedBest ? k : seedBest;
            }
            uint64_t const k = tokenKey(nearest[j], j);
            farBest = k > farBest ? k : farBest;
        }
        seedBest = blockMax(seedBest, scratch);
        farBest = blockMax(farBest, scratch);
        int32_t const t = keyIndex(seedBest != 0ull ? seedBest : farBest);
        for (int32_t j = threadIdx.x; j < n; j += blockDim.x)
        {
            nearest[j] = fminf(nearest[j], dist[static_cast<int64_t>(t) * n + j]);
        }
        if (threadIdx.x == 0)
        {
            chosen[t] = 1;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0)
    {
        int32_t pos = 0;
        for (int32_t i = 0; i < n && pos < budget; ++i)
        {
            if (chosen[i])
            {
                kept[pos++] = i;
            }
        }
    }
}

size_t alignUp(size_t x)
{
    return (x + 255) / 256 * 256;
}

} // namespace

extern "C" {

size_t feather_btp_workspace_bytes(int32_t n, int32_t dim)
{
    if (n <= 0 || dim <= 0)
    {
        return 0;
    }
    size_t const nn = static_cast<size_t>(n);
    return 2 * alignUp(nn * sizeof(int32_t))                              // rank, chosen
        + 2 * alignUp(nn * sizeof(float))                                  // norm, nearest
        + alignUp(nn * static_cast<size_t>(dim) * sizeof(float))           // unit rows
        + alignUp(nn * nn * sizeof(float));                                // D
}

int feather_btp_select(const float* logits, const float* features, const float* seed_priority, int32_t n,
    int32_t dim, int32_t budget, int32_t attention_count, int32_t candidate_count, int64_t* kept_out,
    void* workspace, size_t workspace_bytes, cudaStream_t stream)
{
    if (logits == nullptr || features == nullptr || seed_priority == nullptr || kept_out == nullptr || n <= 0
        || dim <= 0 || budget < 1 || budget > n || attention_count < 0 || attention_count > budget
        || candidate_count < attention_count || candidate_count > n)
    {
        return FEATHER_SELECT_ERR_INVALID_ARGUMENT;
    }
    if (workspace == nullptr || workspace_bytes < feather_btp_workspace_bytes(n, dim))
    {
        return FEATHER_SELECT_ERR_WORKSPACE;
    }
    size_t const nn = static_cast<size_t>(n);
    char* w = static_cast<char*>(workspace);
    int32_t* rank = reinterpret_cast<int32_t*>(w);
    w += alignUp(nn * sizeof(int32_t));
    int32_t* chosen = reinterpret_cast<int32_t*>(w);
    w += alignUp(nn * sizeof(int32_t));
    float* norm = reinterpret_cast<float*>(w);
    w += alignUp(nn * sizeof(float));
    float* nearest = reinterpret_cast<float*>(w);
    w += alignUp(nn * sizeof(float));
    float* unit = reinterpret_cast<float*>(w);
    w += alignUp(nn * static_cast<size_t>(dim) * sizeof(float));
    float* dist = reinterpret_cast<float*>(w);

    unsigned const blocks = static_cast<unsigned>((n + kBlock - 1) / kBlock);
    int64_t const total = static_cast<int64_t>(n) * dim;
    unsigned const unitBlocks = static_cast<unsigned>(std::min<int64_t>((total + kBlock - 1) / kBlock, 65535));
    dim3 const tiles(static_cast<unsigned>((n + kTile - 1) / kTile), static_cast<unsigned>((n + kTile - 1) / kTile));

    // A stale error another library left in this thread's last-error slot must not fail our launches
    // (see select_tokens_kernel.cu): clear it first; a successful launch leaves the slot alone, so the
    // one read after the last launch reports an error of any of these launches.
    static_cast<void>(cudaGetLastError());
    rankKernel<<<blocks, kBlock, 0, stream>>>(logits, n, rank);
    attentionSetKernel<<<blocks, kBlock, 0, stream>>>(rank, n, budget, attention_count, candidate_count, chosen);
    rowNormKernel<<<blocks, kBlock, 0, stream>>>(features, n, dim, norm);
    unitKernel<<<unitBlocks, kBlock, 0, stream>>>(features, norm, total, dim, unit);
    distanceKernel<<<tiles, dim3(kTile, kTile), 0, stream>>>(unit, n, dim, dist);
    fillKernel<<<1, kFillBlock, 0, stream>>>(dist, seed_priority, n, budget - attention_count, chosen, nearest,
        kept_out, budget);
    return cudaGetLastError() == cudaSuccess ? FEATHER_SELECT_OK : FEATHER_SELECT_ERR_CUDA;
}

} // extern "C"
