"""Property tests of every public op against its plain-PyTorch spec, by the tolerance rule (tests/tolerance.py):

    max|ours - ref64| <= 2 * max|torch_lowp - ref64| + atol

for the outputs and the gradients of every input that trains. Hypothesis draws the shapes (1-sized and odd
dimensions, sizes just past the kernels' power-of-two blocks), the layouts (transposed and strided views),
every dtype the op accepts and random combinations of its options (ignore_index patterns, softcap, window,
GQA ratios, LoRA ranks, chunk sizes, NF4 block sizes). Each runs on the torch and C++ backends, and with a
smaller budget and smaller sizes through the Triton kernels under the interpreter (bf16 there is not GPU
arithmetic: fp32 and fp16 only). Profiles: tests/property/conftest.py (derandomised in CI).
"""
import contextlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastnlg import backend, ops
from fastnlg.ops.add_layer_norm import add_layer_norm_reference
from fastnlg.ops.attention import attention_reference
from fastnlg.ops.cross_entropy import cross_entropy_reference
from fastnlg.ops.fused_linear_distillation_loss import fused_linear_distillation_loss_reference
from fastnlg.ops.fused_linear_logprobs import fused_linear_logprobs_reference
from fastnlg.ops.gelu import gelu_reference
from fastnlg.ops.glu import geglu_reference, swiglu_reference
from fastnlg.ops.layer_norm import layer_norm_reference
from fastnlg.ops.lora_linear import lora_linear_reference
from fastnlg.ops.relative_position_attention import relative_position_attention_reference
from fastnlg.ops.rms_norm import rms_norm_reference
from fastnlg.ops.rope import apply_rope_reference
from fastnlg.quant import _backends as nf4_backends
from fastnlg.quant.nf4 import BLOCKSIZES, quantize_nf4
from fastnlg.quant.nf4_reference import dequantize_nf4_reference, quantize_nf4_reference
from tests.property.conftest import examples
from tests.tolerance import assert_by_rule, eager_attention_lowp

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("cpp", id="cpp"),
            pytest.param("triton", id="triton", marks=pytest.mark.skipif(
                not INTERPRETED, reason="triton on CPU tensors needs TRITON_INTERPRET=1"))]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@contextlib.contextmanager
def on(name: str):
    """Every op on backend `name` for the block (an op without it keeps its default: that warning is expected)."""
    with warnings.catch_warnings(), backend.use(name):
        warnings.filterwarnings("ignore", message=".*FASTNLG_BACKEND.*")
        yield


def sizes(name: str, small: tuple, large: tuple):
    """A size strategy: near the kernels' block edges (1, odd, 2^k - 1, 2^k, 2^k + 1), smaller under the
    interpreter for the Triton backend."""
    return st.sampled_from(small if name == "triton" else small + large)


def dtypes(name: str, accepted=FLOATS):
    return st.sampled_from([d for d in accepted if not (name == "triton" and d == torch.bfloat16)])


class Inputs:
    """Tensors made once in fp64 from a seed, then handed out per dtype as leaves and the views the op gets
    (a transposed or strided view when asked), so that ours, the low-precision torch and the fp64 spec see the
    same values, and each gradient is the one of the leaf."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.specs = {}

    def add(self, name, shape, *, scale=1.0, grad=True, layout="contiguous", make=None):
        if layout == "transposed" and len(shape) >= 2:
            base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=self.g, dtype=torch.float64)
        elif layout == "strided":
            base = torch.randn(*shape[:-1], 2 * shape[-1], generator=self.g, dtype=torch.float64)
        else:
            layout = "contiguous"
            base = torch.randn(*shape, generator=self.g, dtype=torch.float64)
        base = make(base) if make else base * scale
        self.specs[name] = (base, grad, layout)

    def randint(self, high, shape):
        return torch.randint(0, high, shape, generator=self.g)

    def rand(self, shape):
        return torch.rand(shape, generator=self.g, dtype=torch.float64)

    def get(self, dtype, keep_fp32=()):
        """(views by name, leaves that train): names in keep_fp32 stay fp32 below fp64 (e.g. rope tables)."""
        views, leaves = {}, []
        for name, (base, grad, layout) in self.specs.items():
            dt = dtype if dtype == torch.float64 or name not in keep_fp32 else torch.float32
            leaf = base.to(dt).clone().requires_grad_(grad)
            if grad:
                leaves.append(leaf)
            views[name] = (leaf.transpose(-1, -2) if layout == "transposed" else
                           leaf[..., ::2] if layout == "strided" else leaf)
        return views, leaves


def _outputs(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]


def _run(fn, inputs: Inputs, dtype, seed, keep_fp32=()):
    views, leaves = inputs.get(dtype, keep_fp32)
    outs = _outputs(fn(**views))
    g = torch.Generator().manual_seed(seed + 1)
    dys = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    diff = [(o, d) for o, d in zip(outs, dys) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in diff], leaves, [d for _, d in diff], allow_unused=True) \
        if diff and leaves else [None] * len(leaves)
    return outs, list(grads)


def check(name, ours, spec, inputs: Inputs, dtype, seed, lowp_spec=None, keep_fp32=()):
    """ours (on the chosen backend) against spec in fp64, bounded by the spec run in `dtype`."""
    o, go = _run(ours, inputs, dtype, seed, keep_fp32)
    r, gr = _run(spec, inputs, torch.float64, seed)
    low, gl = _run(lowp_spec or spec, inputs, dtype, seed, keep_fp32)
    assert len(o) == len(r), f"{name}: {len(o)} outputs, the spec has {len(r)}"
    for i, (a, b, c) in enumerate(zip(o, low, r)):
        assert_by_rule(f"{name} output {i}", a, b, c, a.dtype if a.dtype != torch.float64 else dtype)
    for i, (a, b, c) in enumerate(zip(go, gl, gr)):
        if a is None and c is None:
            continue
        a = torch.zeros_like(c).to(b.dtype) if a is None else a
        b = torch.zeros_like(c).to(a.dtype) if b is None else b
        assert_by_rule(f"{name} gradient {i}", a, b, c, a.dtype)


def _budget(name, n):
    """n examples on torch and C++ (scaled by the profile); a quarter of them, at least 3, through the
    interpreted Triton kernels."""
    return settings(max_examples=examples(max(3, n // 4) if name == "triton" else n))


ROWS = (1, 3)
HIDDEN_SMALL = (1, 7, 64, 65)
HIDDEN_LARGE = (127, 128, 129, 1000, 1025, 4097)
LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided"])


# ---------------------------------------------------------------- norms, activations, RoPE


@pytest.mark.parametrize("name", BACKENDS)
def test_rms_norm(name):
    @_budget(name, 60)
    @given(seed=st.integers(0, 2**16), rows=st.sampled_from(ROWS + (5,)), C=sizes(name, HIDDEN_SMALL, HIDDEN_LARGE),
           dtype=dtypes(name), layout=LAYOUTS, offset=st.sampled_from([0.0, 1.0]), weight=st.booleans(),
           mode=st.sampled_from(["gemma", "llama"]))
    def run(seed, rows, C, dtype, layout, offset, weight, mode):
        offset = offset if weight else 0.0  # (an offset without a weight is refused: tests/ops/test_rms_norm.py)
        x = Inputs(seed)
        x.add("x", (2, rows, C), scale=3.0, layout=layout)
        if weight:
            x.add("weight", (C,))

        def ours(x, weight=None):
            return ops.rms_norm(x, weight, 1e-6, offset, casting_mode=mode)

        def spec(x, weight=None):
            return rms_norm_reference(x, weight, 1e-6, offset, casting_mode=mode)
        with on(name):
            check("rms_norm", ours, spec, x, dtype, seed)
    run()


@pytest.mark.parametrize("name", BACKENDS)
def test_layer_norm_and_add_layer_norm(name):
    @_budget(name, 60)
    @given(seed=st.integers(0, 2**16), rows=st.sampled_from(ROWS), C=sizes(name, HIDDEN_SMALL, HIDDEN_LARGE),
           dtype=dtypes(name), layout=LAYOUTS, bias=st.booleans(), residual=st.booleans(), return_sum=st.booleans())
    def run(seed, rows, C, dtype, layout, bias, residual, return_sum):
        x = Inputs(seed)
        x.add("x", (rows, 2, C), scale=2.0, layout=layout)
        if residual:
            x.add("residual", (rows, 2, C))
        x.add("weight", (C,))
        if bias:
            x.add("bias", (C,))
        with on(name):
            if residual:
                check("add_layer_norm", lambda **a: ops.add_layer_norm(**a, return_sum=return_sum),
                      lambda **a: add_layer_norm_reference(**a, return_sum=return_sum), x, dtype, seed)
            else:
                check("layer_norm", ops.layer_norm, layer_norm_reference, x, dtype, seed)
    run()


@pytest.mark.parametrize("name", BACKENDS)
def test_gelu_and_glus(name):
    @_budget(name, 60)
    @given(seed=st.integers(0, 2**16), rows=st.sampled_from(ROWS), C=sizes(name, HIDDEN_SMALL, HIDDEN_LARGE),
           dtype=dtypes(name), layout=LAYOUTS, which=st.sampled_from(["gelu", "gelu+bias", "swiglu", "geglu"]),
           approximate=st.sampled_from(["tanh", "none"]))
    def run(seed, rows, C, dtype, layout, which, approximate):
        x = Inputs(seed)
        if which.startswith("gelu"):
            x.add("x", (rows, 2, C), scale=3.0, layout=layout)
            if which == "gelu+bias":
                x.add("bias", (C,))
            ours = lambda **a: ops.gelu(**a, approximate=approximate)  # noqa: E731
            spec = lambda **a: gelu_reference(**a, approximate=approximate)  # noqa: E731
        else:
            x.add("gate", (rows, 2, C), scale=3.0, layout=layout)
            x.add("up", (rows, 2, C))
            ours, spec = ((ops.swiglu, swiglu_reference) if which == "swiglu" else
                          (lambda **a: ops.geglu(**a, approximate=approximate),
                           lambda **a: geglu_reference(**a, approximate=approximate)))
        with on(name):
            check(which, ours, spec, x, dtype, seed)
    run()


@pytest.mark.parametrize("name", BACKENDS)
def test_apply_rope(name):
    @_budget(name, 60)
    @given(seed=st.integers(0, 2**16), B=st.sampled_from([1, 2]), H=st.sampled_from([1, 3, 4]),
           gqa=st.sampled_from([1, 2]), T=sizes(name, (1, 5, 17), (64, 65, 129)),
           D=sizes(name, (2, 8, 64), (6, 96, 128)), dtype=dtypes(name), transposed=st.booleans(),
           shared=st.booleans())
    def run(seed, B, H, gqa, T, D, dtype, transposed, shared):
        x = Inputs(seed)
        Hk = max(H // gqa, 1)
        # HF's (B, T, H, D).transpose(1, 2) layout is the non-contiguous one the models hand over
        x.add("q", (B, H, T, D), make=(lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)) if transposed else None)
        x.add("k", (B, Hk, T, D))
        ang = x.rand((1 if shared else B, T, D // 2)) * 6.3
        ang = torch.cat([ang, ang], -1)
        x.specs["cos"], x.specs["sin"] = (ang.cos(), False, "contiguous"), (ang.sin(), False, "contiguous")
        with on(name):
            check("apply_rope", ops.apply_rope, apply_rope_reference, x, dtype, seed)
    run()


# ---------------------------------------------------------------- losses


def _labels(x: Inputs, N, V, pattern, ignore_index):
    y = x.randint(V, (N,))
    if pattern == "some":
        y[x.rand((N,)) < 0.4] = ignore_index
    elif pattern == "all":
        y[:] = ignore_index
    elif pattern == "first-and-last":
        y[0] = y[-1] = ignore_index
    return y


LOSS_OPTIONS = st.fixed_dictionaries({}, optional={
    "label_smoothing": st.sampled_from([0.1]), "softcap": st.sampled_from([5.0, 30.0]),
    "z_loss": st.sampled_from([1e-3]), "reduction": st.sampled_from(["mean", "sum", "none"])})


@pytest.mark.parametrize("name", BACKENDS)
def test_cross_entropy(name):
    @_budget(name, 60)
    @given(seed=st.integers(0, 2**16), N=st.sampled_from([1, 2, 7, 33]), V=sizes(name, (1, 5, 64, 65), (1000, 4097)),
           dtype=dtypes(name), pattern=st.sampled_from(["none", "some", "all", "first-and-last"]),
           ignore_index=st.sampled_from([-100, 0]), opts=LOSS_OPTIONS, transposed=st.booleans())
    def run(seed, N, V, dtype, pattern, ignore_index, opts, transposed):
        x = Inputs(seed)
        x.add("logits", (N, V), scale=4.0, layout="transposed" if transposed else "contiguous")
        y = _labels(x, N, V, pattern, ignore_index)
        kw = dict(opts, ignore_index=ignore_index)
        with on(name):
            check("cross_entropy", lambda logits: ops.cross_entropy(logits, y, **kw),
                  lambda logits: cross_entropy_reference(logits, y, **kw), x, dtype, seed)
    run()


def _head_sizes(name):
    """The seed, rows, vocabulary, hidden size and dtype of a loss over a linear head."""
    return dict(seed=st.integers(0, 2**16), N=st.sampled_from([1, 3, 17]), V=sizes(name, (1, 7, 65), (500, 1025)),
                C=st.sampled_from([1, 8, 33]), dtype=dtypes(name))


def _head(seed, N, V, C, bias, prefix=""):
    x = Inputs(seed)
    x.add(prefix + "hidden", (N, C))
    x.add(prefix + "weight", (V, C), scale=C ** -0.5 * 3)
    if bias:
        x.add("bias", (V,))
    return x


@pytest.mark.parametrize("name", BACKENDS)
def test_fused_linear_cross_entropy(name):
    @_budget(name, 48)
    @given(**_head_sizes(name), pattern=st.sampled_from(["none", "some", "all"]),
           bias=st.booleans(), chunk=st.sampled_from([None, 1, 4]), opts=LOSS_OPTIONS)
    def run(seed, N, V, C, dtype, pattern, bias, chunk, opts):
        x = _head(seed, N, V, C, bias)
        y = _labels(x, N, V, pattern, -100)
        with on(name):
            check("fused_linear_cross_entropy",
                  lambda hidden, weight, bias=None: ops.fused_linear_cross_entropy(hidden, weight, y, bias=bias,
                                                                                   chunk_size=chunk, **opts),
                  lambda hidden, weight, bias=None: cross_entropy_reference(F.linear(hidden, weight, bias), y, **opts),
                  x, dtype, seed)
    run()


@pytest.mark.parametrize("name", BACKENDS)
def test_fused_linear_logprobs(name):
    @_budget(name, 48)
    @given(**_head_sizes(name), pattern=st.sampled_from(["none", "some", "all"]),
           bias=st.booleans(), chunk=st.sampled_from([None, 1, 4]), temperature=st.sampled_from([1.0, 0.7, 2.0]),
           entropy=st.booleans())
    def run(seed, N, V, C, dtype, pattern, bias, chunk, temperature, entropy):
        x = _head(seed, N, V, C, bias)
        y = _labels(x, N, V, pattern, -100)
        kw = dict(temperature=temperature, return_entropy=entropy)
        with on(name):
            check("fused_linear_logprobs",
                  lambda hidden, weight, bias=None: ops.fused_linear_logprobs(hidden, weight, y, bias=bias,
                                                                              chunk_size=chunk, **kw),
                  lambda hidden, weight, bias=None: fused_linear_logprobs_reference(hidden, weight, y, bias=bias, **kw),
                  x, dtype, seed)
    run()


@pytest.mark.parametrize("name", BACKENDS)
def test_fused_linear_distillation_loss(name):
    @_budget(name, 48)
    @given(**_head_sizes(name), pattern=st.sampled_from([None, "none", "some", "all"]),
           loss=st.sampled_from(["forward_kl", "reverse_kl", "jsd"]), beta=st.sampled_from([0.5, 0.1, 0.9]),
           temperature=st.sampled_from([1.0, 2.0]), chunk=st.sampled_from([None, 1, 4]),
           reduction=st.sampled_from(["mean", "sum", "none"]))
    def run(seed, N, V, C, dtype, pattern, loss, beta, temperature, chunk, reduction):
        x = _head(seed, N, V, C, False, prefix="student_")
        x.add("teacher_hidden", (N, C), grad=False)
        x.add("teacher_weight", (V, C), scale=C ** -0.5 * 3, grad=False)
        y = None if pattern is None else _labels(x, N, V, pattern, -100)
        kw = dict(loss=loss, beta=beta, temperature=temperature, reduction=reduction)
        with on(name):
            check("fused_linear_distillation_loss",
                  lambda **a: ops.fused_linear_distillation_loss(**a, labels=y, chunk_size=chunk, **kw),
                  lambda **a: fused_linear_distillation_loss_reference(**a, labels=y, **kw), x, dtype, seed)
    run()


# ---------------------------------------------------------------- attention


ATTN_BACKENDS = [p for p in BACKENDS if p.id != "cpp"]  # (no C++ kernel: torch and Triton)


@pytest.mark.parametrize("name", ATTN_BACKENDS)
def test_flash_attention(name):
    @_budget(name, 48)
    @given(seed=st.integers(0, 2**16), B=st.sampled_from([1, 2]), Hk=st.sampled_from([1, 2]),
           gqa=st.sampled_from([1, 2, 4]), T=sizes(name, (1, 5, 17, 33), (64, 65, 130)),
           D=st.sampled_from([16, 32, 64]), dtype=dtypes(name, [torch.float32, torch.float16, torch.bfloat16]),
           causal=st.booleans(), window=st.sampled_from([None, (1, 1), (8, 0), (4, -1), (0, 3)]), softcap=st.sampled_from([None, 20.0]),
           padded=st.booleans(), transposed=st.booleans())
    def run(seed, B, Hk, gqa, T, D, dtype, causal, window, softcap, padded, transposed):
        x = Inputs(seed)
        H = Hk * gqa
        hf = (lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)) if transposed else None
        x.add("q", (B, H, T, D), make=hf)
        x.add("k", (B, Hk, T, D), make=hf)
        x.add("v", (B, Hk, T, D), make=hf)
        mask = None
        if padded:
            lengths = x.randint(T, (B,)) + 1
            mask = torch.arange(T)[None, :] < lengths[:, None]
        kw = dict(causal=causal, window=window, softcap=softcap, key_padding_mask=mask)
        with on(name):
            check("flash_attention", lambda **a: ops.flash_attention(**a, **kw),
                  lambda **a: attention_reference(**a, **kw), x, dtype, seed,
                  lowp_spec=lambda **a: eager_attention_lowp(**a, **kw))
    run()


@pytest.mark.parametrize("name", ATTN_BACKENDS)
def test_relative_position_attention(name):
    @_budget(name, 36)
    @given(seed=st.integers(0, 2**16), B=st.sampled_from([1, 2]), H=st.sampled_from([1, 3]),
           T=sizes(name, (1, 5, 17), (64, 65)), S_extra=st.sampled_from([0, 3]), D=st.sampled_from([16, 32]),
           dtype=dtypes(name, [torch.float32, torch.float16]), bidirectional=st.booleans(),
           buckets=st.sampled_from([(8, 16), (32, 128)]), causal=st.booleans(), padded=st.booleans(),
           offset=st.sampled_from([0, 4]))
    def run(seed, B, H, T, S_extra, D, dtype, bidirectional, buckets, causal, padded, offset):
        x = Inputs(seed)
        S = T + S_extra
        x.add("q", (B, H, T, D), scale=D ** -0.5)
        x.add("k", (B, H, S, D))
        x.add("v", (B, H, S, D))
        x.add("bias_table", (buckets[0], H))
        mask = None
        if padded:
            lengths = x.randint(S, (B,)) + 1
            mask = torch.arange(S)[None, :] < lengths[:, None]
        kw = dict(bidirectional=bidirectional, num_buckets=buckets[0], max_distance=buckets[1], causal=causal,
                  key_padding_mask=mask, query_offset=offset if causal else 0)
        with on(name):
            check("relative_position_attention", lambda **a: ops.relative_position_attention(**a, **kw),
                  lambda **a: relative_position_attention_reference(**a, **kw), x, dtype, seed)
    run()


# ---------------------------------------------------------------- LoRA and NF4


@pytest.mark.parametrize("name", ATTN_BACKENDS)
def test_lora_linear(name):
    @_budget(name, 48)
    @given(seed=st.integers(0, 2**16), N=st.sampled_from([1, 3, 17]), K=sizes(name, (2, 16, 64), (130, 256)),
           M=sizes(name, (2, 8, 66), (96, 257)), r=st.sampled_from([1, 4, 16]), adapters=st.sampled_from([1, 2]),
           dtype=dtypes(name), bias=st.booleans(), nf4=st.sampled_from([None, 64, 128]), transposed=st.booleans())
    def run(seed, N, K, M, r, adapters, dtype, bias, nf4, transposed):
        if nf4 and (M * K) % 2:
            M += 1
        x = Inputs(seed)
        x.add("x", (2, N, K), layout="transposed" if transposed else "contiguous")
        x.add("weight", (M, K), scale=K ** -0.5, grad=False)  # (the base is frozen in LoRA)
        for i in range(adapters):
            x.add(f"A{i}", (r, K), scale=K ** -0.5)
            x.add(f"B{i}", (M, r), scale=0.1)
        if bias:
            x.add("bias", (M,))
        scaling = [2.0, 0.5][:adapters]

        def call(fn):
            def f(x, weight, bias=None, **ab):
                w = quantize_nf4(weight.detach().float(), nf4) if nf4 else weight
                As = [ab[f"A{i}"] for i in range(adapters)]
                Bs = [ab[f"B{i}"] for i in range(adapters)]
                one = adapters == 1
                return fn(x, w, As[0] if one else As, Bs[0] if one else Bs, scaling=scaling[0] if one else scaling,
                          bias=bias)
            return f
        with on(name):
            check("lora_linear", call(ops.lora_linear), call(lora_linear_reference), x, dtype, seed)
    run()


@pytest.mark.parametrize("name", BACKENDS)
def test_nf4_roundtrip_is_the_spec_bit_for_bit(name):
    """quantize and dequantize on each backend equal the spec exactly (bit-compatibility needs equality, not a
    tolerance): every block size, sizes that leave a partial last block, every weight dtype."""
    @_budget(name, 48)
    @given(seed=st.integers(0, 2**16), blocksize=st.sampled_from(BLOCKSIZES), rows=st.sampled_from([1, 3, 8]),
           cols=st.sampled_from([2, 64, 66, 100]), dtype=dtypes(name),
           scale=st.sampled_from([1e-3, 1.0, 50.0]))
    @example(seed=0, blocksize=64, rows=1, cols=2, dtype=torch.float32, scale=1.0)  # one partial block of 2
    def run(seed, blocksize, rows, cols, dtype, scale):
        g = torch.Generator().manual_seed(seed)
        W = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
        packed_ref, absmax_ref = quantize_nf4_reference(W, blocksize)
        with on(name):
            packed, absmax = nf4_backends.quantize(W, blocksize)
            deq = nf4_backends.dequantize_raw(packed_ref, absmax_ref, W.shape, dtype, blocksize)
        assert torch.equal(packed, packed_ref) and torch.equal(absmax, absmax_ref)
        assert torch.equal(deq, dequantize_nf4_reference(packed_ref, absmax_ref, W.shape, dtype, blocksize))
    run()
