/*
 * Standalone test for the BTP (SelectBalanced) CUDA kernels (no TensorRT needed).
 *
 * For every case it runs feather_btp_select on the GPU and compares the kept indices, exactly,
 * with a CPU reference written from the rules (std::stable_sort on logits, plain float loops for
 * the cosine distance, the greedy fill as docs/design.md §4 states it: the seed first in its order, then
 * the farthest token). Prints one line per case; exits 0 when all pass, 1 on a mismatch, 2 on a
 * CUDA problem, 77 when no CUDA device is present (after the host-only checks passed).
 *
 * Usage: btp_select_kernel_test [--seed S] [--random K] [--quiet]
 *        btp_select_kernel_test --reference FILE   (CPU only: print the reference's kept indices,
 *        one line per case; a case line: n dim budget attention pool s seed_0..seed_{s-1}
 *        logits_0..logits_{n-1} features (n * dim, row-major); used to check this reference
 *        against the Python oracle, tests/test_plugin_build.py)
 * Build the reference with -ffp-contract=off (no fused multiply-add), as the kernel adds.
 */
#include "btp_select_kernel.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace
{

struct Case
{
    std::string name;
    int32_t n{0};
    int32_t dim{0};
    int32_t budget{0};
    int32_t attention{0};
    int32_t pool{0};
    std::vector<float> logits;
    std::vector<float> features;
    std::vector<int32_t> seed; // pick order
};

// ---------------------------------------------------------------- CPU reference

bool logitBefore(float a, int32_t ia, float b, int32_t ib)
{
    bool const na = std::isnan(a), nb = std::isnan(b);
    if (na || nb)
    {
        return (na == nb) ? ia < ib : nb; // NaN lowest; NaN ties by index
    }
    if (a == b)
    {
        return ia < ib;
    }
    return a > b;
}

std::vector<int64_t> reference(Case const& c)
{
    int32_t const n = c.n, d = c.dim;
    std::vector<int32_t> order(n);
    for (int32_t i = 0; i < n; ++i)
    {
        order[i] = i;
    }
    std::stable_sort(order.begin(), order.end(),
        [&](int32_t a, int32_t b) { return logitBefore(c.logits[a], a, c.logits[b], b); });
    std::vector<int32_t> front, back;
    for (int32_t r = 0; r < c.pool; ++r)
    {
        (order[r] < c.budget ? front : back).push_back(order[r]);
    }
    front.insert(front.end(), back.begin(), back.end());
    std::vector<char> chosen(n, 0);
    std::vector<int32_t> picked;
    for (int32_t r = 0; r < c.attention; ++r)
    {
        chosen[front[r]] = 1;
        picked.push_back(front[r]);
    }
    std::vector<float> unit(static_cast<size_t>(n) * d);
    for (int32_t i = 0; i < n; ++i)
    {
        float s = 0.0f;
        for (int32_t k = 0; k < d; ++k)
        {
            float const x = c.features[static_cast<size_t>(i) * d + k];
            float const sq = x * x;
            s = s + sq;
        }
        float const norm = std::max(std::sqrt(s), 1e-12f);
        for (int32_t k = 0; k < d; ++k)
        {
            unit[static_cast<size_t>(i) * d + k] = c.features[static_cast<size_t>(i) * d + k] / norm;
        }
    }
    auto dist = [&](int32_t i, int32_t j) {
        float acc = 0.0f;
        for (int32_t k = 0; k < d; ++k)
        {
            float const p = unit[static_cast<size_t>(i) * d + k] * unit[static_cast<size_t>(j) * d + k];
            acc = acc + p;
        }
        return 1.0f - acc;
    };
    size_t nextSeed = 0;
    while (static_cast<int32_t>(picked.size()) < c.budget)
    {
        while (nextSeed < c.seed.size() && chosen[c.seed[nextSeed]])
        {
            ++nextSeed;
        }
        int32_t t = -1;
        if (nextSeed < c.seed.size())
        {
            t = c.seed[nextSeed];
        }
        else
        {
            float best = -std::numeric_limits<float>::infinity();
            for (int32_t j = 0; j < n; ++j)
            {
                if (chosen[j])
                {
                    continue;
                }
                float m = std::numeric_limits<float>::infinity();
                for (int32_t i : picked)
                {
                    m = std::min(m, dist(i, j));
                }
                if (t < 0 || m > best)
                {
                    best = m;
                    t = j;
                }
            }
        }
        chosen[t] = 1;
        picked.push_back(t);
    }
    std::vector<int64_t> kept;
    for (int32_t i = 0; i < n; ++i)
    {
        if (chosen[i])
        {
            kept.push_back(i);
        }
    }
    return kept;
}

std::vector<float> seedPriority(Case const& c)
{
    std::vector<float> p(c.n, -1.0f);
    for (size_t r = 0; r < c.seed.size(); ++r)
    {
        p[c.seed[r]] = static_cast<float>(c.n - static_cast<int32_t>(r));
    }
    return p;
}

// ---------------------------------------------------------------- cases

Case randomCase(std::mt19937& rng, std::string name, int32_t n, int32_t dim, int32_t budget, int32_t attention,
    int32_t pool, int32_t seedCount, bool coarse)
{
    Case c{std::move(name), n, dim, budget, attention, pool, {}, {}, {}};
    std::normal_distribution<float> normal;
    std::uniform_int_distribution<int32_t> small(-2, 2);
    for (int32_t i = 0; i < n; ++i)
    {
        c.logits.push_back(coarse ? static_cast<float>(small(rng)) : normal(rng));
    }
    for (int64_t e = 0; e < static_cast<int64_t>(n) * dim; ++e)
    {
        c.features.push_back(coarse ? static_cast<float>(small(rng)) : normal(rng));
    }
    std::vector<int32_t> all(n);
    for (int32_t i = 0; i < n; ++i)
    {
        all[i] = i;
    }
    std::shuffle(all.begin(), all.end(), rng);
    c.seed.assign(all.begin(), all.begin() + std::min(seedCount, n));
    return c;
}

std::vector<Case> builtinCases(uint32_t seed, int32_t randomCount)
{
    std::mt19937 rng(seed);
    std::vector<Case> cases;
    cases.push_back(randomCase(rng, "llava-stage1-shape", 576, 64, 288, 86, 318, 144, false));
    cases.push_back(randomCase(rng, "stage2-no-seed", 288, 48, 144, 129, 193, 0, false));
    cases.push_back(randomCase(rng, "all-attention", 144, 40, 48, 48, 57, 0, false));
    cases.push_back(randomCase(rng, "empty-a", 64, 17, 20, 0, 0, 0, false));
    cases.push_back(randomCase(rng, "empty-a-seed", 64, 17, 20, 0, 0, 7, false));
    cases.push_back(randomCase(rng, "coarse-ties", 200, 5, 90, 10, 37, 0, true));
    cases.push_back(randomCase(rng, "keep-all", 33, 3, 33, 5, 18, 4, false));
    cases.push_back(randomCase(rng, "n-1", 1, 1, 1, 0, 0, 0, false));
    cases.push_back(randomCase(rng, "wide", 100, 1000, 50, 12, 44, 25, false));
    Case nan = randomCase(rng, "nan-logits", 50, 8, 20, 8, 29, 0, false);
    nan.logits[3] = std::nanf("");
    nan.logits[7] = -std::numeric_limits<float>::infinity();
    nan.logits[9] = -0.0f;
    nan.logits[10] = 0.0f;
    cases.push_back(nan);
    std::uniform_int_distribution<int32_t> nd(2, 700), dd(1, 80);
    for (int32_t r = 0; r < randomCount; ++r)
    {
        int32_t const n = nd(rng), d = dd(rng);
        int32_t const budget = std::uniform_int_distribution<int32_t>(1, n)(rng);
        int32_t const attention = std::uniform_int_distribution<int32_t>(0, budget)(rng);
        int32_t const pool = std::uniform_int_distribution<int32_t>(attention, n)(rng);
        int32_t const seeds = std::uniform_int_distribution<int32_t>(0, 3)(rng) == 0 ? budget / 2 : 0;
        cases.push_back(randomCase(rng, "random-" + std::to_string(r), n, d, budget, attention, pool, seeds,
            r % 3 == 0));
    }
    return cases;
}

// ---------------------------------------------------------------- host-only checks

bool hostChecks()
{
    bool ok = true;
    auto expect = [&](bool cond, char const* what) {
        if (!cond)
        {
            std::printf("FAIL host_check %s\n", what);
            ok = false;
        }
    };
    float dummy = 0.0f;
    int64_t kept = 0;
    char ws[16];
    expect(feather_btp_workspace_bytes(0, 4) == 0, "workspace for n = 0");
    expect(feather_btp_workspace_bytes(576, 4096) >= 576ull * 576 * 4 + 576ull * 4096 * 4, "workspace covers D");
    expect(feather_btp_select(nullptr, &dummy, &dummy, 1, 1, 1, 0, 0, &kept, ws, 16, nullptr)
            == FEATHER_SELECT_ERR_INVALID_ARGUMENT, "null logits");
    expect(feather_btp_select(&dummy, &dummy, &dummy, 4, 1, 5, 0, 0, &kept, ws, 16, nullptr)
            == FEATHER_SELECT_ERR_INVALID_ARGUMENT, "budget > n");
    expect(feather_btp_select(&dummy, &dummy, &dummy, 4, 1, 2, 3, 3, &kept, ws, 16, nullptr)
            == FEATHER_SELECT_ERR_INVALID_ARGUMENT, "attention > budget");
    expect(feather_btp_select(&dummy, &dummy, &dummy, 4, 1, 2, 2, 1, &kept, ws, 16, nullptr)
            == FEATHER_SELECT_ERR_INVALID_ARGUMENT, "pool < attention");
    expect(feather_btp_select(&dummy, &dummy, &dummy, 4, 1, 2, 1, 2, &kept, ws, 16, nullptr)
            == FEATHER_SELECT_ERR_WORKSPACE, "small workspace");
    // the reference itself on a hand-made case: A = {0}; 3 is farthest from 0; then 1 (lower) of 1, 2
    Case hand{"hand", 4, 2, 3, 1, 1, {9, 0, 0, 0}, {1, 0, 0, 1, 0, 1, -1, 0}, {}};
    expect(reference(hand) == std::vector<int64_t>({0, 1, 3}), "reference on a hand-made case");
    std::printf("%s host_checks\n", ok ? "PASS" : "FAIL");
    return ok;
}

template <typename T>
T* upload(std::vector<T> const& v)
{
    void* raw = nullptr;
    size_t const bytes = std::max<size_t>(1, v.size()) * sizeof(T);
    if (cudaMalloc(&raw, bytes) != cudaSuccess)
    {
        return nullptr;
    }
    T* d = static_cast<T*>(raw);
    if (!v.empty())
    {
        cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    }
    return d;
}

int runCase(Case const& c, bool quiet)
{
    std::vector<int64_t> const expected = reference(c);
    float* logits = upload(c.logits);
    float* features = upload(c.features);
    float* prio = upload(seedPriority(c));
    int64_t* kept = upload(std::vector<int64_t>(c.budget, -1));
    size_t const wsBytes = feather_btp_workspace_bytes(c.n, c.dim);
    void* ws = nullptr;
    if (!logits || !features || !prio || !kept || cudaMalloc(&ws, wsBytes) != cudaSuccess)
    {
        std::printf("ERROR %s: cudaMalloc failed\n", c.name.c_str());
        return 2;
    }
    int const status = feather_btp_select(logits, features, prio, c.n, c.dim, c.budget, c.attention, c.pool,
        kept, ws, wsBytes, nullptr);
    std::vector<int64_t> got(c.budget);
    cudaError_t const err = cudaMemcpy(got.data(), kept, got.size() * sizeof(int64_t), cudaMemcpyDeviceToHost);
    cudaFree(logits);
    cudaFree(features);
    cudaFree(prio);
    cudaFree(kept);
    cudaFree(ws);
    if (status != FEATHER_SELECT_OK || err != cudaSuccess)
    {
        std::printf("ERROR %s: %s / %s\n", c.name.c_str(), feather_select_status_string(status),
            cudaGetErrorString(err));
        return 2;
    }
    bool const same = got == expected;
    if (!same || !quiet)
    {
        std::printf("%s %s (n=%d dim=%d budget=%d m=%d pool=%d seed=%zu)\n", same ? "PASS" : "FAIL",
            c.name.c_str(), c.n, c.dim, c.budget, c.attention, c.pool, c.seed.size());
    }
    return same ? 0 : 1;
}

} // namespace

int referenceOnly(char const* path)
{
    FILE* f = std::fopen(path, "r");
    if (f == nullptr)
    {
        std::fprintf(stderr, "cannot open %s\n", path);
        return 2;
    }
    Case c;
    int32_t seeds = 0;
    while (std::fscanf(f, "%d %d %d %d %d %d", &c.n, &c.dim, &c.budget, &c.attention, &c.pool, &seeds) == 6)
    {
        c.seed.assign(seeds, 0);
        c.logits.assign(c.n, 0.0f);
        c.features.assign(static_cast<size_t>(c.n) * c.dim, 0.0f);
        bool ok = true;
        for (auto& v : c.seed)
        {
            ok = ok && std::fscanf(f, "%d", &v) == 1;
        }
        for (auto& v : c.logits)
        {
            ok = ok && std::fscanf(f, "%f", &v) == 1;
        }
        for (auto& v : c.features)
        {
            ok = ok && std::fscanf(f, "%f", &v) == 1;
        }
        if (!ok)
        {
            std::fprintf(stderr, "malformed case in %s\n", path);
            std::fclose(f);
            return 2;
        }
        for (int64_t k : reference(c))
        {
            std::printf("%lld ", static_cast<long long>(k));
        }
        std::printf("\n");
    }
    std::fclose(f);
    return 0;
}

int main(int argc, char** argv)
{
    if (argc == 3 && !std::strcmp(argv[1], "--reference"))
    {
        return referenceOnly(argv[2]);
    }
    uint32_t seed = 0;
    int32_t randomCount = 40;
    bool quiet = false;
    for (int i = 1; i < argc; ++i)
    {
        if (!std::strcmp(argv[i], "--seed") && i + 1 < argc)
        {
            seed = static_cast<uint32_t>(std::strtoul(argv[++i], nullptr, 10));
        }
        else if (!std::strcmp(argv[i], "--random") && i + 1 < argc)
        {
            randomCount = std::atoi(argv[++i]);
        }
        else if (!std::strcmp(argv[i], "--quiet"))
        {
            quiet = true;
        }
        else
        {
            std::fprintf(stderr, "usage: %s [--seed S] [--random K] [--quiet]\n", argv[0]);
            return 2;
        }
    }
    bool const hostOk = hostChecks();
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
    {
        std::printf("SKIP: no CUDA device (host checks %s)\n", hostOk ? "passed" : "failed");
        return hostOk ? 77 : 1;
    }
    int failures = hostOk ? 0 : 1, errors = 0;
    std::vector<Case> const cases = builtinCases(seed, randomCount);
    for (Case const& c : cases)
    {
        int const r = runCase(c, quiet);
        failures += r == 1;
        errors += r == 2;
    }
    std::printf("%s: %zu cases, %d failure(s), %d error(s)\n", failures || errors ? "FAILED" : "OK", cases.size(),
        failures, errors);
    return errors ? 2 : (failures ? 1 : 0);
}
