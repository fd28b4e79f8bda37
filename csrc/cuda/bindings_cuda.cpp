// pybind11 bindings for fastnlg._C_cuda: pointers and the CUDA stream arrive as integers; an error code other
// than 0 becomes a RuntimeError naming the CUDA error.
#include <pybind11/pybind11.h>

#include <string>

#include "nf4_cuda.h"

namespace py = pybind11;
using ptr = std::uintptr_t;

static void check(int code, const char* what) {
    if (code == -1) throw std::runtime_error(std::string(what) + ": unsupported dtype code");
    if (code != 0)
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(static_cast<cudaError_t>(code)));
}

PYBIND11_MODULE(_C_cuda, m) {
    m.doc() = "fastnlg CUDA kernels (raw pointers + sizes; inputs are checked in Python)";
    m.attr("DTYPE_F32") = fastnlg_cuda::DTYPE_F32;
    m.attr("DTYPE_F16") = fastnlg_cuda::DTYPE_F16;
    m.attr("DTYPE_BF16") = fastnlg_cuda::DTYPE_BF16;
    m.def("nf4_dequantize", [](ptr packed, ptr absmax, ptr out, int dtype, int64_t n_bytes, int64_t bs, ptr stream) {
        check(fastnlg_cuda::nf4_dequantize(reinterpret_cast<const uint8_t*>(packed), reinterpret_cast<const float*>(absmax),
                                           reinterpret_cast<void*>(out), dtype, n_bytes, bs,
                                           reinterpret_cast<cudaStream_t>(stream)), "nf4_dequantize");
    });
    m.def("nf4_gemv", [](ptr x, ptr packed, ptr absmax, ptr y, int dtype, int64_t out_f, int64_t in_f, int64_t bs,
                         ptr stream) {
        check(fastnlg_cuda::nf4_gemv(reinterpret_cast<const void*>(x), reinterpret_cast<const uint8_t*>(packed),
                                     reinterpret_cast<const float*>(absmax), reinterpret_cast<void*>(y), dtype, out_f,
                                     in_f, bs, reinterpret_cast<cudaStream_t>(stream)), "nf4_gemv");
    });
}
