// Host entry points of csrc/cuda/nf4.cu (raw pointers + sizes; Python checks the inputs, DESIGN.md §4.5).
// Return a cudaError_t as int (0 = success), -1 for an unsupported dtype code.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace fastnlg_cuda {

constexpr int DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2;

int nf4_dequantize(const uint8_t* packed, const float* absmax, void* out, int dtype, int64_t n_bytes, int64_t bs,
                   cudaStream_t stream);
int nf4_gemv(const void* x, const uint8_t* packed, const float* absmax, void* y, int dtype, int64_t out_features,
             int64_t in_features, int64_t bs, cudaStream_t stream);

}  // namespace fastnlg_cuda
