// pybind11 bindings for fastnlg._C. Pointers arrive as integers (tensor.data_ptr()) with an `is_double`
// flag choosing the float/double instantiation; the GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "fastnlg_cpu.h"

namespace py = pybind11;
using std::int64_t;
using ptr = std::uintptr_t;

template <typename T> static T* P(ptr p) { return reinterpret_cast<T*>(p); }

#define DISPATCH(is_double, CALL) \
    do {                          \
        if (is_double) {          \
            using T = double;     \
            CALL;                 \
        } else {                  \
            using T = float;      \
            CALL;                 \
        }                         \
    } while (0)

// the storage type S of a dtype code (fastnlg_cpu.h: DT_*), for the kernels that read fp16/bf16 in place
#define DISPATCH_STORAGE(dt, CALL)                                                      \
    do {                                                                                \
        if (dt == fastnlg::DT_F64) {                                                    \
            using S = double;                                                           \
            CALL;                                                                       \
        } else if (dt == fastnlg::DT_BF16) {                                            \
            using S = fastnlg::bf16;                                                    \
            CALL;                                                                       \
        } else if (dt == fastnlg::DT_F16) {                                             \
            using S = fastnlg::half;                                                    \
            CALL;                                                                       \
        } else {                                                                        \
            using S = float;                                                            \
            CALL;                                                                       \
        }                                                                               \
    } while (0)

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastnlg C++ CPU kernels (raw pointers + sizes; inputs are checked in Python)";
    auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("rms_norm_fwd", [](ptr x, ptr w, ptr y, ptr rstd, int64_t N, int64_t C, double eps, double offset,
                             int round_xhat, bool d) {
        DISPATCH(d, fastnlg::rms_norm_fwd<T>(P<T>(x), P<T>(w), P<T>(y), P<T>(rstd), N, C, eps, offset, round_xhat));
    }, nogil);
    m.def("rms_norm_bwd", [](ptr dy, ptr x, ptr w, ptr rstd, ptr dx, ptr dw, int64_t N, int64_t C, double offset, bool d) {
        DISPATCH(d, fastnlg::rms_norm_bwd<T>(P<T>(dy), P<T>(x), P<T>(w), P<T>(rstd), P<T>(dx), P<T>(dw), N, C, offset));
    }, nogil);
    m.def("layer_norm_fwd", [](ptr x, ptr res, ptr w, ptr b, ptr y, ptr sum, ptr mean, ptr rstd, int64_t N, int64_t C,
                               double eps, int round_sum, bool d) {
        DISPATCH(d, fastnlg::layer_norm_fwd<T>(P<T>(x), P<T>(res), P<T>(w), P<T>(b), P<T>(y), P<T>(sum), P<T>(mean),
                                               P<T>(rstd), N, C, eps, round_sum));
    }, nogil);
    m.def("layer_norm_bwd", [](ptr dy, ptr x, ptr w, ptr mean, ptr rstd, ptr ds, ptr dx, ptr dw, ptr db, int64_t N,
                               int64_t C, bool d) {
        DISPATCH(d, fastnlg::layer_norm_bwd<T>(P<T>(dy), P<T>(x), P<T>(w), P<T>(mean), P<T>(rstd), P<T>(ds), P<T>(dx),
                                               P<T>(dw), P<T>(db), N, C));
    }, nogil);
    m.def("glu_fwd", [](ptr gate, ptr up, ptr y, int64_t n, int kind, int round_act, int dt) {
        DISPATCH_STORAGE(dt, fastnlg::glu_fwd<S>(P<S>(gate), P<S>(up), P<S>(y), n, kind, round_act));
    }, nogil);
    m.def("glu_bwd", [](ptr dy, ptr gate, ptr up, ptr dgate, ptr dup, int64_t n, int kind, int dt) {
        DISPATCH_STORAGE(dt, fastnlg::glu_bwd<S>(P<S>(dy), P<S>(gate), P<S>(up), P<S>(dgate), P<S>(dup), n, kind));
    }, nogil);
    m.def("gelu_fwd", [](ptr x, ptr bias, ptr y, int64_t N, int64_t C, bool tanh, int dt) {
        DISPATCH_STORAGE(dt, fastnlg::gelu_fwd<S>(P<S>(x), P<S>(bias), P<S>(y), N, C, tanh));
    }, nogil);
    m.def("gelu_bwd", [](ptr dy, ptr x, ptr bias, ptr dz, int64_t N, int64_t C, bool tanh, int dt) {
        DISPATCH_STORAGE(dt, fastnlg::gelu_bwd<S>(P<S>(dy), P<S>(x), P<S>(bias), P<fastnlg::acc_t<S>>(dz), N, C, tanh));
    }, nogil);
    m.def("rope", [](ptr x, int64_t sxb, int64_t sxh, int64_t sxt, ptr cos, ptr sin, int64_t scb, int64_t sct, ptr out,
                     int64_t B, int64_t H, int64_t T_, int64_t D, bool backward, bool d) {
        const int64_t sx[3] = {sxb, sxh, sxt}, sc[2] = {scb, sct};
        DISPATCH(d, fastnlg::rope<T>(P<T>(x), sx, P<T>(cos), P<T>(sin), sc, P<T>(out), B, H, T_, D, backward));
    }, nogil);
    m.def("cross_entropy_fwd", [](ptr x, ptr labels, ptr scale, ptr loss, ptr lse, int64_t N, int64_t V, int64_t stride,
                                  int64_t ignore_index, double eps, double softcap, double z_loss, ptr class_weight,
                                  bool d) {
        DISPATCH(d, fastnlg::cross_entropy_fwd<T>(P<T>(x), P<const int64_t>(labels), P<const T>(scale), P<T>(loss),
                                                  P<T>(lse), N, V, stride, ignore_index, eps, softcap, z_loss,
                                                  P<const T>(class_weight)));
    }, nogil);
    m.def("logprobs_rows", [](ptr x, ptr labels, ptr logp, ptr ent, ptr ga, ptr gb, int64_t N, int64_t V,
                              int64_t stride, int64_t ignore_index, double inv_t, bool d) {
        DISPATCH(d, fastnlg::logprobs_rows<T>(P<T>(x), P<const int64_t>(labels), P<T>(logp), P<T>(ent),
                                              P<const T>(ga), P<const T>(gb), N, V, stride, ignore_index, inv_t));
    }, nogil);
    m.def("set_cpu_isa", [](const std::string& isa) { return std::string(fastnlg::set_cpu_isa(isa.c_str())); },
          "'auto', 'baseline', 'x86-64-v3' or 'x86-64-v4': which build of the fp32 cross-entropy row kernel runs "
          "(one the CPU lacks keeps the current); returns the one in use");
    m.def("nf4_quantize", [](ptr x, ptr packed, ptr absmax, int64_t n, int64_t bs) {
        fastnlg::nf4_quantize(P<const float>(x), P<unsigned char>(packed), P<float>(absmax), n, bs);
    }, nogil);
    m.def("nf4_dequantize", [](ptr packed, ptr absmax, ptr out, int64_t n, int64_t bs) {
        fastnlg::nf4_dequantize(P<const unsigned char>(packed), P<const float>(absmax), P<float>(out), n, bs);
    }, nogil);
    m.attr("GLU_SWIGLU") = fastnlg::GLU_SWIGLU;
    m.attr("GLU_GEGLU_TANH") = fastnlg::GLU_GEGLU_TANH;
    m.attr("GLU_GEGLU_ERF") = fastnlg::GLU_GEGLU_ERF;
}
