// NF4 on CUDA: dequantisation and the fused NF4 matrix-vector product for batch-1 generation.
// Layout (fastnlg/quant/nf4.py, identical to bitsandbytes): W (out, in) row-major, element e = o * in + i,
// byte e / 2 holds e even in its high nibble; absmax[e / blocksize] is the (decoded, fp32) block scale.
//
//   dequantise: W[e] = NF4[q_e] * absmax[e / bs]                      (fp32 math, then the output type)
//   gemv:       y[o] = sum_i x[i] * NF4[q_{o,i}] * absmax[(o in + i) / bs]   (fp32 accumulation)
// The gemv reads each packed byte once (in / 2 bytes per row): one warp per output row, each lane taking
// 4 bytes (8 weights) per step, a warp-shuffle reduction at the end. Needs in % 8 == 0 (checked in Python).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "nf4_cuda.h"

namespace fastnlg_cuda {

__constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                      T* __restrict__ out, int64_t n_bytes, int64_t bs) {
    const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (j >= n_bytes) return;
    const uint8_t byte = packed[j];
    const float scale = absmax[(2 * j) / bs];
    out[2 * j] = from_float<T>(kNF4[byte >> 4] * scale);
    out[2 * j + 1] = from_float<T>(kNF4[byte & 0xF] * scale);
}

template <typename T>
__global__ void nf4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                const float* __restrict__ absmax, T* __restrict__ y, int64_t out_features,
                                int64_t in_features, int64_t bs) {
    const int lane = threadIdx.x & 31;
    const int64_t row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= out_features) return;
    const int64_t row_elem = row * in_features;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(packed + row_elem / 2);  // in % 8 == 0: aligned
    float acc = 0.0f;
    for (int64_t w = lane; w < in_features / 8; w += 32) {
        const uint32_t word = __ldg(words + w);
        const int64_t i0 = 8 * w;
        const float scale = absmax[(row_elem + i0) / bs];  // bs >= 64: 8 weights share a block
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const uint32_t byte = (word >> (8 * b)) & 0xFF;
            acc += to_float<T>(x[i0 + 2 * b]) * kNF4[byte >> 4] * scale;
            acc += to_float<T>(x[i0 + 2 * b + 1]) * kNF4[byte & 0xF] * scale;
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) y[row] = from_float<T>(acc);
}

template <typename T>
static void launch_dequantize(const uint8_t* packed, const float* absmax, void* out, int64_t n_bytes, int64_t bs,
                              cudaStream_t stream) {
    const int threads = 256;
    const int64_t blocks = (n_bytes + threads - 1) / threads;
    nf4_dequantize_kernel<T><<<blocks, threads, 0, stream>>>(packed, absmax, static_cast<T*>(out), n_bytes, bs);
}

template <typename T>
static void launch_gemv(const void* x, const uint8_t* packed, const float* absmax, void* y, int64_t out_f, int64_t in_f,
                        int64_t bs, cudaStream_t stream) {
    const int warps = 4;
    const int64_t blocks = (out_f + warps - 1) / warps;
    nf4_gemv_kernel<T><<<blocks, warps * 32, 0, stream>>>(static_cast<const T*>(x), packed, absmax, static_cast<T*>(y),
                                                         out_f, in_f, bs);
}

int nf4_dequantize(const uint8_t* packed, const float* absmax, void* out, int dtype, int64_t n_bytes, int64_t bs,
                   cudaStream_t stream) {
    switch (dtype) {
        case DTYPE_F32: launch_dequantize<float>(packed, absmax, out, n_bytes, bs, stream); break;
        case DTYPE_F16: launch_dequantize<__half>(packed, absmax, out, n_bytes, bs, stream); break;
        case DTYPE_BF16: launch_dequantize<__nv_bfloat16>(packed, absmax, out, n_bytes, bs, stream); break;
        default: return -1;
    }
    return static_cast<int>(cudaGetLastError());
}

int nf4_gemv(const void* x, const uint8_t* packed, const float* absmax, void* y, int dtype, int64_t out_features,
             int64_t in_features, int64_t bs, cudaStream_t stream) {
    switch (dtype) {
        case DTYPE_F32: launch_gemv<float>(x, packed, absmax, y, out_features, in_features, bs, stream); break;
        case DTYPE_F16: launch_gemv<__half>(x, packed, absmax, y, out_features, in_features, bs, stream); break;
        case DTYPE_BF16: launch_gemv<__nv_bfloat16>(x, packed, absmax, y, out_features, in_features, bs, stream); break;
        default: return -1;
    }
    return static_cast<int>(cudaGetLastError());
}

}  // namespace fastnlg_cuda
