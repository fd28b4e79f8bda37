// RMSNorm and LayerNorm, forward and backward, over rows of length C.
//
// RMSNorm:   r = (mean(x^2) + eps)^-1/2,  y = x * r * (w + offset), or with round_xhat (Llama's casting:
//   x * r is cast to the input's bf16 / fp16 before the multiply) y = round(x * r) * (w + offset)
//   g = dy * (w + offset),  dx = r * g - x * r^3 * mean(g * x),  dw = sum_rows dy * x * r
// LayerNorm: mu = mean(x), r = (var(x) + eps)^-1/2, xh = (x - mu) * r, y = xh * w + b
//   g = dy * w,  dx = r * (g - mean(g) - xh * mean(g * xh)),  dw = sum_rows dy * xh,  db = sum_rows dy
// With a residual (add_layer_norm) the rows normalised are s = x + residual, rounded as the caller's dtype
// rounds the add (round code) and written to `sum` (the backward's x); the backward adds the sum output's
// gradient ds (when given) to dx, the gradient of both x and the residual.
//
// dw/db use a two-stage reduction: each thread sums its rows into a private row, then the thread rows
// are added (no atomics on one shared row).
#include "fastnlg_cpu.h"

#include <omp.h>

#include <cmath>
#include <vector>

namespace fastnlg {

template <typename T>
void rms_norm_fwd(const T* x, const T* w, T* y, T* rstd, int64_t N, int64_t C, double eps, double offset,
                  int round_xhat) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
        const T* xi = x + i * C;
        T ss = 0;  // accumulate in T (fp32 for fp32/fp16/bf16 inputs, as the GPU kernels do)
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < C; ++j) ss += xi[j] * xi[j];
        const T r = T(1) / std::sqrt(ss / T(C) + T(eps));
        rstd[i] = r;
        T* yi = y + i * C;  // may be xi itself (in place): each element is read before it is written
        if (round_xhat) {
            for (int64_t j = 0; j < C; ++j) yi[j] = round_to(xi[j] * r, round_xhat) * (w[j] + T(offset));
        } else {
#pragma omp simd
            for (int64_t j = 0; j < C; ++j) yi[j] = xi[j] * r * (w[j] + T(offset));
        }
    }
}

// Sums per-thread partial rows `part` (threads x C) into `out` (C).
template <typename T>
static void reduce_partials(const std::vector<T>& part, int threads, int64_t C, T* out) {
    for (int64_t j = 0; j < C; ++j) {
        T s = 0;
        for (int t = 0; t < threads; ++t) s += part[size_t(t) * C + j];
        out[j] = s;
    }
}

template <typename T>
void rms_norm_bwd(const T* dy, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t N, int64_t C, double offset) {
    const int threads = omp_get_max_threads();
    std::vector<T> part(dw ? size_t(threads) * C : 0, T(0));
#pragma omp parallel num_threads(threads)
    {
        T* acc = dw ? part.data() + size_t(omp_get_thread_num()) * C : nullptr;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N; ++i) {
            const T* xi = x + i * C;
            const T* dyi = dy + i * C;
            const T r = rstd[i];
            T dot = 0;  // sum_j g_j x_j
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < C; ++j) dot += dyi[j] * (w[j] + T(offset)) * xi[j];
            const T c = dot / T(C) * r * r * r;
            T* dxi = dx + i * C;
#pragma omp simd
            for (int64_t j = 0; j < C; ++j) dxi[j] = r * dyi[j] * (w[j] + T(offset)) - xi[j] * c;
            if (acc) {
#pragma omp simd
                for (int64_t j = 0; j < C; ++j) acc[j] += dyi[j] * xi[j] * r;
            }
        }
    }
    if (dw) reduce_partials(part, threads, C, dw);
}

template <typename T>
void layer_norm_fwd(const T* x, const T* res, const T* w, const T* b, T* y, T* sum, T* mean, T* rstd, int64_t N,
                    int64_t C, double eps, int round_sum) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
        const T* xi = x + i * C;
        if (res) {
            const T* ri = res + i * C;
            T* si = sum + i * C;
            for (int64_t j = 0; j < C; ++j) si[j] = round_to(xi[j] + ri[j], round_sum);
            xi = si;
        }
        double s = 0.0;
        for (int64_t j = 0; j < C; ++j) s += double(xi[j]);
        const double mu = s / double(C);
        double v = 0.0;
        for (int64_t j = 0; j < C; ++j) v += (double(xi[j]) - mu) * (double(xi[j]) - mu);
        const T r = T(1.0 / std::sqrt(v / double(C) + eps));
        mean[i] = T(mu);
        rstd[i] = r;
        T* yi = y + i * C;
        for (int64_t j = 0; j < C; ++j) yi[j] = (xi[j] - T(mu)) * r * w[j] + (b ? b[j] : T(0));
    }
}

template <typename T>
void layer_norm_bwd(const T* dy, const T* x, const T* w, const T* mean, const T* rstd, const T* ds, T* dx, T* dw, T* db,
                    int64_t N, int64_t C) {
    const int threads = omp_get_max_threads();
    std::vector<T> part_w(dw ? size_t(threads) * C : 0, T(0)), part_b(db ? size_t(threads) * C : 0, T(0));
#pragma omp parallel num_threads(threads)
    {
        const size_t base = size_t(omp_get_thread_num()) * C;
        T* acc_w = dw ? part_w.data() + base : nullptr;
        T* acc_b = db ? part_b.data() + base : nullptr;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N; ++i) {
            const T* xi = x + i * C;
            const T* dyi = dy + i * C;
            const T mu = mean[i], r = rstd[i];
            double sg = 0.0, sgx = 0.0;
            for (int64_t j = 0; j < C; ++j) {
                const double g = double(dyi[j]) * double(w[j]);
                sg += g;
                sgx += g * (double(xi[j]) - double(mu)) * double(r);
            }
            const T mg = T(sg / double(C)), mgx = T(sgx / double(C));
            T* dxi = dx + i * C;
            const T* dsi = ds ? ds + i * C : nullptr;
            for (int64_t j = 0; j < C; ++j) {
                const T xh = (xi[j] - mu) * r;
                dxi[j] = r * (dyi[j] * w[j] - mg - xh * mgx) + (dsi ? dsi[j] : T(0));
                if (acc_w) acc_w[j] += dyi[j] * xh;
                if (acc_b) acc_b[j] += dyi[j];
            }
        }
    }
    if (dw) reduce_partials(part_w, threads, C, dw);
    if (db) reduce_partials(part_b, threads, C, db);
}

#define FASTNLG_INSTANTIATE(T)                                                                               \
    template void rms_norm_fwd<T>(const T*, const T*, T*, T*, int64_t, int64_t, double, double, int);        \
    template void rms_norm_bwd<T>(const T*, const T*, const T*, const T*, T*, T*, int64_t, int64_t, double); \
    template void layer_norm_fwd<T>(const T*, const T*, const T*, const T*, T*, T*, T*, T*, int64_t, int64_t, double, \
                                    int);                                                                    \
    template void layer_norm_bwd<T>(const T*, const T*, const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, \
                                    int64_t);
FASTNLG_INSTANTIATE(float)
FASTNLG_INSTANTIATE(double)

}  // namespace fastnlg
