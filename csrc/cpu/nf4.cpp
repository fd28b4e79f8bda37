// NF4 quantise / dequantise (the format and its rounding rules: fastnlg/quant/nf4.py).
//
//   block b = elements [b * bs, min(n, (b + 1) * bs)),  absmax_b = max |x|
//   s = clamp(x * (1 / max(absmax_b, 1e-38)), -1, 1)  (a short last block divides: x / absmax_b)
//   q = #{k : MID[k] < s}  (MID = the 15 midpoints of the NF4 code: ties go to the lower code)
//   byte j = q[2j] << 4 | q[2j + 1];   dequantised x = CODE[q] * absmax_b  (fp32)
// n and bs are even, so a byte never straddles two blocks. Blocks are split over OpenMP threads.
#include "fastnlg_cpu.h"

#include <algorithm>
#include <cmath>

namespace fastnlg {

static const float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

static inline unsigned char nf4_index(float s, const float* mid) {
    unsigned char q = 0;
    for (int k = 0; k < 15; ++k) q += mid[k] < s;
    return q;
}

void nf4_quantize(const float* x, unsigned char* packed, float* absmax, int64_t n, int64_t bs) {
    float mid[15];
    for (int k = 0; k < 15; ++k) mid[k] = (NF4_CODE[k] + NF4_CODE[k + 1]) / 2.0f;
    const int64_t blocks = (n + bs - 1) / bs;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t lo = b * bs, hi = std::min(n, lo + bs);
        float am = 0.0f;
        for (int64_t i = lo; i < hi; ++i) am = std::max(am, std::fabs(x[i]));
        absmax[b] = am;
        const float safe = std::max(am, 1e-38f), inv = 1.0f / safe;
        const bool short_block = hi - lo < bs;
        for (int64_t i = lo; i < hi; i += 2) {
            float s0 = short_block ? x[i] / safe : x[i] * inv;
            float s1 = short_block ? x[i + 1] / safe : x[i + 1] * inv;
            s0 = std::min(1.0f, std::max(-1.0f, s0));
            s1 = std::min(1.0f, std::max(-1.0f, s1));
            packed[i / 2] = static_cast<unsigned char>(nf4_index(s0, mid) << 4 | nf4_index(s1, mid));
        }
    }
}

void nf4_dequantize(const unsigned char* packed, const float* absmax, float* out, int64_t n, int64_t bs) {
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n / 2; ++j) {
        const float scale = absmax[(2 * j) / bs];
        out[2 * j] = NF4_CODE[packed[j] >> 4] * scale;
        out[2 * j + 1] = NF4_CODE[packed[j] & 0xF] * scale;
    }
}

}  // namespace fastnlg
