"""LoRALinear and peft_lora_forward over PEFT layers (nn.Linear and bitsandbytes Linear4bit bases): same output
and gradients as PEFT, gradients land in PEFT's own Parameters (so PEFT saves the adapter unchanged), several
active adapters, merged / disabled adapters followed live, merge(), and the options lora_linear does not
implement refused with a reason."""
import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from fastnlg.nn import LoRALinear, UnsupportedLoRA, peft_lora_forward  # noqa: E402


def _peft_model(base, **cfg):
    torch.manual_seed(0)
    config = peft.LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["0"], "lora_dropout": 0.0,
                                "init_lora_weights": False, **cfg})
    model = peft.get_peft_model(nn.Sequential(base), config)
    return model, model.base_model.model[0]


def test_from_peft_linear_matches_and_trains_peft_params(tmp_path):
    model, layer = _peft_model(nn.Linear(64, 48, bias=True))
    ours = LoRALinear.from_peft(layer)
    assert ours.lora_A[0] is layer.lora_A["default"].weight and ours.to_peft() is layer
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


def test_from_peft_linear4bit_uses_the_nf4_bytes(bnb_reference):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(128, 64, bias=False)
    q = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 blocksize=64)._quantize("cpu")
    model, layer = _peft_model(q)  # PEFT wraps bitsandbytes' CPU Linear4bit: a failure here is a failure
    ours = LoRALinear.from_peft(layer)
    assert ours.base_weight.packed.data_ptr() == q.weight.data.data_ptr()  # no copy, no re-quantisation
    x = torch.randn(3, 128)
    with bnb_reference([(64, 128)]):  # PEFT + bitsandbytes, dequantising right on this CPU
        expected = model(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
    from fastnlg.nn.lora import _nf4_view, peft_state

    for _ in range(2):  # the NF4 view is cached per parameter (a second lookup must not compare tensors)
        torch.testing.assert_close(peft_lora_forward(layer, x), expected, rtol=1e-4, atol=1e-4)
    assert peft_state(layer).weight is _nf4_view(q.weight)


@pytest.mark.parametrize("cfg,match", [({"use_dora": True}, "DoRA"), ({"lora_dropout": 0.1}, None)])
def test_options(cfg, match):
    model, layer = _peft_model(nn.Linear(32, 16), **cfg)
    if match:
        with pytest.raises(UnsupportedLoRA, match=match):
            LoRALinear.from_peft(layer)
    else:
        assert LoRALinear.from_peft(layer).dropout_p == [0.1]


def _add_second_adapter(model, layer, **cfg):
    torch.manual_seed(1)
    model.add_adapter("second", peft.LoraConfig(**{"r": 4, "lora_alpha": 4, "target_modules": ["0"],
                                                  "init_lora_weights": False, **cfg}))
    layer.set_adapter(["default", "second"])  # both active (and trainable): PEFT sums them


def _grads_of(fn, x, params):
    x = x.clone().requires_grad_()
    y = fn(x)
    return (y, *torch.autograd.grad(y, (x, *params), torch.ones_like(y)))


def test_several_active_adapters_match_peft():
    model, layer = _peft_model(nn.Linear(64, 48, bias=True))
    _add_second_adapter(model, layer)
    assert list(layer.active_adapters) == ["default", "second"]
    params = [layer.lora_A[n].weight for n in ("default", "second")] + [layer.lora_B["second"].weight]
    x = torch.randn(5, 64)
    theirs = _grads_of(layer, x, params)
    for fn in (LoRALinear.from_peft(layer), lambda t: peft_lora_forward(layer, t)):
        for a, b in zip(_grads_of(fn, x, params), theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_peft_lora_forward_follows_merge_unmerge_and_disable():
    """Merged: PEFT runs the base layer alone (the adapters are in W); disabled: base, unmerged first."""
    model, layer = _peft_model(nn.Linear(32, 16))
    _add_second_adapter(model, layer)
    x = torch.randn(3, 32)
    for step in ("merge", "unmerge", "disable", "enable"):
        if step in ("merge", "unmerge"):
            getattr(layer, step)()
        else:
            layer.enable_adapters(step == "enable")
        expected = layer(x)  # PEFT itself (after "disable" it has unmerged, if merged)
        torch.testing.assert_close(peft_lora_forward(layer, x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    layer.enable_adapters(False)
    y = peft_lora_forward(layer, x)  # disabled while merged: unmerges, as PEFT's forward does
    assert not layer.merged
    torch.testing.assert_close(y, layer.base_layer(x))


def test_variant_on_one_adapter_is_refused():
    model, layer = _peft_model(nn.Linear(32, 16))
    _add_second_adapter(model, layer, use_dora=True)
    with pytest.raises(UnsupportedLoRA, match="'second' is a LoRA variant"):
        peft_lora_forward(layer, torch.randn(2, 32))
    with pytest.raises(UnsupportedLoRA, match="mixed-adapter"):
        peft_lora_forward(model.base_model.model[0], torch.randn(2, 32), adapter_names=["default", "default"])
