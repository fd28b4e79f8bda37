"""fastnlg.from_pretrained: a local model loaded, with LoRA (from a LoraConfig or a dict), 4-bit through
fastnlg's NF4 where bitsandbytes cannot run, patched; it trains as the same model built by hand with
Transformers + PEFT, unpatched."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastnlg  # noqa: E402
from fastnlg.nn import NF4Linear  # noqa: E402

from .test_patch import _model, _train_step  # noqa: E402

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "lora_dropout": 0.0,
        "init_lora_weights": False}


@pytest.fixture(autouse=True)
def _cpu_backends(backend_env):
    backend_env.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _model("llama").save_pretrained(str(path))
    return str(path)


def _by_hand(path, quantize=False):
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    if quantize:
        from fastnlg.nn import quantize_linears
        quantize_linears(model)
    return model


@pytest.mark.parametrize("as_config", [False, True])
def test_lora_model_is_loaded_patched_and_trains_as_built_by_hand(saved, as_config):
    torch.manual_seed(0)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", **LORA) if as_config else LORA
    model, report = fastnlg.from_pretrained(saved, lora=lora)
    assert fastnlg.is_patched(model) and isinstance(model, peft.PeftModel)
    assert next(model.parameters()).dtype == torch.float32  # the CPU default
    assert report.count("lora") == 2 * 3 and report.count("cross_entropy") == 1 and report.count("mlp") == 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}
    ref = _by_hand(saved)
    out_ref, g_ref = _train_step(ref)
    out, g = _train_step(model)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-4, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-5)


def test_4bit_without_bitsandbytes_uses_fastnlg_nf4_under_the_adapters(saved):
    torch.manual_seed(0)
    model, report = fastnlg.from_pretrained(saved, load_in_4bit=True, lora=LORA, device="cpu")
    nf4 = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(nf4) == 2 * 7 and not any("lm_head" in n for n in nf4)  # every projection of the 2 layers
    assert report.count("lora") == 2 * 3
    ref = _by_hand(saved, quantize=True)
    out_ref, g_ref = _train_step(ref)
    out, g = _train_step(model)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-4, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-5)


def test_4bit_inference_only_and_options(saved):
    model, report = fastnlg.from_pretrained(saved, load_in_4bit=True, patch=False, dtype=torch.float32)
    assert report is None and not fastnlg.is_patched(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 2 * 7
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(TypeError, match="lora must be a peft.LoraConfig or a dict"):
        fastnlg.from_pretrained(saved, lora=4)
    with pytest.raises(TypeError, match="lora="):
        fastnlg.from_pretrained(saved, lora={"rank": 4})


def test_gradient_checkpointing_trains_as_without(saved):
    torch.manual_seed(0)
    model, _ = fastnlg.from_pretrained(saved, lora=LORA, gradient_checkpointing=True)
    assert model.base_model.model.is_gradient_checkpointing
    ref = _by_hand(saved)
    out_ref, g_ref = _train_step(ref)
    out, g = _train_step(model)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-4, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-5)
