/*
 * feather-export: TensorRT IPluginV3 implementation of the "SelectBalanced" op: one BTP stage
 * (ONNX domain "feather", plugin name "SelectBalanced", namespace "feather", version "1").
 *
 * Inputs : 0 logits        float32 [N]      (pre-softmax last-token logits, mean over heads)
 *          1 features      float32 [N, D']  (image rows of the hidden states entering layer K)
 *          2 seed_priority float32 [N]      (> 0 for seed members, larger first)
 *          3 hidden        T [1, S, D], T in {float32, float16, bfloat16}
 *          4 position_ids  int64 [1, S]
 *          5 image_start   int64 [] (0-D; a 1-element 1-D tensor is also accepted)
 * Outputs: 0 kept             int64 [B]            (ascending indices into the image tokens)
 *          1 hidden_out       T [1, S - N + B, D]
 *          2 position_ids_out int64 [1, S - N + B]
 * Fields : budget (B, 1..N), num_image_tokens (N >= 1), attention_count (0..B),
 *          candidate_count (attention_count..N).
 * Selection: btp_select_kernel.h; the row gather: feather_gather_rows (select_tokens_kernel.h).
 * Written against the TensorRT 10.x public headers (>= 10.3).
 */
#ifndef FEATHER_BTP_SELECT_PLUGIN_H
#define FEATHER_BTP_SELECT_PLUGIN_H

#include "plugin_common.h"

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace feather
{
namespace plugin
{

constexpr char const* kSELECT_BALANCED_PLUGIN_NAME{"SelectBalanced"};

struct SelectBalancedParams
{
    int32_t budget{0};
    int32_t numImageTokens{0};
    int32_t attentionCount{0};
    int32_t candidateCount{0};
};

//! Empty when valid, otherwise a description of the problem.
std::string validateSelectBalancedParams(SelectBalancedParams const& p);

class SelectBalancedPlugin final : public SelectPluginBase<SelectBalancedPlugin>
{
public:
    explicit SelectBalancedPlugin(SelectBalancedParams params);
    SelectBalancedPlugin(SelectBalancedPlugin const& other);
    SelectBalancedPlugin& operator=(SelectBalancedPlugin const&) = delete;
    ~SelectBalancedPlugin() override = default;

    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getMetadataString() noexcept override;

    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    static constexpr char const* kOP_NAME{kSELECT_BALANCED_PLUGIN_NAME};
    static constexpr int32_t kNB_INPUTS{6};
    static constexpr int32_t kNB_OUTPUTS{3};

private:
    friend class SelectPluginBase<SelectBalancedPlugin>;
    bool checkDescs(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs, char const* where) const noexcept;

    SelectBalancedParams mParams;
    std::vector<nvinfer1::PluginField> mSerializedFields;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
    std::string mMetadata;
};

class SelectBalancedPluginCreator final : public SelectCreatorBase
{
public:
    SelectBalancedPluginCreator();
    ~SelectBalancedPluginCreator() override = default;

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
};

//! The library's creator instance (listed by getCreators()).
SelectBalancedPluginCreator& selectBalancedCreator() noexcept;

} // namespace plugin
} // namespace feather

#endif // FEATHER_BTP_SELECT_PLUGIN_H
