// Gated activations y = act(gate) * up, elementwise over n values, and the plain GELU y = gelu(x + bias)
// over rows (GPT-2's MLP activation with c_fc's bias fused).
//
// SwiGLU: act = silu(g) = g * s, s = sigmoid(g);  d act/dg = s * (1 + g * (1 - s))
// GELU (tanh): act = g * sigmoid(2z), z = k (g + 0.044715 g^3), k = sqrt(2/pi)
//   (0.5 (1 + tanh z) == sigmoid(2z), so no cancellation near 0);
//   d act/dg = S + 2 g S (1 - S) k (1 + 3 * 0.044715 g^2), S = sigmoid(2z)
// GELU (erf): act = 0.5 g (1 + erf(g / sqrt 2));  d act/dg = 0.5 (1 + erf(g / sqrt 2)) + g phi(g)
// GLU backward: dgate = dy * up * act'(g),  dup = dy * act(g): one pass over the three inputs.
// GELU backward: dx = dy * act'(x + bias) (the bias gradient, a column sum of dx, is the caller's).
// round_act (eager's rounding): act(g) is rounded to the input's bf16 / fp16 before the multiply.
//
// The exp of the sigmoids is vexp (fastnlg_cpu.h: a vectorisable polynomial in fp32), so the SwiGLU and
// tanh-GELU loops vectorise; erf stays glibc's (scalar). Blocks of values are split over OpenMP threads,
// and in fp32 each block runs the build for the CPU's x86-64 level (baseline, v3 = AVX2, v4 = AVX-512).
#include "fastnlg_cpu.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace fastnlg {

// the activations and their derivatives, shared by the GLU and GELU loops
template <typename T>
static inline __attribute__((always_inline)) T gelu_tanh_e(T g) {  // e^(-2z): act = g / (1 + e), S = 1 / (1 + e)
    return vexp(T(-2) * T(0.7978845608028654) * (g + T(0.044715) * g * g * g));
}
template <typename T>
static inline __attribute__((always_inline)) T gelu_tanh_grad(T g, T S) {
    return S + T(2) * g * S * (T(1) - S) * T(0.7978845608028654) * (T(1) + T(3) * T(0.044715) * g * g);
}
template <typename T>
static inline __attribute__((always_inline)) T gelu_erf_cdf(T g) {
    return T(0.5) * (T(1) + std::erf(g * T(0.7071067811865476)));
}
template <typename T>
static inline __attribute__((always_inline)) T gelu_erf_grad(T g, T cdf) {
    return cdf + g * T(0.3989422804014327) * vexp(T(-0.5) * g * g);
}

template <typename S>
static inline __attribute__((always_inline)) void glu_fwd_block(const S* gate, const S* up, S* y, int64_t n, int kind,
                                                                 int round_act) {
    using T = acc_t<S>;
    if (round_act) {
        for (int64_t i = 0; i < n; ++i) {
            const T g = load(gate[i]);
            const T act = kind == GLU_SWIGLU        ? g / (T(1) + vexp(-g))
                          : kind == GLU_GEGLU_TANH ? g / (T(1) + gelu_tanh_e(g))
                                                   : g * gelu_erf_cdf(g);
            y[i] = store<S>(round_to(act, round_act) * load(up[i]));
        }
    } else if (kind == GLU_SWIGLU) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const T g = load(gate[i]);
            y[i] = store<S>(g / (T(1) + vexp(-g)) * load(up[i]));
        }
    } else if (kind == GLU_GEGLU_TANH) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const T g = load(gate[i]);
            y[i] = store<S>(g / (T(1) + gelu_tanh_e(g)) * load(up[i]));
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            const T g = load(gate[i]);
            y[i] = store<S>(g * gelu_erf_cdf(g) * load(up[i]));
        }
    }
}

template <typename S>
static inline __attribute__((always_inline)) void glu_bwd_block(const S* dy, const S* gate, const S* up, S* dgate,
                                                                 S* dup, int64_t n, int kind) {
    using T = acc_t<S>;
    if (kind == GLU_SWIGLU) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const T g = load(gate[i]), d = load(dy[i]), s = T(1) / (T(1) + vexp(-g));
            dgate[i] = store<S>(d * load(up[i]) * s * (T(1) + g * (T(1) - s)));
            dup[i] = store<S>(d * g * s);
        }
    } else if (kind == GLU_GEGLU_TANH) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const T g = load(gate[i]), d = load(dy[i]), S_ = T(1) / (T(1) + gelu_tanh_e(g));
            dgate[i] = store<S>(d * load(up[i]) * gelu_tanh_grad(g, S_));
            dup[i] = store<S>(d * g * S_);
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            const T g = load(gate[i]), d = load(dy[i]), cdf = gelu_erf_cdf(g);
            dgate[i] = store<S>(d * load(up[i]) * gelu_erf_grad(g, cdf));
            dup[i] = store<S>(d * g * cdf);
        }
    }
}

// GELU over `rows` rows of C values stored as S, z = x + bias (HasBias false: z = x): forward out = act(z)
// (stored as S), backward out = dy * act'(z) (O: the compute type, the caller sums it for the bias gradient
// and casts it)
template <bool HasBias, bool Backward, typename S, typename O>
static inline __attribute__((always_inline)) void gelu_rows(const S* dy, const S* x, const S* b, O* out,
                                                             int64_t rows, int64_t C, bool tanh) {
    using T = acc_t<S>;
    for (int64_t r = 0; r < rows; ++r) {
        const S* xr = x + r * C;
        const S* dyr = Backward ? dy + r * C : nullptr;
        O* o = out + r * C;
        if (tanh) {
#pragma omp simd
            for (int64_t j = 0; j < C; ++j) {
                const T z = HasBias ? load(xr[j]) + load(b[j]) : load(xr[j]), e = gelu_tanh_e(z);
                o[j] = store<O>(Backward ? load(dyr[j]) * gelu_tanh_grad(z, T(1) / (T(1) + e)) : z / (T(1) + e));
            }
        } else {
            for (int64_t j = 0; j < C; ++j) {
                const T z = HasBias ? load(xr[j]) + load(b[j]) : load(xr[j]), cdf = gelu_erf_cdf(z);
                o[j] = store<O>(Backward ? load(dyr[j]) * gelu_erf_grad(z, cdf) : z * cdf);
            }
        }
    }
}

template <bool Backward, typename S, typename O>
static inline __attribute__((always_inline)) void gelu_block(const S* dy, const S* x, const S* b, O* out,
                                                              int64_t rows, int64_t C, bool tanh) {
    if (b) gelu_rows<true, Backward>(dy, x, b, out, rows, C, tanh);
    else gelu_rows<false, Backward>(dy, x, b, out, rows, C, tanh);
}

// the fp32 / bf16 / fp16 blocks, one build per x86-64 level
template <typename S>
struct ActLoops {
    void (*glu_fwd)(const S*, const S*, S*, int64_t, int, int);
    void (*glu_bwd)(const S*, const S*, const S*, S*, S*, int64_t, int);
    void (*gelu_fwd)(const S*, const S*, S*, int64_t, int64_t, bool);
    void (*gelu_bwd)(const S*, const S*, const S*, float*, int64_t, int64_t, bool);
};
struct IsaLoops {
    ActLoops<float> f32;
    ActLoops<bf16> bf16_;
    ActLoops<half> f16;
};
#define FASTNLG_ACT_BUILD_TYPE(LEVEL, ATTR, S, NAME)                                                              \
    ATTR static void glu_fwd_##LEVEL##_##NAME(const S* g, const S* u, S* y, int64_t n, int kind, int r) {         \
        glu_fwd_block<S>(g, u, y, n, kind, r);                                                                    \
    }                                                                                                              \
    ATTR static void glu_bwd_##LEVEL##_##NAME(const S* d, const S* g, const S* u, S* dg, S* du, int64_t n,        \
                                              int kind) {                                                         \
        glu_bwd_block<S>(d, g, u, dg, du, n, kind);                                                               \
    }                                                                                                              \
    ATTR static void gelu_fwd_##LEVEL##_##NAME(const S* x, const S* b, S* y, int64_t rows, int64_t C, bool tanh) { \
        gelu_block<false, S, S>(nullptr, x, b, y, rows, C, tanh);                                                  \
    }                                                                                                              \
    ATTR static void gelu_bwd_##LEVEL##_##NAME(const S* d, const S* x, const S* b, float* dx, int64_t rows,        \
                                               int64_t C, bool tanh) {                                            \
        gelu_block<true, S, float>(d, x, b, dx, rows, C, tanh);                                                    \
    }
#define FASTNLG_ACT_BUILD(LEVEL, ATTR)                                                                            \
    FASTNLG_ACT_BUILD_TYPE(LEVEL, ATTR, float, f32)                                                                \
    FASTNLG_ACT_BUILD_TYPE(LEVEL, ATTR, bf16, bf16)                                                                \
    FASTNLG_ACT_BUILD_TYPE(LEVEL, ATTR, half, f16)                                                                 \
    static constexpr IsaLoops loops_##LEVEL = {                                                                    \
        {glu_fwd_##LEVEL##_f32, glu_bwd_##LEVEL##_f32, gelu_fwd_##LEVEL##_f32, gelu_bwd_##LEVEL##_f32},           \
        {glu_fwd_##LEVEL##_bf16, glu_bwd_##LEVEL##_bf16, gelu_fwd_##LEVEL##_bf16, gelu_bwd_##LEVEL##_bf16},       \
        {glu_fwd_##LEVEL##_f16, glu_bwd_##LEVEL##_f16, gelu_fwd_##LEVEL##_f16, gelu_bwd_##LEVEL##_f16}};
FASTNLG_ACT_BUILD(baseline, )
#ifdef FASTNLG_X86_V3
FASTNLG_ACT_BUILD(v3, __attribute__((target("arch=x86-64-v3"))))
FASTNLG_ACT_BUILD(v4, __attribute__((target("arch=x86-64-v4"))))
#endif

// the loops of storage type S (not double: fp64 runs the generic blocks) for the CPU's x86-64 level
template <typename S>
static const ActLoops<S>& act_loops() {
#ifdef FASTNLG_X86_V3
    const IsaLoops& l = isa_level() == 4 ? loops_v4 : isa_level() == 3 ? loops_v3 : loops_baseline;
#else
    const IsaLoops& l = loops_baseline;
#endif
    if constexpr (std::is_same_v<S, float>) return l.f32;
    else if constexpr (std::is_same_v<S, bf16>) return l.bf16_;
    else return l.f16;
}

// f(start, count) over blocks of n items of `width` values each (about 4096 values a block), split over
// threads when there is more than one block
template <typename F>
static void blocks(int64_t n, F f, int64_t width = 1) {
    const int64_t B = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, width));
    const int64_t nb = (n + B - 1) / B;
#pragma omp parallel for schedule(static) if (nb > 1)
    for (int64_t b = 0; b < nb; ++b) f(b * B, std::min(B, n - b * B));
}

template <typename S>
void glu_fwd(const S* gate, const S* up, S* y, int64_t n, int kind, int round_act) {
    if constexpr (std::is_same_v<S, double>) {
        blocks(n, [&](int64_t s, int64_t m) { glu_fwd_block<double>(gate + s, up + s, y + s, m, kind, round_act); });
    } else {
        const auto run = act_loops<S>().glu_fwd;
        blocks(n, [&](int64_t s, int64_t m) { run(gate + s, up + s, y + s, m, kind, round_act); });
    }
}
template <typename S>
void glu_bwd(const S* dy, const S* gate, const S* up, S* dgate, S* dup, int64_t n, int kind) {
    if constexpr (std::is_same_v<S, double>) {
        blocks(n, [&](int64_t s, int64_t m) { glu_bwd_block<double>(dy + s, gate + s, up + s, dgate + s, dup + s, m, kind); });
    } else {
        const auto run = act_loops<S>().glu_bwd;
        blocks(n, [&](int64_t s, int64_t m) { run(dy + s, gate + s, up + s, dgate + s, dup + s, m, kind); });
    }
}

// GELU: blocks of whole rows with a bias; without one, blocks of the N x C values as one flat row
template <typename T, typename Run>
static void gelu_blocks(int64_t N, int64_t C, const T* bias, Run run) {
    if (bias)
        blocks(N, [&](int64_t s, int64_t m) { run(s * C, m, C); }, C);
    else
        blocks(N * C, [&](int64_t s, int64_t m) { run(s, int64_t(1), m); });
}

template <typename S>
void gelu_fwd(const S* x, const S* bias, S* y, int64_t N, int64_t C, bool tanh) {
    gelu_blocks(N, C, bias, [&](int64_t s, int64_t rows, int64_t c) {
        if constexpr (std::is_same_v<S, double>) gelu_block<false, S, S>(nullptr, x + s, bias, y + s, rows, c, tanh);
        else act_loops<S>().gelu_fwd(x + s, bias, y + s, rows, c, tanh);
    });
}
template <typename S>
void gelu_bwd(const S* dy, const S* x, const S* bias, acc_t<S>* dx, int64_t N, int64_t C, bool tanh) {
    gelu_blocks(N, C, bias, [&](int64_t s, int64_t rows, int64_t c) {
        if constexpr (std::is_same_v<S, double>) gelu_block<true, S, S>(dy + s, x + s, bias, dx + s, rows, c, tanh);
        else act_loops<S>().gelu_bwd(dy + s, x + s, bias, dx + s, rows, c, tanh);
    });
}
#define FASTNLG_ACT_ENTRY(S)                                                                 \
    template void glu_fwd<S>(const S*, const S*, S*, int64_t, int, int);                     \
    template void glu_bwd<S>(const S*, const S*, const S*, S*, S*, int64_t, int);            \
    template void gelu_fwd<S>(const S*, const S*, S*, int64_t, int64_t, bool);               \
    template void gelu_bwd<S>(const S*, const S*, const S*, acc_t<S>*, int64_t, int64_t, bool);
FASTNLG_ACT_ENTRY(float)
FASTNLG_ACT_ENTRY(double)
FASTNLG_ACT_ENTRY(bf16)
FASTNLG_ACT_ENTRY(half)

}  // namespace fastnlg
