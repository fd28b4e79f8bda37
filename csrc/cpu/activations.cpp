// Gated activations y = act(gate) * up, elementwise over n values.
//
// SwiGLU: act = silu(g) = g * s, s = sigmoid(g);  d act/dg = s * (1 + g * (1 - s))
// GeGLU (tanh): act = g * sigmoid(2z), z = k (g + 0.044715 g^3), k = sqrt(2/pi)
//   (0.5 (1 + tanh z) == sigmoid(2z), so no cancellation near 0);
//   d act/dg = S + 2 g S (1 - S) k (1 + 3 * 0.044715 g^2), S = sigmoid(2z)
// GeGLU (erf): act = 0.5 g (1 + erf(g / sqrt 2));  d act/dg = 0.5 (1 + erf(g / sqrt 2)) + g phi(g)
// Backward: dgate = dy * up * act'(g),  dup = dy * act(g).
#include "fastnlg_cpu.h"

#include <cmath>

namespace fastnlg {

template <typename T>
static inline void act_and_grad(T g, int kind, T& act, T& dact) {
    if (kind == GLU_SWIGLU) {
        const T s = T(1) / (T(1) + std::exp(-g));
        act = g * s;
        dact = s * (T(1) + g * (T(1) - s));
    } else if (kind == GLU_GEGLU_TANH) {
        const T k = T(0.7978845608028654);
        const T z = k * (g + T(0.044715) * g * g * g);
        const T S = T(1) / (T(1) + std::exp(-T(2) * z));
        act = g * S;
        dact = S + T(2) * g * S * (T(1) - S) * k * (T(1) + T(3 * 0.044715) * g * g);
    } else {
        const T cdf = T(0.5) * (T(1) + std::erf(g * T(0.7071067811865476)));
        act = g * cdf;
        dact = cdf + g * T(0.3989422804014327) * std::exp(T(-0.5) * g * g);
    }
}

template <typename T>
void glu_fwd(const T* gate, const T* up, T* y, int64_t n, int kind) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        T act, dact;
        act_and_grad(gate[i], kind, act, dact);
        y[i] = act * up[i];
    }
}

template <typename T>
void glu_bwd(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t n, int kind) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        T act, dact;
        act_and_grad(gate[i], kind, act, dact);
        dgate[i] = dy[i] * up[i] * dact;
        dup[i] = dy[i] * act;
    }
}

template void glu_fwd<float>(const float*, const float*, float*, int64_t, int);
template void glu_fwd<double>(const double*, const double*, double*, int64_t, int);
template void glu_bwd<float>(const float*, const float*, const float*, float*, float*, int64_t, int);
template void glu_bwd<double>(const double*, const double*, const double*, double*, double*, int64_t, int);

}  // namespace fastnlg
