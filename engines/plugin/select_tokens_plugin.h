/*
 * feather-export: TensorRT IPluginV3 implementation of the "SelectTokens" op
 * (ONNX domain "feather", plugin name "SelectTokens", namespace "feather", version "1").
 *
 * Inputs : 0 scores       float32 [N]
 *          1 hidden       T [1, S, D], T in {float32, float16, bfloat16}
 *          2 position_ids int64 [1, S]
 *          3 image_start  int64 [] (0-D; a 1-element 1-D tensor is also accepted)
 * Outputs: 0 kept             int64 [B]            (ascending indices into the image tokens)
 *          1 hidden_out       T [1, S - N + B, D]
 *          2 position_ids_out int64 [1, S - N + B]
 * Fields : budget (int32, 1..N), num_image_tokens (int32 N >= 1), grid_side (int32 >= 0),
 *          grid_stride (int32 >= 0), raster_offset (int32 in 0..N, optional, default 0: image
 *          tokens before the raster, e.g. a CLS under strategy "full", never on the forced grid),
 *          criterion (string, informational only).
 *
 * Written against the TensorRT 10.x public headers (>= 10.3, the JetPack 6 version).
 */
#ifndef FEATHER_SELECT_TOKENS_PLUGIN_H
#define FEATHER_SELECT_TOKENS_PLUGIN_H

#include "plugin_common.h"

#include <NvInferRuntime.h>
#include <NvInferVersion.h>

#include <cstdint>
#include <string>
#include <vector>

#if !defined(NV_TENSORRT_MAJOR) || NV_TENSORRT_MAJOR < 10 || (NV_TENSORRT_MAJOR == 10 && NV_TENSORRT_MINOR < 3)
#error "feather SelectTokens plugin needs TensorRT >= 10.3 headers (IPluginV3 / IPluginCreatorV3One)"
#endif

namespace feather
{
namespace plugin
{

constexpr char const* kSELECT_TOKENS_PLUGIN_NAME{"SelectTokens"};
constexpr char const* kSELECT_TOKENS_PLUGIN_VERSION{kPLUGIN_VERSION};
constexpr char const* kSELECT_TOKENS_PLUGIN_NAMESPACE{kPLUGIN_NAMESPACE};

struct SelectTokensParams
{
    int32_t budget{0};
    int32_t numImageTokens{0};
    int32_t gridSide{0};
    int32_t gridStride{0};
    int32_t rasterOffset{0};
    std::string criterion;
};

//! Validate parameters. Returns an empty string when valid, otherwise a description of the problem.
std::string validateSelectTokensParams(SelectTokensParams const& p);

class SelectTokensPlugin final : public SelectPluginBase<SelectTokensPlugin>
{
public:
    //! \p params must already be validated (see SelectTokensPluginCreator::createPlugin).
    explicit SelectTokensPlugin(SelectTokensParams params);
    SelectTokensPlugin(SelectTokensPlugin const& other);
    SelectTokensPlugin& operator=(SelectTokensPlugin const&) = delete;
    ~SelectTokensPlugin() override = default;

    // IPluginV3OneBuild
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

    // IPluginV3OneRuntime
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

    static constexpr char const* kOP_NAME{kSELECT_TOKENS_PLUGIN_NAME};
    static constexpr int32_t kNB_INPUTS{4};
    static constexpr int32_t kNB_OUTPUTS{3};

private:
    friend class SelectPluginBase<SelectTokensPlugin>;
    //! Shape/type check used by configurePlugin (build) and onShapeChange (runtime).
    //! Dimensions equal to -1 (unknown at build time) are not checked.
    bool checkDescs(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs, char const* where) const noexcept;

    SelectTokensParams mParams;
    std::vector<nvinfer1::PluginField> mSerializedFields;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
    std::string mMetadata;
};

class SelectTokensPluginCreator final : public SelectCreatorBase
{
public:
    SelectTokensPluginCreator();
    ~SelectTokensPluginCreator() override = default;

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
};

} // namespace plugin
} // namespace feather

#endif // FEATHER_SELECT_TOKENS_PLUGIN_H
