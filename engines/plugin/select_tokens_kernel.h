/*
 * feather-export: CUDA kernels behind the "SelectTokens" op (domain "feather").
 *
 * Plain C entry points, usable without TensorRT (the TensorRT plugin in
 * select_tokens_plugin.cpp and the standalone test select_tokens_kernel_test.cpp
 * both call them).
 *
 * Selection rule (must match the ONNX function body / exporter reference bit for bit):
 *   token i is raster token r = i - raster_offset (raster_offset image tokens, e.g. a CLS under
 *   strategy "full", precede the raster and are never forced):
 *   forced grid G = { i < N : r >= 0 and (r / grid_side) % grid_stride == 0 and
 *                             (r % grid_side) % grid_stride == 0 }   when grid_stride > 0
 *                 = {}                                              when grid_stride == 0
 *   The B - |G| remaining slots go to the highest-scoring tokens outside G.
 *   Order among non-grid tokens: higher score first; equal scores -> lower index first.
 *   Score comparison details (documented, deterministic):
 *     - NaN is lower than every non-NaN value (including -inf); all NaNs compare equal,
 *       so NaN ties are also broken by lower index.
 *     - -0.0 and +0.0 compare equal (IEEE equality), so they tie and the lower index wins.
 *   Output: the B kept indices (G union selected), sorted ascending, as int64.
 *
 * Row gather (hidden states and position ids), with st = *image_start clamped to [0, S-N]:
 *   out row j <- in row j                         for j < st
 *   out row j <- in row st + kept[j - st]         for st <= j < st + B
 *   out row j <- in row j + N - B                 for j >= st + B
 *   out has S - N + B rows.
 *
 * All functions are asynchronous on `stream` (no host synchronisation) and return
 * FEATHER_SELECT_OK or an error code; argument errors are detected on the host before
 * any launch. image_start is read on the device, so an out-of-range value cannot be
 * reported without a synchronisation: it is clamped to [0, S-N] instead.
 */
#ifndef FEATHER_SELECT_TOKENS_KERNEL_H
#define FEATHER_SELECT_TOKENS_KERNEL_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define FEATHER_KERNEL_API
#else
#define FEATHER_KERNEL_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum FeatherSelectStatus
{
    FEATHER_SELECT_OK = 0,
    FEATHER_SELECT_ERR_INVALID_ARGUMENT = 1, /* bad n / budget / grid parameters / null pointer */
    FEATHER_SELECT_ERR_WORKSPACE = 2,        /* workspace missing or smaller than feather_select_workspace_bytes(n) */
    FEATHER_SELECT_ERR_CUDA = 3              /* a kernel launch failed (cudaGetLastError after it; a
                                                stale error from before the launch is cleared) */
};

/* Human-readable text for a FeatherSelectStatus value. */
FEATHER_KERNEL_API const char* feather_select_status_string(int status);

/* |G| for the given parameters (0 when grid_stride == 0). Host-only, O(1).
 * Returns -1 for invalid parameters (n < 0, grid_side < 0, grid_stride < 0, raster_offset < 0,
 * or grid_stride > 0 with grid_side == 0). */
FEATHER_KERNEL_API int32_t feather_forced_grid_count(
    int32_t n, int32_t grid_side, int32_t grid_stride, int32_t raster_offset);

/* Device workspace feather_select_tokens needs for n image tokens (bytes, 256-aligned). */
FEATHER_KERNEL_API size_t feather_select_workspace_bytes(int32_t n);

/* Compute the B kept indices (sorted ascending) into kept_out[0..budget).
 * scores: device float[n]; kept_out: device int64[budget]; workspace: device memory of
 * at least feather_select_workspace_bytes(n) bytes.
 * Requires 1 <= budget <= n, raster_offset >= 0 and |G| <= budget. */
FEATHER_KERNEL_API int feather_select_tokens(const float* scores, int32_t n, int32_t budget, int32_t grid_side,
    int32_t grid_stride, int32_t raster_offset, int64_t* kept_out, void* workspace, size_t workspace_bytes,
    cudaStream_t stream);

/* Gather rows of a [1, seq_len, num_cols] tensor of elem_bytes-sized elements
 * (elem_bytes in {1, 2, 4, 8}: fp16/bf16 -> 2, fp32 -> 4, int64 position ids -> 8 with
 * num_cols == 1) into dst of shape [1, seq_len - n + budget, num_cols], using the
 * kept indices (device int64[budget]) and the device int64 scalar image_start.
 * The copy is a bit copy: no arithmetic on the values. Requires seq_len >= n. */
FEATHER_KERNEL_API int feather_gather_rows(const void* src, void* dst, int64_t seq_len, int64_t num_cols,
    int32_t elem_bytes, int32_t n, int32_t budget, const int64_t* image_start, const int64_t* kept,
    cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FEATHER_SELECT_TOKENS_KERNEL_H */
