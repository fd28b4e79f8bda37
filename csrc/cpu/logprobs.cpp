// Per-token log-probabilities and entropies over rows of logits, for the chunked fused_linear_logprobs,
// with the gradient optionally written in place of the logits. Same math as kernels/logprobs.py:
//
//   z = x / T,  m = max_v z_v,  s = sum_v e^{z_v - m},  t = sum_v e^{z_v - m} (z_v - m)
//   lse = m + log s,  logp = z_y - lse,  H = -sum_v p_v log p_v = log s - t / s,  p = softmax(z)
//   with row gradients a (of logp) and b (of H), E = sum_v p_v z_v (so z_v - E = (z_v - m) - t / s):
//   dx_v = (a ([v == y] - p_v) - b p_v (z_v - E)) / T            (0 on rows where y == ignore_index)
// Logits of -inf (a masked vocabulary) have p_v = 0 and add nothing to H or to the gradient (no 0 * inf).
//
// Sweeps per row: max; sum (keeping e_v = e^{z_v - m} in the row when only logp has a gradient, so the
// gradient sweep scales it: one exp per logit); gradient. Rows are split over OpenMP threads. The fp32 row
// is built per x86-64 level like the cross-entropy row (cross_entropy.cpp) and follows its choice.
#include "fastnlg_cpu.h"

#include <cmath>
#include <limits>

namespace fastnlg {

template <typename T>
static inline __attribute__((always_inline)) void lp_row(T* xr, int64_t y, bool valid, T inv_t, int64_t V, T* logp,
                                                          T* ent, const T* ga, const T* gb) {
    const bool grad = ga != nullptr || gb != nullptr;
    if (!valid) {
        *logp = 0;
        if (ent) *ent = 0;
        if (grad)
            for (int64_t v = 0; v < V; ++v) xr[v] = 0;
        return;
    }
    T m = -std::numeric_limits<T>::infinity(), sx = 0;
#pragma omp simd reduction(max : m) reduction(+ : sx)
    for (int64_t v = 0; v < V; ++v) {
        m = xr[v] > m ? xr[v] : m;
        sx += xr[v];
    }
    if (sx != sx) m = sx;  // a NaN logit (max ignores it) makes the row NaN, as in torch
    const T mz = m * inv_t, zy = xr[y] * inv_t;
    const bool keep_exp = grad && gb == nullptr;
    T s = 0, t = 0;
    if (keep_exp) {
#pragma omp simd reduction(+ : s, t)
        for (int64_t v = 0; v < V; ++v) {
            const T d = xr[v] * inv_t - mz, e = vexp(d);
            xr[v] = e;
            s += e;
            t += e > 0 ? e * d : T(0);
        }
    } else {
#pragma omp simd reduction(+ : s, t)
        for (int64_t v = 0; v < V; ++v) {
            const T d = xr[v] * inv_t - mz, e = vexp(d);
            s += e;
            t += e > 0 ? e * d : T(0);
        }
    }
    const T ls = std::log(s), em = t / s;  // (E - m)
    *logp = zy - (mz + ls);
    if (ent) *ent = ls - em;
    if (!grad) return;
    const T a = ga ? *ga : T(0), b = gb ? *gb : T(0), rs = inv_t / s;
    if (keep_exp) {
        const T c = -a * rs;
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) xr[v] *= c;
    } else {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
            const T d = xr[v] * inv_t - mz, e = vexp(d);
            xr[v] = e > 0 ? -e * rs * (a + b * (d - em)) : T(0);
        }
    }
    xr[y] += a * inv_t;
}

#define FASTNLG_LP_ROW_F32_BUILD(SUFFIX, ATTR)                                                                      \
    ATTR static void lp_row_f32_##SUFFIX(float* xr, int64_t y, bool valid, float inv_t, int64_t V, float* logp,    \
                                         float* ent, const float* ga, const float* gb) {                           \
        lp_row<float>(xr, y, valid, inv_t, V, logp, ent, ga, gb);                                                  \
    }
FASTNLG_LP_ROW_F32_BUILD(baseline, )
#ifdef FASTNLG_X86_V3
FASTNLG_LP_ROW_F32_BUILD(v3, __attribute__((target("arch=x86-64-v3"))))
FASTNLG_LP_ROW_F32_BUILD(v4, __attribute__((target("arch=x86-64-v4"))))
#endif

static void lp_row_f32(float* xr, int64_t y, bool valid, float inv_t, int64_t V, float* logp, float* ent,
                       const float* ga, const float* gb) {
#ifdef FASTNLG_X86_V3
    const int level = isa_level();
    if (level == 4) return lp_row_f32_v4(xr, y, valid, inv_t, V, logp, ent, ga, gb);
    if (level == 3) return lp_row_f32_v3(xr, y, valid, inv_t, V, logp, ent, ga, gb);
#endif
    lp_row_f32_baseline(xr, y, valid, inv_t, V, logp, ent, ga, gb);
}

static void lp_row_f64(double* xr, int64_t y, bool valid, double inv_t, int64_t V, double* logp, double* ent,
                       const double* ga, const double* gb) {
    lp_row<double>(xr, y, valid, inv_t, V, logp, ent, ga, gb);
}

template <typename T, typename Row>
static void lp_rows(Row row, T* x, const int64_t* labels, T* logp, T* ent, const T* ga, const T* gb, int64_t N,
                    int64_t V, int64_t stride, int64_t ignore_index, double inv_t) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i)
        row(x + i * stride, labels[i], labels[i] != ignore_index, T(inv_t), V, logp + i, ent ? ent + i : nullptr,
            ga ? ga + i : nullptr, gb ? gb + i : nullptr);
}

template <>
void logprobs_rows<float>(float* x, const int64_t* labels, float* logp, float* ent, const float* ga, const float* gb,
                          int64_t N, int64_t V, int64_t stride, int64_t ignore_index, double inv_t) {
    lp_rows<float>(lp_row_f32, x, labels, logp, ent, ga, gb, N, V, stride, ignore_index, inv_t);
}

template <>
void logprobs_rows<double>(double* x, const int64_t* labels, double* logp, double* ent, const double* ga,
                           const double* gb, int64_t N, int64_t V, int64_t stride, int64_t ignore_index,
                           double inv_t) {
    lp_rows<double>(lp_row_f64, x, labels, logp, ent, ga, gb, N, V, stride, ignore_index, inv_t);
}

}  // namespace fastnlg
