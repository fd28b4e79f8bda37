"""fastnlg.patch on encoders (BERT, RoBERTa, XLM-RoBERTa; token / sequence classification, masked LM, base
model): what the report says runs, and the patched model against the unpatched one on a padded batch (loss,
logits and every gradient in fp32; bf16 autocast by the tolerance rule; PEFT LoRA; torch.compile)."""
import copy
import importlib

import pytest
import torch
import transformers

import fastnlg
from tests.tolerance import assert_training_step_by_rule

if not torch.cuda.is_available():  # the kernels, defined under the interpreter conftest.py sets (the tests
    for _name in ("attention", "layer_norm", "gelu", "glu", "rope", "cross_entropy"):  # below run the CPU defaults)
        importlib.import_module(f"fastnlg.kernels.{_name}")

FAMILIES = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert",
            "modernbert": "ModernBert"}
HEADS = ("ForTokenClassification", "ForSequenceClassification", "ForMaskedLM")
VOCAB, LABELS = 120, 5


@pytest.fixture(autouse=True)
def _cpu_backends(backend_env):
    backend_env.setenv("TRITON_INTERPRET", "0")  # the CPU defaults users run (the kernels: tests/ops)


def _config(family, **kw):
    cls = getattr(transformers, f"{FAMILIES[family]}Config")
    if family == "distilbert":
        base = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=LABELS,
                    max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
                    pad_token_id=1)
    elif family == "modernbert":  # alternating local (a 4-token window: it matters at 12 tokens) and global layers
        base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                    num_labels=LABELS, max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=2,
                    pad_token_id=1, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)
    else:
        base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=LABELS, max_position_embeddings=64, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, pad_token_id=1)
    return cls(**{**base, **kw})


def _model(family, head, **kw):
    torch.manual_seed(0)
    return getattr(transformers, FAMILIES[family] + head)(_config(family, **kw)).train()


def _batch(head, seed=0, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids = ids.masked_fill(mask == 0, 1)
    if head == "ForTokenClassification":
        labels = torch.randint(0, LABELS, (B, T), generator=g).masked_fill(mask == 0, -100)
    elif head == "ForSequenceClassification":
        labels = torch.randint(0, LABELS, (B,), generator=g)
    else:
        masked = (torch.rand(B, T, generator=g) < 0.25) & (mask == 1)
        masked[0, 0] = True
        labels = torch.where(masked, ids, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _step(model, batch, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(ours, ref, rel=1e-5):
    """Every gradient within rel of the model's largest gradient entry (a gradient that is 0 in exact
    arithmetic, as the key biases' under softmax, is rounding noise on both sides)."""
    assert ours.keys() == ref.keys()
    scale = max(g.abs().max().item() for g in ref.values())
    for name in ref:
        err = (ours[name] - ref[name]).abs().max().item()
        assert err <= rel * scale, (name, err, scale)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_unpatched(family, head):
    ref = _model(family, head)
    ours = copy.deepcopy(ref)
    report = fastnlg.patch(ours)
    details = " | ".join(e.detail for e in report.patched)
    fused = ("FastModernBertMLP(geglu none)", "apply_rotary_pos_emb -> fastnlg.ops.apply_rope") if family == "modernbert" \
        else ("add_layer_norm", "FastDistilBertFFN(none)" if family == "distilbert" else "FastDenseGELU(none)")
    assert all(f in details for f in fused), details
    assert any(e.what == "cross_entropy" for e in report.patched), report
    assert not [e for e in report.skipped if e.what in ("norm", "mlp", "cross_entropy", "attention")
                or (e.what == "rope" and family == "modernbert")], report
    batch = _batch(head)
    (out_ref, g_ref), (out, g) = _step(ref, batch), _step(ours, batch)
    assert torch.allclose(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6), (out.loss, out_ref.loss)
    _assert_grads_close(g, g_ref)
    if head != "ForMaskedLM":
        assert torch.allclose(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    else:
        assert out.logits is None  # training: no (tokens x vocab) logits
    ref.eval()
    ours.eval()
    with torch.no_grad():  # evaluation: the logits, and the loss over them
        e_ref, e = ref(**batch), ours(**batch)
    assert torch.allclose(e.logits, e_ref.logits, rtol=1e-5, atol=1e-5)
    assert torch.allclose(e.loss, e_ref.loss, rtol=1e-5, atol=1e-6)
    tup = ours(**batch, return_dict=False)
    assert isinstance(tup, tuple) and torch.allclose(tup[0], e.loss)
    fastnlg.unpatch(ours)
    assert not [m for m in ours.modules() if type(m).__module__.startswith("fastnlg") or "forward" in m.__dict__]


def test_masked_lm_runs_only_the_masked_rows(monkeypatch):
    """The head's transform and the fused loss see the masked rows only (the rest are ignored by the loss)."""
    enc = importlib.import_module("fastnlg.nn.encoder")
    rows = []
    real = enc.fused_linear_cross_entropy
    monkeypatch.setattr(enc, "fused_linear_cross_entropy", lambda h, *a, **k: rows.append(h.shape[0]) or real(h, *a, **k))
    model = _model("bert", "ForMaskedLM")
    fastnlg.patch(model)
    batch = _batch("ForMaskedLM")
    model(**batch).loss.backward()
    assert rows == [int((batch["labels"] != -100).sum())]


def test_classification_loss_options():
    """Class weights (model.loss_class_weight) as CrossEntropyLoss(weight=...); regression and multi-label
    sequence problems keep the model's own loss."""
    ref = _model("bert", "ForTokenClassification")
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    w = torch.tensor([0.2, 1.0, 2.0, 0.5, 3.0])
    ours.loss_class_weight = w
    batch = _batch("ForTokenClassification")
    logits = ref(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, LABELS), batch["labels"].reshape(-1), weight=w)
    assert torch.allclose(ours(**batch).loss, expected, rtol=1e-5)
    for labels, problem in ((torch.randn(3), "regression"), (torch.rand(3, LABELS).round(), "multi_label")):
        ref = _model("bert", "ForSequenceClassification", num_labels=1 if problem == "regression" else LABELS)
        ours = copy.deepcopy(ref)
        fastnlg.patch(ours)
        batch = {**_batch("ForSequenceClassification"), "labels": labels}
        assert torch.allclose(ours(**batch).loss, ref(**batch).loss, rtol=1e-6)
        assert ours.config.problem_type.startswith(problem)


@pytest.mark.parametrize("family", FAMILIES)
def test_base_model_and_padded_attention(family):
    """The base model alone: fused layers, no loss (reported), outputs equal on a padded batch."""
    torch.manual_seed(0)
    ref = getattr(transformers, f"{FAMILIES[family]}Model")(_config(family)).eval()
    ours = copy.deepcopy(ref)
    report = fastnlg.patch(ours)
    assert any("has no loss rule" in e.detail for e in report.skipped)
    batch = {k: v for k, v in _batch("ForTokenClassification").items() if k != "labels"}
    with torch.no_grad():
        a, b = ref(**batch).last_hidden_state, ours(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert torch.allclose(a[keep], b[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,head", [("bert", "ForSequenceClassification")] + [
    (f, "ForTokenClassification") for f in FAMILIES])
def test_bf16_autocast_by_the_rule(family, head):
    """fp32 weights under bf16 autocast: the patched model as close to the fp64 model as the unpatched one
    under the same autocast (loss and the whole gradient, DESIGN's rule)."""
    batch = _batch(head, seed=2, B=8, T=24)
    assert_training_step_by_rule(lambda: _model(family, head), lambda m, ac: _step(m, batch, ac), fastnlg.patch)


def test_peft_lora_on_a_patched_encoder():
    """LoRA on query/key/value/dense with the classifier in modules_to_save (PEFT's TOKEN_CLS): the LoRA
    layers run fastnlg's lora_linear, and the patched model trains as the unpatched one."""
    import peft

    def build(patch):
        m = _model("bert", "ForTokenClassification")
        if patch:
            fastnlg.patch(m)
        torch.manual_seed(1)
        m = peft.get_peft_model(m, peft.LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8,
                                                   target_modules=["query", "key", "value", "dense"]))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        return m

    from fastnlg.patching.builders import ours as fused

    ref, ours = build(False), build(True)
    lora = [m for m in ours.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    assert len(lora) == 2 * (4 + 2) and all(fused(m, "forward") for m in lora)  # (added after patching: fused too)
    batch = _batch("ForTokenClassification")
    (o_ref, g_ref), (o, g) = _step(ref, batch), _step(ours, batch)
    assert torch.allclose(o.loss, o_ref.loss, rtol=1e-5)
    _assert_grads_close(g, g_ref)


@pytest.mark.parametrize("family,head", [("bert", "ForTokenClassification")] + [
    pytest.param(f, h, marks=pytest.mark.slow) for f, h in (("roberta", "ForSequenceClassification"),
                                                             ("xlm-roberta", "ForTokenClassification"),
                                                             ("bert", "ForMaskedLM"))])
def test_compiles_fullgraph(family, head):
    """torch.compile(fullgraph=True) of the patched model: no graph break, the eager patched model's loss and
    gradients."""
    ours = _model(family, head)
    fastnlg.patch(ours)
    ref = copy.deepcopy(ours)
    batch = _batch(head)
    (o_ref, g_ref) = _step(ref, batch)
    (o, g) = _step(torch.compile(ours, fullgraph=True), batch)
    assert torch.allclose(o.loss, o_ref.loss, rtol=1e-5)
    _assert_grads_close({k.removeprefix("_orig_mod."): v for k, v in g.items()}, g_ref)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run the Triton kernels under the interpreter only")
@pytest.mark.parametrize("family", ["modernbert", "bert", "distilbert"])
def test_every_kernel_in_the_encoders(family, monkeypatch):
    """Every op on its Triton kernels (under the interpreter): attention on the encoders' masks (non-causal with
    key padding; ModernBERT's symmetric local window on alternate layers), add_layer_norm, the GELU with its
    bias, GeGLU, RoPE, the losses: the unpatched model's loss and gradients."""
    from fastnlg import backend
    from fastnlg.ops import attention

    calls = []
    real = attention._RUN["triton"]
    monkeypatch.setitem(attention._RUN, "triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = _model(family, "ForTokenClassification")
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    batch = _batch("ForTokenClassification")
    with backend.use("triton", interpret=True):
        out, g = _step(ours, batch)
    out_ref, g_ref = _step(ref, batch)
    assert len(calls) == ours.config.num_hidden_layers
    assert torch.allclose(out.loss, out_ref.loss, rtol=1e-5)
    _assert_grads_close(g, g_ref, rel=1e-4)
