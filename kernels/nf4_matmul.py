"""Matmuls against an NF4 weight W (out, in) dequantised tile by tile in registers (never whole in memory).

W element (n, k) is e = n * in + k: byte e // 2 (high nibble when e is even), scale absmax[e // BS]:
    w(n, k) = CODE[q(e)] * absmax[e // BS], cast to the activation dtype (as dequantise-then-matmul does).
nt: Y (M, out) = X (M, in) W^T (+ bias) (+ s U B^T: the LoRA branch added in the epilogue, so Y is written
    once)                                   grid (M / BLOCK_M, out / BLOCK_N), loop over in in BLOCK_K tiles
nn: DX (M, in) = DY (M, out) W              grid (M / BLOCK_M, in / BLOCK_K), loop over out in BLOCK_N tiles
fp32 accumulation; the packed weight is read once per (row block of X, tile).
"""
import torch
import triton
import triton.language as tl

from ._arch import group_name
from ._autotune import has_candidate, tuned_launch
from ._dot import dot
from ._launch import TRITON_DTYPE, declared_signature

# Candidate (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) in order of preference; the launchers measure
# the candidates of the GPU at hand per problem shape (kernels/_autotune.py), the first one there is the
# untuned default, and the AOT tier compiles every one (a config that spills or overflows shared memory on an
# architecture is no candidate there: kernels/_arch.py). The LoRA epilogue holds U (BLOCK_M x r) and B
# (BLOCK_N x r) tiles: ranks above LORA_TUNED_RANK choose among HIGH_RANK_CONFIGS (larger tiles would not
# fit 99 KB of shared memory at r = 256). The small tiles are for the consumer GPUs.
CONFIGS = {
    torch.bfloat16: [(64, 64, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 32, 8, 3), (16, 128, 32, 4, 3),
                     (128, 128, 32, 8, 3), (32, 64, 32, 4, 2), (16, 64, 32, 4, 2), (32, 32, 32, 4, 2),
                     (16, 32, 32, 4, 2)],
    torch.float32: [(32, 32, 32, 4, 2), (16, 32, 32, 4, 2)],
}
HIGH_RANK_CONFIGS = {torch.bfloat16: [(64, 64, 64, 8, 3), (32, 64, 32, 4, 2), (16, 64, 32, 4, 2),
                                      (16, 32, 32, 4, 2), (16, 32, 32, 8, 2)],
                     torch.float32: [(32, 32, 32, 4, 2), (16, 32, 32, 4, 2)]}
CONFIGS[torch.float16], HIGH_RANK_CONFIGS[torch.float16] = CONFIGS[torch.bfloat16], HIGH_RANK_CONFIGS[torch.bfloat16]
LORA_TUNED_RANK = 64
RANK_BUCKETS = (16, LORA_TUNED_RANK, 256)  # BLOCK_R compiled per group: a launch uses the bucket >= its BLOCK_R
INTERPRET_BLOCK = 16
INTERPRET_CONFIG = (INTERPRET_BLOCK, INTERPRET_BLOCK, INTERPRET_BLOCK, 4, 1)  # tests set other tile shapes here
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


@triton.jit
def _w_tile(PACKED, ABSMAX, CODE, offs_n, offs_k, n_out, n_in, BS: tl.constexpr):
    """(len(offs_n), len(offs_k)) fp32 tile of the dequantised weight (0 outside the matrix)."""
    ok = (offs_n[:, None] < n_out) & (offs_k[None, :] < n_in)
    e = offs_n[:, None] * n_in + offs_k[None, :]  # int32: the launcher checks out * in < 2^31
    byte = tl.load(PACKED + e // 2, mask=ok, other=0).to(tl.int32)
    q = (byte >> ((1 - (e % 2)) * 4).to(tl.int32)) & 15
    scale = tl.load(ABSMAX + e // BS, mask=ok, other=0.0)
    return tl.load(CODE + q) * scale


@triton.jit
def nf4_matmul_nt_kernel(X, PACKED: "*u8", ABSMAX: "*fp32", CODE: "*fp32", BIAS, U, LB, Y, M: tl.int32,
                         n_out: tl.int32, n_in: tl.int32, r: tl.int32, sxm: tl.int32, sym: tl.int32, sum_: tl.int32,
                         slb: tl.int32, scaling: tl.float32,
                         HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None].to(tl.int64) * sxm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < n_in), other=0.0)
        w = _w_tile(PACKED, ABSMAX, CODE, offs_n, offs_k, n_out, n_in, BS).to(x.dtype)
        acc += dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < n_out, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:  # the LoRA branch in the epilogue: acc += s U B^T, U = d(x) A^T (M, r), B (out, r)
        offs_r = tl.arange(0, BLOCK_R)
        u = tl.load(U + offs_m[:, None].to(tl.int64) * sum_ + offs_r[None, :],
                    mask=(offs_m[:, None] < M) & (offs_r[None, :] < r), other=0.0)
        lb = tl.load(LB + offs_n[:, None].to(tl.int64) * slb + offs_r[None, :],
                     mask=(offs_n[:, None] < n_out) & (offs_r[None, :] < r), other=0.0)
        acc += scaling * dot(u, tl.trans(lb))
    tl.store(Y + offs_m[:, None].to(tl.int64) * sym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_out))


@triton.jit
def nf4_matmul_nn_kernel(DY, PACKED: "*u8", ABSMAX: "*fp32", CODE: "*fp32", DX, M: tl.int32, n_out: tl.int32,
                         n_in: tl.int32, sdym: tl.int32, sdxm: tl.int32, BS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, n_out, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(DY + offs_m[:, None].to(tl.int64) * sdym + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_out), other=0.0)
        w = _w_tile(PACKED, ABSMAX, CODE, offs_n, offs_k, n_out, n_in, BS).to(dy.dtype)
        acc += dot(dy, w)
    tl.store(DX + offs_m[:, None].to(tl.int64) * sdxm + offs_k[None, :], acc.to(DX.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < n_in))


def rank_bucket(block_r: int) -> int:
    return next(b for b in RANK_BUCKETS if block_r <= b)


def candidate_configs(dtype, block_r: int | None) -> list:
    """The nt kernel's candidates at LoRA tile width block_r (None: the nn kernel, no LoRA)."""
    return CONFIGS[dtype] if block_r is None or block_r <= LORA_TUNED_RANK else HIGH_RANK_CONFIGS[dtype]


def launch_group(kernel, dtype, block_r: int | None) -> str:
    extra = {} if block_r is None else {"R": rank_bucket(block_r)}
    return group_name(kernel.fn.__name__, TRITON_DTYPE[dtype], **extra)


def _tuned_launch(name, kernel, grid, args, meta, dtype, sizes, device, block_r=None):
    """Launch with the config measured fastest for (name, dtype, LoRA tile, power-of-2 sizes); grid(cfg)."""
    key = (name, dtype, block_r, *(triton.next_power_of_2(max(1, n)) for n in sizes))
    tuned_launch(kernel, candidate_configs(dtype, block_r), CONFIG_FIELDS, INTERPRET_CONFIG, grid, key, args, meta,
                 device, group=launch_group(kernel, dtype, block_r))


def _check_size(shape):
    if shape[0] * shape[1] >= 2**31:
        raise ValueError(f"nf4 matmul: weight {tuple(shape)} has 2^31 or more elements (int32 indexing)")


MAX_RANK = RANK_BUCKETS[-1]  # LoRA ranks the epilogue holds in registers (BLOCK_R = next power of 2 >= r, >= 16)
AOT_FALLBACK = {"nf4_matmul_nt_kernel": "the LoRA term is added after the NF4 matmul (addmm) instead of in its "
                                        "epilogue"}


def epilogue_fits(rank: int, dtype, device) -> bool:
    """Whether the nt kernel can add a rank-`rank` LoRA term in its epilogue on `device` (a rank within MAX_RANK
    whose launch group has a clean config on the GPU's architecture; else AOT_FALLBACK)."""
    if rank > MAX_RANK:
        return False
    block_r = max(16, triton.next_power_of_2(rank))
    return has_candidate(launch_group(nf4_matmul_nt_kernel, dtype, block_r), candidate_configs(dtype, block_r), device)


def matmul_nt(x2: torch.Tensor, packed, absmax, code, shape, blocksize: int, bias=None, lora_u=None, lora_B=None,
              scaling=0.0) -> torch.Tensor:
    """x2 (M, in), unit column stride -> (M, out) = x2 W^T (+ bias) (+ scaling lora_u lora_B^T), written once;
    W (out, in) = `shape` given by its packed bytes, fp32 absmax per `blocksize` block and the 16-entry code."""
    _check_size(shape)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    M, (n_out, n_in) = x2.shape[0], shape
    y = torch.empty(M, n_out, dtype=x2.dtype, device=x2.device)
    lora = lora_u is not None
    u = lora_u.contiguous() if lora else y
    lb = lora_B.contiguous() if lora else y
    r = lora_u.shape[1] if lora else 1
    _tuned_launch("nf4_matmul_nt", nf4_matmul_nt_kernel,
                  lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(n_out, c["BLOCK_N"])),
                  (x2, packed, absmax, code, bias if bias is not None else y, u, lb, y, M, n_out, n_in, r, x2.stride(0),
                   y.stride(0), u.stride(0), lb.stride(0), float(scaling)),
                  dict(HAS_BIAS=bias is not None, HAS_LORA=lora, BS=blocksize,
                       BLOCK_R=max(16, triton.next_power_of_2(r))),
                  x2.dtype, (M, n_out, n_in), x2.device, block_r=max(16, triton.next_power_of_2(r)))
    return y


def matmul_nn(dy2: torch.Tensor, packed, absmax, code, shape, blocksize: int) -> torch.Tensor:
    """dy2 (M, out) -> (M, in) = dy2 W (W as in matmul_nt)."""
    _check_size(shape)
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    M, (n_out, n_in) = dy2.shape[0], shape
    dx = torch.empty(M, n_in, dtype=dy2.dtype, device=dy2.device)
    _tuned_launch("nf4_matmul_nn", nf4_matmul_nn_kernel,
                  lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(n_in, c["BLOCK_K"])),
                  (dy2, packed, absmax, code, dx, M, n_out, n_in, dy2.stride(0), dx.stride(0)), dict(BS=blocksize),
                  dy2.dtype, (M, n_out, n_in), dy2.device)
    return dx


def _specs():
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        for kernel, block_r in ((nf4_matmul_nt_kernel, 16), (nf4_matmul_nt_kernel, LORA_TUNED_RANK),
                                (nf4_matmul_nt_kernel, RANK_BUCKETS[-1]), (nf4_matmul_nn_kernel, None)):
            group = launch_group(kernel, dtype, block_r)
            for bm, bn, bk, warps, stages in candidate_configs(dtype, block_r):
                blocks = {"BS": 64, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
                lora = {} if block_r is None else {"HAS_BIAS": True, "HAS_LORA": True, "BLOCK_R": block_r}
                specs.append({"kernel": kernel, "num_warps": warps, "num_stages": stages, "group": group,
                              "config": (bm, bn, bk, warps, stages), "signature": declared_signature(kernel, dtype),
                              "constexprs": {**lora, **blocks}})
    return specs


AOT_SPECS = _specs()
