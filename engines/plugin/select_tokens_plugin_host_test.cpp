/*
 * CPU-only smoke test of libfeather_plugin.so through its exported entry points. Needs the
 * TensorRT headers to compile, but neither libnvinfer nor a GPU to run: it dlopen()s the
 * plugin library, calls setLoggerFinder()/getCreators(), and exercises the creator and the
 * build-time methods that do not need a TensorRT builder (no IExprBuilder, no enqueue).
 *
 * Usage: select_tokens_plugin_host_test /path/to/libfeather_plugin.so
 * Prints one line per check; exits 0 when all pass, 1 otherwise, 2 if the library cannot load.
 */
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

class CapturingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            last = msg != nullptr ? msg : "";
            ++count;
        }
    }
    std::string last;
    int count{0};
};

class TestLoggerFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &logger;
    }
    CapturingLogger logger;
};

int gFailures = 0;

void check(bool ok, std::string const& what, std::string const& detail = "")
{
    std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", what.c_str(), detail.empty() ? "" : " -- ", detail.c_str());
    if (!ok)
    {
        ++gFailures;
    }
}

struct Fields
{
    int32_t budget{144};
    int32_t n{576};
    int32_t side{24};
    int32_t stride{4};
    int32_t offset{0};
    std::string criterion{"feather"};
    bool withBudget{true};
    bool withN{true};
    bool withOffset{false}; // raster_offset is optional (default 0)
    std::vector<PluginField> list;
    PluginFieldCollection fc{};

    PluginFieldCollection const* build()
    {
        list.clear();
        if (withBudget)
        {
            list.emplace_back("budget", &budget, PluginFieldType::kINT32, 1);
        }
        if (withN)
        {
            list.emplace_back("num_image_tokens", &n, PluginFieldType::kINT32, 1);
        }
        list.emplace_back("grid_side", &side, PluginFieldType::kINT32, 1);
        list.emplace_back("grid_stride", &stride, PluginFieldType::kINT32, 1);
        if (withOffset)
        {
            list.emplace_back("raster_offset", &offset, PluginFieldType::kINT32, 1);
        }
        list.emplace_back("criterion", criterion.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(criterion.size() + 1));
        fc.nbFields = static_cast<int32_t>(list.size());
        fc.fields = list.data();
        return &fc;
    }
};

DynamicPluginTensorDesc desc(DataType t, std::vector<int64_t> const& dims)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = t;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.scale = -1.0F;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t k = 0; k < dims.size(); ++k)
    {
        d.desc.dims.d[k] = dims[k];
    }
    d.min = d.desc.dims;
    d.max = d.desc.dims;
    d.opt = d.desc.dims;
    return d;
}

int32_t readInt(PluginFieldCollection const* fc, char const* name)
{
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        if (std::strcmp(fc->fields[i].name, name) == 0 && fc->fields[i].type == PluginFieldType::kINT32)
        {
            return *static_cast<int32_t const*>(fc->fields[i].data);
        }
    }
    return -12345;
}

// ---------------------------------------------------------------- SelectBalanced (BTP)

struct BalancedFields
{
    int32_t budget{288};
    int32_t n{576};
    int32_t attention{86};
    int32_t pool{318};
    bool withPool{true};
    std::vector<PluginField> list;
    PluginFieldCollection fc{};

    PluginFieldCollection const* build()
    {
        list.clear();
        list.emplace_back("budget", &budget, PluginFieldType::kINT32, 1);
        list.emplace_back("num_image_tokens", &n, PluginFieldType::kINT32, 1);
        list.emplace_back("attention_count", &attention, PluginFieldType::kINT32, 1);
        if (withPool)
        {
            list.emplace_back("candidate_count", &pool, PluginFieldType::kINT32, 1);
        }
        fc.nbFields = static_cast<int32_t>(list.size());
        fc.fields = list.data();
        return &fc;
    }
};

void checkSelectBalanced(IPluginCreatorInterface* iface, TestLoggerFinder& finder)
{
    check(std::strcmp(iface->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0,
        "SelectBalanced creator is an IPluginCreatorV3One");
    auto* creator = static_cast<IPluginCreatorV3One*>(iface);
    check(std::strcmp(creator->getPluginName(), "SelectBalanced") == 0
            && std::strcmp(creator->getPluginVersion(), "1") == 0
            && std::strcmp(creator->getPluginNamespace(), "feather") == 0,
        "SelectBalanced name/version/namespace");
    check(creator->getFieldNames() != nullptr && creator->getFieldNames()->nbFields == 4,
        "SelectBalanced advertises 4 fields");
    struct BadCase
    {
        char const* label;
        void (*mutate)(BalancedFields&);
    };
    BadCase const bad[] = {
        {"budget 0 (a 0-count stage has no node)", [](BalancedFields& f) { f.budget = 0; }},
        {"budget > N", [](BalancedFields& f) { f.budget = 577; }},
        {"attention_count > budget", [](BalancedFields& f) { f.attention = 289; }},
        {"candidate_count < attention_count", [](BalancedFields& f) { f.pool = 85; }},
        {"candidate_count > N", [](BalancedFields& f) { f.pool = 577; }},
        {"missing candidate_count", [](BalancedFields& f) { f.withPool = false; }},
    };
    for (auto const& b : bad)
    {
        BalancedFields f;
        b.mutate(f);
        int const before = finder.logger.count;
        IPluginV3* p = creator->createPlugin("bad", f.build(), TensorRTPhase::kBUILD);
        check(p == nullptr && finder.logger.count > before, std::string("SelectBalanced rejects ") + b.label,
            finder.logger.last);
        delete p;
    }
    BalancedFields good;
    IPluginV3* plugin = creator->createPlugin("balanced", good.build(), TensorRTPhase::kBUILD);
    check(plugin != nullptr, "SelectBalanced plugin for budget=288 N=576 m=86 pool=318");
    if (plugin == nullptr)
    {
        return;
    }
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(build != nullptr && runtime != nullptr && build->getNbOutputs() == 3, "SelectBalanced capabilities, 3 outputs");
    {
        DataType in[6] = {DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kBF16, DataType::kINT64,
            DataType::kINT64};
        DataType out[3] = {};
        check(build->getOutputDataTypes(out, 3, in, 6) == 0 && out[0] == DataType::kINT64 && out[1] == DataType::kBF16
                && out[2] == DataType::kINT64,
            "SelectBalanced output types follow hidden");
    }
    int64_t const S = 35 + 576 + 20;
    int64_t const Sout = S - 576 + 288;
    std::vector<DynamicPluginTensorDesc> io = {desc(DataType::kFLOAT, {576}), desc(DataType::kFLOAT, {576, 2048}),
        desc(DataType::kFLOAT, {576}), desc(DataType::kHALF, {1, S, 2048}), desc(DataType::kINT64, {1, S}),
        desc(DataType::kINT64, {}), desc(DataType::kINT64, {288}), desc(DataType::kHALF, {1, Sout, 2048}),
        desc(DataType::kINT64, {1, Sout})};
    bool allSupported = true;
    for (int32_t pos = 0; pos < 9; ++pos)
    {
        allSupported = allSupported && build->supportsFormatCombination(pos, io.data(), 6, 3);
    }
    check(allSupported, "SelectBalanced supportsFormatCombination accepts the fp16 combination");
    {
        auto wrong = io;
        wrong[1].desc.type = DataType::kHALF;
        check(!build->supportsFormatCombination(1, wrong.data(), 6, 3), "SelectBalanced features must be float32");
    }
    check(build->configurePlugin(io.data(), 6, io.data() + 6, 3) == 0, "SelectBalanced configurePlugin");
    {
        auto bad = io;
        bad[2].desc.dims.d[0] = 575;
        check(build->configurePlugin(bad.data(), 6, bad.data() + 6, 3) != 0,
            "SelectBalanced configurePlugin rejects seed_priority != N");
    }
    check(build->getWorkspaceSize(io.data(), 6, io.data() + 6, 3) >= 576u * 576u * 4u + 576u * 2048u * 4u,
        "SelectBalanced workspace holds D and the unit rows");
    PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
    check(ser != nullptr && readInt(ser, "budget") == 288 && readInt(ser, "attention_count") == 86
            && readInt(ser, "candidate_count") == 318 && readInt(ser, "num_image_tokens") == 576,
        "SelectBalanced getFieldsToSerialize");
    IPluginV3* restored = creator->createPlugin("restored", ser, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, "SelectBalanced rebuilt from serialized fields");
    delete restored;
    delete plugin;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libfeather_plugin.so\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 2;
    }
    using GetCreatorsFn = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinderFn = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreatorsFn>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinderFn>(dlsym(lib, "setLoggerFinder"));
    check(getCreators != nullptr, "exports getCreators");
    check(setLoggerFinder != nullptr, "exports setLoggerFinder");
    check(dlsym(lib, "getPluginCreators") == nullptr, "does not export the V2-only getPluginCreators");
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        return 1;
    }
    TestLoggerFinder finder;
    setLoggerFinder(&finder);

    int32_t nb = 0;
    IPluginCreatorInterface* const* creators = getCreators(nb);
    check(nb == 2 && creators != nullptr && creators[0] != nullptr && creators[1] != nullptr,
        "getCreators returns two creators (SelectTokens, SelectBalanced)");
    if (nb != 2 || creators == nullptr || creators[0] == nullptr || creators[1] == nullptr)
    {
        return 1;
    }
    checkSelectBalanced(creators[1], finder);
    InterfaceInfo const info = creators[0]->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1,
        "creator is an IPluginCreatorV3One", info.kind);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), "SelectTokens") == 0, "plugin name SelectTokens");
    check(std::strcmp(creator->getPluginVersion(), "1") == 0, "plugin version 1");
    check(std::strcmp(creator->getPluginNamespace(), "feather") == 0, "plugin namespace feather");
    PluginFieldCollection const* names = creator->getFieldNames();
    check(names != nullptr && names->nbFields == 6, "creator advertises 6 fields");

    // --- invalid attribute sets must return nullptr and log an error (never crash)
    struct BadCase
    {
        char const* label;
        void (*mutate)(Fields&);
    };
    BadCase const bad[] = {
        {"budget 0", [](Fields& f) { f.budget = 0; }},
        {"budget > N", [](Fields& f) { f.budget = 577; }},
        {"N 0", [](Fields& f) { f.n = 0; }},
        {"negative grid_side", [](Fields& f) { f.side = -1; }},
        {"stride without side", [](Fields& f) { f.side = 0; }},
        {"|G| > budget", [](Fields& f) { f.budget = 10; }},
        {"missing budget", [](Fields& f) { f.withBudget = false; }},
        {"missing num_image_tokens", [](Fields& f) { f.withN = false; }},
        {"negative raster_offset", [](Fields& f) {
             f.withOffset = true;
             f.offset = -1;
         }},
        {"raster_offset > N", [](Fields& f) {
             f.withOffset = true;
             f.offset = 577;
         }},
    };
    for (auto const& b : bad)
    {
        Fields f;
        b.mutate(f);
        int const before = finder.logger.count;
        IPluginV3* p = creator->createPlugin("bad", f.build(), TensorRTPhase::kBUILD);
        check(p == nullptr && finder.logger.count > before, std::string("rejects ") + b.label, finder.logger.last);
        delete p;
    }
    check(creator->createPlugin("null", nullptr, TensorRTPhase::kBUILD) == nullptr, "rejects null field collection");
    {
        Fields f;
        f.build();
        f.list[0].type = PluginFieldType::kFLOAT32;
        check(creator->createPlugin("float", &f.fc, TensorRTPhase::kBUILD) == nullptr, "rejects float budget field");
    }

    // --- a CLS image token before the 24 x 24 raster (strategy full): N = 577, raster_offset 1
    {
        Fields cls;
        cls.n = 577;
        cls.withOffset = true;
        cls.offset = 1;
        IPluginV3* p = creator->createPlugin("cls", cls.build(), TensorRTPhase::kBUILD);
        check(p != nullptr, "creates plugin for N=577 raster_offset=1");
        if (p != nullptr)
        {
            auto* rt = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
            PluginFieldCollection const* ser = rt->getFieldsToSerialize();
            check(ser != nullptr && readInt(ser, "raster_offset") == 1 && readInt(ser, "num_image_tokens") == 577,
                "serializes raster_offset");
            delete p;
        }
    }

    // --- valid plugin
    Fields good;
    IPluginV3* plugin = creator->createPlugin("select", good.build(), TensorRTPhase::kBUILD);
    check(plugin != nullptr, "creates plugin for budget=144 N=576 side=24 stride=4 (|G|=36)");
    if (plugin == nullptr)
    {
        return 1;
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core != nullptr && build != nullptr && runtime != nullptr, "exposes core/build/runtime capabilities");
    check(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0
            && std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        "capability interface kinds");
    check(std::strcmp(core->getPluginName(), "SelectTokens") == 0
            && std::strcmp(core->getPluginNamespace(), "feather") == 0,
        "core name/namespace");
    check(build->getNbOutputs() == 3, "3 outputs");

    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        DataType in[4] = {DataType::kFLOAT, t, DataType::kINT64, DataType::kINT64};
        DataType out[3] = {};
        int32_t const rc = build->getOutputDataTypes(out, 3, in, 4);
        check(rc == 0 && out[0] == DataType::kINT64 && out[1] == t && out[2] == DataType::kINT64,
            "output types for hidden type " + std::to_string(static_cast<int>(t)));
    }
    {
        DataType in[4] = {DataType::kFLOAT, DataType::kINT32, DataType::kINT64, DataType::kINT64};
        DataType out[3] = {};
        check(build->getOutputDataTypes(out, 3, in, 4) != 0, "rejects int32 hidden in getOutputDataTypes");
    }

    int64_t const S = 35 + 576 + 20;
    int64_t const Sout = S - 576 + 144;
    std::vector<DynamicPluginTensorDesc> io = {desc(DataType::kFLOAT, {576}), desc(DataType::kHALF, {1, S, 4096}),
        desc(DataType::kINT64, {1, S}), desc(DataType::kINT64, {}), desc(DataType::kINT64, {144}),
        desc(DataType::kHALF, {1, Sout, 4096}), desc(DataType::kINT64, {1, Sout})};
    bool allSupported = true;
    for (int32_t pos = 0; pos < 7; ++pos)
    {
        allSupported = allSupported && build->supportsFormatCombination(pos, io.data(), 4, 3);
    }
    check(allSupported, "supportsFormatCombination accepts the fp16 combination");
    {
        auto wrong = io;
        wrong[5].desc.type = DataType::kFLOAT;
        check(!build->supportsFormatCombination(5, wrong.data(), 4, 3), "hidden_out must follow hidden's type");
        wrong = io;
        wrong[2].desc.type = DataType::kINT32;
        check(!build->supportsFormatCombination(2, wrong.data(), 4, 3), "position_ids must be int64");
        wrong = io;
        wrong[1].desc.format = TensorFormat::kHWC8;
        check(!build->supportsFormatCombination(1, wrong.data(), 4, 3), "only linear format");
    }
    check(build->configurePlugin(io.data(), 4, io.data() + 4, 3) == 0, "configurePlugin accepts consistent shapes");
    {
        auto dyn = io;
        dyn[1].desc.dims.d[1] = -1;
        dyn[2].desc.dims.d[1] = -1;
        dyn[5].desc.dims.d[1] = -1;
        dyn[6].desc.dims.d[1] = -1;
        check(build->configurePlugin(dyn.data(), 4, dyn.data() + 4, 3) == 0, "configurePlugin accepts dynamic S");
        auto badN = io;
        badN[0].desc.dims.d[0] = 575;
        check(build->configurePlugin(badN.data(), 4, badN.data() + 4, 3) != 0, "configurePlugin rejects scores != N");
        auto badOut = io;
        badOut[5].desc.dims.d[1] = Sout + 1;
        check(build->configurePlugin(badOut.data(), 4, badOut.data() + 4, 3) != 0,
            "configurePlugin rejects wrong hidden_out rows");
    }
    check(build->getWorkspaceSize(io.data(), 4, io.data() + 4, 3) >= 576 * sizeof(int32_t), "workspace size");
    {
        PluginTensorDesc rt[7];
        for (int32_t i = 0; i < 7; ++i)
        {
            rt[i] = io[i].desc;
        }
        check(runtime->onShapeChange(rt, 4, rt + 4, 3) == 0, "onShapeChange accepts runtime shapes");
        rt[2].dims.d[1] = S - 1;
        check(runtime->onShapeChange(rt, 4, rt + 4, 3) != 0, "onShapeChange rejects mismatched position_ids");
    }

    // --- serialization round trip (runtime phase)
    PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
    check(ser != nullptr && readInt(ser, "budget") == 144 && readInt(ser, "num_image_tokens") == 576
            && readInt(ser, "grid_side") == 24 && readInt(ser, "grid_stride") == 4 && readInt(ser, "raster_offset") == 0,
        "getFieldsToSerialize");
    IPluginV3* restored = creator->createPlugin("restored", ser, TensorRTPhase::kRUNTIME);
    check(restored != nullptr, "creator rebuilds plugin from serialized fields");
    if (restored != nullptr)
    {
        auto* rrt = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        PluginFieldCollection const* ser2 = rrt->getFieldsToSerialize();
        check(readInt(ser2, "budget") == 144 && readInt(ser2, "grid_stride") == 4, "round trip keeps fields");
        delete restored;
    }
    IPluginV3* cloned = plugin->clone();
    check(cloned != nullptr && cloned != plugin, "clone");
    delete cloned;
    IPluginV3* attached = runtime->attachToContext(nullptr);
    check(attached != nullptr, "attachToContext(nullptr) clones");
    delete attached;
    delete plugin;

    std::printf("%s: %d failure(s)\n", gFailures == 0 ? "OK" : "FAILED", gFailures);
    // The library is deliberately not dlclose()d: creators are function-local statics.
    return gFailures == 0 ? 0 : 1;
}
