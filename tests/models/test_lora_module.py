"""LoRALinear built from PEFT layers (over nn.Linear and bitsandbytes Linear4bit): same output and gradients as
PEFT, gradients land in PEFT's own Parameters (so PEFT saves the adapter unchanged), merge(), and the
options lora_linear does not implement are refused with a reason."""
import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from fastnlg.nn import LoRALinear, UnsupportedLoRA  # noqa: E402


def _peft_model(base, **cfg):
    torch.manual_seed(0)
    config = peft.LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["0"], "lora_dropout": 0.0,
                                "init_lora_weights": False, **cfg})
    model = peft.get_peft_model(nn.Sequential(base), config)
    return model, model.base_model.model[0]


def test_from_peft_linear_matches_and_trains_peft_params(tmp_path):
    model, layer = _peft_model(nn.Linear(64, 48, bias=True))
    ours = LoRALinear.from_peft(layer)
    assert ours.lora_A is layer.lora_A["default"].weight and ours.to_peft() is layer
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), model(x), rtol=1e-5, atol=1e-6)
    ours(x).pow(2).sum().backward()
    g_ours = layer.lora_B["default"].weight.grad.clone()
    layer.lora_B["default"].weight.grad = None
    layer.lora_A["default"].weight.grad = None
    model(x).pow(2).sum().backward()
    torch.testing.assert_close(g_ours, layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        layer.lora_A["default"].weight.add_(0.5)  # "training" through our module changes PEFT's adapter
    model.save_pretrained(str(tmp_path))
    saved = peft.PeftModel.from_pretrained(nn.Sequential(nn.Linear(64, 48)), str(tmp_path))
    torch.testing.assert_close(saved.base_model.model[0].lora_A["default"].weight, layer.lora_A["default"].weight)
    merged = ours.merge(torch.float32)
    torch.testing.assert_close(x @ merged.t() + layer.base_layer.bias, model(x), rtol=1e-5, atol=1e-5)


def test_from_peft_linear4bit_uses_the_nf4_bytes():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(128, 64, bias=False)
    q = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 blocksize=64)._quantize("cpu")
    try:
        model, layer = _peft_model(q)
    except Exception as exc:  # PEFT's bnb layer may need a CUDA build of bitsandbytes
        pytest.skip(f"PEFT cannot wrap Linear4bit here: {exc}")
    ours = LoRALinear.from_peft(layer)
    assert ours.base_weight.packed.data_ptr() == q.weight.data.data_ptr()  # no copy, no re-quantisation
    x = torch.randn(3, 128)
    torch.testing.assert_close(ours(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg,match", [({"use_dora": True}, "DoRA"), ({"lora_dropout": 0.1}, None)])
def test_options(cfg, match):
    model, layer = _peft_model(nn.Linear(32, 16), **cfg)
    if match:
        with pytest.raises(UnsupportedLoRA, match=match):
            LoRALinear.from_peft(layer)
    else:
        assert LoRALinear.from_peft(layer).dropout_p == 0.1


def test_merged_adapter_is_refused():
    model, layer = _peft_model(nn.Linear(32, 16))
    layer.merge()
    with pytest.raises(UnsupportedLoRA, match="merged"):
        LoRALinear.from_peft(layer)
