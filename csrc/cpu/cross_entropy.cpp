// Cross-entropy rows for the chunked (fused linear) loss: loss, log-sum-exp and, optionally, the
// gradient written in place of the logits. Same math as kernels/cross_entropy.py:
//
//   z = c tanh(x / c) (softcap c, else z = x),   lse = m + log sum_v exp(z_v - m),  m = max_v z_v
//   class weights w (all 1 when none given), W = sum_v w_v:
//   loss = (1 - eps) w_y (lse - z_y) + eps / V (W lse - sum_v w_v z_v) + zl lse^2   (0 where y == ignore_index)
//   dx_v = scale * [softmax(z)_v ((1 - eps) w_y + eps W / V + 2 zl lse) - eps w_v / V - (1 - eps) w_y [v == y]]
//          * (1 - (z_v / c)^2)
//
// Three sweeps per row (max + sum z; sum exp; gradient), each a vectorisable loop over V, with one exp per
// logit (the sum sweep keeps exp(z - m) in the row for the gradient sweep); a row of 32k-256k fp32 logits
// (128 KB-1 MB) stays in L2 between sweeps. Rows are split over OpenMP threads.
// fp32 uses exp_f32 (fastnlg_cpu.h: Cephes' expf polynomial, ~1 ulp, vectorisable). The fp32 row kernel is built
// three times (baseline x86-64, x86-64-v3 = AVX2 + FMA, x86-64-v4 = AVX-512: 1.5x v3 on a Zen 4 EPYC); the
// best build the CPU has runs, and set_cpu_isa() forces one, so a test can run every path the machine has.
#include "fastnlg_cpu.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace fastnlg {

template <typename T>
static inline T capped(T x, T c, bool cap) { return cap ? c * std::tanh(x / c) : x; }

template <typename T>
static inline __attribute__((always_inline)) void ce_row(T* xr, int64_t y, const T* scale_i, T* loss, T* lse,
                                                          int64_t V, int64_t ignore_index, T eps, T c, bool cap, T zl,
                                                          const T* w, T wsum) {
    const bool valid = y != ignore_index;
    T m = -std::numeric_limits<T>::infinity(), sz = 0, swz = 0;
    if (cap) {  // tanh keeps these loops scalar: sums in double (a 32k-row fp32 sum would carry ~1e-5)
        double szd = 0, swzd = 0;
        for (int64_t v = 0; v < V; ++v) {
            const T z = c * std::tanh(xr[v] / c);
            m = z > m ? z : m;
            szd += z;
            if (w) swzd += double(w[v]) * z;
        }
        sz = T(szd);
        swz = T(swzd);
    } else if (w) {
#pragma omp simd reduction(max : m) reduction(+ : sz, swz)
        for (int64_t v = 0; v < V; ++v) {
            m = xr[v] > m ? xr[v] : m;
            sz += xr[v];
            swz += w[v] * xr[v];
        }
    } else {
#pragma omp simd reduction(max : m) reduction(+ : sz)
        for (int64_t v = 0; v < V; ++v) {
            m = xr[v] > m ? xr[v] : m;
            sz += xr[v];
        }
    }
    if (sz != sz) m = sz;  // a NaN logit (max ignores it) makes the row NaN, as in torch
    const T zy = valid ? capped(xr[y], c, cap) : T(0);
    // with a gradient to write (and no softcap), the sum sweep leaves e_v = exp(z_v - m) in the row and the
    // gradient sweep scales it (softmax_v = e_v / s): one exp per logit instead of two
    const bool keep_exp = scale_i != nullptr && !cap;
    T s = 0;
    if (cap) {
        double sd = 0;
        for (int64_t v = 0; v < V; ++v) sd += vexp(c * std::tanh(xr[v] / c) - m);
        s = T(sd);
    } else if (keep_exp) {
#pragma omp simd reduction(+ : s)
        for (int64_t v = 0; v < V; ++v) {
            const T e = vexp(xr[v] - m);
            xr[v] = e;
            s += e;
        }
    } else {
#pragma omp simd reduction(+ : s)
        for (int64_t v = 0; v < V; ++v) s += vexp(xr[v] - m);
    }
    const T l = m + std::log(s);
    const T wy = (w && valid) ? w[y] : T(1), W = w ? wsum : T(V);
    // no 0 * inf from -inf logits when eps == 0
    const T smooth = eps > 0 ? (w ? eps / T(V) * (W * l - swz) : eps * (l - sz / T(V))) : T(0);
    *loss = valid ? (1 - eps) * wy * (l - zy) + smooth + zl * l * l : T(0);
    *lse = l;
    if (scale_i == nullptr) return;
    const T sc = valid ? *scale_i : T(0), a = ((1 - eps) * wy + eps * W / T(V) + 2 * zl * l) * sc,
            b = eps / T(V) * sc, hit = (1 - eps) * wy * sc;
    if (cap) {
        for (int64_t v = 0; v < V; ++v) {
            const T t = std::tanh(xr[v] / c);
            xr[v] = (vexp(c * t - l) * a - b * (w ? w[v] : T(1))) * (1 - t * t);
        }
        if (valid) {
            const T t = zy / c;
            xr[y] -= hit * (1 - t * t);
        }
    } else if (w) {  // (xr holds e_v: see keep_exp)
        const T as = a / s;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) xr[v] = xr[v] * as - b * w[v];
        if (valid) xr[y] -= hit;
    } else {
        const T as = a / s;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) xr[v] = xr[v] * as - b;
        if (valid) xr[y] -= hit;
    }
}

// The per-row fp32 kernel, built per x86-64 level.
#define FASTNLG_CE_ROW_F32_BUILD(SUFFIX, ATTR)                                                                     \
    ATTR static void ce_row_f32_##SUFFIX(float* xr, int64_t y, const float* scale_i, float* loss, float* lse,     \
                                         int64_t V, int64_t ignore_index, float eps, float c, bool cap, float zl, \
                                         const float* w, float wsum) {                                            \
        ce_row<float>(xr, y, scale_i, loss, lse, V, ignore_index, eps, c, cap, zl, w, wsum);                      \
    }
FASTNLG_CE_ROW_F32_BUILD(baseline, )

#ifdef FASTNLG_X86_V3
FASTNLG_CE_ROW_F32_BUILD(v3, __attribute__((target("arch=x86-64-v3"))))
FASTNLG_CE_ROW_F32_BUILD(v4, __attribute__((target("arch=x86-64-v4"))))

static int cpu_level() {  // 3: x86-64-v3, 4: x86-64-v4 (AVX-512 F/BW/DQ/VL), else 0
    __builtin_cpu_init();
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return v4 ? 4 : v3 ? 3 : 0;
}
static int level = cpu_level();
#endif

int isa_level() {
#ifdef FASTNLG_X86_V3
    return level;
#else
    return 0;
#endif
}

const char* set_cpu_isa(const char* isa) {
#ifdef FASTNLG_X86_V3
    const int best = cpu_level();
    if (std::strcmp(isa, "baseline") == 0) level = 0;
    else if (std::strcmp(isa, "x86-64-v3") == 0 && best >= 3) level = 3;
    else if (std::strcmp(isa, "x86-64-v4") == 0 && best >= 4) level = 4;
    else if (std::strcmp(isa, "auto") == 0) level = best;
    return level == 4 ? "x86-64-v4" : level == 3 ? "x86-64-v3" : "baseline";
#else
    (void)isa;
    return "baseline";
#endif
}

static void ce_row_f32(float* xr, int64_t y, const float* scale_i, float* loss, float* lse, int64_t V,
                       int64_t ignore_index, float eps, float c, bool cap, float zl, const float* w, float wsum) {
#ifdef FASTNLG_X86_V3
    if (level == 4) return ce_row_f32_v4(xr, y, scale_i, loss, lse, V, ignore_index, eps, c, cap, zl, w, wsum);
    if (level == 3) return ce_row_f32_v3(xr, y, scale_i, loss, lse, V, ignore_index, eps, c, cap, zl, w, wsum);
#endif
    ce_row_f32_baseline(xr, y, scale_i, loss, lse, V, ignore_index, eps, c, cap, zl, w, wsum);
}

static void ce_row_f64(double* xr, int64_t y, const double* scale_i, double* loss, double* lse, int64_t V,
                       int64_t ignore_index, double eps, double c, bool cap, double zl, const double* w,
                       double wsum) {
    ce_row<double>(xr, y, scale_i, loss, lse, V, ignore_index, eps, c, cap, zl, w, wsum);
}

template <typename T, typename Row>
static void ce_rows(Row row, T* x, const int64_t* labels, const T* scale, T* loss, T* lse, int64_t N, int64_t V,
                    int64_t stride, int64_t ignore_index, double eps, double softcap, double z_loss, const T* w) {
    const bool cap = softcap > 0;
    const T c = cap ? T(softcap) : T(1);
    T wsum = 0;
    if (w)
        for (int64_t v = 0; v < V; ++v) wsum += w[v];
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i)
        row(x + i * stride, labels[i], scale ? scale + i : nullptr, loss + i, lse + i, V, ignore_index, T(eps), c, cap,
            T(z_loss), w, wsum);
}

template <>
void cross_entropy_fwd<float>(float* x, const int64_t* labels, const float* scale, float* loss, float* lse, int64_t N,
                              int64_t V, int64_t stride, int64_t ignore_index, double eps, double softcap,
                              double z_loss, const float* w) {
    ce_rows<float>(ce_row_f32, x, labels, scale, loss, lse, N, V, stride, ignore_index, eps, softcap, z_loss, w);
}

template <>
void cross_entropy_fwd<double>(double* x, const int64_t* labels, const double* scale, double* loss, double* lse,
                               int64_t N, int64_t V, int64_t stride, int64_t ignore_index, double eps, double softcap,
                               double z_loss, const double* w) {
    ce_rows<double>(ce_row_f64, x, labels, scale, loss, lse, N, V, stride, ignore_index, eps, softcap, z_loss, w);
}

}  // namespace fastnlg
