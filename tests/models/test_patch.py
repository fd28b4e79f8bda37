"""fastnlg.patch on tiny Transformers models of each family in the table, plain and under PEFT LoRA:
the same loss, gradients, eval logits and generations as the unpatched model, the report, and unpatch
restoring the original modules, functions and outputs exactly."""
import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastnlg  # noqa: E402
from fastnlg.patching import table  # noqa: E402

VOCAB = 61
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2"]
# per layer: + q/k norms (Qwen3), + post norms (Gemma 2), both (Gemma 3)
NORMS = {"qwen3": 2 * 4 + 1, "gemma2": 2 * 4 + 1, "gemma3": 2 * 6 + 1}


@pytest.fixture(autouse=True)
def _cpu_backends(request, backend_env):
    """The CPU defaults (C++ / torch), as users run on CPU; test_patched_model_on_triton runs the Triton
    kernels under the interpreter (slow: one family)."""
    if "triton" not in request.node.name:
        backend_env.setenv("TRITON_INTERPRET", "0")


def _config(family):
    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}
    if family == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, **common)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=6, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":  # per-head q/k RMSNorm
        return transformers.Qwen3Config(head_dim=8, **common)
    if family == "gemma":  # (1 + w) norms, GeGLU, tied embeddings
        return transformers.GemmaConfig(head_dim=8, hidden_act="gelu_pytorch_tanh", **common)
    if family == "gemma2":  # + logit softcaps, sliding layers
        return transformers.Gemma2Config(head_dim=8, sliding_window=5, final_logit_softcapping=3.0,
                                         attn_logit_softcapping=4.0, query_pre_attn_scalar=8, **common)
    if family == "gemma3":  # + q/k norms, alternating sliding/global layers with their own rope bases
        return transformers.Gemma3TextConfig(head_dim=8, sliding_window=5, final_logit_softcapping=3.0,
                                             query_pre_attn_scalar=8, layer_types=["sliding_attention",
                                                                                   "full_attention"], **common)
    if family == "phi3":  # fused qkv_proj and gate_up_proj, partial rotary
        return transformers.Phi3Config(partial_rotary_factor=0.5, pad_token_id=0, **common)
    if family == "gpt2":  # LayerNorm, no rope, attention dropout off here
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    raise ValueError(family)


def _model(family, **config):
    torch.manual_seed(0)
    cfg = _config(family)
    cfg.update(config)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # non-trivial norm weights (Gemma's start at 0, Llama's at 1)
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100  # the first real token of the padded row sees no key before it: out of the loss
    return ids, mask, labels


def _train_step(model):
    ids, mask, labels = _batch()
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _types(model):
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_matches_unpatched(family, fresh_rope):
    _check_patched(family)


def test_patched_model_on_triton(use_backend, fresh_rope):
    use_backend("triton")
    _check_patched("llama")


def _check_patched(family):
    ref = _model(family)
    ours = copy.deepcopy(ref)
    types_before, keys_before = _types(ours), list(ours.state_dict())
    report = fastnlg.patch(ours)
    rope_module = type(ours).__module__
    if family != "gpt2":
        assert report.count("norm") == NORMS.get(family, 2 * 2 + 1)
        assert report.count("mlp") == 2 and report.count("rope") == 1
        assert sys.modules[rope_module].apply_rotary_pos_emb.__fastnlg_original__
    else:
        assert report.count("norm") == 2 * 2 + 1 and report.count("rope") == 0
        assert report.count("mlp") == 2 and "FastGPT2MLP(NewGELUActivation)" in str(report)
    assert report.count("cross_entropy") == 1 and report.count("attention") == 1
    assert list(ours.state_dict()) == keys_before  # the same Parameters under the same names
    assert "fastnlg.patch" in str(report)

    out_ref, g_ref = _train_step(ref)
    out, g = _train_step(ours)
    assert out.logits is None  # training with labels: the fused loss, no logits
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-4, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")

    ids, mask, _ = _batch()
    ref.eval(), ours.eval()
    with torch.no_grad():
        keep = mask.bool()
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[keep],
                                   ref(input_ids=ids, attention_mask=mask).logits[keep], rtol=1e-4, atol=1e-4)
        gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids[:1], **gen), ref.generate(ids[:1], **gen))

    fastnlg.unpatch(ours)
    assert _types(ours) == types_before and "forward" not in ours.__dict__
    assert ours.config._attn_implementation == "eager"
    rope_fn = getattr(sys.modules[rope_module], "apply_rotary_pos_emb", None)  # GPT-2 has none
    assert not hasattr(rope_fn, "__fastnlg_original__")
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)


def test_patch_again_adds_nothing_and_unpatch_of_an_unpatched_model_is_an_error():
    model = _model("llama")
    with pytest.raises(ValueError, match="was not patched"):
        fastnlg.unpatch(model)
    first = fastnlg.patch(model)
    types_patched = _types(model)
    again = fastnlg.patch(model)
    assert again.patched == [] and again.skipped == [] and _types(model) == types_patched
    assert fastnlg.unpatch(model).patched == first.patched
    assert not fastnlg.is_patched(model)
    with pytest.raises(ValueError, match="was not patched"):
        fastnlg.unpatch(model)


def test_patched_rope_function_takes_the_hf_arguments(monkeypatch, fresh_rope):
    """The patched apply_rotary_pos_emb runs fastnlg's op for HF's calls (unsqueeze_dim positional or by name,
    1 or 2, partial-width cos/sin) with the original's values, and hands anything else to the original."""
    import fastnlg.ops.rope as rope_op

    model = _model("llama")
    module = sys.modules[type(model).__module__]
    original = module.apply_rotary_pos_emb
    fastnlg.patch(model)
    calls, run = [], rope_op._run
    monkeypatch.setattr(rope_op, "_run", lambda *a: calls.append(1) or run(*a))  # the fused op's body
    try:
        patched = module.apply_rotary_pos_emb
        B, T, D = 2, 5, 16
        q, k = torch.randn(B, 4, T, D), torch.randn(B, 2, T, D)
        cos, sin = torch.randn(B, T, D), torch.randn(B, T, D)
        for args, kwargs, (qq, kk) in [((), {}, (q, k)), ((2,), {}, (q.transpose(1, 2), k.transpose(1, 2))),
                                       ((), {"unsqueeze_dim": 2}, (q.transpose(1, 2), k.transpose(1, 2))),
                                       ((), {}, (q, k))]:
            for got, want in zip(patched(qq, kk, cos, sin, *args, **kwargs), original(qq, kk, cos, sin, *args, **kwargs)):
                torch.testing.assert_close(got, want)
        half_cos, half_sin = cos[..., :8], sin[..., :8]  # partial rotary: cat(rotated 8, pass-through 8)
        for got in patched(q, k, half_cos, half_sin):
            assert got.shape == (B, got.shape[1], T, D)
        assert len(calls) == 5
        q3 = torch.randn(B, T, D)  # not what apply_rope takes: the original handles (and rejects) it
        with pytest.raises(Exception):  # noqa: B017  (whatever the original raises)
            patched(q3, q3, cos, sin, unsqueeze_dim=5)
        assert len(calls) == 5
    finally:
        fastnlg.unpatch(model)


def test_call_wrappers_bind_as_the_original():
    """The patched forward and rope function skip inspect's binding for the common all-keyword (forward) and
    four-tensor (rope) calls; every call still binds as the original would: positional and keyword calls
    reach the body alike, unknown keywords go through **kwargs, and a call the original rejects is
    rejected."""
    from fastnlg.patching.builders import _with_signature_of
    from fastnlg.patching.rope import rope_function as _rope_function

    def original(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        pass

    seen = []
    forward = _with_signature_of(lambda self, **named: seen.append(named), original)
    forward("m", 1, labels=3, use_cache=False)
    forward("m", input_ids=1, labels=3, use_cache=False)
    assert seen[0] == seen[1] == {"input_ids": 1, "labels": 3, "use_cache": False}
    strict = _with_signature_of(lambda self, **named: named, lambda self, input_ids=None: None)
    with pytest.raises(TypeError):
        strict("m", input_ids=1, use_cache=False)

    def needs_positions(q, k, cos, sin, position_ids, unsqueeze_dim=1):
        raise AssertionError("only reached through the wrapper's fallback")

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match="position_ids"):  # the four tensors are not a call it takes
        _rope_function(needs_positions)(q, q, torch.ones(3, 4), torch.zeros(3, 4))


def test_rope_function_shared_by_two_models_is_restored_after_both(fresh_rope):
    module = sys.modules["transformers.models.llama.modeling_llama"]
    original = module.apply_rotary_pos_emb
    a, b = _model("llama"), _model("llama")
    fastnlg.patch(a)
    fastnlg.patch(b)
    fastnlg.unpatch(a)
    assert module.apply_rotary_pos_emb is not original  # b still uses it
    fastnlg.unpatch(b)
    assert module.apply_rotary_pos_emb is original


def test_options_and_unknown_types_are_reported():
    model = _model("llama")
    report = fastnlg.patch(model, attention=False, rope=False, mlp=False)
    assert report.count("attention") == report.count("rope") == report.count("mlp") == 0
    assert report.count("norm") == 5 and model.config._attn_implementation == "eager"
    fastnlg.unpatch(model)

    class CustomNorm(torch.nn.Module):
        def forward(self, x):
            return x
    model.model.norm = CustomNorm()
    report = fastnlg.patch(model)
    assert ("model.norm", "norm", "CustomNorm: type not in the table") in report.skipped
    fastnlg.unpatch(model)


peft = pytest.importorskip("peft")


def _peft_model(**cfg):
    base = _model("llama")
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                "lora_dropout": 0.0, "init_lora_weights": False, **cfg})
    return peft.get_peft_model(base, config)


def test_peft_model_matches_and_saves_unchanged(tmp_path, monkeypatch):
    import fastnlg.nn.lora as lora_module

    ref = _peft_model()
    ours = copy.deepcopy(ref)
    report = fastnlg.patch(ours)
    assert report.count("lora") == 2 * 3 and report.count("cross_entropy") == 1
    out_ref, g_ref = _train_step(ref)
    calls = []
    fused = lora_module.lora_linear
    monkeypatch.setattr(lora_module, "lora_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    out, g = _train_step(ours)
    assert len(calls) == 2 * 3  # every LoRA layer ran the fused op
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-4, atol=1e-5)
    assert g.keys() == g_ref.keys() and all("lora_" in name for name in g)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    ours.save_pretrained(str(tmp_path / "ours"))
    ref.save_pretrained(str(tmp_path / "ref"))
    from safetensors.torch import load_file

    saved, saved_ref = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "ref"))
    assert saved.keys() == saved_ref.keys()
    fastnlg.unpatch(ours)
    assert not any("forward" in m.__dict__ for m in ours.modules())


def test_peft_dora_is_skipped_with_its_reason_and_runs_peft():
    model = _peft_model(use_dora=True)
    report = fastnlg.patch(model)
    assert report.count("lora") == 0
    assert any(e.what == "lora" and "variant" in e.detail for e in report.skipped)
    assert "skipped" in str(report)
    fastnlg.unpatch(model)


def test_lora_state_changed_after_patching_falls_back_to_peft(caplog):
    ref = _peft_model()
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    ids, mask, labels = _batch()
    ref.eval(), ours.eval()  # PEFT takes adapter_names in eval mode only
    with caplog.at_level("WARNING", logger="fastnlg"):
        with torch.no_grad():  # a mixed-adapter batch is PEFT's path
            y = ours(input_ids=ids, attention_mask=mask, adapter_names=["default", "default"]).logits
    assert "runs PEFT's forward" in caplog.text
    with torch.no_grad():
        y_ref = ref(input_ids=ids, attention_mask=mask, adapter_names=["default", "default"]).logits
    keep = mask.bool()  # padding queries see no key: 0 in the kernel, a uniform average in eager
    torch.testing.assert_close(y[keep], y_ref[keep], rtol=1e-4, atol=1e-4)
    fastnlg.unpatch(ours)


def test_table_names_exist_in_transformers():
    """The class names of the table's family rows are real Transformers classes of this version (a rename
    shows up here), and every family of the table is tested here."""
    import importlib

    found = set()
    encoders = ("bert", "roberta", "xlm_roberta", "distilbert", "modernbert", "t5", "mt5", "umt5", "bart", "mbart",
                "pegasus")  # test_encoders, test_seq2seq
    for family in (*FAMILIES, *encoders):
        found |= set(vars(importlib.import_module(f"transformers.models.{family}.modeling_{family}")))
    names = table.class_names()
    assert names <= found, names - found
    rope_classes = table.class_names("rope")
    assert {f"{f.capitalize()}Attention" for f in FAMILIES if f != "gpt2"} | {"ModernBertAttention"} == rope_classes


def _quantize_linears(model, names):
    """bitsandbytes 4-bit NF4 layers in place of the named nn.Linear projections (as load_in_4bit does)."""
    bnb = pytest.importorskip("bitsandbytes")
    for path, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and path.rsplit(".", 1)[-1] in names:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  quant_type="nf4", compute_dtype=torch.float32)
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         blocksize=64)._quantize("cpu")
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, q)
    return model


def _qlora_model(hidden_size=32, quantized=("q_proj", "v_proj", "k_proj")):
    base = _quantize_linears(_model("llama", hidden_size=hidden_size, head_dim=hidden_size // 4), set(quantized))
    # (_quantize_linears skips without bitsandbytes; PEFT wrapping its CPU Linear4bit must then work)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, init_lora_weights=False))


def _assert_same_step(ours, ref, bnb_reference, shapes, nested=True):
    """One training step of each; the 4-bit layers left to bitsandbytes (in both models) dequantise through
    the reference bnb_reference names."""
    with bnb_reference(shapes, nested=nested):
        out_ref, g_ref = _train_step(ref)
        out, g = _train_step(ours)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-4, atol=1e-5)
    assert g.keys() == g_ref.keys() and all("lora_" in name for name in g)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_qlora_model_matches_peft_on_bitsandbytes(bnb_reference):
    """A 4-bit (bnb NF4) model under PEFT LoRA: the LoRA layers run lora_linear over the NF4 bytes; 4-bit
    layers without an adapter stay bitsandbytes' and are reported."""
    ref = _qlora_model()
    ours = copy.deepcopy(ref)
    report = fastnlg.patch(ours)
    assert report.count("lora") == 2 * 2
    assert [e.path for e in report.skipped if e.what == "linear4bit"] == [
        f"base_model.model.model.layers.{i}.self_attn.k_proj" for i in range(2)]
    _assert_same_step(ours, ref, bnb_reference, [(32, 32), (16, 32)])  # blocks of 64 span two rows here
    fastnlg.unpatch(ours)


def test_qlora_model_after_bitsandbytes_cpu_repacking(bnb_reference):
    """On an AVX512-BF16 CPU, bitsandbytes repacks a Linear4bit's weight in place on its first eval forward
    without grad, and from then on computes with code * bf16(absmax). The repacking is done here by calling
    bitsandbytes' function (what that forward calls), so the test runs the same on every CPU: the patched
    model trains on exactly that weight, as the unpatched model with the same weight in the standard layout.
    Only the LoRA layers are 4-bit here: a repacked Linear4bit without an adapter is bitsandbytes' own path,
    which in training runs its bf16 inference kernel (not fastnlg's to fix; see the closing note)."""
    from tests import bnb_oracle

    ours = _qlora_model(hidden_size=64, quantized=("q_proj", "v_proj"))  # in_features % blocksize == 0
    ref = copy.deepcopy(ours)
    bf = pytest.importorskip("bitsandbytes.functional")
    for module in ours.modules():
        if type(module).__name__ == "Linear4bit":
            with bnb_oracle.dequantize_by_definition():
                module.weight.data, _ = bf._convert_weight_packed_for_cpu(module.weight.data, module.weight.quant_state)
    for module in ref.modules():  # the same values bitsandbytes now holds, in the standard layout
        if type(module).__name__ == "Linear4bit":
            state = module.weight.quant_state
            state.absmax = bnb_oracle.state_absmax(state).to(torch.bfloat16).float()
            state.nested, state.offset, state.state2 = False, None, None
    fastnlg.patch(ours)
    _assert_same_step(ours, ref, bnb_reference, [(64, 64), (32, 64)], nested=False)
    fastnlg.unpatch(ours)


def _lora(model):
    import peft

    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B starts at 0 in PEFT: give the adapters a part in the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_over_fp32_weights(family, method):
    """The Trainer(bf16=True) / TRL default: fp32 weights under torch.autocast(bf16). Every fused op follows
    autocast as the module it replaces, so the patched model runs and is as close to the fp64 model as the
    unpatched model under the same autocast (DESIGN tolerance rule: loss and every gradient within twice
    the unpatched error plus a small atol)."""
    def build():
        m = _model(family)
        return _lora(m) if method == "lora" else m

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (8, 32), generator=g)  # enough tokens that rounding errors average out
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding, as trainers pad (left-padded rows would make the fp64 eager model NaN)
    labels = ids.masked_fill(mask == 0, -100)

    def step(model, autocast):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l64, g64 = step(build().double(), False)
    lp, gp = step(build(), True)
    ours = build()
    fastnlg.patch(ours)
    lo, go = step(ours, True)
    assert abs(lo - l64) <= 2 * abs(lp - l64) + 2e-3, (lo, lp, l64)
    assert go.keys() == gp.keys() == g64.keys()
    names = sorted(g64)
    ref, ours, plain = (torch.cat([g[n].double().flatten() for n in names]) for g in (g64, go, gp))
    # the rule over the whole gradient; per tensor a looser bound, since in a tiny model one tensor's
    # rounding error is a draw (ours/plain reaches 3x on single adapter tensors, ~1 over the whole
    # gradient), while a wrong gradient is off by the size of the gradient itself
    assert (ours - ref).norm() <= 2 * (plain - ref).norm() + 2e-3 * ref.norm(), "gradient"
    for name in names:
        ref = g64[name].double()
        err_ours, err_plain = (go[name].double() - ref).norm(), (gp[name].double() - ref).norm()
        assert err_ours <= 4 * err_plain + 2e-3 * ref.norm() + 1e-6, (name, err_ours.item(), err_plain.item())


@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3", "gpt2"])
def test_generate_with_each_cache_matches(family, cache, pad):
    """Greedy generation with a dynamic and a static cache, with and without left padding: the same tokens
    and step scores as the unpatched model. (A static cache's prefill comes with no mask: SDPA's top-left
    causal; the patched forward keeps the original signature, so generate builds GPT-2's position_ids.)"""
    import inspect

    ref = _model(family).eval()
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    assert inspect.signature(ours.forward) == inspect.signature(ref.forward)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask, output_scores=True,
              return_dict_in_generate=True, cache_implementation=cache)
    a, b = ref.generate(ids, **kw), ours.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_strict_refuses_what_it_cannot_patch_and_leaves_the_model_alone():
    model = _peft_model(use_dora=True)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"strict=True.*\n  lora: adapter 'default' is a LoRA variant"):
        fastnlg.patch(model, strict=True)
    assert not fastnlg.is_patched(model) and {n: type(m) for n, m in model.named_modules()} == before
    report = fastnlg.patch(model, strict=True, lora=False)  # what was not asked for does not count
    assert fastnlg.is_patched(model) and report.count("norm") > 0
    fastnlg.unpatch(model)


def test_strict_ignores_what_does_not_apply_to_the_family():
    """GPT-2 and BERT have no RoPE: the report lists rope as not applicable, and strict=True does not count it;
    a model with RoPE has it patched (and nothing listed as not applicable)."""
    import transformers

    small = dict(vocab_size=64)
    models = {"gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                                            bos_token_id=0, eos_token_id=0, **small)),
              "bert": transformers.BertForMaskedLM(transformers.BertConfig(num_hidden_layers=1, hidden_size=32,
                                                                           num_attention_heads=2,
                                                                           intermediate_size=64, **small)),
              "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32,
                                                                              num_attention_heads=2,
                                                                              intermediate_size=64, **small))}
    for name, model in models.items():
        report = fastnlg.patch(model, strict=True)
        rope_na = [e for e in report.not_applicable if e.what == "rope"]
        assert not [e for e in report.skipped if e.what == "rope"], (name, report)
        if name == "llama":
            assert report.count("rope") == 1 and not rope_na, report
        else:
            assert len(rope_na) == 1 and "no rotary position embedding" in str(report), report
        fastnlg.unpatch(model)


def test_report_names_the_wrapped_model_and_a_model_that_is_no_causal_lm():
    peft_model = _peft_model()
    report = fastnlg.patch(peft_model)
    fastnlg.unpatch(peft_model)
    assert "Peft" not in str(report) and report.count("cross_entropy") == 1
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=48))
    report = fastnlg.patch(bert)
    assert report.count("norm") > 0
    assert any(e.what == "cross_entropy" and "BertModel has no loss rule" in e.detail for e in report.skipped)
    fastnlg.unpatch(bert)


def test_gpt2_lora_over_conv1d_is_fused_and_matches():
    """GPT-2's projections are Conv1D (weight stored (in, out), PEFT's fan_in_fan_out=True): LoRA over them
    runs lora_linear with the same loss and gradients as PEFT."""
    import peft

    def build():
        torch.manual_seed(1)
        m = peft.get_peft_model(_model("gpt2"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj",
                                                                                                    "c_fc"],
                                                                 fan_in_fan_out=True, init_lora_weights=False))
        return m
    ref, ours = build(), build()
    report = fastnlg.patch(ours)
    try:
        assert report.count("lora") == 2 * 4 and not any(e.what == "lora" for e in report.skipped)
        (out_ref, g_ref), (out, g) = _train_step(ref), _train_step(ours)
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
        assert g.keys() == g_ref.keys() and any("lora_A" in k for k in g)
        for k in g_ref:
            torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=k)
    finally:
        fastnlg.unpatch(ours)


@pytest.mark.parametrize("eager_rounding", [False, True])
def test_mlp_rounding_in_bf16(eager_rounding):
    """patch(eager_rounding=True): a bf16 Llama MLP gives the unpatched module's bits; the default rounds
    once (more accurate) and so differs in some elements. The patched RMSNorm rounds as LlamaRMSNorm always."""
    model = _model("llama").to(torch.bfloat16)
    mlp, norm = model.model.layers[0].mlp, model.model.layers[0].input_layernorm
    x = torch.randn(4, 9, model.config.hidden_size, dtype=torch.bfloat16) * 2
    with torch.no_grad():
        want_mlp, want_norm = mlp(x), norm(x)
        fastnlg.patch(model, eager_rounding=eager_rounding)
        try:
            got_mlp, got_norm = model.model.layers[0].mlp(x), model.model.layers[0].input_layernorm(x)
            assert type(model.model.layers[0].mlp).__name__ == "FastGatedMLP"
        finally:
            fastnlg.unpatch(model)
    assert torch.equal(got_norm, want_norm)
    assert torch.equal(got_mlp, want_mlp) == eager_rounding


def test_whole_model_under_a_global_backend_override(monkeypatch, backend_env):
    """FASTNLG_BACKEND=cpp on a patched model: the ops with a C++ kernel run it, attention keeps its default
    (said once in a warning) instead of raising, and the step matches the unpatched model."""
    from fastnlg import backend

    monkeypatch.setattr(backend, "_WARNED", set())
    backend_env.setenv("TRITON_INTERPRET", "0")
    ref = _model("llama")
    ours = _model("llama")
    ref_out, ref_grads = _train_step(ref)
    fastnlg.patch(ours)
    backend_env.setenv("FASTNLG_BACKEND", "cpp")
    try:
        with pytest.warns(UserWarning, match="does not apply to flash_attention"):
            out, grads = _train_step(ours)
    finally:
        fastnlg.unpatch(ours)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-4, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_torch_compile_of_a_patched_model():
    """torch.compile (inductor) of a patched Llama trains as the patched model does eagerly (the custom ops'
    fake implementations are checked by tests/ops/test_opcheck.py)."""
    model = _model("llama")
    fastnlg.patch(model)
    try:
        ref, ref_grads = _train_step(model)
        torch._dynamo.reset()
        out, grads = _train_step(torch.compile(model, backend="inductor"))
    finally:
        torch._dynamo.reset()
        fastnlg.unpatch(model)
    grads = {k.replace("_orig_mod.", ""): v for k, v in grads.items()}
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, msg=name, rtol=1e-4, atol=1e-6)


def _graph_breaks(model, ids, mask, labels):
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(lambda i, m, y: model(input_ids=i, attention_mask=m, labels=y).loss)(
            ids, mask, labels)
    finally:
        torch._dynamo.reset()
    return explained.graph_break_count, [b.reason.splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize("family", ["llama"] + [pytest.param(f, marks=pytest.mark.slow) for f in ("gemma2", "phi3",
                                                                                                  "gpt2")])
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
def test_graph_breaks_no_more_than_unpatched_and_fullgraph_training(family, pad):
    """A patched model's training step has no graph break (no more than the unpatched one), padded or not,
    and compiles with fullgraph=True to the eager patched model's loss and gradients: under compile the
    losses keep their label check on the device (no host read) and the attention runs under the mask."""
    ids, mask, labels = _batch()
    if not pad:
        mask, labels = torch.ones_like(mask), ids.clone()
    ref = _model(family)
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    ours.train()
    ref.train()
    n_ref, _ = _graph_breaks(ref, ids, mask, labels)  # (unpatched GPT-2 has one)
    n_ours, reasons = _graph_breaks(ours, ids, mask, labels)
    assert n_ours == 0 and n_ours <= n_ref, reasons

    def step(model):
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    eager_loss, eager_grads = step(ours)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
        loss, grads = step(compiled)
    finally:
        torch._dynamo.reset()
        fastnlg.unpatch(ours)
    grads = {k.replace("_orig_mod.", ""): v for k, v in grads.items()}
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, msg=name, rtol=1e-4, atol=1e-6)
