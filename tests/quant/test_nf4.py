"""NF4 against bitsandbytes (which runs on CPU here): packed bytes, absmax and double-quant statistics,
dequantisation (against the definition everywhere, against bitsandbytes' CPU kernel where it is right:
tests/bnb_oracle.py), Params4bit round trips and bitsandbytes' CPU-packed layout, safetensors, bad input."""
import pytest
import torch

from fastnlg.quant import NF4Weight, quantize_nf4
from fastnlg.quant.nf4 import DYNAMIC_CODE, NF4_CODE, dequantize_8bit_reference, quantize_8bit_reference
from tests import bnb_oracle as oracle
from tests.conftest import backend_params

BACKENDS = backend_params()

bnb = pytest.importorskip("bitsandbytes")
bf = pytest.importorskip("bitsandbytes.functional")

SHAPES = [((64, 96), 64), ((256, 1024), 64), ((333, 6), 128), ((4096 * 3 + 6,), 4096), ((40, 50), 256),
          ((2, 11008), 512), ((7, 2), 64)]  # real and odd shapes, every block size family, short last blocks


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def test_codes_are_bitsandbytes_codes():
    assert torch.equal(NF4_CODE, bf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize", SHAPES, ids=str)
def test_single_quant_equals_bitsandbytes(shape, blocksize, dtype, device, backend, use_backend):
    """Every backend (torch, C++, Triton) produces bitsandbytes' bytes and absmax, and dequantises them to
    the definition code[nibble] * absmax bit for bit (bitsandbytes' own CPU dequantisation is not that
    definition on every CPU: see tests/bnb_oracle.py and test_dequantize_equals_bitsandbytes)."""
    if device == "cpu" and backend == "triton" and (dtype != torch.float32 or torch.Size(shape).numel() > 20000):
        pytest.skip("the interpreter is slow: Triton runs the small shapes in fp32 on CPU, all of them on a GPU")
    use_backend(backend)
    W = _weight(shape, dtype)
    packed, state = bf.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(W.to(device), blocksize=blocksize, double_quant=False)
    assert torch.equal(ours.packed.cpu(), packed.reshape(-1))
    assert torch.equal(ours.absmax.cpu(), state.absmax)
    deq = ours.dequantize()
    assert deq.dtype == dtype and deq.shape == W.shape
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        return  # the interpreter's fp32 -> bf16 cast truncates instead of rounding: the gpu tier checks this
    expected = oracle.definition_dequantize(packed, state.absmax, blocksize, shape, dtype)
    torch.testing.assert_close(deq.cpu(), expected, rtol=0, atol=0)
    if device == "cuda":  # bitsandbytes' CUDA kernel as a second, independent implementation
        torch.testing.assert_close(deq, bf.dequantize_4bit(packed.cuda(), state.to("cuda")), rtol=0, atol=0)


@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize", SHAPES, ids=str)
def test_dequantize_equals_bitsandbytes(shape, blocksize, dtype, nested, use_backend):
    """Ours equals bitsandbytes' own CPU dequantisation, where that is right on this CPU (self-checked)."""
    exact, why = oracle.bnb_dequantize_is_exact(shape, blocksize, dtype, nested)
    if not exact:
        pytest.skip(why)
    use_backend("cpp")
    W = _weight(shape, dtype)
    packed, state = bf.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    ours = NF4Weight(packed.reshape(-1), state.absmax, shape, dtype, blocksize,
                     state.offset.reshape(()) if nested else None, state.state2.absmax if nested else None)
    torch.testing.assert_close(ours.dequantize(), bf.dequantize_4bit(packed, state), rtol=0, atol=0)


def test_bitsandbytes_made_wrong_is_detected():
    """The self-check that guards every comparison with bitsandbytes catches a wrong CPU kernel, and the
    definition override gives back the right values: no verdict depends on bitsandbytes being right."""
    W = _weight((64, 128), torch.float32)
    packed, state = bf.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    expected = oracle.definition_dequantize_state(packed, state)
    with oracle.broken_bnb_dequantize():
        exact, why = oracle.bnb_dequantize_is_exact((64, 128), 64, torch.float32, True)
        assert not exact and "wrong on this CPU" in why
        assert not torch.equal(bf.dequantize_4bit(packed, state), expected)
        with oracle.dequantize_by_definition():
            assert torch.equal(bf.dequantize_4bit(packed, state), expected)
    with oracle.dequantize_by_definition():
        assert oracle.bnb_dequantize_is_exact((64, 96), 64, torch.float32, True) == (True, "")


@pytest.mark.parametrize("shape,blocksize", SHAPES, ids=str)
def test_double_quant_matches_bitsandbytes(shape, blocksize, use_backend):
    """Packed bytes, offset and the 8-bit blocks' scales are equal. The 8-bit absmax codes are bitsandbytes'
    except where its CPU search (BinSearch) leaves round-to-nearest: there ours is the nearest code, so the
    decoded absmax is never further from the true one than theirs."""
    use_backend("cpp")
    W = _weight(shape, torch.bfloat16)
    packed, state = bf.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(W, blocksize=blocksize, double_quant=True)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.absmax2, state.state2.absmax)
    scaled = state.state2.absmax.repeat_interleave(256)[: ours.absmax.numel()] > 0  # 0/0 blocks: any code
    same = (ours.absmax == state.absmax)[scaled].float().mean().item() if scaled.any() else 1.0
    assert same > 0.98, same
    exact = quantize_nf4(W, blocksize=blocksize, double_quant=False).absmax
    theirs = dequantize_8bit_reference(state.absmax, state.state2.absmax) + state.offset
    assert torch.all((ours.absmax_fp32() - exact).abs() <= (theirs - exact).abs() + 1e-9)


def test_8bit_quant_is_round_to_nearest():
    x = torch.randn(256 * 4)
    q, scale = quantize_8bit_reference(x)
    normed = x.reshape(-1, 256) / scale[:, None]
    err = (DYNAMIC_CODE[q.long()].reshape(-1, 256) - normed).abs()
    best = (DYNAMIC_CODE[None, None, :] - normed[..., None]).abs().amin(-1)
    assert torch.equal(err, best)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_params_round_trip(double_quant, use_backend):
    """bitsandbytes Params4bit -> NF4Weight -> Params4bit is lossless, and both dequantise to the definition
    (and to bitsandbytes' own dequantisation where that is right on this CPU)."""
    use_backend("cpp")
    W = _weight((128, 256), torch.bfloat16)
    param = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", blocksize=64,
                              compress_statistics=double_quant)._quantize("cpu")
    bnb_exact = oracle.bnb_dequantize_is_exact((128, 256), 64, torch.bfloat16, double_quant)[0]
    ours = NF4Weight.from_bnb(param)
    torch.testing.assert_close(ours.dequantize(), oracle.definition_dequantize_state(param.data, param.quant_state),
                               rtol=0, atol=0)
    back = ours.to_bnb()
    assert torch.equal(back.data, param.data)
    torch.testing.assert_close(oracle.definition_dequantize_state(back.data, back.quant_state), ours.dequantize(),
                               rtol=0, atol=0)
    mine = quantize_nf4(W, 64, double_quant)
    mine_bnb = mine.to_bnb()  # ours -> bitsandbytes reads it as the same weight
    torch.testing.assert_close(oracle.definition_dequantize_state(mine_bnb.data, mine_bnb.quant_state),
                               mine.dequantize(), rtol=0, atol=0)
    if bnb_exact:
        torch.testing.assert_close(bf.dequantize_4bit(param.data, param.quant_state), ours.dequantize(),
                                   rtol=0, atol=0)
        torch.testing.assert_close(bf.dequantize_4bit(mine_bnb.data, mine_bnb.quant_state), mine.dequantize(),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_bnb_reads_the_cpu_packed_layout(double_quant, dtype, use_backend):
    """After bitsandbytes' CPU repacking (what Linear4bit does in place on its first eval forward on an
    AVX512-BF16 CPU), the NF4 view is what bitsandbytes then computes with: code[nibble] * bf16(absmax).
    bitsandbytes' packing function is called directly, so this runs the same on every CPU."""
    use_backend("cpp")
    W = _weight((96, 192), dtype)
    param = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4", blocksize=64,
                              compress_statistics=double_quant)._quantize("cpu")
    packed = param.data.clone()
    absmax = oracle.state_absmax(param.quant_state)
    with oracle.dequantize_by_definition():  # the repack decodes double-quantised absmax with bitsandbytes' kernel
        param.data, state = bf._convert_weight_packed_for_cpu(param.data, param.quant_state)
    assert state.packing_format_for_cpu and param.data.shape == (96, 96)
    held = state.absmax.t().reshape(-1).float()  # (K / blocksize, N) bf16 -> per-block fp32, row-major blocks
    torch.testing.assert_close(held, absmax.to(torch.bfloat16).float(), rtol=0, atol=0)
    view = NF4Weight.from_bnb(param)
    assert view.shape == W.shape and view.dtype == dtype and not view.double_quant
    assert torch.equal(view.packed, packed.reshape(-1))
    expected = oracle.definition_dequantize(packed, held, 64, W.shape, dtype)
    torch.testing.assert_close(view.dequantize(), expected, rtol=0, atol=0)


def test_from_bnb_refuses_a_cpu_layout_it_does_not_know():
    param = bnb.nn.Params4bit(_weight((64, 64), torch.float32), requires_grad=False, quant_type="nf4",
                              blocksize=64, compress_statistics=False)._quantize("cpu")
    param.quant_state.packing_format_for_cpu = True  # flag set, tensors not repacked
    with pytest.raises(ValueError, match="CPU-packed layout"):
        NF4Weight.from_bnb(param)


def test_safetensors_round_trip(tmp_path):
    w = quantize_nf4(_weight((64, 128), torch.float16), 64, True)
    path = tmp_path / "w.safetensors"
    w.save(str(path))
    back = NF4Weight.load(str(path))
    assert back.shape == w.shape and back.dtype == w.dtype and back.blocksize == 64 and back.double_quant
    assert torch.equal(back.dequantize(), w.dequantize())


def test_dequantize_error_is_bounded():
    """Each element is within half an NF4 step (the widest gap, 0.3038) of its block's absmax."""
    W = _weight((64, 64), torch.float32)
    w = quantize_nf4(W, 64, False)
    err = (w.dequantize() - W).abs().reshape(-1, 64)
    assert torch.all(err <= 0.5 * 0.3039 * w.absmax[:, None])


@pytest.mark.parametrize("W,blocksize,match", [
    (torch.zeros(3, 5), 64, r"15 elements .* multiple of 2"),
    (torch.zeros(4, 4), 100, r"blocksize must be one of"),
    (torch.zeros(4, 4, dtype=torch.float64), 64, r"dtype torch.float64"),
    (torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]), 64, r"NaN/Inf \(first at index \(1, 0\): nan\)"),
    (torch.tensor([0.0, float("inf")]), 64, r"NaN/Inf \(first at index \(1,\): inf\)"),
])
def test_bad_input(W, blocksize, match):
    with pytest.raises(ValueError, match=match):
        quantize_nf4(W, blocksize)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_dequantize_and_gemv(dtype, use_backend):
    """csrc/cuda/nf4.cu (built with FASTNLG_BUILD_CUDA=1): dequantise equals the reference bit for bit, and
    the GEMV equals x @ dequantised W^T within fp32-accumulation rounding."""
    from fastnlg import backend
    from fastnlg.quant import _backends

    if not backend.has_cuda_ext():
        pytest.skip("fastnlg._C_cuda not built")
    W = _weight((512, 1024), dtype).cuda()
    w = quantize_nf4(W, 64, True)
    use_backend("cuda")
    deq = w.dequantize()
    use_backend("torch")
    torch.testing.assert_close(deq, w.dequantize(), rtol=0, atol=0)
    x = torch.randn(1024, device="cuda", dtype=dtype)
    use_backend("cuda")
    y = _backends.gemv(x, w)
    ref = x.double() @ deq.double().t()
    low = (x @ deq.t()).double()
    assert (y.double() - ref).abs().max() <= 2 * (low - ref).abs().max() + 1e-3 * ref.abs().max()
