"""relative_position_attention (T5's relative-position-bias attention, fastnlg/ops/relative_position_attention.py)
against its fp64 spec: buckets as Transformers buckets them, each backend (torch on CPU, Triton under the
interpreter) by the tolerance rule in fp32 and fp16, bidirectional and causal, a query offset, padding, T != S,
GQA, several torch blocks and kernel tiles; fp64 gradcheck with the bias table (dropout included); the custom
op under opcheck and torch.compile(fullgraph=True); clear errors."""
import importlib

import pytest
import torch

from fastnlg.ops import relative_position_attention
from fastnlg.ops.relative_position_attention import (
    bucket_lut,
    relative_position_attention_reference,
    relative_position_bucket,
)
from tests.tolerance import assert_by_rule

rpa = importlib.import_module("fastnlg.ops.relative_position_attention")  # (the package's name is the function)
T5 = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (16, 20), (64, 100)])
def test_buckets_are_transformers_buckets(bidirectional, num_buckets, max_distance):
    for T, S in ((300, 300), (1, 300), (300, 7), (129, 257)):
        rel = torch.arange(S)[None, :] - torch.arange(T)[:, None] - (S - T if T < S else 0)
        want = T5._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                            max_distance=max_distance)
        got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                       max_distance=max_distance)
        assert torch.equal(got, want)
        lut = bucket_lut(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance,
                         device="cpu")  # what the kernels look up: j - p_i clamped to [-L, L]
        assert torch.equal(lut[rel.clamp(-max_distance, max_distance) + max_distance], want)


def _inputs(dtype, B=2, H=4, Hkv=4, T=19, S=19, D=16, nb=8, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(B, H, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D)
    table = (torch.randn(nb, H, generator=g) * 2).to(dtype if dtype == torch.float64 else torch.float32)
    kpm = None
    if pad:
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[-1, S - S // 3:] = False
    return q, k, v, table.requires_grad_(), kpm


def _eager_t5(q, k, v, table, *, bidirectional, num_buckets, max_distance, causal, key_padding_mask, softmax_scale,
              query_offset):
    """Plain torch in the inputs' dtype, as T5's eager attention computes it (the bias from compute_bias, in the
    table's dtype): the rule's low-precision baseline."""
    T, S = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    bias = rpa.relative_position_bias(table, T, S, bidirectional=bidirectional, num_buckets=num_buckets,
                                      max_distance=max_distance, query_offset=query_offset)
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * softmax_scale + bias
    ok = rpa._visible(T, S, causal, query_offset, q.device, key_padding_mask)
    p = torch.softmax(s.masked_fill(~ok, torch.finfo(s.dtype).min), -1) * ok
    return p @ v.repeat_interleave(rep, 1)


CASES = {  # name: (shape overrides, causal, query_offset)
    "bidirectional": ({}, False, 0),
    "causal": ({}, True, 0),
    "causal-decode-offset": ({"T": 5, "S": 29}, True, 24),
    "causal-static-offset": ({"T": 5, "S": 29}, True, 9),  # (keys past the offset: a static cache's empty slots)
    "cross-T!=S": ({"T": 11, "S": 37}, False, 0),
    "gqa": ({"H": 4, "Hkv": 2, "T": 23, "S": 23}, False, 3),
    "long-rel": ({"T": 40, "S": 70}, False, 0),  # relative positions past max_distance on both sides
}


def _run(case, dtype, backend_env, backend, interpret):
    shape, causal, offset = CASES[case]
    q, k, v, table, kpm = _inputs(dtype, **shape)
    kw = dict(bidirectional=not causal, num_buckets=table.shape[0], max_distance=12, causal=causal,
              key_padding_mask=kpm, softmax_scale=0.7, query_offset=offset)
    backend_env.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    backend_env.setenv("FASTNLG_BACKEND", backend)
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out = relative_position_attention(q, k, v, table, **kw)
    grads = torch.autograd.grad(out, (q, k, v, table), dy.to(out.dtype))
    args64 = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    ref = relative_position_attention_reference(*args64, **kw)
    ref_g = torch.autograd.grad(ref, args64, dy.double())
    lowp_in = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, table)]
    low = _eager_t5(*lowp_in, **kw)
    low_g = torch.autograd.grad(low, lowp_in, dy.to(low.dtype))
    assert_by_rule(f"{case} out", out, low, ref, dtype)
    for name, a, lo, r in zip(("dq", "dk", "dv", "dtable"), grads, low_g, ref_g):
        assert_by_rule(f"{case} {name}", a, lo, r, dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("path", ["blocks", "composite"])
def test_torch_backend_against_the_spec(case, dtype, path, backend_env, monkeypatch):
    if path == "blocks":  # the custom op, several blocks of query rows
        monkeypatch.setattr(rpa, "_BLOCK_SCORES", 600)
        monkeypatch.setattr(rpa, "_COMPOSITE_SCORES", 0)
    _run(case, dtype, backend_env, "torch", False)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_kernels_against_the_spec(case, dtype, backend_env):
    pytest.importorskip("triton")
    _run(case, dtype, backend_env, "triton", True)


@pytest.mark.parametrize("composite", [0, 1 << 22], ids=["blocks", "composite"])
def test_gradcheck_fp64_with_the_bias_table_and_dropout(composite, monkeypatch):
    monkeypatch.setattr(rpa, "_BLOCK_SCORES", 200)
    monkeypatch.setattr(rpa, "_COMPOSITE_SCORES", composite)
    for causal, offset in ((False, 0), (True, 3)):
        q, k, v, table, kpm = _inputs(torch.float64, B=2, H=2, Hkv=1, T=7, S=10, D=4, nb=8)
        kw = dict(bidirectional=not causal, num_buckets=8, max_distance=6, causal=causal, key_padding_mask=kpm,
                  query_offset=offset)
        assert torch.autograd.gradcheck(lambda *a: relative_position_attention(*a, **kw), (q, k, v, table))
        # dropout: a fixed seed draws the same keep mask in forward and backward
        fn = lambda q, k, v, t: rpa._RPA.forward(q, k, v, t, kpm, causal, 1.0, not causal, 8, 6, offset, 0.3,  # noqa: E731
                                                 1234)[0]
        assert torch.autograd.gradcheck(fn, (q, k, v, table))
        dropped = fn(q, k, v, table)
        assert not torch.allclose(dropped, relative_position_attention(q, k, v, table, **kw))


@pytest.mark.parametrize("composite", [0, 1 << 22], ids=["blocks", "composite"])
def test_rows_that_see_no_key_output_zero(composite, monkeypatch):
    monkeypatch.setattr(rpa, "_COMPOSITE_SCORES", composite)
    q, k, v, table, _ = _inputs(torch.float32, T=6, S=6, pad=False)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0] = True
    out = relative_position_attention(q, k, v, table, bidirectional=True, num_buckets=8, max_distance=12,
                                      key_padding_mask=kpm)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, table))


@pytest.mark.parametrize("composite", [0, 1 << 22], ids=["custom-op", "composite"])
def test_custom_op_opcheck_and_compile(composite, monkeypatch):
    monkeypatch.setattr(rpa, "_COMPOSITE_SCORES", composite)
    q, k, v, table, kpm = _inputs(torch.float32, T=9, S=13)
    ops = torch.ops.fastnlg
    args = (q, k, v, table, kpm, False, 1.0, True, 8, 12, 0, 0.0, 0)
    if not composite:  # (the custom ops themselves: the same with either setting)
        torch.library.opcheck(ops.relative_position_attention_fwd, args)
        o, lse = ops.relative_position_attention_fwd(*args)
        torch.library.opcheck(ops.relative_position_attention_bwd,
                              (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(),
                               table.detach(), *args[4:]))
    kw = dict(bidirectional=True, num_buckets=8, max_distance=12, key_padding_mask=kpm)
    fn = torch.compile(lambda *a: relative_position_attention(*a, **kw), fullgraph=True, backend="aot_eager")
    out = fn(q, k, v, table)
    ref = relative_position_attention(q, k, v, table, **kw)
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.autograd.grad(out.sum(), table)[0]
    assert torch.allclose(g, torch.autograd.grad(ref.sum(), table)[0], atol=1e-5)


def test_bf16_autocast_keeps_the_bias_in_fp32():
    q, k, v, table, kpm = _inputs(torch.float32)
    kw = dict(bidirectional=True, num_buckets=8, max_distance=12, key_padding_mask=kpm)
    with torch.autocast("cpu", torch.bfloat16):
        out = relative_position_attention(q, k, v, table, **kw)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert table.grad.dtype == torch.float32 and q.grad.dtype == torch.float32


@pytest.mark.parametrize("bad,match", [
    (dict(table=torch.zeros(7, 4)), r"bias_table must be \(num_buckets, H\) = \(8, 4\)"),
    (dict(kpm=torch.ones(2, 5, dtype=torch.bool)), r"key_padding_mask must be bool \(B, S\)"),
    (dict(num_buckets=2, table=torch.zeros(2, 4)), "leave no logarithmic buckets"),
    (dict(query_offset=-1), "query_offset must be >= 0"),
    (dict(k=torch.zeros(2, 3, 19, 16)), "H a multiple of Hkv"),
])
def test_bad_input_is_a_clear_error(bad, match):
    q, k, v, table, kpm = _inputs(torch.float32)
    args = dict(q=q, k=bad.get("k", k), v=bad.get("k", v), table=bad.get("table", table), kpm=bad.get("kpm", kpm))
    with pytest.raises(ValueError, match=match):
        relative_position_attention(args["q"], args["k"], args["v"], args["table"], bidirectional=True,
                                    num_buckets=bad.get("num_buckets", 8), max_distance=12,
                                    key_padding_mask=args["kpm"], query_offset=bad.get("query_offset", 0))


def test_peak_memory_is_a_quarter_of_eager_t5(use_backend):
    """CPU, B=2, H=8, T=S=2048, D=64, fwd+bwd with the table's gradient: the torch backend's peak is at most
    1/4 of eager T5 attention's (its (1, H, T, S) bias and (B, H, T, S) scores and probabilities)."""
    from benchmarks import bench_relative_position_attention as bench
    from benchmarks.harness import peak_memory_mb

    use_backend("torch")  # the CPU default; the interpreter would only make this slow
    inputs = bench.make_inputs({"B": 2, "H": 8, "T": 2048, "D": 64, "causal": False}, "cpu", torch.float32)

    def step(fn):
        def run():
            fn(**inputs).sum().backward()
            for name in ("q", "k", "v", "table"):
                inputs[name].grad = None
        return run

    eager_mb = peak_memory_mb(step(bench.eager), "cpu")
    ours_mb = peak_memory_mb(step(bench.fastnlg), "cpu")
    scores_mb = 2 * 8 * 2048 * 2048 * 4 / 2**20  # 256 MB
    assert eager_mb > 2 * scores_mb, eager_mb
    assert ours_mb <= eager_mb / 4, (ours_mb, eager_mb)
