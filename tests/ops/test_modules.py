"""Module wrappers vs the Hugging Face / torch modules they stand in for."""
import pytest
import torch
from torch import nn

from fastnlg.nn import FastGatedMLP, FastLayerNorm, FastRMSNorm


def test_rms_norm_module_matches_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(48, eps=1e-5)
    nn.init.normal_(hf.weight)
    ours = FastRMSNorm.from_module(hf)
    assert ours.weight is hf.weight
    x = torch.randn(2, 3, 48)
    torch.testing.assert_close(ours(x), hf(x))


def test_rms_norm_module_matches_gemma():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    hf = GemmaRMSNorm(32, eps=1e-6)
    nn.init.normal_(hf.weight, std=0.1)
    x = torch.randn(4, 32)
    torch.testing.assert_close(FastRMSNorm.from_module(hf, offset=1.0)(x), hf(x))


def test_layer_norm_module():
    ln = nn.LayerNorm(40)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    x = torch.randn(3, 40)
    torch.testing.assert_close(FastLayerNorm.from_module(ln)(x), ln(x))


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_gated_mlp(act):
    from transformers.activations import ACT2FN

    mlp = FastGatedMLP(16, 40, activation=act)
    x = torch.randn(2, 5, 16)
    want = mlp.down_proj(ACT2FN[act](mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), want)


def test_gated_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unsupported activation 'relu'"):
        FastGatedMLP(4, 8, activation="relu")
