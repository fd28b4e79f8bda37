// Gated activations y = act(gate) * up, elementwise over n values.
//
// SwiGLU: act = silu(g) = g * s, s = sigmoid(g);  d act/dg = s * (1 + g * (1 - s))
// GeGLU (tanh): act = g * sigmoid(2z), z = k (g + 0.044715 g^3), k = sqrt(2/pi)
//   (0.5 (1 + tanh z) == sigmoid(2z), so no cancellation near 0);
//   d act/dg = S + 2 g S (1 - S) k (1 + 3 * 0.044715 g^2), S = sigmoid(2z)
// GeGLU (erf): act = 0.5 g (1 + erf(g / sqrt 2));  d act/dg = 0.5 (1 + erf(g / sqrt 2)) + g phi(g)
// Backward: dgate = dy * up * act'(g),  dup = dy * act(g).
// round_act (eager's rounding): act(g) is rounded to the input's bf16 / fp16 before the multiply.
#include "fastnlg_cpu.h"

#include <cmath>

namespace fastnlg {

// One loop per kind, each branch-free so GCC vectorises it (omp simd + glibc's vector exp/erf; the
// build passes -fno-math-errno, which that needs).
template <typename T>
void glu_fwd(const T* gate, const T* up, T* y, int64_t n, int kind, int round_act) {
    const T k = T(0.7978845608028654), c3 = T(0.044715), r2 = T(0.7071067811865476);
    if (round_act) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            const T g = gate[i];
            const T act = kind == GLU_SWIGLU        ? g / (T(1) + std::exp(-g))
                          : kind == GLU_GEGLU_TANH ? g / (T(1) + std::exp(T(-2) * k * (g + c3 * g * g * g)))
                                                   : g * T(0.5) * (T(1) + std::erf(g * r2));
            y[i] = round_to(act, round_act) * up[i];
        }
    } else if (kind == GLU_SWIGLU) {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) y[i] = gate[i] / (T(1) + std::exp(-gate[i])) * up[i];
    } else if (kind == GLU_GEGLU_TANH) {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            const T g = gate[i];
            y[i] = g / (T(1) + std::exp(T(-2) * k * (g + c3 * g * g * g))) * up[i];
        }
    } else {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) y[i] = gate[i] * T(0.5) * (T(1) + std::erf(gate[i] * r2)) * up[i];
    }
}

template <typename T>
void glu_bwd(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t n, int kind) {
    const T k = T(0.7978845608028654), c3 = T(0.044715), r2 = T(0.7071067811865476), ip = T(0.3989422804014327);
    if (kind == GLU_SWIGLU) {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            const T g = gate[i], s = T(1) / (T(1) + std::exp(-g));
            dgate[i] = dy[i] * up[i] * s * (T(1) + g * (T(1) - s));
            dup[i] = dy[i] * g * s;
        }
    } else if (kind == GLU_GEGLU_TANH) {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            const T g = gate[i], S = T(1) / (T(1) + std::exp(T(-2) * k * (g + c3 * g * g * g)));
            dgate[i] = dy[i] * up[i] * (S + T(2) * g * S * (T(1) - S) * k * (T(1) + T(3) * c3 * g * g));
            dup[i] = dy[i] * g * S;
        }
    } else {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            const T g = gate[i], cdf = T(0.5) * (T(1) + std::erf(g * r2));
            dgate[i] = dy[i] * up[i] * (cdf + g * ip * std::exp(T(-0.5) * g * g));
            dup[i] = dy[i] * g * cdf;
        }
    }
}

template void glu_fwd<float>(const float*, const float*, float*, int64_t, int, int);
template void glu_fwd<double>(const double*, const double*, double*, int64_t, int, int);
template void glu_bwd<float>(const float*, const float*, const float*, float*, float*, int64_t, int);
template void glu_bwd<double>(const double*, const double*, const double*, double*, double*, int64_t, int);

}  // namespace fastnlg
