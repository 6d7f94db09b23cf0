/*
 * feather-export: the order on float scores shared by the selection kernels (device code).
 * A monotone uint32 image of a score (NaN lowest, -0 == +0) and a 64-bit token key that breaks
 * ties toward the lower index; a larger key ranks first. Key 0 is never a valid token's key.
 */
#ifndef FEATHER_SCORE_KEYS_CUH
#define FEATHER_SCORE_KEYS_CUH

#include <stdint.h>

namespace feather
{

// Monotone map float -> uint32 (larger score -> larger key).
// NaN -> 0, strictly below the key of -inf (0x007FFFFF); -0.0 is canonicalised to +0.0.
__device__ __forceinline__ uint32_t scoreKey(float s)
{
    if (s != s)
    {
        return 0u;
    }
    if (s == 0.0f)
    {
        s = 0.0f;
    }
    uint32_t const b = __float_as_uint(s);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Composite key, larger = better; lower index wins ties. Never 0 for a valid index.
__device__ __forceinline__ uint64_t tokenKey(float s, int32_t i)
{
    return (static_cast<uint64_t>(scoreKey(s)) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(i));
}

// The index a tokenKey was built from.
__device__ __forceinline__ int32_t keyIndex(uint64_t key)
{
    return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFull));
}

} // namespace feather

#endif /* FEATHER_SCORE_KEYS_CUH */
