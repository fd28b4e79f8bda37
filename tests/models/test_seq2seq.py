"""fastnlg.patch on encoder-decoders (T5 v1.0, T5 v1.1 / Flan-T5, mT5): T5's RMSNorm and gated-GELU MLP fused,
its attention its own (relative position bias: tests/models/test_hf_attention.py), against the unpatched
model: loss, logits and every gradient (the bias table's too) in fp32, bf16 autocast by the rule, generate."""
import copy

import pytest
import torch
import transformers

import fastnlg
from tests.tolerance import assert_training_step_by_rule

VOCAB = 64


@pytest.fixture(autouse=True)
def _cpu_backends(backend_env):
    backend_env.setenv("TRITON_INTERPRET", "0")


def _model(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                  relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if kind == "t5-v1.0":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(**common)).train()
    if kind == "t5-v1.1":
        cfg = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common)
        return transformers.T5ForConditionalGeneration(cfg).train()
    return transformers.MT5ForConditionalGeneration(transformers.MT5Config(**common)).train()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(2, VOCAB, (3, 9), generator=g), torch.randint(2, VOCAB, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels[2, 4:] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _step(model, batch, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["t5-v1.0", "t5-v1.1", "mt5"])
def test_patched_matches_unpatched(kind):
    ref = _model(kind)
    ours = copy.deepcopy(ref)
    report = fastnlg.patch(ours)
    details = " | ".join(e.detail for e in report.patched)
    assert "FastT5LayerNorm" in details, details
    assert ("FastT5GatedMLP(geglu tanh)" in details) == (kind != "t5-v1.0"), details
    batch = _batch()
    (o_ref, g_ref), (o, g) = _step(ref, batch), _step(ours, batch)
    assert torch.allclose(o.loss, o_ref.loss, rtol=1e-5) and torch.allclose(o.logits, o_ref.logits, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys() and any("relative_attention_bias" in n for n in g)
    scale = max(v.abs().max().item() for v in g_ref.values())
    for name in g_ref:
        assert (g[name] - g_ref[name]).abs().max().item() <= 1e-5 * scale, name
    ref.eval()
    ours.eval()
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw),
                       ref.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw))
    for beams in (2,):
        assert torch.equal(ours.generate(input_ids=batch["input_ids"], num_beams=beams, **kw),
                           ref.generate(input_ids=batch["input_ids"], num_beams=beams, **kw))
    fastnlg.unpatch(ours)
    assert not [m for m in ours.modules() if type(m).__module__.startswith("fastnlg")]


@pytest.mark.parametrize("kind", ["t5-v1.0", "t5-v1.1"])
def test_bf16_autocast_by_the_rule(kind):
    batch = _batch()
    assert_training_step_by_rule(lambda: _model(kind), lambda m, ac: _step(m, batch, ac), fastnlg.patch)


def test_t5_layernorm_rounds_as_t5():
    """FastT5LayerNorm gives T5LayerNorm's dtypes and values: fp32 weight (bf16 input -> fp32 output), half
    weight with the same and with an fp32 input."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from fastnlg.nn.norms import FastT5LayerNorm

    for w_dtype, x_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                             (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)):
        ref = T5LayerNorm(40)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(40))
        ref = ref.to(w_dtype)
        x = torch.randn(3, 5, 40).to(x_dtype)
        ours = FastT5LayerNorm.from_module(ref)
        a, b = ours(x), ref(x)
        assert a.dtype == b.dtype, (w_dtype, x_dtype, a.dtype, b.dtype)
        tol = 1e-6 if b.dtype == torch.float32 else 1e-2
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol), (w_dtype, x_dtype)
