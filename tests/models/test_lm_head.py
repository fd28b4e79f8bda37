"""FusedLMHead + causal_lm_forward against the unpatched Transformers model: same loss and gradients in
training (without logits), same logits / loss / generation in evaluation."""
import copy
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastnlg.nn import FusedLMHead, causal_lm_forward, head_options_from_config  # noqa: E402

VOCAB = 97


def _tiny(family):
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 64}
    if family == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif family == "gemma2":  # final_logit_softcapping, tied embeddings
        cfg = transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, **common)
    elif family == "gpt2":  # base model under `transformer`, tied embeddings
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    elif family == "granite":  # logits divided by logits_scaling
        cfg = transformers.GraniteConfig(num_key_value_heads=2, logits_scaling=4.0, **common)
    cfg._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(cfg).float()


def _patch(model):
    model.lm_head = FusedLMHead.from_linear(model.lm_head, **head_options_from_config(model.config))
    model.forward = types.MethodType(causal_lm_forward, model)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    mask = torch.ones_like(ids)
    return ids, mask, labels


FAMILIES = ["llama", "gemma2", "gpt2", "granite"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_items", [None, 17])
def test_training_loss_and_grads_match(family, num_items):
    ref = _tiny(family)
    ours = _patch(copy.deepcopy(ref))
    ids, mask, labels = _batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref.train(), ours.train()
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    assert out.logits is None  # the point: no (B, T, V) logits in training
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_returns_logits_and_loss(family):
    ref = _tiny(family).eval()
    ours = _patch(copy.deepcopy(ref)).eval()
    ids, mask, labels = _batch()
    with torch.no_grad():
        out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        last = ours(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        as_tuple = ours(input_ids=ids, attention_mask=mask, return_dict=False)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last.logits, out_ref.logits[:, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(as_tuple[0], out_ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_unchanged(family):
    ref = _tiny(family).eval()
    ours = _patch(copy.deepcopy(ref)).eval()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_head_shares_parameters_and_round_trips():
    model = _tiny("gemma2")
    linear = model.lm_head
    head = FusedLMHead.from_linear(linear, softcap=2.0)
    assert head.weight is linear.weight is model.get_input_embeddings().weight  # tying kept
    model.lm_head = head
    assert set(model.state_dict()) == set(_tiny("gemma2").state_dict())
    back = head.to_linear()
    assert type(back) is torch.nn.Linear and back.weight is linear.weight
    with pytest.raises(TypeError, match="unknown options"):
        FusedLMHead.from_linear(linear, softcapping=2.0)
    with pytest.raises(ValueError, match=r"labels \(3, 4\) must match hidden's leading dimensions \(3, 5\)"):
        head.loss(torch.randn(3, 5, 32), torch.zeros(3, 4, dtype=torch.long))


def _counting(monkeypatch):
    """Patches FusedLMHead.loss to record the head each fused-loss call ran on."""
    calls, loss = [], FusedLMHead.loss

    def counted(self, *a, **k):
        calls.append(self)
        return loss(self, *a, **k)
    monkeypatch.setattr(FusedLMHead, "loss", counted)
    return calls


def test_a_modules_to_save_head_keeps_the_fused_loss(monkeypatch, tmp_path):
    """fastnlg.patch, then PEFT with modules_to_save=["lm_head"] (a trainable head): training still computes the
    loss without logits, on the wrapper's trained copy (its gradient as unpatched PEFT's); with the adapter
    disabled, on the original head; the saved adapter loads back with the trained head."""
    import peft

    import fastnlg

    def build(patched):
        model = _tiny("llama")
        if patched:
            fastnlg.patch(model)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
        return peft.get_peft_model(model, cfg).train()

    ref, ours = build(False), build(True)
    calls = _counting(monkeypatch)
    ids, _, labels = _batch()
    out_ref, out = ref(input_ids=ids, labels=labels), ours(input_ids=ids, labels=labels)
    wrapper = ours.base_model.model.lm_head
    assert calls == [wrapper.modules_to_save["default"]] and out.logits is None  # fused, on the trained copy
    out_ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    g_ref = ref.base_model.model.lm_head.modules_to_save["default"].weight.grad
    g = wrapper.modules_to_save["default"].weight.grad
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert wrapper.original_module.weight.grad is None
    with ours.disable_adapter():
        ours(input_ids=ids, labels=labels)
    assert calls[-1] is wrapper.original_module and len(calls) == 2
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(0.5)  # a trained head, to tell it from the original
    ours.save_pretrained(tmp_path / "adapter")
    base = _tiny("llama")
    fastnlg.patch(base)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True).train()
    head = loaded.base_model.model.lm_head
    torch.testing.assert_close(head.modules_to_save["default"].weight, wrapper.modules_to_save["default"].weight)
    loaded(input_ids=ids, labels=labels)
    assert calls[-1] is head.modules_to_save["default"] and len(calls) == 3
