/*
 * feather-export: CUDA kernels behind the "SelectBalanced" op (domain "feather"): one stage of
 * BTP (Balanced Token Pruning), docs/design.md §4 / README "BTP".
 *
 * Plain C entry points, usable without TensorRT. The row gather after the selection is
 * feather_gather_rows (select_tokens_kernel.h): same semantics as SelectTokens.
 *
 * Selection (must match the ONNX function body in feather_export/onnx/btp_op.py and the numpy
 * oracle btp_select in feather_export/methods/selection.py):
 *   pool  = the candidate_count tokens with the largest logits (ties: lower index first);
 *   A     = the first attention_count of [pool members with index < budget, by logit desc]
 *           followed by [the other pool members, by logit desc];
 *   D     = 1 - cosine similarity of the feature rows (fp32; norm = max(sqrt(sum x^2), 1e-12),
 *           dot products summed in index order without fused multiply-add);
 *   fill  = exactly budget - attention_count steps; a step takes the unchosen token with the
 *           largest seed_priority if any unchosen token has seed_priority > 0, else
 *           argmax over unchosen j of min_{i chosen} D[i, j] (+inf when nothing is chosen);
 *           ties go to the lower index;
 *   kept  = the chosen indices, ascending (int64[budget]).
 * Logit comparison is the SelectTokens one (NaN lowest, -0 == +0). NaN features are outside the
 * contract.
 *
 * All functions are asynchronous on `stream` and return FEATHER_SELECT_OK or an error code
 * (select_tokens_kernel.h); argument errors are detected on the host before any launch.
 */
#ifndef FEATHER_BTP_SELECT_KERNEL_H
#define FEATHER_BTP_SELECT_KERNEL_H

#include "select_tokens_kernel.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Device workspace feather_btp_select needs for n tokens of dim features (bytes). */
FEATHER_KERNEL_API size_t feather_btp_workspace_bytes(int32_t n, int32_t dim);

/* One BTP stage. logits: device float[n]; features: device float[n * dim] (row-major);
 * seed_priority: device float[n] (> 0 for seed members, larger = earlier; <= 0 otherwise);
 * kept_out: device int64[budget]. Requires 1 <= budget <= n, 0 <= attention_count <= budget,
 * attention_count <= candidate_count <= n, dim >= 1. */
FEATHER_KERNEL_API int feather_btp_select(const float* logits, const float* features, const float* seed_priority,
    int32_t n, int32_t dim, int32_t budget, int32_t attention_count, int32_t candidate_count, int64_t* kept_out,
    void* workspace, size_t workspace_bytes, cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FEATHER_BTP_SELECT_KERNEL_H */
