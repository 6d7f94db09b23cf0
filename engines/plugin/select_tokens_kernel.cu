/*
 * feather-export: CUDA kernels for the SelectTokens op. See select_tokens_kernel.h for the
 * exact selection and gather semantics.
 *
 * Selection is done by exact rank counting, which is deterministic and needs no sort:
 *   key(i)  = (monotone uint32 image of score i) << 32 | (0xFFFFFFFF - i)
 *   rank(i) = #{ j non-grid : key(j) > key(i) }            (i non-grid)
 * Keys are distinct, so ranks of the non-grid tokens are a permutation of 0..N-|G|-1 and
 * exactly R = B - |G| of them satisfy rank < R. A second single-block kernel compacts the
 * keep flags into ascending indices with a block-wide prefix sum. N is at most a few
 * thousand image tokens, so the O(N^2) rank count costs microseconds.
 */
#include "select_tokens_kernel.h"
#include "score_keys.cuh"

#include <cuda_runtime.h>
#include <stdint.h>

namespace
{

constexpr int kRankBlock = 256;
constexpr int kCompactBlock = 1024;
constexpr int kGatherThreads = 256;

// Token i is raster token i - rasterOffset; the tokens before the raster are never forced.
__host__ __device__ __forceinline__ bool isForcedGrid(int32_t i, int32_t gridSide, int32_t gridStride,
    int32_t rasterOffset)
{
    int32_t const p = i - rasterOffset;
    if (gridStride <= 0 || gridSide <= 0 || p < 0)
    {
        return false;
    }
    int32_t const r = p / gridSide;
    int32_t const c = p - r * gridSide;
    return (r % gridStride == 0) && (c % gridStride == 0);
}

using feather::tokenKey;

// flags[i] = 1 if token i is kept (forced grid, or rank among non-grid < quota), else 0.
__global__ void __launch_bounds__(kRankBlock) rankSelectKernel(
    float const* __restrict__ scores, int32_t n, int32_t quota, int32_t gridSide, int32_t gridStride,
    int32_t rasterOffset, int32_t* __restrict__ flags)
{
    __shared__ uint64_t tile[kRankBlock];

    int32_t const i = blockIdx.x * kRankBlock + threadIdx.x;
    bool const valid = i < n;
    bool const grid = valid && isForcedGrid(i, gridSide, gridStride, rasterOffset);
    uint64_t const mine = valid ? tokenKey(scores[i], i) : 0ull;

    int32_t rank = 0;
    for (int32_t base = 0; base < n; base += kRankBlock)
    {
        int32_t const j = base + threadIdx.x;
        // Grid tokens and padding get key 0, which is never greater than a real key.
        tile[threadIdx.x]
            = (j < n && !isForcedGrid(j, gridSide, gridStride, rasterOffset)) ? tokenKey(scores[j], j) : 0ull;
        __syncthreads();
        if (valid && !grid)
        {
            int32_t const limit = min(kRankBlock, n - base);
#pragma unroll 8
            for (int32_t t = 0; t < limit; ++t)
            {
                rank += tile[t] > mine ? 1 : 0;
            }
        }
        __syncthreads();
    }
    if (valid)
    {
        flags[i] = (grid || rank < quota) ? 1 : 0;
    }
}

// Single block: kept[pos] = i for every flagged i, pos = number of flagged indices < i.
__global__ void __launch_bounds__(kCompactBlock) compactKernel(
    int32_t const* __restrict__ flags, int32_t n, int64_t* __restrict__ kept, int32_t budget)
{
    __shared__ int32_t warpTotals[kCompactBlock / 32];
    __shared__ int32_t chunkOffset;

    int32_t const tid = threadIdx.x;
    int32_t const lane = tid & 31;
    int32_t const warp = tid >> 5;
    int32_t const nbWarps = blockDim.x >> 5;
    if (tid == 0)
    {
        chunkOffset = 0;
    }
    __syncthreads();

    for (int32_t base = 0; base < n; base += blockDim.x)
    {
        int32_t const i = base + tid;
        int32_t const f = (i < n) ? flags[i] : 0;

        int32_t x = f; // inclusive scan inside the warp
#pragma unroll
        for (int32_t o = 1; o < 32; o <<= 1)
        {
            int32_t const y = __shfl_up_sync(0xFFFFFFFFu, x, o);
            if (lane >= o)
            {
                x += y;
            }
        }
        if (lane == 31)
        {
            warpTotals[warp] = x;
        }
        __syncthreads();
        if (warp == 0)
        {
            int32_t w = (lane < nbWarps) ? warpTotals[lane] : 0;
#pragma unroll
            for (int32_t o = 1; o < 32; o <<= 1)
            {
                int32_t const y = __shfl_up_sync(0xFFFFFFFFu, w, o);
                if (lane >= o)
                {
                    w += y;
                }
            }
            if (lane < nbWarps)
            {
                warpTotals[lane] = w; // inclusive prefix over warps
            }
        }
        __syncthreads();
        int32_t const exclusive = chunkOffset + (warp > 0 ? warpTotals[warp - 1] : 0) + (x - f);
        if (f && exclusive < budget)
        {
            kept[exclusive] = static_cast<int64_t>(i);
        }
        __syncthreads(); // everyone has read chunkOffset and warpTotals
        if (tid == static_cast<int32_t>(blockDim.x) - 1)
        {
            chunkOffset = exclusive + f;
        }
        __syncthreads();
    }
}

template <typename U>
__global__ void gatherRowsKernel(U const* __restrict__ src, U* __restrict__ dst, int64_t seqLen, int64_t outRows,
    int64_t unitsPerRow, int32_t n, int32_t budget, int64_t const* __restrict__ imageStart,
    int64_t const* __restrict__ kept)
{
    int64_t st = *imageStart;
    int64_t const maxStart = seqLen - n;
    st = st < 0 ? 0 : (st > maxStart ? maxStart : st);

    int64_t const rowStride = static_cast<int64_t>(gridDim.x) * blockDim.y;
    int64_t const colStride = static_cast<int64_t>(gridDim.y) * blockDim.x;
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < outRows; row += rowStride)
    {
        int64_t srcRow;
        if (row < st)
        {
            srcRow = row;
        }
        else if (row < st + budget)
        {
            int64_t k = kept[row - st];
            k = k < 0 ? 0 : (k >= n ? n - 1 : k); // defensive: kept is produced by compactKernel
            srcRow = st + k;
        }
        else
        {
            srcRow = row + n - budget;
        }
        U const* s = src + srcRow * unitsPerRow;
        U* d = dst + row * unitsPerRow;
        for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < unitsPerRow; c += colStride)
        {
            d[c] = s[c];
        }
    }
}

// Launch errors. A <<<>>> launch reports a failure only through the host thread's "last error"
// slot, which any earlier CUDA runtime call in this thread may have left set (another library's
// failed launch that it never checked). Reading the slot after our launch alone would fail our
// enqueue on that stale error, and cudaPeekAtLastError() would not help: a successful launch does
// not reset the slot, and peeking does not clear it. So the slot is cleared right before each
// launch (which discards only an error its owner already ignored) and read, and cleared, right
// after it: what it then holds is this launch's error. A sticky error (a corrupted context)
// cannot be cleared and is reported by the launch again, as it must be.
void clearStaleLaunchError()
{
    static_cast<void>(cudaGetLastError());
}

int launchStatus()
{
    return cudaGetLastError() == cudaSuccess ? FEATHER_SELECT_OK : FEATHER_SELECT_ERR_CUDA;
}

template <typename U>
int launchGather(void const* src, void* dst, int64_t seqLen, int64_t outRows, int64_t rowBytes, int32_t n,
    int32_t budget, int64_t const* imageStart, int64_t const* kept, cudaStream_t stream)
{
    int64_t const units = rowBytes / static_cast<int64_t>(sizeof(U));
    // blockDim.x: power of two covering min(units, 256); remaining threads stack rows in y.
    int32_t tx = 1;
    while (tx < kGatherThreads && tx < units)
    {
        tx <<= 1;
    }
    int32_t const ty = kGatherThreads / tx;
    int64_t gx = (outRows + ty - 1) / ty;
    int64_t gy = (units + tx - 1) / tx;
    gx = gx < 1 ? 1 : (gx > (1LL << 20) ? (1LL << 20) : gx);
    gy = gy < 1 ? 1 : (gy > 65535 ? 65535 : gy);
    dim3 const block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
    dim3 const grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    clearStaleLaunchError();
    gatherRowsKernel<U><<<grid, block, 0, stream>>>(static_cast<U const*>(src), static_cast<U*>(dst), seqLen,
        outRows, units, n, budget, imageStart, kept);
    return launchStatus();
}

size_t alignUp(size_t x, size_t a)
{
    return (x + a - 1) / a * a;
}

int64_t countMultiples(int64_t m, int64_t stride)
{
    // #{ k in [0, m) : k % stride == 0 }
    return m <= 0 ? 0 : (m + stride - 1) / stride;
}

} // namespace

extern "C" {

const char* feather_select_status_string(int status)
{
    switch (status)
    {
    case FEATHER_SELECT_OK: return "ok";
    case FEATHER_SELECT_ERR_INVALID_ARGUMENT: return "invalid argument";
    case FEATHER_SELECT_ERR_WORKSPACE: return "workspace missing or too small";
    case FEATHER_SELECT_ERR_CUDA: return "CUDA kernel launch failed";
    default: return "unknown status";
    }
}

int32_t feather_forced_grid_count(int32_t n, int32_t grid_side, int32_t grid_stride, int32_t raster_offset)
{
    if (n < 0 || grid_side < 0 || grid_stride < 0 || raster_offset < 0)
    {
        return -1;
    }
    if (grid_stride == 0)
    {
        return 0;
    }
    if (grid_side == 0)
    {
        return -1;
    }
    int64_t const raster = n > raster_offset ? n - raster_offset : 0; // tokens on the raster
    int64_t const fullRows = raster / grid_side;
    int64_t const rest = raster % grid_side;
    int64_t count = countMultiples(fullRows, grid_stride) * countMultiples(grid_side, grid_stride);
    if (rest > 0 && fullRows % grid_stride == 0)
    {
        count += countMultiples(rest, grid_stride);
    }
    return static_cast<int32_t>(count);
}

size_t feather_select_workspace_bytes(int32_t n)
{
    if (n <= 0)
    {
        return 0;
    }
    return alignUp(static_cast<size_t>(n) * sizeof(int32_t), 256);
}

int feather_select_tokens(const float* scores, int32_t n, int32_t budget, int32_t grid_side, int32_t grid_stride,
    int32_t raster_offset, int64_t* kept_out, void* workspace, size_t workspace_bytes, cudaStream_t stream)
{
    if (scores == nullptr || kept_out == nullptr || n <= 0 || budget < 1 || budget > n)
    {
        return FEATHER_SELECT_ERR_INVALID_ARGUMENT;
    }
    int32_t const forced = feather_forced_grid_count(n, grid_side, grid_stride, raster_offset);
    if (forced < 0 || forced > budget)
    {
        return FEATHER_SELECT_ERR_INVALID_ARGUMENT;
    }
    if (workspace == nullptr || workspace_bytes < feather_select_workspace_bytes(n))
    {
        return FEATHER_SELECT_ERR_WORKSPACE;
    }
    int32_t* flags = static_cast<int32_t*>(workspace);
    int32_t const quota = budget - forced;
    int32_t const gridSide = grid_stride > 0 ? grid_side : 0;
    int32_t const gridStride = grid_stride > 0 ? grid_stride : 0;

    unsigned const rankBlocks = static_cast<unsigned>((n + kRankBlock - 1) / kRankBlock);
    clearStaleLaunchError();
    rankSelectKernel<<<rankBlocks, kRankBlock, 0, stream>>>(
        scores, n, quota, gridSide, gridStride, raster_offset, flags);
    if (launchStatus() != FEATHER_SELECT_OK)
    {
        return FEATHER_SELECT_ERR_CUDA;
    }
    compactKernel<<<1, kCompactBlock, 0, stream>>>(flags, n, kept_out, budget);
    return launchStatus();
}

int feather_gather_rows(const void* src, void* dst, int64_t seq_len, int64_t num_cols, int32_t elem_bytes, int32_t n,
    int32_t budget, const int64_t* image_start, const int64_t* kept, cudaStream_t stream)
{
    if (src == nullptr || dst == nullptr || image_start == nullptr || kept == nullptr || n <= 0 || budget < 1
        || budget > n || seq_len < n || num_cols < 0
        || (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8))
    {
        return FEATHER_SELECT_ERR_INVALID_ARGUMENT;
    }
    int64_t const outRows = seq_len - n + budget;
    int64_t const rowBytes = num_cols * elem_bytes;
    if (rowBytes == 0)
    {
        return FEATHER_SELECT_OK;
    }
    // Widest copy unit that divides the row size and matches both base pointers' alignment.
    uintptr_t const addrBits = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst);
    auto fits = [&](int64_t unit) { return rowBytes % unit == 0 && (addrBits % static_cast<uintptr_t>(unit)) == 0; };
    if (fits(16))
    {
        return launchGather<uint4>(src, dst, seq_len, outRows, rowBytes, n, budget, image_start, kept, stream);
    }
    if (fits(8))
    {
        return launchGather<uint2>(src, dst, seq_len, outRows, rowBytes, n, budget, image_start, kept, stream);
    }
    if (fits(4))
    {
        return launchGather<uint32_t>(src, dst, seq_len, outRows, rowBytes, n, budget, image_start, kept, stream);
    }
    if (fits(2))
    {
        return launchGather<uint16_t>(src, dst, seq_len, outRows, rowBytes, n, budget, image_start, kept, stream);
    }
    return launchGather<uint8_t>(src, dst, seq_len, outRows, rowBytes, n, budget, image_start, kept, stream);
}

} // extern "C"
