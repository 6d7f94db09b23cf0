/*
 * feather-export: helpers shared by the TensorRT plugins of libfeather_plugin.so (SelectTokens,
 * SelectBalanced): the ILoggerFinder handed over by setLoggerFinder() (one per library), noexcept
 * logging, integer plugin fields, and tensor-description checks.
 */
#ifndef FEATHER_PLUGIN_COMMON_H
#define FEATHER_PLUGIN_COMMON_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace feather
{
namespace plugin
{

class LoggerFinderHolder
{
public:
    void set(nvinfer1::ILoggerFinder* finder) noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (finder != nullptr)
        {
            mFinder = finder;
        }
    }

    nvinfer1::ILogger* get() noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        return mFinder != nullptr ? mFinder->findLogger() : nullptr;
    }

private:
    std::mutex mMutex;
    nvinfer1::ILoggerFinder* mFinder{nullptr};
};

//! The library's one holder (an inline function's static: shared by every translation unit).
inline LoggerFinderHolder& loggerFinder() noexcept
{
    static LoggerFinderHolder holder;
    return holder;
}

//! Log "[feather::<op>] msg" through TensorRT's logger (stderr for warnings and errors when no
//! logger was handed over); never throws.
inline void logOpMessage(char const* op, nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept
{
    try
    {
        std::string const text = std::string("[feather::") + op + "] " + msg;
        if (nvinfer1::ILogger* logger = loggerFinder().get())
        {
            logger->log(severity, text.c_str());
        }
        else if (severity <= nvinfer1::ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    }
    catch (...)
    {
        // Logging must never throw out of a noexcept TensorRT callback.
    }
}

inline bool isHiddenType(nvinfer1::DataType t) noexcept
{
    return t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF || t == nvinfer1::DataType::kBF16;
}

inline int32_t elementBytes(nvinfer1::DataType t) noexcept
{
    return t == nvinfer1::DataType::kFLOAT ? 4 : 2;
}

inline bool dimMatches(int64_t actual, int64_t expected) noexcept
{
    return actual < 0 || actual == expected; // -1 = not known yet (build phase)
}

inline bool isScalarLike(nvinfer1::Dims const& d) noexcept
{
    return d.nbDims == 0 || (d.nbDims == 1 && dimMatches(d.d[0], 1));
}

//! Read an integer plugin field (kINT32 as produced by the ONNX parser; kINT8/16/64 accepted too).
inline bool readIntField(nvinfer1::PluginField const& f, int32_t& value, std::string& error)
{
    using nvinfer1::PluginFieldType;
    if (f.data == nullptr || f.length < 1)
    {
        error = std::string("field '") + f.name + "' has no data";
        return false;
    }
    int64_t v = 0;
    switch (f.type)
    {
    case PluginFieldType::kINT32: v = *static_cast<int32_t const*>(f.data); break;
    case PluginFieldType::kINT64: v = *static_cast<int64_t const*>(f.data); break;
    case PluginFieldType::kINT16: v = *static_cast<int16_t const*>(f.data); break;
    case PluginFieldType::kINT8: v = *static_cast<int8_t const*>(f.data); break;
    default:
        error = std::string("field '") + f.name + "' must be an integer (kINT32)";
        return false;
    }
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
    {
        error = std::string("field '") + f.name + "' is out of int32 range";
        return false;
    }
    value = static_cast<int32_t>(v);
    return true;
}

constexpr char const* kPLUGIN_VERSION{"1"};
constexpr char const* kPLUGIN_NAMESPACE{"feather"};

//! What SelectTokens and SelectBalanced share as IPluginV3 (CRTP): capabilities, clone, names,
//! output count, configurePlugin / onShapeChange through Derived::checkDescs, attachToContext
//! and error reporting. Derived provides kOP_NAME, kNB_INPUTS, kNB_OUTPUTS and
//! bool checkDescs(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
//!                 int32_t nbOutputs, char const* where) const noexcept.
template <typename Derived>
class SelectPluginBase : public nvinfer1::IPluginV3,
                         public nvinfer1::IPluginV3OneCore,
                         public nvinfer1::IPluginV3OneBuild,
                         public nvinfer1::IPluginV3OneRuntime
{
public:
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        try
        {
            return new Derived(static_cast<Derived const&>(*this));
        }
        catch (std::exception const& e)
        {
            logError(std::string("clone failed: ") + e.what());
        }
        catch (...)
        {
            logError("clone failed");
        }
        return nullptr;
    }

    char const* getPluginName() const noexcept override
    {
        return Derived::kOP_NAME;
    }

    char const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return kPLUGIN_NAMESPACE;
    }

    int32_t getNbOutputs() const noexcept override
    {
        return Derived::kNB_OUTPUTS;
    }

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        if (in == nullptr || out == nullptr || nbInputs != Derived::kNB_INPUTS || nbOutputs != Derived::kNB_OUTPUTS)
        {
            reportError("configurePlugin: wrong number of inputs or outputs");
            return -1;
        }
        nvinfer1::PluginTensorDesc inDescs[Derived::kNB_INPUTS];
        nvinfer1::PluginTensorDesc outDescs[Derived::kNB_OUTPUTS];
        for (int32_t i = 0; i < Derived::kNB_INPUTS; ++i)
        {
            inDescs[i] = in[i].desc;
        }
        for (int32_t i = 0; i < Derived::kNB_OUTPUTS; ++i)
        {
            outDescs[i] = out[i].desc;
        }
        return derived().checkDescs(inDescs, nbInputs, outDescs, nbOutputs, "configurePlugin") ? 0 : -1;
    }

    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override
    {
        return derived().checkDescs(in, nbInputs, out, nbOutputs, "onShapeChange") ? 0 : -1;
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override
    {
        auto* cloned = static_cast<Derived*>(clone());
        if (cloned != nullptr)
        {
            cloned->mErrorRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
        }
        return cloned;
    }

protected:
    static void logError(std::string const& msg) noexcept
    {
        logOpMessage(Derived::kOP_NAME, nvinfer1::ILogger::Severity::kERROR, msg);
    }

    //! Log, and report to the execution context's error recorder when attached.
    void reportError(char const* msg) const noexcept
    {
        logError(msg);
        if (mErrorRecorder != nullptr)
        {
            mErrorRecorder->reportError(nvinfer1::ErrorCode::kFAILED_EXECUTION, msg);
        }
    }

    nvinfer1::IErrorRecorder* mErrorRecorder{nullptr};

private:
    Derived const& derived() const noexcept
    {
        return static_cast<Derived const&>(*this);
    }
};

//! The creator side both ops share: names, version, namespace and the advertised fields
//! (\p opName and the field list come from the derived creator's constructor).
class SelectCreatorBase : public nvinfer1::IPluginCreatorV3One
{
public:
    char const* getPluginName() const noexcept override
    {
        return mOpName;
    }

    char const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return kPLUGIN_NAMESPACE;
    }

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mFieldCollection;
    }

protected:
    SelectCreatorBase(char const* opName, std::vector<nvinfer1::PluginField> fields)
        : mOpName(opName)
        , mFieldNames(std::move(fields))
    {
        mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mFieldCollection.fields = mFieldNames.data();
    }

private:
    char const* mOpName;
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace plugin
} // namespace feather

#endif // FEATHER_PLUGIN_COMMON_H
