/*
 * feather-export: TensorRT IPluginV3 "SelectBalanced" (namespace "feather", version "1"): one BTP
 * stage. See btp_select_plugin.h for the I/O contract and btp_select_kernel.h for the selection.
 * Like SelectTokens, every TensorRT-facing method is noexcept and reports failures through the
 * logger from setLoggerFinder() and the context's IErrorRecorder.
 */
#include "btp_select_plugin.h"
#include "btp_select_kernel.h"
#include "plugin_common.h"

#include <exception>
#include <sstream>

using nvinfer1::DataType;
using nvinfer1::DimensionOperation;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IDimensionExpr;
using nvinfer1::ILogger;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace feather
{
namespace plugin
{
namespace
{

void logError(std::string const& msg) noexcept
{
    logOpMessage(kSELECT_BALANCED_PLUGIN_NAME, ILogger::Severity::kERROR, msg);
}

enum Input : int32_t
{
    kLOGITS = 0,
    kFEATURES = 1,
    kSEED = 2,
    kHIDDEN = 3,
    kPOSITIONS = 4,
    kIMAGE_START = 5
};

} // namespace

std::string validateSelectBalancedParams(SelectBalancedParams const& p)
{
    std::ostringstream err;
    if (p.numImageTokens < 1)
    {
        err << "num_image_tokens must be >= 1 (got " << p.numImageTokens << ")";
    }
    else if (p.budget < 1 || p.budget > p.numImageTokens)
    {
        err << "budget must be in [1, num_image_tokens=" << p.numImageTokens << "] (got " << p.budget
            << "); a 0-count stage has no SelectBalanced node";
    }
    else if (p.attentionCount < 0 || p.attentionCount > p.budget)
    {
        err << "attention_count must be in [0, budget=" << p.budget << "] (got " << p.attentionCount << ")";
    }
    else if (p.candidateCount < p.attentionCount || p.candidateCount > p.numImageTokens)
    {
        err << "candidate_count must be in [attention_count=" << p.attentionCount
            << ", num_image_tokens=" << p.numImageTokens << "] (got " << p.candidateCount << ")";
    }
    return err.str();
}

// ================================================================ SelectBalancedPlugin

SelectBalancedPlugin::SelectBalancedPlugin(SelectBalancedParams params)
    : mParams(params)
{
}

SelectBalancedPlugin::SelectBalancedPlugin(SelectBalancedPlugin const& other)
    : SelectPluginBase<SelectBalancedPlugin>(other)
    , mParams(other.mParams)
{
}

int32_t SelectBalancedPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != kNB_OUTPUTS || nbInputs != kNB_INPUTS)
    {
        reportError("getOutputDataTypes: expected 6 inputs and 3 outputs");
        return -1;
    }
    if (!isHiddenType(inputTypes[kHIDDEN]))
    {
        reportError("getOutputDataTypes: hidden (input 3) must be float32, float16 or bfloat16");
        return -1;
    }
    outputTypes[0] = DataType::kINT64;
    outputTypes[1] = inputTypes[kHIDDEN];
    outputTypes[2] = DataType::kINT64;
    return 0;
}

int32_t SelectBalancedPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        reportError("getOutputShapes: expected 6 inputs and 3 outputs");
        return -1;
    }
    if (inputs[kLOGITS].nbDims != 1 || inputs[kFEATURES].nbDims != 2 || inputs[kSEED].nbDims != 1
        || inputs[kHIDDEN].nbDims != 3 || inputs[kPOSITIONS].nbDims != 2
        || !(inputs[kIMAGE_START].nbDims == 0 || inputs[kIMAGE_START].nbDims == 1))
    {
        reportError("getOutputShapes: expected logits [N], features [N, D'], seed_priority [N], hidden [1,S,D], "
                    "position_ids [1,S], image_start []");
        return -1;
    }
    IDimensionExpr const* n = inputs[kLOGITS].d[0];
    if (n != nullptr && n->isConstant() && n->getConstantValue() != mParams.numImageTokens)
    {
        std::ostringstream os;
        os << "getOutputShapes: logits has " << n->getConstantValue() << " entries, num_image_tokens is "
           << mParams.numImageTokens;
        reportError(os.str().c_str());
        return -1;
    }
    IDimensionExpr const* dropped = exprBuilder.constant(mParams.numImageTokens - mParams.budget);
    IDimensionExpr const* budget = exprBuilder.constant(mParams.budget);
    if (dropped == nullptr || budget == nullptr || inputs[kHIDDEN].d[1] == nullptr
        || inputs[kPOSITIONS].d[1] == nullptr)
    {
        reportError("getOutputShapes: could not build dimension expressions");
        return -1;
    }
    IDimensionExpr const* hiddenRows
        = exprBuilder.operation(DimensionOperation::kSUB, *inputs[kHIDDEN].d[1], *dropped);
    IDimensionExpr const* positionRows
        = exprBuilder.operation(DimensionOperation::kSUB, *inputs[kPOSITIONS].d[1], *dropped);
    if (hiddenRows == nullptr || positionRows == nullptr)
    {
        reportError("getOutputShapes: could not build dimension expressions");
        return -1;
    }
    outputs[0].nbDims = 1;
    outputs[0].d[0] = budget;
    outputs[1].nbDims = 3;
    outputs[1].d[0] = inputs[kHIDDEN].d[0];
    outputs[1].d[1] = hiddenRows;
    outputs[1].d[2] = inputs[kHIDDEN].d[2];
    outputs[2].nbDims = 2;
    outputs[2].d[0] = inputs[kPOSITIONS].d[0];
    outputs[2].d[1] = positionRows;
    return 0;
}

bool SelectBalancedPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0
        || pos >= kNB_INPUTS + kNB_OUTPUTS)
    {
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case kLOGITS:
    case kFEATURES:
    case kSEED: return d.type == DataType::kFLOAT;
    case kHIDDEN: return isHiddenType(d.type);
    case kPOSITIONS:
    case kIMAGE_START:
    case kNB_INPUTS + 0:                                                  // kept
    case kNB_INPUTS + 2: return d.type == DataType::kINT64;              // position_ids_out
    case kNB_INPUTS + 1: return d.type == inOut[kHIDDEN].desc.type;      // hidden_out follows hidden
    default: return false;
    }
}

bool SelectBalancedPlugin::checkDescs(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs, char const* where)
    const noexcept
{
    std::ostringstream err;
    int64_t const n = mParams.numImageTokens;
    int64_t const b = mParams.budget;
    if (in == nullptr || out == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        err << "expected 6 inputs and 3 outputs";
    }
    else if (in[kLOGITS].type != DataType::kFLOAT || in[kFEATURES].type != DataType::kFLOAT
        || in[kSEED].type != DataType::kFLOAT || !isHiddenType(in[kHIDDEN].type)
        || in[kPOSITIONS].type != DataType::kINT64 || in[kIMAGE_START].type != DataType::kINT64
        || out[0].type != DataType::kINT64 || out[1].type != in[kHIDDEN].type || out[2].type != DataType::kINT64)
    {
        err << "unsupported data types (logits/features/seed_priority float32, hidden float32/float16/bfloat16, "
               "int64 ids)";
    }
    else if (in[kLOGITS].dims.nbDims != 1 || !dimMatches(in[kLOGITS].dims.d[0], n) || in[kSEED].dims.nbDims != 1
        || !dimMatches(in[kSEED].dims.d[0], n))
    {
        err << "logits and seed_priority must have shape [" << n << "]";
    }
    else if (in[kFEATURES].dims.nbDims != 2 || !dimMatches(in[kFEATURES].dims.d[0], n)
        || in[kFEATURES].dims.d[1] == 0)
    {
        err << "features must have shape [" << n << ", D'] with D' >= 1";
    }
    else if (in[kHIDDEN].dims.nbDims != 3 || !dimMatches(in[kHIDDEN].dims.d[0], 1)
        || (in[kHIDDEN].dims.d[1] >= 0 && in[kHIDDEN].dims.d[1] < n))
    {
        err << "hidden must have shape [1, S, D] with S >= " << n;
    }
    else if (in[kPOSITIONS].dims.nbDims != 2 || !dimMatches(in[kPOSITIONS].dims.d[0], 1)
        || (in[kHIDDEN].dims.d[1] >= 0 && !dimMatches(in[kPOSITIONS].dims.d[1], in[kHIDDEN].dims.d[1])))
    {
        err << "position_ids must have shape [1, S] with the same S as hidden";
    }
    else if (!isScalarLike(in[kIMAGE_START].dims))
    {
        err << "image_start must be a scalar";
    }
    else if (out[0].dims.nbDims != 1 || !dimMatches(out[0].dims.d[0], b))
    {
        err << "kept must have shape [" << b << "]";
    }
    else if (out[1].dims.nbDims != 3
        || (in[kHIDDEN].dims.d[1] >= 0 && !dimMatches(out[1].dims.d[1], in[kHIDDEN].dims.d[1] - n + b)))
    {
        err << "hidden_out must have shape [1, S - " << n << " + " << b << ", D]";
    }
    else if (out[2].dims.nbDims != 2
        || (in[kPOSITIONS].dims.d[1] >= 0 && !dimMatches(out[2].dims.d[1], in[kPOSITIONS].dims.d[1] - n + b)))
    {
        err << "position_ids_out must have shape [1, S - " << n << " + " << b << "]";
    }
    std::string const msg = err.str();
    if (!msg.empty())
    {
        reportError((std::string(where) + ": " + msg).c_str());
        return false;
    }
    return true;
}

size_t SelectBalancedPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (inputs == nullptr || nbInputs != kNB_INPUTS || inputs[kFEATURES].max.nbDims != 2)
    {
        return 0;
    }
    int64_t const dim = inputs[kFEATURES].max.d[1];
    return dim > 0 ? feather_btp_workspace_bytes(mParams.numImageTokens, static_cast<int32_t>(dim)) : 0;
}

char const* SelectBalancedPlugin::getMetadataString() noexcept
{
    try
    {
        std::ostringstream os;
        os << "budget=" << mParams.budget << ";num_image_tokens=" << mParams.numImageTokens
           << ";attention_count=" << mParams.attentionCount << ";candidate_count=" << mParams.candidateCount;
        mMetadata = os.str();
        return mMetadata.c_str();
    }
    catch (...)
    {
        return nullptr;
    }
}

int32_t SelectBalancedPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        reportError("enqueue: null descriptors or buffers");
        return -1;
    }
    int32_t const n = mParams.numImageTokens;
    int32_t const b = mParams.budget;
    int64_t const dim = inputDesc[kFEATURES].dims.d[1];
    int64_t const seqLen = inputDesc[kHIDDEN].dims.d[1];
    int64_t const cols = inputDesc[kHIDDEN].dims.d[2];
    int64_t const posLen = inputDesc[kPOSITIONS].dims.d[1];
    if (inputDesc[kLOGITS].dims.d[0] != n || inputDesc[kFEATURES].dims.d[0] != n || dim < 1 || seqLen < n
        || posLen != seqLen || cols < 0 || dim > INT32_MAX)
    {
        reportError("enqueue: runtime shapes do not match num_image_tokens / each other");
        return -1;
    }
    auto* kept = static_cast<int64_t*>(outputs[0]);
    auto const* imageStart = static_cast<int64_t const*>(inputs[kIMAGE_START]);
    int32_t const d = static_cast<int32_t>(dim);
    int status = feather_btp_select(static_cast<float const*>(inputs[kLOGITS]),
        static_cast<float const*>(inputs[kFEATURES]), static_cast<float const*>(inputs[kSEED]), n, d, b,
        mParams.attentionCount, mParams.candidateCount, kept, workspace, feather_btp_workspace_bytes(n, d), stream);
    if (status == FEATHER_SELECT_OK)
    {
        status = feather_gather_rows(inputs[kHIDDEN], outputs[1], seqLen, cols, elementBytes(inputDesc[kHIDDEN].type),
            n, b, imageStart, kept, stream);
    }
    if (status == FEATHER_SELECT_OK)
    {
        status = feather_gather_rows(inputs[kPOSITIONS], outputs[2], posLen, 1, 8, n, b, imageStart, kept, stream);
    }
    if (status != FEATHER_SELECT_OK)
    {
        reportError((std::string("enqueue: ") + feather_select_status_string(status)).c_str());
        return status;
    }
    return 0;
}

PluginFieldCollection const* SelectBalancedPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mSerializedFields.clear();
        mSerializedFields.emplace_back("budget", &mParams.budget, PluginFieldType::kINT32, 1);
        mSerializedFields.emplace_back("num_image_tokens", &mParams.numImageTokens, PluginFieldType::kINT32, 1);
        mSerializedFields.emplace_back("attention_count", &mParams.attentionCount, PluginFieldType::kINT32, 1);
        mSerializedFields.emplace_back("candidate_count", &mParams.candidateCount, PluginFieldType::kINT32, 1);
        mSerializedCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
        mSerializedCollection.fields = mSerializedFields.data();
        return &mSerializedCollection;
    }
    catch (...)
    {
        logError("getFieldsToSerialize failed");
        return nullptr;
    }
}

// ================================================================ SelectBalancedPluginCreator

SelectBalancedPluginCreator::SelectBalancedPluginCreator()
    : SelectCreatorBase(kSELECT_BALANCED_PLUGIN_NAME,
        {{"budget", nullptr, PluginFieldType::kINT32, 1}, {"num_image_tokens", nullptr, PluginFieldType::kINT32, 1},
          {"attention_count", nullptr, PluginFieldType::kINT32, 1},
          {"candidate_count", nullptr, PluginFieldType::kINT32, 1}})
{
}

nvinfer1::IPluginV3* SelectBalancedPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        std::string const layer = name != nullptr ? name : "<unnamed>";
        if (fc == nullptr || (fc->nbFields > 0 && fc->fields == nullptr))
        {
            logError("createPlugin(" + layer + "): no plugin fields given");
            return nullptr;
        }
        SelectBalancedParams params;
        int32_t seen = 0;
        std::string error;
        for (int32_t i = 0; i < fc->nbFields && error.empty(); ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr)
            {
                continue;
            }
            std::string const field = f.name;
            int32_t* target = field == "budget"   ? &params.budget
                : field == "num_image_tokens"     ? &params.numImageTokens
                : field == "attention_count"      ? &params.attentionCount
                : field == "candidate_count"      ? &params.candidateCount
                                                  : nullptr;
            if (target != nullptr)
            {
                seen += readIntField(f, *target, error) ? 1 : 0;
            }
            else
            {
                logOpMessage(kSELECT_BALANCED_PLUGIN_NAME, ILogger::Severity::kVERBOSE,
                    "createPlugin(" + layer + "): ignoring field '" + field + "'");
            }
        }
        if (error.empty() && seen < 4)
        {
            error = "required fields 'budget', 'num_image_tokens', 'attention_count' and 'candidate_count' are missing";
        }
        if (error.empty())
        {
            error = validateSelectBalancedParams(params);
        }
        if (!error.empty())
        {
            logError("createPlugin(" + layer + "): " + error);
            return nullptr;
        }
        return new SelectBalancedPlugin(params);
    }
    catch (std::exception const& e)
    {
        logError(std::string("createPlugin failed: ") + e.what());
    }
    catch (...)
    {
        logError("createPlugin failed");
    }
    return nullptr;
}

SelectBalancedPluginCreator& selectBalancedCreator() noexcept
{
    static SelectBalancedPluginCreator creator;
    return creator;
}

} // namespace plugin
} // namespace feather
