"""attn_implementation="fastnlg" in tiny Transformers models: logits and gradients equal eager attention
(with left padding, sliding windows, softcapping, GQA), generation unchanged, and a mask the kernel cannot
express falls back with a warning instead of a wrong answer."""
import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastnlg.nn import hf_attention  # noqa: E402

VOCAB = 64


def _config(family):
    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":  # sliding window shorter than the sequence
        return transformers.MistralConfig(sliding_window=5, **common)
    if family == "gemma2":  # softcap + alternating sliding/global layers
        return transformers.Gemma2Config(head_dim=8, sliding_window=4, attn_logit_softcapping=5.0,
                                         query_pre_attn_scalar=8, **common)
    raise ValueError(family)


def _models(family):
    hf_attention.register()
    torch.manual_seed(0)
    cfg = _config(family)
    cfg._attn_implementation = "eager"
    ref = transformers.AutoModelForCausalLM.from_config(cfg).float()
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("fastnlg")
    assert ours.config._attn_implementation == "fastnlg"
    return ref, ours


def _batch(pad):
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :4] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    if pad:  # the last pad position predicts the first real token: with no key to attend, its output is
        labels[0, 4] = -100  # 0 here (as flash-attn) and a uniform average in eager; keep it out of the loss
    return ids, mask, labels


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "leftpad"])
def test_logits_and_grads_match_eager(family, pad, backend, use_backend, monkeypatch):
    use_backend(backend)
    calls = []
    kernel = hf_attention.flash_attention
    monkeypatch.setattr(hf_attention, "flash_attention", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    if backend == "triton":  # the fallback must not be needed here
        monkeypatch.setattr(hf_attention, "masked_attention_reference", None)
    ref, ours = _models(family)
    ids, mask, labels = _batch(pad)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    keep = mask.bool()  # logits of padding positions are not compared (kernel: 0-attention rows)
    torch.testing.assert_close(out.logits[keep], out_ref.logits[keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-4, atol=1e-5)
    if backend == "triton":
        assert len(calls) == 2  # one per layer, through the kernel
        if pad:
            assert calls[0]["key_padding_mask"] is not None
    else:  # torch: a 4-D mask (padding, a window) runs SDPA under it as given; no mask runs flash_attention
        assert len(calls) == {"llama": 0 if pad else 2, "mistral": 0, "gemma2": 0 if pad else 1}[family]
    out_ref.loss.backward()
    out.loss.backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_with_kv_cache_unchanged(family):
    ref, ours = _models(family)
    ids, mask, _ = _batch(pad=True)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "attention_mask": mask}
    assert torch.equal(ours.eval().generate(ids, **kw), ref.eval().generate(ids, **kw))


def test_inexpressible_mask_falls_back_with_one_note(caplog):
    """A block-diagonal (document) mask without position ids is not causal + padding: SDPA runs under the
    mask (as the unpatched model would), said once."""
    module = torch.nn.Module()
    module.is_causal = True
    module.training = False
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    allowed[3:, :3] = False  # two documents
    mask = allowed[None, None]
    with caplog.at_level(logging.INFO, logger="fastnlg"):
        out, _ = hf_attention.fastnlg_attention_forward(module, q, k, v, mask, scaling=0.3)
        hf_attention.fastnlg_attention_forward(module, q, k, v, mask.clone(), scaling=0.3)
    assert sum("not causal/window + key padding" in r.message for r in caplog.records) == 1
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, -float("inf"))
    torch.testing.assert_close(out, (torch.softmax(s, -1) @ v).transpose(1, 2))


def test_mask_conversion_is_not_fooled_by_a_reused_address():
    """The conversion cache is keyed by the live tensor object: a new mask (even at a recycled address)
    is converted again."""
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    m1 = causal.expand(2, 1, 5, 5).clone()
    out1, _ = hf_attention.fastnlg_attention_forward(module, q, k, v, m1, scaling=0.3)
    m1[0, :, :, :2] = False  # same storage, now left-padded: version bump must be seen
    out2, _ = hf_attention.fastnlg_attention_forward(module, q, k, v, m1, scaling=0.3)
    assert not torch.allclose(out1[0, 2:], out2[0, 2:])
    torch.testing.assert_close(out1[1], out2[1])


def test_mask_conversion_is_cached_across_layers(monkeypatch):
    """All layers share one mask tensor: it is converted (one host sync) once, not once per layer."""
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    calls = []
    real = hf_attention.visible_mask
    monkeypatch.setattr(hf_attention, "visible_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool)).expand(2, 1, 5, 5).clone()
    mask[0, :, :, :2] = False
    for _ in range(4):
        hf_attention.fastnlg_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("position_ids_batch", [2, 1])
def test_packed_batch_runs_varlen_on_triton(backend, position_ids_batch, use_backend, monkeypatch):
    """A packed batch (position ids restarting at 0, Transformers' document mask): on Triton the varlen
    kernel over the B*T tokens with cu_seqlens from the position ids; on the torch backend SDPA under the
    mask. Both equal attention under the mask, forward and backward."""
    use_backend(backend)
    calls = []
    kernel = hf_attention.flash_attention
    monkeypatch.setattr(hf_attention, "flash_attention", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]])[:position_ids_batch]
    doc = (pos == 0).cumsum(-1)
    mask = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()).expand(2, 6, 6)[:, None]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, 6, 8, generator=g).requires_grad_() for s in (4, 2, 2))  # GQA
    out, _ = hf_attention.fastnlg_attention_forward(module, q, k, v, mask, scaling=0.3, position_ids=pos)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if backend == "triton":
        cu = [0, 3, 6, 8, 12] if position_ids_batch == 2 else [0, 3, 6, 9, 12]
        assert len(calls) == 1 and calls[0]["cu_seqlens"].tolist() == cu
    else:
        assert calls == []


def test_torch_backend_runs_sdpa_under_the_given_mask(use_backend, monkeypatch):
    """On the torch backend (the CPU default) a 4-D mask is not converted (no host read, no rebuilt mask):
    SDPA runs under it, with the SDPA mask built once for all layers and freed with the mask; a query row
    that sees no key outputs 0, as on the kernels."""
    use_backend("torch")
    conversions = []
    monkeypatch.setattr(hf_attention, "visible_mask", lambda *a, **k: conversions.append(1))
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, 5, 8, generator=g).requires_grad_() for s in (4, 2, 2))
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool)).expand(2, 1, 5, 5).clone()
    mask[0, :, :, :2] = False  # left padding: rows 0 and 1 of sample 0 see no key
    outs = [hf_attention.fastnlg_attention_forward(module, q, k, v, mask, scaling=0.3)[0] for _ in range(3)]
    assert conversions == [] and len(hf_attention._sdpa_cache) == 1
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~mask.any(-1, keepdim=True),
                                                           scale=0.3, enable_gqa=True).transpose(1, 2)
    ref = ref.masked_fill(~mask.any(-1)[:, 0, :, None, None], 0.0)
    for out in outs:
        torch.testing.assert_close(out, ref)
    assert outs[0][0, :2].abs().max() == 0 and outs[0][1].abs().min() > 0
    grads = torch.autograd.grad(outs[0].sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~mask, torch.finfo(torch.float32).min)  # float masks alike
    torch.testing.assert_close(hf_attention.fastnlg_attention_forward(module, q, k, v, additive, scaling=0.3)[0], ref)
    del mask, additive
    assert hf_attention._sdpa_cache == {}


def _t5_pair():
    hf_attention.register()
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0)
    cfg._attn_implementation = "eager"
    ref = transformers.T5ForConditionalGeneration(cfg)
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("fastnlg")
    return ref, ours


def test_t5_position_bias_is_never_dropped(caplog):
    """T5 (set to "fastnlg" without fastnlg.patch) passes its relative position bias as a `position_bias`
    tensor: those calls run SDPA with the bias added (one note), and the logits and gradients are eager's,
    bias-table gradient included (dropping it silently gave logits off by 0.21). fastnlg.patch's marker:
    tests/models/test_seq2seq.py."""
    ref, ours = _t5_pair()
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(1, VOCAB, (2, 7), generator=g), torch.randint(1, VOCAB, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    hf_attention._warned.clear()
    with caplog.at_level(logging.INFO, logger="fastnlg"):
        outs = [m(input_ids=ids, attention_mask=mask, labels=labels) for m in (ref, ours)]
    for o in outs:
        o.loss.backward()
    assert torch.allclose(outs[1].logits, outs[0].logits, atol=1e-6)
    table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert torch.allclose(ours.get_parameter(table).grad, ref.get_parameter(table).grad, atol=1e-6)
    warned = [r.getMessage() for r in caplog.records if "passes a position_bias tensor" in r.getMessage()]
    assert len(warned) == 1, warned


@pytest.mark.parametrize("argument", ["position_bias", "head_mask", "output_attentions", "s_aux", "a_future_argument"])
def test_every_argument_it_does_not_implement_runs_the_familys_attention(argument, monkeypatch):
    """Each argument fastnlg's attention does not implement (and any argument it does not know) sends the call
    to the family's eager_attention_forward with every argument as given."""
    calls = []
    module = type("LlamaAttention", (torch.nn.Module,), {"__module__": "transformers.models.llama.modeling_llama"})()
    llama = __import__("transformers.models.llama.modeling_llama", fromlist=["eager_attention_forward"])
    monkeypatch.setattr(llama, "eager_attention_forward", lambda *a, **k: calls.append(k) or ("own", None))
    q = torch.randn(1, 2, 4, 8)
    value = True if argument == "output_attentions" else torch.randn(1, 2, 4, 4)
    if argument == "position_bias":  # (a bias with output_attentions: the weights need the family's attention)
        kwargs = {"output_attentions": True}
    else:
        kwargs = {}
    out = hf_attention.fastnlg_attention_forward(module, q, q, q, None, scaling=0.5, **{argument: value}, **kwargs)
    assert out == ("own", None) and calls[0][argument] is value and calls[0]["scaling"] == 0.5
    assert hf_attention.fallback_reason(None, {"position_ids": q, "use_cache": True, "output_attentions": False}) is None


def test_an_additive_float_mask_is_not_read_as_allowed_or_not():
    """A float mask holding a bias (values other than 0 / -inf) is not representable as allow/forbid: the call
    runs the family's attention; a 0 / min mask is representable."""
    lowest = torch.finfo(torch.float32).min
    binary = torch.tensor([[[[0.0, lowest], [0.0, 0.0]]]])
    assert hf_attention.fallback_reason(binary, {}) is None
    assert "additive bias" in hf_attention.fallback_reason(binary + 0.5, {})
    assert hf_attention.fallback_reason(binary.bool(), {}) is None


def test_gemma2_output_attentions_returns_the_weights_after_patching():
    """Gemma-2 asked for output_attentions: the patched model's calls run its own eager attention, so the user
    gets the weights (not None) and the same outputs as unpatched eager."""
    import transformers

    import fastnlg

    cfg = transformers.Gemma2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=16, intermediate_size=64, vocab_size=64, sliding_window=4,
                                    attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    x = torch.randint(0, 64, (2, 9))
    ref = model(x, output_attentions=True)
    fastnlg.patch(model)
    out = model(x, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == len(ref.attentions) == 2
    for a, r in zip(out.attentions, ref.attentions):
        assert a is not None and a.shape == r.shape == (2, 2, 9, 9)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    fastnlg.unpatch(model)
