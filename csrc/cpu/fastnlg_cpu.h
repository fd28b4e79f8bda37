// fastnlg C++ CPU kernels: raw pointers + sizes, no checking (Python checks once, DESIGN.md §4.5).
// Every kernel is templated on the element type T (float or double); fp16/bf16 inputs are upcast to
// fp32 by the Python caller, except for the activations (GLU, GELU), which also read and write bf16 / fp16
// in place (storage types below). Rows are independent and split over OpenMP threads.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTNLG_X86_V3 1  // the fp32 hot loops are also built for x86-64-v3 (AVX2 + FMA) and -v4 (AVX-512)
#endif

namespace fastnlg {

// e^x = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (ln 2 split in two for exactness), e^r by the
// degree-6 Cephes polynomial on |r| <= ln2 / 2 (~1 ulp). Selects, not branches, so `omp simd` vectorises it
// (with -fno-trapping-math, which lets GCC if-convert the comparisons); glibc's expf is not vectorised
// without -ffast-math, which we do not use (it drops NaN/Inf semantics). x < -87.3 (e^x below the smallest
// normal float, and -inf) gives exactly 0; x is capped at 88; NaN propagates (the comparisons keep it).
static inline float exp_f32(float x) {
    const bool underflow = x < -87.3365f;
    x = underflow ? -87.3365f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return underflow ? 0.0f : p * scale;
}
static inline float vexp(float x) { return exp_f32(x); }
static inline double vexp(double x) { return std::exp(x); }

// The x86-64 level whose build of the fp32 hot loops (cross-entropy rows, activations) runs: 4
// (x86-64-v4), 3 (x86-64-v3) or 0 (baseline); the best the CPU has unless set_cpu_isa chose another.
int isa_level();

// Rounding of an fp32 value to the caller's low-precision dtype and back, for the modes that round an
// intermediate as the eager module does (round code 0: none, 1: bfloat16, 2: IEEE half).
inline float round_bf16(float v) {  // nearest, ties to even; NaN kept
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return v;
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    std::memcpy(&v, &u, sizeof v);
    return v;
}
inline float round_fp16(float v) { return static_cast<float>(static_cast<_Float16>(v)); }
template <typename T>
inline T round_to(T v, int code) {
    return code == 1 ? T(round_bf16(float(v))) : code == 2 ? T(round_fp16(float(v))) : v;
}

// Storage types of the kernels that read and write fp16/bf16 tensors in place (no fp32 copy in and out):
// values load to fp32, are computed in fp32 and round once, to nearest even, on the store (as torch's
// fp32 -> bf16/fp16 conversion: the same bits as computing into an fp32 tensor and calling .to()).
struct bf16 {
    std::uint16_t bits;
};
using half = _Float16;
inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(half x) { return static_cast<float>(x); }
inline float load(bf16 x) {
    const std::uint32_t u = std::uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
template <typename S, typename T>
inline S store(T v) { return static_cast<S>(v); }  // float, double, half (round to nearest even)
template <>
inline bf16 store<bf16, float>(float v) {
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return bf16{std::uint16_t(nan ? 0x7fc0u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};  // (NaN: torch's 0x7fc0)
}
// the compute type of a storage type: fp64 for fp64, fp32 for fp32, bf16 and fp16
template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;
// dtype codes of the bindings: fp32, fp64, bf16, fp16 (fastnlg/ops/_native.py's dtype_code)
constexpr int DT_F32 = 0, DT_F64 = 1, DT_BF16 = 2, DT_F16 = 3;

template <typename T> void rms_norm_fwd(const T* x, const T* w, T* y, T* rstd, int64_t N, int64_t C, double eps, double offset,
                                       int round_xhat);
template <typename T> void rms_norm_bwd(const T* dy, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t N, int64_t C, double offset);
// res / sum: the residual and the sum's output (add_layer_norm), both null for a plain LayerNorm; ds: the sum
// output's gradient, or null.
template <typename T> void layer_norm_fwd(const T* x, const T* res, const T* w, const T* b, T* y, T* sum, T* mean,
                                          T* rstd, int64_t N, int64_t C, double eps, int round_sum);
template <typename T> void layer_norm_bwd(const T* dy, const T* x, const T* w, const T* mean, const T* rstd,
                                          const T* ds, T* dx, T* dw, T* db, int64_t N, int64_t C);
// gated activations over n values stored as S (float, double, bf16, half)
template <typename S> void glu_fwd(const S* gate, const S* up, S* y, int64_t n, int kind, int round_act);
template <typename S> void glu_bwd(const S* dy, const S* gate, const S* up, S* dgate, S* dup, int64_t n, int kind);
// y = gelu(x + bias) over N rows of C stored as S (bias (C,) or null); dz = dy * gelu'(x + bias) in the compute
// type (the caller sums it for the bias gradient before casting it); tanh or erf form
template <typename S> void gelu_fwd(const S* x, const S* bias, S* y, int64_t N, int64_t C, bool tanh);
template <typename S> void gelu_bwd(const S* dy, const S* x, const S* bias, acc_t<S>* dz, int64_t N, int64_t C, bool tanh);
template <typename T> void cross_entropy_fwd(T* x, const int64_t* labels, const T* scale, T* loss, T* lse, int64_t N,
                                            int64_t V, int64_t stride, int64_t ignore_index, double eps,
                                            double softcap, double z_loss, const T* class_weight);
// log p(label) and (ent non-null) the entropy per row of x / T (x: N rows of V at `stride`); with ga / gb
// (the row gradients of logp / of the entropy, either may be null) the logits' gradient overwrites x
template <typename T> void logprobs_rows(T* x, const int64_t* labels, T* logp, T* ent, const T* ga, const T* gb,
                                        int64_t N, int64_t V, int64_t stride, int64_t ignore_index, double inv_t);
// Which build of the fp32 hot loops runs: "auto" (the best the CPU has), "baseline", "x86-64-v3" or
// "x86-64-v4" (one the CPU lacks keeps the current); returns the one now in use. For tests.
const char* set_cpu_isa(const char* isa);
template <typename T> void rope(const T* x, const int64_t* sx, const T* cos, const T* sin, const int64_t* sc, T* out,
                                int64_t B, int64_t H, int64_t T_, int64_t D, bool backward);

void nf4_quantize(const float* x, unsigned char* packed, float* absmax, int64_t n, int64_t blocksize);
void nf4_dequantize(const unsigned char* packed, const float* absmax, float* out, int64_t n, int64_t blocksize);

// glu kinds
constexpr int GLU_SWIGLU = 0, GLU_GEGLU_TANH = 1, GLU_GEGLU_ERF = 2;

}  // namespace fastnlg
