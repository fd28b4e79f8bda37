"""NF4 dequantisation (GB/s over packed bytes read + output written) and batch-1 decode GEMV
(y = x W^T for one token, GB/s over the packed weight) - fastnlg vs bitsandbytes when installed. The same
one-token product through lora_linear (the Triton NF4 matmul on CUDA, which batch-1 decode runs today) is
timed beside the CUDA GEMV: which of the two batch-1 decode should take is read from these rows.
Target: dequantisation >= 85% of the memory bandwidth."""
import importlib.util

import torch

from fastnlg.ops import lora_linear
from fastnlg.quant import _backends, quantize_nf4

from .harness import Bench, Case


def cases(quick, device):
    if quick:
        return [Case("512x1024", {"out": 512, "in": 1024}, 512 * 1024)]
    return [Case(f"{o}x{i}", {"out": o, "in": i}, o * i) for (o, i) in ((4096, 4096), (14336, 4096), (4096, 14336),
                                                                         (128256, 4096))]


def make_inputs(p, device, dtype):
    W = torch.randn(p["out"], p["in"], device=device, dtype=dtype) * 0.02
    return {"w": quantize_nf4(W, 64, True), "x": torch.randn(p["in"], device=device, dtype=dtype), "dtype": dtype}


def dequantize(w, x, dtype):
    return w.dequantize(dtype)


def gemv(w, x, dtype):
    return _backends.gemv(x, w)


def nf4_matmul_one_token(w, x, dtype):
    return lora_linear(x[None], w, [], [], scaling=[])[0]


def _peers():
    if not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")):
        return {}
    import bitsandbytes.functional as bf
    cache = {}

    def bnb_dequantize(w, x, dtype):
        if id(w) not in cache:
            cache[id(w)] = w.to_bnb()
        p = cache[id(w)]
        return bf.dequantize_4bit(p.data, p.quant_state)
    return {"bnb-dequantize": bnb_dequantize}


def bytes_moved(p, dtype, mode):
    n = p["out"] * p["in"]
    return n / 2 + n * torch.tensor([], dtype=dtype).element_size()  # (dequantise; the GEMV row reads n / 2)


BENCH = Bench("nf4", cases, make_inputs, {"fastnlg-dequantize": dequantize, "fastnlg-gemv": gemv,
                                          "fastnlg-lora_linear-1-token": nf4_matmul_one_token, **_peers()},
              bytes_moved=bytes_moved, modes=("fwd",), x_label="weight elements")
