"""Launch heuristics shared by the row-wise Triton kernels, and the AOT-spec helpers.

Every kernel file exports ``AOT_SPECS``: the (signature, constexprs, num_warps) combinations its
launchers can pick. The ahead-of-time check (fastnlg/aot.py) compiles exactly these for sm_75 to sm_120,
so a config a launcher can choose is a config CI has compiled.
"""
import torch

TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# AOT compiles each config in bf16 and fp32: fp16 has bf16's register/shared-memory footprint.
AOT_DTYPES = (torch.bfloat16, torch.float32)

# Whole rows live in registers: one program per row, BLOCK_C = next_pow2(C).
MAX_ROW = 32768
ROW_BLOCKS = tuple(2 ** i for i in range(4, 16))  # 16 .. 32768


_SCALAR_TYPES = {"int32": "i32", "int64": "i64", "fp32": "fp32"}


def declared_signature(kernel, dtype, **element_types) -> dict:
    """AOT signature of a @triton.jit kernel from its declared argument types: constexprs and annotated
    arguments (`n: tl.int32`, `LSE: "*fp32"`) as declared; an argument without a type is a pointer to the
    launch's data dtype, or to element_types[name] (a Triton type name) where given. Reads the Python
    function's annotations, so it works under TRITON_INTERPRET too."""
    import inspect

    import triton.language as tl

    sig = {}
    for name, param in inspect.signature(getattr(kernel, "fn", kernel)).parameters.items():
        ann = param.annotation
        if ann is tl.constexpr or "constexpr" in str(ann):
            sig[name] = "constexpr"
        elif isinstance(ann, tl.dtype):
            if ann.name not in _SCALAR_TYPES:
                raise TypeError(f"{kernel}: argument {name}: declare one of {sorted(_SCALAR_TYPES)}, got {ann}")
            sig[name] = _SCALAR_TYPES[ann.name]
        elif isinstance(ann, str) and ann.startswith("*"):
            sig[name] = ann
        elif ann is inspect.Parameter.empty:
            sig[name] = "*" + element_types.get(name, TRITON_DTYPE[dtype])
        else:
            raise TypeError(f"{kernel}: argument {name}: unsupported annotation {ann!r}")
    return sig


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_block(C: int, heavy: bool = False) -> tuple[int, int]:
    """(BLOCK_C, num_warps) for a row of C elements held by one program; `heavy` kernels (backward:
    several row-sized arrays live at once) get twice the warps to keep registers from spilling."""
    if C > MAX_ROW:
        raise ValueError(f"row length {C} exceeds the kernels' maximum of {MAX_ROW}")
    block = max(16, next_pow2(C))
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, min(32, warps * 2) if heavy else warps


def num_programs(device: torch.device, n_rows: int, per_sm: int = 4) -> int:
    """How many persistent programs share `n_rows` rows (for two-stage reductions)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, sms * per_sm))
    return max(1, min(n_rows, 4))


def row_specs(kernel, signature: dict, dtype_args: tuple, extra_constexprs: dict | None = None, heavy: bool = False):
    """AOT specs for a row kernel: every ROW_BLOCKS entry (with its num_warps) for every kernel dtype.

    `dtype_args` names the pointer arguments whose element type follows the input dtype."""
    specs = []
    for dtype in AOT_DTYPES:
        sig = dict(signature)
        for name in dtype_args:
            sig[name] = "*" + TRITON_DTYPE[dtype]
        for block in ROW_BLOCKS:
            _, warps = row_block(block, heavy)
            constexprs = {"BLOCK_C": block, **(extra_constexprs or {})}
            specs.append({"kernel": kernel, "signature": sig, "constexprs": constexprs, "num_warps": warps})
    return specs
