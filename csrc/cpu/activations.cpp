// Gated activations y = act(gate) * up, elementwise over n values.
//
// SwiGLU: act = silu(g) = g * s, s = sigmoid(g);  d act/dg = s * (1 + g * (1 - s))
// GeGLU (tanh): act = g * sigmoid(2z), z = k (g + 0.044715 g^3), k = sqrt(2/pi)
//   (0.5 (1 + tanh z) == sigmoid(2z), so no cancellation near 0);
//   d act/dg = S + 2 g S (1 - S) k (1 + 3 * 0.044715 g^2), S = sigmoid(2z)
// GeGLU (erf): act = 0.5 g (1 + erf(g / sqrt 2));  d act/dg = 0.5 (1 + erf(g / sqrt 2)) + g phi(g)
// Backward: dgate = dy * up * act'(g),  dup = dy * act(g): one pass over the three inputs.
// round_act (eager's rounding): act(g) is rounded to the input's bf16 / fp16 before the multiply.
//
// The exp of the sigmoids is vexp (fastnlg_cpu.h: a vectorisable polynomial in fp32), so the SwiGLU and
// tanh-GeGLU loops vectorise; erf stays glibc's (scalar). Blocks of values are split over OpenMP threads,
// and in fp32 each block runs the build for the CPU's x86-64 level (baseline, v3 = AVX2, v4 = AVX-512).
#include "fastnlg_cpu.h"

#include <algorithm>
#include <cmath>

namespace fastnlg {

template <typename T>
static inline __attribute__((always_inline)) void glu_fwd_block(const T* gate, const T* up, T* y, int64_t n, int kind,
                                                                 int round_act) {
    const T k = T(0.7978845608028654), c3 = T(0.044715), r2 = T(0.7071067811865476);
    if (round_act) {
        for (int64_t i = 0; i < n; ++i) {
            const T g = gate[i];
            const T act = kind == GLU_SWIGLU        ? g / (T(1) + vexp(-g))
                          : kind == GLU_GEGLU_TANH ? g / (T(1) + vexp(T(-2) * k * (g + c3 * g * g * g)))
                                                   : g * T(0.5) * (T(1) + std::erf(g * r2));
            y[i] = round_to(act, round_act) * up[i];
        }
    } else if (kind == GLU_SWIGLU) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) y[i] = gate[i] / (T(1) + vexp(-gate[i])) * up[i];
    } else if (kind == GLU_GEGLU_TANH) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const T g = gate[i];
            y[i] = g / (T(1) + vexp(T(-2) * k * (g + c3 * g * g * g))) * up[i];
        }
    } else {
        for (int64_t i = 0; i < n; ++i) y[i] = gate[i] * T(0.5) * (T(1) + std::erf(gate[i] * r2)) * up[i];
    }
}

template <typename T>
static inline __attribute__((always_inline)) void glu_bwd_block(const T* dy, const T* gate, const T* up, T* dgate,
                                                                 T* dup, int64_t n, int kind) {
    const T k = T(0.7978845608028654), c3 = T(0.044715), r2 = T(0.7071067811865476), ip = T(0.3989422804014327);
    if (kind == GLU_SWIGLU) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const T g = gate[i], s = T(1) / (T(1) + vexp(-g));
            dgate[i] = dy[i] * up[i] * s * (T(1) + g * (T(1) - s));
            dup[i] = dy[i] * g * s;
        }
    } else if (kind == GLU_GEGLU_TANH) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const T g = gate[i], S = T(1) / (T(1) + vexp(T(-2) * k * (g + c3 * g * g * g)));
            dgate[i] = dy[i] * up[i] * (S + T(2) * g * S * (T(1) - S) * k * (T(1) + T(3) * c3 * g * g));
            dup[i] = dy[i] * g * S;
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            const T g = gate[i], cdf = T(0.5) * (T(1) + std::erf(g * r2));
            dgate[i] = dy[i] * up[i] * (cdf + g * ip * vexp(T(-0.5) * g * g));
            dup[i] = dy[i] * g * cdf;
        }
    }
}

using FwdF32 = void (*)(const float*, const float*, float*, int64_t, int, int);
using BwdF32 = void (*)(const float*, const float*, const float*, float*, float*, int64_t, int);

// one build of the fp32 forward and backward blocks per x86-64 level
#define FASTNLG_GLU_F32_BUILD(SUFFIX, ATTR)                                                                       \
    ATTR static void fwd_f32_##SUFFIX(const float* g, const float* u, float* y, int64_t n, int kind, int r) {     \
        glu_fwd_block<float>(g, u, y, n, kind, r);                                                                \
    }                                                                                                              \
    ATTR static void bwd_f32_##SUFFIX(const float* d, const float* g, const float* u, float* dg, float* du,       \
                                      int64_t n, int kind) {                                                      \
        glu_bwd_block<float>(d, g, u, dg, du, n, kind);                                                           \
    }
FASTNLG_GLU_F32_BUILD(baseline, )
#ifdef FASTNLG_X86_V3
FASTNLG_GLU_F32_BUILD(v3, __attribute__((target("arch=x86-64-v3"))))
FASTNLG_GLU_F32_BUILD(v4, __attribute__((target("arch=x86-64-v4"))))
#endif

static FwdF32 fwd_f32() {
#ifdef FASTNLG_X86_V3
    if (isa_level() == 4) return fwd_f32_v4;
    if (isa_level() == 3) return fwd_f32_v3;
#endif
    return fwd_f32_baseline;
}
static BwdF32 bwd_f32() {
#ifdef FASTNLG_X86_V3
    if (isa_level() == 4) return bwd_f32_v4;
    if (isa_level() == 3) return bwd_f32_v3;
#endif
    return bwd_f32_baseline;
}

// f(start, count) over blocks of the n values, split over threads when there is more than one block
template <typename F>
static void blocks(int64_t n, F f) {
    constexpr int64_t B = 4096;
    const int64_t nb = (n + B - 1) / B;
#pragma omp parallel for schedule(static) if (nb > 1)
    for (int64_t b = 0; b < nb; ++b) f(b * B, std::min(B, n - b * B));
}

template <>
void glu_fwd<float>(const float* gate, const float* up, float* y, int64_t n, int kind, int round_act) {
    const FwdF32 run = fwd_f32();
    blocks(n, [&](int64_t s, int64_t m) { run(gate + s, up + s, y + s, m, kind, round_act); });
}
template <>
void glu_fwd<double>(const double* gate, const double* up, double* y, int64_t n, int kind, int round_act) {
    blocks(n, [&](int64_t s, int64_t m) { glu_fwd_block<double>(gate + s, up + s, y + s, m, kind, round_act); });
}
template <>
void glu_bwd<float>(const float* dy, const float* gate, const float* up, float* dgate, float* dup, int64_t n,
                    int kind) {
    const BwdF32 run = bwd_f32();
    blocks(n, [&](int64_t s, int64_t m) { run(dy + s, gate + s, up + s, dgate + s, dup + s, m, kind); });
}
template <>
void glu_bwd<double>(const double* dy, const double* gate, const double* up, double* dgate, double* dup, int64_t n,
                     int kind) {
    blocks(n, [&](int64_t s, int64_t m) { glu_bwd_block<double>(dy + s, gate + s, up + s, dgate + s, dup + s, m, kind); });
}

}  // namespace fastnlg
