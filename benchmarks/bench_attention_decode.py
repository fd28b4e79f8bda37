"""Decoding attention: one query row per sequence (T = 1) against a KV cache of S tokens, inference only.
fastnlg's flash-decoding (split over S) vs eager and SDPA. Bytes: the KV cache read, 2 B Hkv S D s
(the query and output are negligible); the target is >= 80% of the memory bandwidth."""
import torch

from .bench_attention import _sdpa, eager, fastnlg
from .harness import Bench, Case


def cases(quick, device):
    if quick:
        return [Case("B=1,H=8/2,S=2048,D=64", {"B": 1, "Hq": 8, "Hkv": 2, "S": 2048, "D": 64}, 2048)]
    return [Case(f"B={b},H=32/8,S={s},D=128", {"B": b, "Hq": 32, "Hkv": 8, "S": s, "D": 128}, s)
            for b in (1, 8) for s in (4096, 16384, 65536, 131072)]


def make_inputs(p, device, dtype):
    B, S, D = p["B"], p["S"], p["D"]
    return {"q": torch.randn(B, p["Hq"], 1, D, device=device, dtype=dtype),
            "k": torch.randn(B, p["Hkv"], S, D, device=device, dtype=dtype),
            "v": torch.randn(B, p["Hkv"], S, D, device=device, dtype=dtype), "causal": True}


def bytes_moved(p, dtype, mode):
    return 2 * p["B"] * p["Hkv"] * p["S"] * p["D"] * torch.tensor([], dtype=dtype).element_size()


BENCH = Bench("attention_decode", cases, make_inputs,
              {"fastnlg": fastnlg, "eager": eager, "sdpa": _sdpa("FLASH_ATTENTION")},
              bytes_moved=bytes_moved, modes=("fwd",), x_label="KV cache length S")
