// Rotary position embedding with Hugging Face semantics (rotate_half), on x (B, H, T, D) and cos/sin
// (B, T, D) of any strides but a unit one along D (x: strides sx = (b, h, t); cos and sin share strides
// sc = (b, t), 0 for a broadcast batch), into a contiguous out (B, H, T, D); h = D / 2. HF's q and k are
// transposed views (B, T, H, D) -> (B, H, T, D) and its cos/sin often one row broadcast over the batch: they
// are read in place, not copied first.
// forward:  out[j]   = x[j] c[j]   - x[j+h] s[j]        (j < h)
//           out[j+h] = x[j+h] c[j+h] + x[j] s[j+h]
// backward (transpose of the forward map, applied to the output gradient):
//           dx[j]    = d[j] c[j]     + d[j+h] s[j+h]
//           dx[j+h]  = d[j+h] c[j+h] - d[j] s[j]
#include "fastnlg_cpu.h"

namespace fastnlg {

template <typename T>
void rope(const T* x, const int64_t* sx, const T* cos, const T* sin, const int64_t* sc, T* out, int64_t B, int64_t H,
          int64_t T_, int64_t D, bool backward) {
    const int64_t h = D / 2;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
        for (int64_t hd = 0; hd < H; ++hd)
            for (int64_t t = 0; t < T_; ++t) {
                const T* xi = x + b * sx[0] + hd * sx[1] + t * sx[2];
                const T* c = cos + b * sc[0] + t * sc[1];
                const T* s = sin + b * sc[0] + t * sc[1];
                T* o = out + ((b * H + hd) * T_ + t) * D;
                for (int64_t j = 0; j < h; ++j) {
                    const T x1 = xi[j], x2 = xi[j + h];
                    if (!backward) {
                        o[j] = x1 * c[j] - x2 * s[j];
                        o[j + h] = x2 * c[j + h] + x1 * s[j + h];
                    } else {
                        o[j] = x1 * c[j] + x2 * s[j + h];
                        o[j + h] = x2 * c[j + h] - x1 * s[j];
                    }
                }
            }
}

template void rope<float>(const float*, const int64_t*, const float*, const float*, const int64_t*, float*, int64_t,
                          int64_t, int64_t, int64_t, bool);
template void rope<double>(const double*, const int64_t*, const double*, const double*, const int64_t*, double*, int64_t,
                           int64_t, int64_t, int64_t, bool);

}  // namespace fastnlg
