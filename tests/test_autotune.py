"""kernels/_autotune.py: the first candidate wherever nothing can be measured; on a GPU the fastest measured
config, kept per (key, device), skipping configs that do not fit the device (time measurement is faked here,
the gpu tier measures for real)."""
import pytest
import torch

from fastnlg.kernels import _autotune


def test_first_candidate_without_a_gpu():
    calls = []
    assert _autotune.pick(("k",), [(1,), (2,)], calls.append, torch.device("cpu")) == (1,)
    assert calls == []  # nothing launched, nothing cached
    assert not any(key[0] == "k" for key in _autotune.chosen())


@pytest.fixture
def fake_gpu(monkeypatch):
    timings, launched = {}, []

    def time_ms(launch, cfg):
        launch(cfg)
        t = timings[cfg]
        if isinstance(t, Exception):
            raise t
        return t
    monkeypatch.setattr(_autotune, "_measure_allowed", lambda device: True)
    monkeypatch.setattr(_autotune, "_time_ms", time_ms)
    monkeypatch.setattr(_autotune, "_BEST", {})
    return timings, launched


def test_fastest_is_kept_per_key_and_device(fake_gpu):
    timings, launched = fake_gpu
    timings.update({(1,): 3.0, (2,): 1.0, (3,): 2.0})
    dev = torch.device("cuda", 0)
    assert _autotune.pick(("attn", 64), [(1,), (2,), (3,)], launched.append, dev) == (2,)
    assert launched == [(1,), (2,), (3,)]
    assert _autotune.pick(("attn", 64), [(1,), (2,), (3,)], launched.append, dev) == (2,)
    assert len(launched) == 3  # cached: no second measurement
    timings[(2,)] = 9.0
    assert _autotune.pick(("attn", 64), [(1,), (2,), (3,)], launched.append, torch.device("cuda", 1)) == (3,)
    assert _autotune.pick(("attn", 128), [(1,), (2,), (3,)], launched.append, dev) == (3,)
    assert len(_autotune.chosen()) == 3


def test_configs_that_do_not_fit_are_skipped(fake_gpu):
    from triton.runtime.errors import OutOfResources

    timings, launched = fake_gpu
    timings.update({(1,): OutOfResources(200_000, 101_376, "shared memory"), (2,): 5.0})
    assert _autotune.pick(("x",), [(1,), (2,)], launched.append, torch.device("cuda")) == (2,)
    timings[(2,)] = OutOfResources(200_000, 101_376, "shared memory")
    with pytest.raises(RuntimeError, match="no candidate config of y could launch"):
        _autotune.pick(("y",), [(1,), (2,)], launched.append, torch.device("cuda"))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("FASTNLG_AUTOTUNE", "0")
    assert not _autotune._measure_allowed(torch.device("cuda"))


def test_every_attention_candidate_is_aot_compiled():
    """The tuner only picks configs the AOT tier compiled for every target."""
    from fastnlg.kernels import attention as kern

    compiled = {(s["kernel"].fn.__name__, s["constexprs"]["BLOCK_D"], s["constexprs"]["BLOCK_M"],
                 s["constexprs"]["BLOCK_N"], s["num_warps"], s["num_stages"]) for s in kern.AOT_SPECS}
    for tables, kernels in (((kern.FWD_CONFIGS, kern.FWD_CONFIGS_FP32), ("attn_fwd_kernel",)),
                            ((kern.BWD_CONFIGS, kern.BWD_CONFIGS_FP32), ("attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"))):
        for table in tables:
            for block_d, configs in table.items():
                for name in kernels:
                    for cfg in configs:
                        assert (name, block_d, *cfg) in compiled


def test_every_nf4_matmul_candidate_is_aot_compiled():
    from fastnlg.kernels import nf4_matmul as kern

    compiled = {(s["kernel"].fn.__name__, s["constexprs"].get("BLOCK_R"), s["constexprs"]["BLOCK_M"],
                 s["constexprs"]["BLOCK_N"], s["constexprs"]["BLOCK_K"], s["num_warps"], s["num_stages"])
                for s in kern.AOT_SPECS}
    for dtype in (torch.bfloat16, torch.float32):
        for rank in kern.RANK_BUCKETS:
            for cfg in kern.candidate_configs(dtype, rank):
                assert ("nf4_matmul_nt_kernel", rank, *cfg) in compiled
        for cfg in kern.candidate_configs(dtype, None):
            assert ("nf4_matmul_nn_kernel", None, *cfg) in compiled
    assert [kern.rank_bucket(r) for r in (16, 32, 64, 128, 256)] == [16, 64, 64, 256, 256]


def test_each_gpu_tunes_among_its_own_candidates(monkeypatch):
    """On a GPU the candidates are the group's configs less those excluded on its architecture (the table
    of the newest compile target not newer than it); off CUDA nothing is filtered."""
    from fastnlg.kernels import _arch

    monkeypatch.setattr(_arch, "EXCLUDED", {"k/half/D64": {75: [(2,)], 90: [(1,)]}})
    monkeypatch.setattr(_autotune, "_ARCH", {})
    caps = {0: (7, 5), 1: (9, 0), 2: (8, 7), 3: (10, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: caps[d.index])
    configs = [(1,), (2,), (3,)]
    assert _autotune.launch_candidates("k/half/D64", configs, torch.device("cuda", 0)) == [(1,), (3,)]
    assert _autotune.launch_candidates("k/half/D64", configs, torch.device("cuda", 1)) == [(2,), (3,)]
    assert _autotune.launch_candidates("k/half/D64", configs, torch.device("cuda", 2)) == configs  # sm_87 -> 86
    assert _autotune.launch_candidates("k/half/D64", configs, torch.device("cuda", 3)) == [(2,), (3,)]  # -> 90
    assert _autotune.launch_candidates("k/half/D64", configs, torch.device("cpu")) == configs
    monkeypatch.setattr(_arch, "EXCLUDED", {"k/half/D64": {75: [(1,), (2,), (3,)]}})
    with pytest.raises(RuntimeError, match="no candidate config compiles cleanly for sm_75"):
        _autotune.launch_candidates("k/half/D64", configs, torch.device("cuda", 0))
    assert [_arch.table_arch(c) for c in ((7, 0), (7, 5), (8, 9), (12, 1))] == [75, 75, 89, 120]


def test_configs_measured_wrong_are_no_candidates(monkeypatch):
    """The H200's race in the dK/dV kernel (kernels/_arch.MEASURED_WRONG): on sm_90 its untuned default, and
    every candidate the tuner may pick, is none of the measured-wrong tiles; other architectures keep them
    (none was measured there)."""
    from fastnlg.kernels import _arch
    from fastnlg.kernels import attention as A

    group = "attn_bwd_dkdv_kernel/half/D128"
    wrong = _arch.MEASURED_WRONG[group][90]
    monkeypatch.setattr(_autotune, "_ARCH", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 0))
    kept = _autotune.launch_candidates(group, A.BWD_CONFIGS[128], torch.device("cuda", 0))
    assert kept and not set(kept) & set(wrong)
    assert (32, 64, 8, 2) in A.BWD_CONFIGS[128] and (32, 64, 8, 2) in _arch.candidates(group, A.BWD_CONFIGS[128], 89)
    assert _arch.candidates("attn_bwd_dq_kernel/half/D128", A.BWD_CONFIGS[128], 90)[0] == (32, 64, 8, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_measures_its_tiles_on_the_gpu(monkeypatch):
    """A real measurement: forward and both backward kernels pick a config from their tables, and the result
    equals the untuned default's."""
    from fastnlg.kernels import attention as kern
    from fastnlg.ops import flash_attention

    monkeypatch.setattr(_autotune, "_BEST", {})
    q, k, v = (torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = flash_attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    picked = {key[0]: cfg for key, cfg in _autotune.chosen().items()}
    assert picked["attn_fwd"] in kern.FWD_CONFIGS[128]
    assert picked["attn_bwd_dkdv"] in kern.BWD_CONFIGS[128] and picked["attn_bwd_dq"] in kern.BWD_CONFIGS[128]
    monkeypatch.setenv("FASTNLG_AUTOTUNE", "0")
    out0 = flash_attention(q, k, v, causal=True)
    grads0 = torch.autograd.grad(out0, (q, k, v), torch.ones_like(out0))
    for a, b in zip((out, *grads), (out0, *grads0)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_groups_without_a_candidate_take_their_fallback(monkeypatch):
    """On sm_75 (the real exclusion table) attention's head-dim-256 backward, flash-decoding at head dim 256 and
    the NF4 LoRA epilogue above rank 64 have no config that compiles cleanly: the launchers say so and take
    their AOT_FALLBACK (SDPA, the FA2 forward, the LoRA term after the matmul); on sm_90 they run."""
    import types

    from fastnlg.kernels import attention, attention_decode, nf4_matmul

    t4, h100 = torch.device("cuda", 0), torch.device("cuda", 1)
    monkeypatch.setattr(_autotune, "_ARCH", {t4: 75, h100: 90})
    assert "no config that compiles without spills for sm_75" in attention.unsupported(torch.float16, 256, t4, True)
    assert attention.unsupported(torch.float16, 256, t4, False) is None  # the forward has one
    assert attention.unsupported(torch.float16, 128, t4, True) is None
    assert attention.unsupported(torch.bfloat16, 256, h100, True) is None
    assert not nf4_matmul.epilogue_fits(128, torch.float16, t4) and nf4_matmul.epilogue_fits(64, torch.float16, t4)
    assert nf4_matmul.epilogue_fits(256, torch.bfloat16, h100) and not nf4_matmul.epilogue_fits(512, torch.bfloat16, h100)

    def q_on(device, D):
        return types.SimpleNamespace(shape=(1, 8, 1, D), dtype=torch.float16, device=device)
    k = types.SimpleNamespace(shape=(1, 8, 1024, 256))
    assert not attention_decode.decode_eligible(q_on(t4, 256), k, 0.0, None)
    assert attention_decode.decode_eligible(q_on(h100, 256), k, 0.0, None)
    assert attention_decode.decode_eligible(q_on(t4, 128), types.SimpleNamespace(shape=(1, 8, 1024, 128)), 0.0, None)
