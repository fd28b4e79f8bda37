"""Size sweeps shared by the row-wise op benchmarks: hidden sizes 1024–16384 over token counts."""
from .harness import Case

HIDDEN_FULL = (1024, 2048, 4096, 8192, 16384)
TOKENS_FULL = (4096, 16384)


def hidden_sweep(quick: bool, device: str) -> list:
    if quick:  # CPU / CI: small enough to run in seconds, still two hidden sizes
        return [Case(f"N=256,C={c}", {"N": 256, "C": c}, c) for c in (1024, 4096)]
    return [Case(f"N={n},C={c}", {"N": n, "C": c}, c) for n in TOKENS_FULL for c in HIDDEN_FULL]


def compiled(fn):
    """torch.compile of an eager reference, built lazily so a run without it pays nothing."""
    cache = {}

    def run(**kw):
        if "fn" not in cache:
            cache["fn"] = torch_compile(fn)
        return cache["fn"](**kw)
    return run


def torch_compile(fn):
    import torch

    return torch.compile(fn, dynamic=False)
