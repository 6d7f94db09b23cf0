/*
 * feather-export: TensorRT IPluginV3 "SelectTokens" (namespace "feather", version "1").
 * See select_tokens_plugin.h for the I/O contract and select_tokens_kernel.h for the exact
 * selection rule. Every TensorRT-facing method is noexcept and never throws: failures are
 * returned as documented (non-zero status / nullptr / false) and described through the
 * ILogger obtained from setLoggerFinder() and, at runtime, through the execution context's
 * IErrorRecorder handed over in attachToContext().
 */
#include "select_tokens_plugin.h"
#include "btp_select_plugin.h"
#include "plugin_common.h"
#include "select_tokens_kernel.h"

#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
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

void logMessage(ILogger::Severity severity, std::string const& msg) noexcept
{
    logOpMessage(kSELECT_TOKENS_PLUGIN_NAME, severity, msg);
}

void logError(std::string const& msg) noexcept
{
    logMessage(ILogger::Severity::kERROR, msg);
}

} // namespace

std::string validateSelectTokensParams(SelectTokensParams const& p)
{
    std::ostringstream err;
    if (p.numImageTokens < 1)
    {
        err << "num_image_tokens must be >= 1 (got " << p.numImageTokens << ")";
    }
    else if (p.budget < 1 || p.budget > p.numImageTokens)
    {
        err << "budget must be in [1, num_image_tokens=" << p.numImageTokens << "] (got " << p.budget << ")";
    }
    else if (p.gridSide < 0 || p.gridStride < 0)
    {
        err << "grid_side and grid_stride must be >= 0 (got " << p.gridSide << ", " << p.gridStride << ")";
    }
    else if (p.gridStride > 0 && p.gridSide == 0)
    {
        err << "grid_stride=" << p.gridStride << " needs grid_side > 0";
    }
    else if (p.rasterOffset < 0 || p.rasterOffset > p.numImageTokens)
    {
        err << "raster_offset must be in [0, num_image_tokens=" << p.numImageTokens << "] (got " << p.rasterOffset
            << ")";
    }
    else
    {
        int32_t const forced
            = feather_forced_grid_count(p.numImageTokens, p.gridSide, p.gridStride, p.rasterOffset);
        if (forced < 0 || forced > p.budget)
        {
            err << "forced grid has " << forced << " tokens, more than budget=" << p.budget;
        }
    }
    return err.str();
}

// ================================================================ SelectTokensPlugin

SelectTokensPlugin::SelectTokensPlugin(SelectTokensParams params)
    : mParams(std::move(params))
{
}

SelectTokensPlugin::SelectTokensPlugin(SelectTokensPlugin const& other)
    : SelectPluginBase<SelectTokensPlugin>(other)
    , mParams(other.mParams)
{
    // mSerializedFields points into mParams: rebuilt on demand by getFieldsToSerialize().
}

int32_t SelectTokensPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != kNB_OUTPUTS || nbInputs != kNB_INPUTS)
    {
        reportError("getOutputDataTypes: expected 4 inputs and 3 outputs");
        return -1;
    }
    if (!isHiddenType(inputTypes[1]))
    {
        reportError("getOutputDataTypes: hidden (input 1) must be float32, float16 or bfloat16");
        return -1;
    }
    outputTypes[0] = DataType::kINT64;
    outputTypes[1] = inputTypes[1];
    outputTypes[2] = DataType::kINT64;
    return 0;
}

int32_t SelectTokensPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        reportError("getOutputShapes: expected 4 inputs and 3 outputs");
        return -1;
    }
    if (inputs[0].nbDims != 1 || inputs[1].nbDims != 3 || inputs[2].nbDims != 2
        || !(inputs[3].nbDims == 0 || inputs[3].nbDims == 1))
    {
        reportError("getOutputShapes: expected scores [N], hidden [1,S,D], position_ids [1,S], image_start []");
        return -1;
    }
    IDimensionExpr const* n = inputs[0].d[0];
    if (n != nullptr && n->isConstant() && n->getConstantValue() != mParams.numImageTokens)
    {
        std::ostringstream os;
        os << "getOutputShapes: scores has " << n->getConstantValue() << " entries, num_image_tokens is "
           << mParams.numImageTokens;
        reportError(os.str().c_str());
        return -1;
    }
    IDimensionExpr const* s = inputs[1].d[1];
    if (s != nullptr && s->isConstant() && s->getConstantValue() < mParams.numImageTokens)
    {
        reportError("getOutputShapes: sequence length S is smaller than num_image_tokens");
        return -1;
    }

    // S_out = S - (N - B); N and B are build-time constants of this plugin instance.
    IDimensionExpr const* dropped = exprBuilder.constant(mParams.numImageTokens - mParams.budget);
    IDimensionExpr const* budget = exprBuilder.constant(mParams.budget);
    if (dropped == nullptr || budget == nullptr || inputs[1].d[1] == nullptr || inputs[2].d[1] == nullptr)
    {
        reportError("getOutputShapes: could not build dimension expressions");
        return -1;
    }
    IDimensionExpr const* hiddenRows = exprBuilder.operation(DimensionOperation::kSUB, *inputs[1].d[1], *dropped);
    IDimensionExpr const* positionRows = exprBuilder.operation(DimensionOperation::kSUB, *inputs[2].d[1], *dropped);
    if (hiddenRows == nullptr || positionRows == nullptr)
    {
        reportError("getOutputShapes: could not build dimension expressions");
        return -1;
    }

    outputs[0].nbDims = 1;
    outputs[0].d[0] = budget;

    outputs[1].nbDims = 3;
    outputs[1].d[0] = inputs[1].d[0];
    outputs[1].d[1] = hiddenRows;
    outputs[1].d[2] = inputs[1].d[2];

    outputs[2].nbDims = 2;
    outputs[2].d[0] = inputs[2].d[0];
    outputs[2].d[1] = positionRows;
    return 0;
}

bool SelectTokensPlugin::supportsFormatCombination(
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
    case 0: return d.type == DataType::kFLOAT;            // scores
    case 1: return isHiddenType(d.type);                  // hidden
    case 2:                                               // position_ids
    case 3:                                               // image_start
    case 4:                                               // kept
    case 6: return d.type == DataType::kINT64;            // position_ids_out
    case 5: return d.type == inOut[1].desc.type;          // hidden_out follows hidden
    default: return false;
    }
}

bool SelectTokensPlugin::checkDescs(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs, char const* where)
    const noexcept
{
    std::ostringstream err;
    int64_t const n = mParams.numImageTokens;
    int64_t const b = mParams.budget;
    if (in == nullptr || out == nullptr || nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
    {
        err << "expected 4 inputs and 3 outputs";
    }
    else if (in[0].type != DataType::kFLOAT || !isHiddenType(in[1].type) || in[2].type != DataType::kINT64
        || in[3].type != DataType::kINT64 || out[0].type != DataType::kINT64 || out[1].type != in[1].type
        || out[2].type != DataType::kINT64)
    {
        err << "unsupported data types (scores float32, hidden float32/float16/bfloat16, int64 ids)";
    }
    else if (in[0].dims.nbDims != 1 || !dimMatches(in[0].dims.d[0], n))
    {
        err << "scores must have shape [" << n << "]";
    }
    else if (in[1].dims.nbDims != 3 || !dimMatches(in[1].dims.d[0], 1)
        || (in[1].dims.d[1] >= 0 && in[1].dims.d[1] < n))
    {
        err << "hidden must have shape [1, S, D] with S >= " << n;
    }
    else if (in[2].dims.nbDims != 2 || !dimMatches(in[2].dims.d[0], 1)
        || (in[1].dims.d[1] >= 0 && !dimMatches(in[2].dims.d[1], in[1].dims.d[1])))
    {
        err << "position_ids must have shape [1, S] with the same S as hidden";
    }
    else if (!isScalarLike(in[3].dims))
    {
        err << "image_start must be a scalar";
    }
    else if (out[0].dims.nbDims != 1 || !dimMatches(out[0].dims.d[0], b))
    {
        err << "kept must have shape [" << b << "]";
    }
    else if (out[1].dims.nbDims != 3
        || (in[1].dims.d[1] >= 0 && !dimMatches(out[1].dims.d[1], in[1].dims.d[1] - n + b)))
    {
        err << "hidden_out must have shape [1, S - " << n << " + " << b << ", D]";
    }
    else if (out[2].dims.nbDims != 2 || (in[2].dims.d[1] >= 0 && !dimMatches(out[2].dims.d[1], in[2].dims.d[1] - n + b)))
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

size_t SelectTokensPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return feather_select_workspace_bytes(mParams.numImageTokens);
}

char const* SelectTokensPlugin::getMetadataString() noexcept
{
    try
    {
        std::ostringstream os;
        os << "budget=" << mParams.budget << ";num_image_tokens=" << mParams.numImageTokens
           << ";grid_side=" << mParams.gridSide << ";grid_stride=" << mParams.gridStride
           << ";raster_offset=" << mParams.rasterOffset << ";criterion=" << mParams.criterion;
        mMetadata = os.str();
        return mMetadata.c_str();
    }
    catch (...)
    {
        return nullptr;
    }
}

int32_t SelectTokensPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        reportError("enqueue: null descriptors or buffers");
        return -1;
    }
    int32_t const n = mParams.numImageTokens;
    int32_t const b = mParams.budget;
    int64_t const seqLen = inputDesc[1].dims.d[1];
    int64_t const cols = inputDesc[1].dims.d[2];
    int64_t const posLen = inputDesc[2].dims.d[1];
    if (inputDesc[0].dims.d[0] != n || seqLen < n || posLen != seqLen || cols < 0)
    {
        reportError("enqueue: runtime shapes do not match num_image_tokens / each other");
        return -1;
    }
    int64_t const* kept = static_cast<int64_t const*>(outputs[0]);
    int64_t const* imageStart = static_cast<int64_t const*>(inputs[3]);

    int status = feather_select_tokens(static_cast<float const*>(inputs[0]), n, b, mParams.gridSide,
        mParams.gridStride, mParams.rasterOffset, static_cast<int64_t*>(outputs[0]), workspace,
        feather_select_workspace_bytes(n), stream);
    if (status == FEATHER_SELECT_OK)
    {
        status = feather_gather_rows(inputs[1], outputs[1], seqLen, cols, elementBytes(inputDesc[1].type), n, b,
            imageStart, kept, stream);
    }
    if (status == FEATHER_SELECT_OK)
    {
        status = feather_gather_rows(inputs[2], outputs[2], posLen, 1, 8, n, b, imageStart, kept, stream);
    }
    if (status != FEATHER_SELECT_OK)
    {
        reportError((std::string("enqueue: ") + feather_select_status_string(status)).c_str());
        return status;
    }
    return 0;
}

PluginFieldCollection const* SelectTokensPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mSerializedFields.clear();
        mSerializedFields.emplace_back("budget", &mParams.budget, PluginFieldType::kINT32, 1);
        mSerializedFields.emplace_back("num_image_tokens", &mParams.numImageTokens, PluginFieldType::kINT32, 1);
        mSerializedFields.emplace_back("grid_side", &mParams.gridSide, PluginFieldType::kINT32, 1);
        mSerializedFields.emplace_back("grid_stride", &mParams.gridStride, PluginFieldType::kINT32, 1);
        mSerializedFields.emplace_back("raster_offset", &mParams.rasterOffset, PluginFieldType::kINT32, 1);
        mSerializedFields.emplace_back("criterion", mParams.criterion.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(mParams.criterion.size() + 1));
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

// ================================================================ SelectTokensPluginCreator

SelectTokensPluginCreator::SelectTokensPluginCreator()
    : SelectCreatorBase(kSELECT_TOKENS_PLUGIN_NAME,
        {{"budget", nullptr, PluginFieldType::kINT32, 1}, {"num_image_tokens", nullptr, PluginFieldType::kINT32, 1},
          {"grid_side", nullptr, PluginFieldType::kINT32, 1}, {"grid_stride", nullptr, PluginFieldType::kINT32, 1},
          {"raster_offset", nullptr, PluginFieldType::kINT32, 1}, {"criterion", nullptr, PluginFieldType::kCHAR, 1}})
{
}

nvinfer1::IPluginV3* SelectTokensPluginCreator::createPlugin(
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
        SelectTokensParams params;
        bool haveBudget = false;
        bool haveN = false;
        std::string error;
        for (int32_t i = 0; i < fc->nbFields && error.empty(); ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr)
            {
                continue;
            }
            std::string const field = f.name;
            if (field == "budget")
            {
                haveBudget = readIntField(f, params.budget, error);
            }
            else if (field == "num_image_tokens")
            {
                haveN = readIntField(f, params.numImageTokens, error);
            }
            else if (field == "grid_side")
            {
                readIntField(f, params.gridSide, error);
            }
            else if (field == "grid_stride")
            {
                readIntField(f, params.gridStride, error);
            }
            else if (field == "raster_offset") // optional: absent in nodes without a CLS image token
            {
                readIntField(f, params.rasterOffset, error);
            }
            else if (field == "criterion")
            {
                if (f.type == PluginFieldType::kCHAR && f.data != nullptr && f.length > 0)
                {
                    char const* text = static_cast<char const*>(f.data);
                    size_t len = 0;
                    while (len < static_cast<size_t>(f.length) && text[len] != '\0')
                    {
                        ++len;
                    }
                    params.criterion.assign(text, len);
                }
            }
            else
            {
                logMessage(ILogger::Severity::kVERBOSE, "createPlugin(" + layer + "): ignoring field '" + field + "'");
            }
        }
        if (error.empty() && (!haveBudget || !haveN))
        {
            error = "required fields 'budget' and 'num_image_tokens' are missing";
        }
        if (error.empty())
        {
            error = validateSelectTokensParams(params);
        }
        if (!error.empty())
        {
            logError("createPlugin(" + layer + "): " + error);
            return nullptr;
        }
        return new SelectTokensPlugin(std::move(params));
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

namespace
{
SelectTokensPluginCreator& creatorInstance() noexcept
{
    static SelectTokensPluginCreator creator;
    return creator;
}

#if defined(FEATHER_PLUGIN_STATIC_REGISTRATION)
// Opt-in load-time registration for loaders that only dlopen() the library (e.g. ctypes.CDLL).
// Needs libnvinfer (getPluginRegistry). Do not combine with IPluginRegistry::loadLibrary /
// trtexec --dynamicPlugins on the same library: the second registration is rejected.
struct StaticRegistration
{
    StaticRegistration()
    {
        if (nvinfer1::IPluginRegistry* registry = getPluginRegistry())
        {
            if (!registry->registerCreator(creatorInstance(), kSELECT_TOKENS_PLUGIN_NAMESPACE))
            {
                logError("static registration of feather::SelectTokens failed (already registered?)");
            }
            if (!registry->registerCreator(selectBalancedCreator(), kSELECT_TOKENS_PLUGIN_NAMESPACE))
            {
                logError("static registration of feather::SelectBalanced failed (already registered?)");
            }
        }
    }
};
StaticRegistration gStaticRegistration;
#endif
} // namespace

} // namespace plugin
} // namespace feather

// ================================================================ library entry points
// Documented entry points of a TensorRT plugin shared library (IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins): setLoggerFinder() and getCreators(). The deprecated
// getPluginCreators() returns IPluginCreator (V2) objects only, so a V3-only library does not
// export it. TENSORRTAPI from the TensorRT headers only marks symbols visible when
// TENSORRT_BUILD_LIB is defined, so the library uses its own export macro (it is built with
// -fvisibility=hidden).
#if defined(_WIN32)
#define FEATHER_PLUGIN_EXPORT __declspec(dllexport)
#else
#define FEATHER_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

extern "C" FEATHER_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    feather::plugin::loggerFinder().set(finder);
}

extern "C" FEATHER_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const kCreators[]
        = {&feather::plugin::creatorInstance(), &feather::plugin::selectBalancedCreator()};
    nbCreators = static_cast<int32_t>(sizeof(kCreators) / sizeof(kCreators[0]));
    return kCreators;
}
