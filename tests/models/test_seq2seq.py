"""fastnlg.patch on encoder-decoders (T5 v1.0, T5 v1.1 / Flan-T5, mT5, UMT5 with a bias table per layer): T5's RMSNorm and gated-GELU MLP fused,
its relative-position-bias attention on relative_position_attention (the marker from compute_bias), against
the unpatched model: loss, logits and every gradient (the bias table's too) in fp32, bf16 autocast by the rule,
greedy and beam generate, torch.compile(fullgraph=True), the Triton kernels under the interpreter, dropout.
BART, mBART, Pegasus: their attention on flash_attention, as unpatched. The training loss of all of them
without logits (the decoder's hidden state through the fused loss: T5's scaling, BART's final_logits_bias)."""
import copy
import importlib

import pytest
import torch
import transformers

import fastnlg
import fastnlg.kernels.attention  # noqa: F401  (imported under conftest's TRITON_INTERPRET=1: interpretable)
from fastnlg.nn import hf_attention
from tests.tolerance import assert_training_step_by_rule

VOCAB = 64


@pytest.fixture(autouse=True)
def _cpu_backends(backend_env):
    backend_env.setenv("TRITON_INTERPRET", "0")


def _model(kind, **config):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                  relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    common.update(config)
    if kind == "t5-v1.0":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(**common)).train()
    if kind == "t5-v1.1":
        cfg = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common)
        return transformers.T5ForConditionalGeneration(cfg).train()
    if kind == "umt5":  # (every self-attention layer has its own bias table; tied embeddings, scaled)
        return transformers.UMT5ForConditionalGeneration(transformers.UMT5Config(**common)).train()
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


def _counting(monkeypatch):
    """The relative_position_attention calls fastnlg's attention makes (their keyword arguments)."""
    calls, op = [], hf_attention.relative_position_attention
    monkeypatch.setattr(hf_attention, "relative_position_attention", lambda *a, **kw: calls.append(kw) or op(*a, **kw))
    return calls


@pytest.mark.parametrize("kind", ["t5-v1.0", "t5-v1.1", "mt5", "umt5"])
def test_patched_matches_unpatched(kind, monkeypatch):
    ref = _model(kind)
    ours = copy.deepcopy(ref)
    report = fastnlg.patch(ours)
    details = " | ".join(e.detail for e in report.patched)
    assert "FastT5LayerNorm" in details, details
    assert ("FastT5GatedMLP(geglu tanh)" in details) == (kind != "t5-v1.0"), details
    assert ours.config._attn_implementation == "fastnlg"
    tables = [f"{stack}.block.{i}.layer.0.SelfAttention" for stack in ("encoder", "decoder")
              for i in ((0, 1) if kind == "umt5" else (0,))]
    assert [e.path for e in report.patched if "relative_position_attention" in e.detail] == tables
    calls = _counting(monkeypatch)
    batch = _batch()
    (o_ref, g_ref), (o, g) = _step(ref, batch), _step(ours, batch)
    # every self-attention layer ran the op (T5, mT5: the layers after the first reuse its marker; UMT5: each its
    # own): the encoder's with its key padding, the decoder's causal; cross-attention has no bias (zeros dropped)
    assert [(c["causal"], c["key_padding_mask"] is not None, c["bidirectional"]) for c in calls] == \
        [(False, True, True)] * 2 + [(True, False, False)] * 2
    # the training loss without logits: the decoder's hidden state through the fused loss (T5 v1.0 and mT5
    # tie their embeddings; T5 scales the decoder output then, mT5 does not)
    assert "T5ForConditionalGeneration.lm_head -> FusedLMHead + seq2seq_lm_forward" in details, details  # (and MT5's, ...)
    assert o.logits is None and o_ref.logits is not None
    assert torch.allclose(o.loss, o_ref.loss, rtol=1e-5)
    assert g.keys() == g_ref.keys() and any("relative_attention_bias" in n for n in g)
    scale = max(v.abs().max().item() for v in g_ref.values())
    for name in g_ref:
        assert (g[name] - g_ref[name]).abs().max().item() <= 1e-5 * scale, name
    ref.eval()
    ours.eval()
    with torch.no_grad():  # evaluation: the model's own logits and loss
        e, e_ref = ours(**batch), ref(**batch)
    torch.testing.assert_close(e.logits, e_ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.loss, e_ref.loss, rtol=1e-5, atol=1e-6)
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw),
                       ref.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw))
    for beams in (2,):
        assert torch.equal(ours.generate(input_ids=batch["input_ids"], num_beams=beams, **kw),
                           ref.generate(input_ids=batch["input_ids"], num_beams=beams, **kw))
    fastnlg.unpatch(ours)
    assert not [m for m in ours.modules() if type(m).__module__.startswith("fastnlg")]
    assert not [m for m in ours.modules() if "compute_bias" in m.__dict__]
    assert ours.config._attn_implementation != "fastnlg"


def test_generate_with_a_cache_offset_and_a_static_cache(monkeypatch):
    """Decoding one token at a time runs the op with query_offset = the cached length; sampling with a seed,
    and the static cache, give the unpatched tokens."""
    ref = _model("t5-v1.1").eval()
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    calls = _counting(monkeypatch)
    batch = _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(ours.generate(**kw, do_sample=False), ref.generate(**kw, do_sample=False))
    offsets = sorted({c["query_offset"] for c in calls if not c["bidirectional"]})
    assert offsets == list(range(6)), offsets
    for model in (ours, ref):
        torch.manual_seed(3)
        model.sampled = model.generate(**kw, do_sample=True, top_k=8)
    assert torch.equal(ours.sampled, ref.sampled)
    static = dict(kw, do_sample=False, cache_implementation="static")
    calls.clear()
    assert torch.equal(ours.generate(**static), ref.generate(**static))
    # the static cache's decode steps (keys: every slot, the empty ones masked) run the op too
    assert sorted({c["query_offset"] for c in calls if not c["bidirectional"]}) == list(range(6))


# the padded batch (what training runs) in the default tier; the unmasked graph, a second ~30 s compile, is slow
@pytest.mark.parametrize("masked", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(masked):
    """The patched model compiles with fullgraph=True (the marker is a plain object; a mask in a compiled
    graph runs SDPA with the bias built) and trains as the unpatched one."""
    ref = _model("t5-v1.1")
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    compiled = torch.compile(ours, fullgraph=True)
    batch = _batch()
    for b in ([batch] if masked else [dict(batch, attention_mask=None)]):
        (o_ref, g_ref), (o, g) = _step(ref, b), _step(compiled, b)
        g = {name.removeprefix("_orig_mod."): grad for name, grad in g.items()}
        assert g.keys() == g_ref.keys()
        torch.testing.assert_close(o.loss, o_ref.loss, rtol=1e-5, atol=1e-6)
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_triton_kernels_under_the_interpreter(backend_env, monkeypatch):
    """The Triton path of relative_position_attention (bias and its table gradient in the kernels) inside the
    model, under the interpreter: loss and gradients as unpatched."""
    backend_env.setenv("TRITON_INTERPRET", "1")
    backend_env.setenv("FASTNLG_BACKEND_RELATIVE_POSITION_ATTENTION", "triton")
    rpa = importlib.import_module("fastnlg.ops.relative_position_attention")
    used = []
    kernel_fwd = rpa._FWD["triton"]
    monkeypatch.setitem(rpa._FWD, "triton", lambda *a: used.append(1) or kernel_fwd(*a))
    ref = _model("t5-v1.0")
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours, norm=False, mlp=False)
    batch = _batch()
    (o_ref, g_ref), (o, g) = _step(ref, batch), _step(ours, batch)
    assert len(used) == 4
    torch.testing.assert_close(o.loss, o_ref.loss, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_dropout_trains():
    """With dropout on (T5's attention dropout in the op), a training step is finite, its table gets a
    gradient, and the same seed gives the same step; eval mode matches the unpatched model."""
    ref = _model("t5-v1.1", dropout_rate=0.3)
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    batch = _batch()
    table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    steps = []
    for _ in range(2):
        torch.manual_seed(7)
        out, grads = _step(ours, batch)
        assert torch.isfinite(out.loss) and grads[table].abs().sum() > 0
        steps.append((out.loss.detach(), grads[table]))
    assert torch.equal(steps[0][0], steps[1][0]) and torch.equal(steps[0][1], steps[1][1])
    ref.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, rtol=1e-5, atol=1e-5)


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


def _bart(kind):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(cfg).train()
    with torch.no_grad():  # (zeros at init: a fused loss that dropped it would pass)
        model.final_logits_bias.normal_()
    return model


@pytest.mark.parametrize("kind, backend", [("Bart", "torch"), ("MBart", "torch"), ("Pegasus", "torch"),
                                           ("Bart", "triton")])
def test_bart_family_attention_and_generate(kind, backend, backend_env, monkeypatch):
    """BART, mBART, Pegasus: the attention setting applied by their table rows (they do not declare attention
    backends), self- and cross-attention on flash_attention (the Triton kernels under the interpreter: the
    encoder's and the cross-attention's key padding masks in the kernels' form), LayerNorms fused; loss,
    logits, every gradient, and (torch backend) greedy and beam generate as unpatched."""
    if backend == "triton":
        backend_env.setenv("TRITON_INTERPRET", "1")
        backend_env.setenv("FASTNLG_BACKEND_FLASH_ATTENTION", "triton")
    ref = _bart(kind)
    ours = copy.deepcopy(ref)
    report = fastnlg.patch(ours)
    assert ours.config._attn_implementation == "fastnlg"
    assert sum(e.what == "attention" and "flash_attention" in e.detail for e in report.patched) == 2 * 2 + 2
    # BART's post-LN layers: residual LayerNorms on add_layer_norm, fc1's bias in the GELU (mBART and Pegasus
    # normalise first: their LayerNorms are swapped one by one)
    layers = [e.path for e in report.patched if "residual LayerNorms -> add_layer_norm" in e.detail]
    assert len(layers) == (4 if kind == "Bart" else 0), layers
    calls, op = [], hf_attention.flash_attention
    monkeypatch.setattr(hf_attention, "flash_attention", lambda *a, **kw: calls.append(kw) or op(*a, **kw))
    batch = _batch()
    batch["input_ids"][:, -1] = 2  # (eos)
    (o_ref, g_ref), (o, g) = _step(ref, batch), _step(ours, batch)
    if backend == "triton":  # every layer through the kernels: 2 encoder, 2 decoder self (causal), 2 cross
        assert len(calls) == 6 and sum(c["key_padding_mask"] is not None for c in calls) == 4
        assert sum(bool(c["causal"]) for c in calls) == 2
    else:  # the torch backend: a 4-D mask runs SDPA as given; the decoder's plain causal mask, flash_attention
        assert len(calls) == 2 and all(c["causal"] for c in calls)
    assert o.logits is None  # the fused loss, with final_logits_bias
    torch.testing.assert_close(o.loss, o_ref.loss, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if backend == "triton":  # (generate under the interpreter is slow: decoding is checked on the torch backend)
        return
    ref.eval()
    ours.eval()
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.generate(**kw), ref.generate(**kw))
    assert torch.equal(ours.generate(**kw, num_beams=3), ref.generate(**kw, num_beams=3))


def test_bart_layers_train_with_dropout_as_unpatched():
    """BART's fused layer forward draws its dropout masks in the model's order: with dropout on, the same seed
    gives the unpatched loss and gradients."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                  decoder_ffn_dim=48, max_position_embeddings=64, dropout=0.2, attention_dropout=0.1,
                                  activation_dropout=0.1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=2)
    ref = transformers.BartForConditionalGeneration(cfg).train()
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    batch = _batch()
    torch.manual_seed(3)
    o_ref, g_ref = _step(ref, batch)
    torch.manual_seed(3)
    o, g = _step(ours, batch)
    torch.testing.assert_close(o.loss, o_ref.loss, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
