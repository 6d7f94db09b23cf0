/*
 * Standalone test for the SelectTokens CUDA kernels (no TensorRT needed).
 *
 * For every case it runs feather_select_tokens + feather_gather_rows on the GPU and compares,
 * bit for bit, with a CPU reference written independently below (plain float comparisons
 * and std::sort, not the kernel's integer keys). Prints one line per case, exits 0 when all
 * pass, 1 on any mismatch, 2 on a CUDA/runtime problem, 77 when no usable CUDA device is
 * present (the host-only checks still run first; 77 is CTest's SKIP_RETURN_CODE here).
 *
 * Usage:
 *   select_tokens_kernel_test [--seed S] [--random K] [--cases FILE] [--quiet]
 *   select_tokens_kernel_test --reference FILE     (CPU only: print the CPU reference's kept
 *                                                   indices, one line per case, and exit)
 * FILE: one case per line, '#' starts a comment:
 *   n budget grid_side grid_stride raster_offset s_0 s_1 ... s_{n-1}
 * (scores parsed with strtof, so "nan", "inf", "-inf", "-0" are accepted; raster_offset: image
 * tokens before the raster, e.g. 1 for a CLS under strategy "full", never on the grid).
 */
#include "select_tokens_kernel.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace
{

struct Case
{
    std::string name;
    int32_t n{0};
    int32_t budget{0};
    int32_t gridSide{0};
    int32_t gridStride{0};
    int32_t rasterOffset{0};
    std::vector<float> scores;
};

// ---------------------------------------------------------------- CPU reference

// Token i is raster token r = i - offset; the offset tokens before the raster are never on the grid.
bool refIsGrid(int32_t i, int32_t side, int32_t stride, int32_t offset)
{
    int32_t const r = i - offset;
    if (stride <= 0 || r < 0)
    {
        return false;
    }
    return ((r / side) % stride == 0) && ((r % side) % stride == 0);
}

// true when token a (score sa) ranks before token b (score sb).
// NaN is below everything, NaNs tie with each other; -0 == +0 by IEEE equality; ties -> lower index.
bool refBefore(float sa, int32_t a, float sb, int32_t b)
{
    bool const na = std::isnan(sa);
    bool const nb = std::isnan(sb);
    if (na != nb)
    {
        return nb; // the non-NaN one goes first
    }
    if (!na && sa != sb)
    {
        return sa > sb;
    }
    return a < b;
}

std::vector<int64_t> refSelect(Case const& c)
{
    std::vector<int64_t> kept;
    std::vector<int32_t> others;
    for (int32_t i = 0; i < c.n; ++i)
    {
        if (refIsGrid(i, c.gridSide, c.gridStride, c.rasterOffset))
        {
            kept.push_back(i);
        }
        else
        {
            others.push_back(i);
        }
    }
    std::sort(others.begin(), others.end(),
        [&](int32_t a, int32_t b) { return refBefore(c.scores[a], a, c.scores[b], b); });
    size_t const quota = static_cast<size_t>(c.budget) - kept.size();
    for (size_t k = 0; k < quota && k < others.size(); ++k)
    {
        kept.push_back(others[k]);
    }
    std::sort(kept.begin(), kept.end());
    return kept;
}

std::vector<uint8_t> refGather(std::vector<uint8_t> const& src, int64_t seqLen, int64_t rowBytes, int32_t n,
    int32_t budget, int64_t imageStart, std::vector<int64_t> const& kept)
{
    int64_t const outRows = seqLen - n + budget;
    std::vector<uint8_t> out(static_cast<size_t>(outRows * rowBytes));
    for (int64_t j = 0; j < outRows; ++j)
    {
        int64_t srcRow;
        if (j < imageStart)
        {
            srcRow = j;
        }
        else if (j < imageStart + budget)
        {
            srcRow = imageStart + kept[static_cast<size_t>(j - imageStart)];
        }
        else
        {
            srcRow = j + n - budget;
        }
        std::memcpy(out.data() + j * rowBytes, src.data() + srcRow * rowBytes, static_cast<size_t>(rowBytes));
    }
    return out;
}

// ---------------------------------------------------------------- GPU helpers

#define CUDA_OR_FAIL(expr)                                                                                             \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t const e_ = (expr);                                                                                 \
        if (e_ != cudaSuccess)                                                                                         \
        {                                                                                                              \
            std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__,             \
                cudaGetErrorString(e_));                                                                               \
            std::exit(2);                                                                                              \
        }                                                                                                              \
    } while (0)

template <typename T>
cudaError_t devAlloc(T** ptr, size_t bytes)
{
    return cudaMalloc(reinterpret_cast<void**>(ptr), bytes);
}

template <typename T>
T* deviceCopy(std::vector<T> const& host)
{
    T* d = nullptr;
    CUDA_OR_FAIL(devAlloc(&d, std::max<size_t>(1, host.size()) * sizeof(T)));
    if (!host.empty())
    {
        CUDA_OR_FAIL(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    return d;
}

template <typename T>
std::vector<T> hostCopy(T const* d, size_t count)
{
    std::vector<T> h(count);
    if (count > 0)
    {
        CUDA_OR_FAIL(cudaMemcpy(h.data(), d, count * sizeof(T), cudaMemcpyDeviceToHost));
    }
    return h;
}

std::string formatIndices(std::vector<int64_t> const& v, size_t at)
{
    std::ostringstream os;
    size_t const lo = at > 3 ? at - 3 : 0;
    size_t const hi = std::min(v.size(), at + 4);
    for (size_t k = lo; k < hi; ++k)
    {
        os << (k == at ? "[" : "") << v[k] << (k == at ? "]" : "") << (k + 1 < hi ? "," : "");
    }
    return os.str();
}

// Run one selection case (+ gather checks for several element sizes). Returns true on pass.
bool runCase(Case const& c, std::mt19937_64& rng, cudaStream_t stream, bool quiet)
{
    std::vector<int64_t> const want = refSelect(c);
    int32_t const forced = feather_forced_grid_count(c.n, c.gridSide, c.gridStride, c.rasterOffset);

    float* dScores = deviceCopy(c.scores);
    int64_t* dKept = nullptr;
    CUDA_OR_FAIL(devAlloc(&dKept, static_cast<size_t>(c.budget) * sizeof(int64_t)));
    CUDA_OR_FAIL(cudaMemset(dKept, 0xFF, static_cast<size_t>(c.budget) * sizeof(int64_t)));
    size_t const wsBytes = feather_select_workspace_bytes(c.n);
    void* dWs = nullptr;
    CUDA_OR_FAIL(devAlloc(&dWs, std::max<size_t>(wsBytes, 1)));

    std::string failure;
    int const st = feather_select_tokens(
        dScores, c.n, c.budget, c.gridSide, c.gridStride, c.rasterOffset, dKept, dWs, wsBytes, stream);
    if (st != FEATHER_SELECT_OK)
    {
        failure = std::string("feather_select_tokens returned ") + feather_select_status_string(st);
    }
    CUDA_OR_FAIL(cudaStreamSynchronize(stream));
    std::vector<int64_t> got = hostCopy(dKept, static_cast<size_t>(c.budget));
    if (failure.empty())
    {
        for (size_t k = 0; k < want.size(); ++k)
        {
            if (got[k] != want[k])
            {
                failure = "kept[" + std::to_string(k) + "] got " + formatIndices(got, k) + " want "
                    + formatIndices(want, k);
                break;
            }
        }
    }

    // Gather checks: [1, S, D] with S = prefix + N + suffix, several element sizes and widths.
    struct GatherSpec
    {
        int32_t elemBytes;
        int64_t cols;
        char const* label;
    };
    std::vector<GatherSpec> const specs = {
        {2, 64, "fp16/bf16 D=64"}, {4, 33, "fp32 D=33"}, {2, 7, "16-bit D=7"}, {8, 1, "int64 positions"}};
    int64_t const prefix = std::uniform_int_distribution<int64_t>(0, 40)(rng);
    int64_t const suffix = std::uniform_int_distribution<int64_t>(0, 40)(rng);
    int64_t const seqLen = prefix + c.n + suffix;
    for (auto const& g : specs)
    {
        if (!failure.empty())
        {
            break;
        }
        int64_t const rowBytes = g.cols * g.elemBytes;
        std::vector<uint8_t> src(static_cast<size_t>(seqLen * rowBytes));
        for (auto& b : src)
        {
            b = static_cast<uint8_t>(rng());
        }
        int64_t const outRows = seqLen - c.n + c.budget;
        uint8_t* dSrc = deviceCopy(src);
        uint8_t* dDst = nullptr;
        CUDA_OR_FAIL(devAlloc(&dDst, std::max<size_t>(1, static_cast<size_t>(outRows * rowBytes))));
        int64_t* dStart = deviceCopy(std::vector<int64_t>{prefix});
        int const gs = feather_gather_rows(
            dSrc, dDst, seqLen, g.cols, g.elemBytes, c.n, c.budget, dStart, dKept, stream);
        CUDA_OR_FAIL(cudaStreamSynchronize(stream));
        if (gs != FEATHER_SELECT_OK)
        {
            failure = std::string("feather_gather_rows(") + g.label + ") returned " + feather_select_status_string(gs);
        }
        else
        {
            std::vector<uint8_t> const gotRows = hostCopy(dDst, static_cast<size_t>(outRows * rowBytes));
            std::vector<uint8_t> const wantRows = refGather(src, seqLen, rowBytes, c.n, c.budget, prefix, want);
            if (gotRows != wantRows)
            {
                size_t k = 0;
                while (gotRows[k] == wantRows[k])
                {
                    ++k;
                }
                failure = std::string("gather ") + g.label + " mismatch at out row " + std::to_string(k / rowBytes);
            }
        }
        CUDA_OR_FAIL(cudaFree(dSrc));
        CUDA_OR_FAIL(cudaFree(dDst));
        CUDA_OR_FAIL(cudaFree(dStart));
    }

    CUDA_OR_FAIL(cudaFree(dScores));
    CUDA_OR_FAIL(cudaFree(dKept));
    CUDA_OR_FAIL(cudaFree(dWs));

    bool const ok = failure.empty();
    if (!ok || !quiet)
    {
        std::printf("%s %-28s N=%-5d B=%-5d side=%-3d stride=%-2d offset=%-2d |G|=%-4d S=%-5lld %s\n",
            ok ? "PASS" : "FAIL", c.name.c_str(), c.n, c.budget, c.gridSide, c.gridStride, c.rasterOffset, forced,
            static_cast<long long>(seqLen), failure.c_str());
    }
    return ok;
}

// ---------------------------------------------------------------- case generation

std::vector<float> randomScores(int32_t n, std::mt19937_64& rng)
{
    std::normal_distribution<float> d(0.0f, 1.0f);
    std::vector<float> s(static_cast<size_t>(n));
    for (auto& x : s)
    {
        x = d(rng);
    }
    return s;
}

std::vector<float> tiedScores(int32_t n, int32_t levels, std::mt19937_64& rng)
{
    std::uniform_int_distribution<int32_t> d(0, levels - 1);
    std::vector<float> s(static_cast<size_t>(n));
    for (auto& x : s)
    {
        x = static_cast<float>(d(rng)) * 0.25f;
    }
    return s;
}

Case makeCase(std::string name, int32_t n, int32_t budget, int32_t side, int32_t stride, std::vector<float> scores,
    int32_t offset = 0)
{
    Case c;
    c.name = std::move(name);
    c.n = n;
    c.budget = budget;
    c.gridSide = side;
    c.gridStride = stride;
    c.rasterOffset = offset;
    c.scores = std::move(scores);
    return c;
}

std::vector<Case> builtinCases(std::mt19937_64& rng)
{
    float const nan = std::numeric_limits<float>::quiet_NaN();
    float const inf = std::numeric_limits<float>::infinity();
    std::vector<Case> cases;
    cases.push_back(makeCase("random_no_grid", 576, 144, 24, 0, randomScores(576, rng)));
    cases.push_back(makeCase("random_grid_s4", 576, 144, 24, 4, randomScores(576, rng)));
    cases.push_back(makeCase("ties_4_levels_grid", 576, 100, 24, 3, tiedScores(576, 4, rng)));
    cases.push_back(makeCase("ties_2_levels", 576, 288, 24, 0, tiedScores(576, 2, rng)));
    cases.push_back(makeCase("all_equal", 576, 100, 24, 0, std::vector<float>(576, 1.5f)));
    cases.push_back(makeCase("all_equal_grid", 576, 100, 24, 4, std::vector<float>(576, -3.0f)));
    cases.push_back(makeCase("all_equal_budget1", 576, 1, 24, 0, std::vector<float>(576, 0.0f)));
    cases.push_back(makeCase("budget_eq_N", 576, 576, 24, 2, randomScores(576, rng)));
    {
        int32_t const g = feather_forced_grid_count(576, 24, 4, 0);
        cases.push_back(makeCase("grid_only_budget_eq_G", 576, g, 24, 4, randomScores(576, rng)));
    }
    {
        int32_t const g = feather_forced_grid_count(576, 24, 1, 0);
        cases.push_back(makeCase("stride1_all_grid", 576, g, 24, 1, randomScores(576, rng)));
    }
    // a CLS image token before the 24 x 24 raster (strategy "full"): N = 577, raster_offset 1
    cases.push_back(makeCase("cls_random_grid_s3", 577, 144, 24, 3, randomScores(577, rng), 1));
    cases.push_back(makeCase("cls_all_equal_grid", 577, 100, 24, 4, std::vector<float>(577, 0.5f), 1));
    {
        int32_t const g = feather_forced_grid_count(577, 24, 3, 1);
        std::vector<float> s = randomScores(577, rng);
        s[0] = 100.0f; // the CLS scores highest but the quota is 0: only the grid is kept
        cases.push_back(makeCase("cls_grid_only_budget_eq_G", 577, g, 24, 3, s, 1));
    }
    {
        std::vector<float> s = tiedScores(257, 3, rng);
        s[0] = -inf; // the CLS scores lowest and is never forced
        cases.push_back(makeCase("cls_lowest_not_forced", 257, 200, 16, 2, s, 1));
    }
    cases.push_back(makeCase("two_before_raster", 66, 20, 8, 3, randomScores(66, rng), 2));
    {
        std::vector<float> s = randomScores(300, rng);
        for (int32_t i = 0; i < 300; i += 7)
        {
            s[static_cast<size_t>(i)] = nan;
        }
        for (int32_t i = 3; i < 300; i += 11)
        {
            s[static_cast<size_t>(i)] = (i % 2) ? inf : -inf;
        }
        for (int32_t i = 5; i < 300; i += 13)
        {
            s[static_cast<size_t>(i)] = (i % 2) ? -0.0f : 0.0f;
        }
        cases.push_back(makeCase("nan_inf_signed_zero", 300, 120, 0, 0, s));
        cases.push_back(makeCase("nan_inf_budget_all", 300, 300, 0, 0, s));
    }
    {
        std::vector<float> s(64, nan);
        cases.push_back(makeCase("all_nan", 64, 10, 8, 0, s));
        s[40] = -inf;
        s[50] = -inf;
        cases.push_back(makeCase("nan_below_neg_inf", 64, 3, 8, 0, s));
    }
    {
        std::vector<float> s(100);
        for (int32_t i = 0; i < 100; ++i)
        {
            s[static_cast<size_t>(i)] = (i % 2) ? -0.0f : 0.0f;
        }
        cases.push_back(makeCase("signed_zero_ties", 100, 37, 10, 0, s));
    }
    cases.push_back(makeCase("n1_b1", 1, 1, 1, 1, {0.5f}));
    cases.push_back(makeCase("n1_b1_nogrid", 1, 1, 0, 0, {nan}));
    cases.push_back(makeCase("n_not_square_grid", 2880, 720, 48, 2, tiedScores(2880, 50, rng)));
    cases.push_back(makeCase("partial_last_row_grid", 1000, 300, 48, 3, randomScores(1000, rng)));
    cases.push_back(makeCase("large_ties", 5000, 1234, 70, 5, tiedScores(5000, 17, rng)));
    cases.push_back(makeCase("large_random", 4096, 1024, 64, 8, randomScores(4096, rng)));
    cases.push_back(makeCase("chunk_boundary_1025", 1025, 513, 0, 0, tiedScores(1025, 3, rng)));
    return cases;
}

std::vector<Case> randomCases(int32_t count, std::mt19937_64& rng)
{
    std::vector<Case> cases;
    for (int32_t k = 0; k < count; ++k)
    {
        int32_t const n = std::uniform_int_distribution<int32_t>(1, 3000)(rng);
        int32_t side = std::uniform_int_distribution<int32_t>(0, 64)(rng);
        int32_t stride = side > 0 ? std::uniform_int_distribution<int32_t>(0, 6)(rng) : 0;
        int32_t const offset = std::uniform_int_distribution<int32_t>(0, 2)(rng);
        int32_t const forced = feather_forced_grid_count(n, side, stride, offset);
        int32_t const budget = std::uniform_int_distribution<int32_t>(std::max(1, forced), n)(rng);
        int32_t const levels = std::uniform_int_distribution<int32_t>(1, 40)(rng);
        std::vector<float> s = (k % 3 == 0) ? randomScores(n, rng) : tiedScores(n, levels, rng);
        cases.push_back(makeCase("random_" + std::to_string(k), n, budget, side, stride, std::move(s), offset));
    }
    return cases;
}

bool readCases(std::string const& path, std::vector<Case>& out)
{
    std::ifstream in(path);
    if (!in)
    {
        std::fprintf(stderr, "cannot open case file %s\n", path.c_str());
        return false;
    }
    std::string line;
    int32_t lineNo = 0;
    while (std::getline(in, line))
    {
        ++lineNo;
        auto const hash = line.find('#');
        if (hash != std::string::npos)
        {
            line.resize(hash);
        }
        std::istringstream is(line);
        std::vector<std::string> tok;
        std::string t;
        while (is >> t)
        {
            tok.push_back(t);
        }
        if (tok.empty())
        {
            continue;
        }
        if (tok.size() < 5)
        {
            std::fprintf(stderr, "%s:%d: expected 'n budget grid_side grid_stride raster_offset scores...'\n",
                path.c_str(), lineNo);
            return false;
        }
        Case c;
        c.name = "file_line_" + std::to_string(lineNo);
        c.n = std::atoi(tok[0].c_str());
        c.budget = std::atoi(tok[1].c_str());
        c.gridSide = std::atoi(tok[2].c_str());
        c.gridStride = std::atoi(tok[3].c_str());
        c.rasterOffset = std::atoi(tok[4].c_str());
        for (size_t k = 5; k < tok.size(); ++k)
        {
            c.scores.push_back(std::strtof(tok[k].c_str(), nullptr));
        }
        int32_t const forced = feather_forced_grid_count(c.n, c.gridSide, c.gridStride, c.rasterOffset);
        if (c.n < 1 || static_cast<size_t>(c.n) != c.scores.size() || c.budget < 1 || c.budget > c.n || forced < 0
            || forced > c.budget)
        {
            std::fprintf(stderr, "%s:%d: invalid case (n=%d, %zu scores, budget=%d, |G|=%d)\n", path.c_str(), lineNo,
                c.n, c.scores.size(), c.budget, forced);
            return false;
        }
        out.push_back(std::move(c));
    }
    return true;
}

// Host-only checks: |G| closed form vs brute force, argument validation (no launches happen).
bool hostChecks()
{
    bool ok = true;
    for (int32_t n : {0, 1, 5, 24, 576, 577, 1000, 2880})
    {
        for (int32_t side : {1, 3, 24, 48})
        {
            for (int32_t stride : {0, 1, 2, 3, 4, 7})
            {
                for (int32_t offset : {0, 1, 2, 5, 3000})
                {
                    int32_t brute = 0;
                    for (int32_t i = 0; i < n; ++i)
                    {
                        brute += refIsGrid(i, side, stride, offset) ? 1 : 0;
                    }
                    int32_t const got = feather_forced_grid_count(n, side, stride, offset);
                    if (brute != got)
                    {
                        std::printf("FAIL grid_count n=%d side=%d stride=%d offset=%d got %d want %d\n", n, side,
                            stride, offset, got, brute);
                        ok = false;
                    }
                }
            }
        }
    }
    if (feather_forced_grid_count(16, 4, 2, -1) != -1)
    {
        std::printf("FAIL grid_count accepts a negative raster_offset\n");
        ok = false;
    }
    float dummyScore = 0.0f;
    int64_t dummyKept = 0;
    char ws[1024];
    auto expect = [&](char const* what, int got, int want) {
        if (got != want)
        {
            std::printf("FAIL %s: got %s want %s\n", what, feather_select_status_string(got),
                feather_select_status_string(want));
            ok = false;
        }
    };
    expect("budget 0", feather_select_tokens(&dummyScore, 4, 0, 0, 0, 0, &dummyKept, ws, sizeof(ws), nullptr),
        FEATHER_SELECT_ERR_INVALID_ARGUMENT);
    expect("budget > n", feather_select_tokens(&dummyScore, 4, 5, 0, 0, 0, &dummyKept, ws, sizeof(ws), nullptr),
        FEATHER_SELECT_ERR_INVALID_ARGUMENT);
    expect("|G| > budget", feather_select_tokens(&dummyScore, 16, 3, 4, 2, 0, &dummyKept, ws, sizeof(ws), nullptr),
        FEATHER_SELECT_ERR_INVALID_ARGUMENT);
    expect("|G| > budget after the offset",
        feather_select_tokens(&dummyScore, 17, 3, 4, 2, 1, &dummyKept, ws, sizeof(ws), nullptr),
        FEATHER_SELECT_ERR_INVALID_ARGUMENT);
    expect("negative raster_offset",
        feather_select_tokens(&dummyScore, 16, 8, 4, 2, -1, &dummyKept, ws, sizeof(ws), nullptr),
        FEATHER_SELECT_ERR_INVALID_ARGUMENT);
    expect("stride without side",
        feather_select_tokens(&dummyScore, 16, 8, 0, 2, 0, &dummyKept, ws, sizeof(ws), nullptr),
        FEATHER_SELECT_ERR_INVALID_ARGUMENT);
    expect("workspace too small",
        feather_select_tokens(&dummyScore, 4096, 8, 0, 0, 0, &dummyKept, ws, sizeof(ws), nullptr),
        FEATHER_SELECT_ERR_WORKSPACE);
    expect("gather seq_len < n",
        feather_gather_rows(ws, ws, 3, 4, 2, 4, 2, &dummyKept, &dummyKept, nullptr), FEATHER_SELECT_ERR_INVALID_ARGUMENT);
    expect("gather elem 3", feather_gather_rows(ws, ws, 8, 4, 3, 4, 2, &dummyKept, &dummyKept, nullptr),
        FEATHER_SELECT_ERR_INVALID_ARGUMENT);
    std::printf("%s host_checks (grid count closed form, argument validation)\n", ok ? "PASS" : "FAIL");
    return ok;
}

} // namespace

// A stale, non-sticky error left in this thread's last-error slot by an earlier runtime call (for
// example another library's) must not fail our launches (select_tokens_kernel.cu,
// clearStaleLaunchError): leave one there, then run a selection case.
bool staleErrorCase(Case const& c, std::mt19937_64& rng, cudaStream_t stream, bool quiet)
{
    void* p = nullptr;
    cudaError_t const e = cudaMalloc(&p, static_cast<size_t>(1) << 62); // 4 EiB: out of memory, not sticky
    if (e == cudaSuccess)
    {
        cudaFree(p);
    }
    if (e == cudaSuccess || cudaPeekAtLastError() == cudaSuccess)
    {
        std::printf("SKIP stale_error: could not leave a pending error (%s)\n", cudaGetErrorName(e));
        return true;
    }
    bool const ok = runCase(c, rng, stream, quiet);
    std::printf("%s stale_error: %s pending before the launches did not fail them\n", ok ? "PASS" : "FAIL",
        cudaGetErrorName(e));
    return ok;
}

int main(int argc, char** argv)
{
    uint64_t seed = 20240607;
    int32_t nbRandom = 40;
    bool quiet = false;
    std::vector<std::string> caseFiles;
    std::string referenceFile;
    for (int k = 1; k < argc; ++k)
    {
        std::string const a = argv[k];
        if (a == "--seed" && k + 1 < argc)
        {
            seed = std::strtoull(argv[++k], nullptr, 10);
        }
        else if (a == "--random" && k + 1 < argc)
        {
            nbRandom = std::atoi(argv[++k]);
        }
        else if (a == "--cases" && k + 1 < argc)
        {
            caseFiles.emplace_back(argv[++k]);
        }
        else if (a == "--reference" && k + 1 < argc)
        {
            referenceFile = argv[++k];
        }
        else if (a == "--quiet")
        {
            quiet = true;
        }
        else
        {
            std::fprintf(stderr, "usage: %s [--seed S] [--random K] [--cases FILE] [--quiet] | --reference FILE\n",
                argv[0]);
            return 2;
        }
    }
    if (!referenceFile.empty()) // CPU only: the reference's choice, to check it against the Python oracle
    {
        std::vector<Case> cases;
        if (!readCases(referenceFile, cases))
        {
            return 2;
        }
        for (auto const& c : cases)
        {
            std::vector<int64_t> const kept = refSelect(c);
            for (size_t k = 0; k < kept.size(); ++k)
            {
                std::printf(k ? " %lld" : "%lld", static_cast<long long>(kept[k]));
            }
            std::printf("\n");
        }
        return 0;
    }

    bool ok = hostChecks();

    int deviceCount = 0;
    cudaError_t const e = cudaGetDeviceCount(&deviceCount);
    if (e != cudaSuccess || deviceCount == 0)
    {
        std::fprintf(stderr, "SKIP: no usable CUDA device (%s): GPU cases not run\n",
            e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return ok ? 77 : 1;
    }
    cudaDeviceProp prop{};
    CUDA_OR_FAIL(cudaGetDeviceProperties(&prop, 0));
    std::printf("device 0: %s (sm_%d%d), seed %llu\n", prop.name, prop.major, prop.minor,
        static_cast<unsigned long long>(seed));

    std::mt19937_64 rng(seed);
    std::vector<Case> cases = builtinCases(rng);
    std::vector<Case> more = randomCases(nbRandom, rng);
    cases.insert(cases.end(), more.begin(), more.end());
    for (auto const& f : caseFiles)
    {
        if (!readCases(f, cases))
        {
            return 2;
        }
    }

    cudaStream_t stream = nullptr;
    CUDA_OR_FAIL(cudaStreamCreate(&stream));
    int32_t passed = 0;
    int32_t failed = 0;
    for (auto const& c : cases)
    {
        if (runCase(c, rng, stream, quiet))
        {
            ++passed;
        }
        else
        {
            ++failed;
        }
    }
    if (staleErrorCase(cases.front(), rng, stream, quiet))
    {
        ++passed;
    }
    else
    {
        ++failed;
    }
    CUDA_OR_FAIL(cudaStreamDestroy(stream));
    std::printf("%s: %d passed, %d failed\n", (ok && failed == 0) ? "OK" : "FAILED", passed, failed);
    return (ok && failed == 0) ? 0 : 1;
}
