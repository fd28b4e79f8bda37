"""Changes made to a model after fastnlg.patch: adding LoRA, merging it, resizing the vocabulary, deep copies,
and replacing the head. The patched model stays patched and correct, and unpatch restores the model as it is
*now* (never the modules saved at patch time), never losing a Parameter."""
import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastnlg  # noqa: E402
from fastnlg.nn import FastGatedMLP, FusedLMHead  # noqa: E402

from .test_patch import _model, _train_step, _types  # noqa: E402

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        "lora_dropout": 0.0, "init_lora_weights": False}


@pytest.fixture(autouse=True)
def _cpu_backends(backend_env):
    backend_env.setenv("TRITON_INTERPRET", "0")


def _assert_same_step(ours, ref):
    out_ref, g_ref = _train_step(ref)
    out, g = _train_step(ours)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-4, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return out


def _lora_names(model):
    return sorted(n for n, _ in model.named_parameters() if "lora_" in n)


def test_lora_added_to_a_patched_model_is_fused_as_added_and_kept_by_unpatch(tmp_path, monkeypatch):
    import fastnlg.nn.lora as lora_module

    torch.manual_seed(0)
    ref = peft.get_peft_model(_model("llama"), peft.LoraConfig(**LORA))
    torch.manual_seed(0)
    base = _model("llama")
    fastnlg.patch(base)
    ours = peft.get_peft_model(base, peft.LoraConfig(**LORA))  # PEFT wraps the fused MLPs' projections
    assert fastnlg.is_patched(ours) and _lora_names(ours) == _lora_names(ref)
    assert len(_lora_names(ref)) == 2 * 5 * 2
    assert isinstance(ours.base_model.model.model.layers[0].mlp, FastGatedMLP)
    report = ours.base_model.model._fastnlg_state.report
    assert sum(e.what == "lora" for e in report.patched) == 2 * 5  # fused as PEFT registered them
    calls = []
    fused = lora_module.lora_linear
    monkeypatch.setattr(lora_module, "lora_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    _assert_same_step(ours, ref)
    assert len(calls) == 2 * 5  # every LoRA layer ran the fused op
    again = fastnlg.patch(ours)
    assert again.patched == []  # nothing left to fuse

    fastnlg.unpatch(ours)
    assert not fastnlg.is_patched(ours) and _types(ours) == _types(ref)
    assert _lora_names(ours) == _lora_names(ref)  # the MLP adapters stay (they were dropped before)
    assert list(ours.state_dict()) == list(ref.state_dict())
    _assert_same_step(ours, ref)
    ours.save_pretrained(str(tmp_path / "ours"))
    ref.save_pretrained(str(tmp_path / "ref"))
    from safetensors.torch import load_file

    saved, saved_ref = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "ref"))
    assert saved.keys() == saved_ref.keys() and len(saved) == 2 * 5 * 2


def test_merge_and_unload_of_a_patched_peft_model():
    ref = peft.get_peft_model(_model("llama"), peft.LoraConfig(**LORA))
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    merged_ref, merged = ref.merge_and_unload(), ours.merge_and_unload()
    for m in (merged_ref, merged):
        m.requires_grad_(True)  # PEFT froze the base; train the merged model in full
    assert fastnlg.is_patched(merged)  # the Transformers model inside keeps the patch and its record
    assert isinstance(merged.model.layers[0].mlp, FastGatedMLP) and isinstance(merged.lm_head, FusedLMHead)
    _assert_same_step(merged, merged_ref)
    fastnlg.unpatch(merged)
    assert _types(merged) == _types(merged_ref)  # no PEFT wrapper re-inserted
    assert list(merged.state_dict()) == list(merged_ref.state_dict())
    assert not any("base_layer" in k or "lora_" in k for k in merged.state_dict())
    _assert_same_step(merged, merged_ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # untied and tied embeddings
def test_resize_token_embeddings_after_patching(family):
    ref = _model(family)
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    for m in (ref, ours):
        torch.manual_seed(1)
        m.resize_token_embeddings(72)
    assert isinstance(ours.lm_head, FusedLMHead) and ours.lm_head.weight.shape[0] == 72
    out = _assert_same_step(ours, ref)
    assert out.logits is None  # still the fused loss
    fastnlg.unpatch(ours)
    assert type(ours.lm_head) is torch.nn.Linear and ours.lm_head.weight.shape[0] == 72
    assert ours.get_input_embeddings().weight.shape[0] == 72
    if family == "gpt2":
        assert ours.lm_head.weight is ours.get_input_embeddings().weight
    _assert_same_step(ours, ref)


def test_deepcopy_of_a_patched_model_is_patched_and_unpatches_on_its_own(fresh_rope):
    ref = _model("llama")
    ours = _model("llama")
    fastnlg.patch(ours)
    twin = copy.deepcopy(ours)
    rope = sys.modules["transformers.models.llama.modeling_llama"]
    assert fastnlg.is_patched(twin) and _types(twin) == _types(ours)
    assert twin.model.layers[0].mlp.gate_proj.weight is not ours.model.layers[0].mlp.gate_proj.weight
    _assert_same_step(twin, ref)
    fastnlg.unpatch(ours)
    assert hasattr(rope.apply_rotary_pos_emb, "__fastnlg_original__")  # the copy still holds the function
    _assert_same_step(twin, ref)
    fastnlg.unpatch(twin)
    assert not hasattr(rope.apply_rotary_pos_emb, "__fastnlg_original__")
    assert _types(twin) == _types(ref) and twin.config._attn_implementation == "eager"
    _assert_same_step(twin, ref)


def test_a_head_replaced_by_an_unfused_module_runs_the_models_own_forward():
    ref = _model("llama")
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)

    class Wrapped(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x)
    ref.lm_head, ours.lm_head = Wrapped(ref.lm_head), Wrapped(ours.lm_head.to_linear())
    out = _assert_same_step(ours, ref)
    assert out.logits is not None  # the model's own forward computed the logits


def test_unpatch_refuses_to_drop_what_a_replacement_gained_and_changes_nothing():
    model = _model("llama")
    fastnlg.patch(model)
    model.model.layers[1].mlp.extra = torch.nn.Linear(2, 2)  # the LlamaMLP it replaced has no such child
    types_before = _types(model)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp \(FastGatedMLP\) holds \['extra'\]"):
        fastnlg.unpatch(model)
    assert _types(model) == types_before and fastnlg.is_patched(model)
    del model.model.layers[1].mlp.extra
    fastnlg.unpatch(model)
    assert not fastnlg.is_patched(model)


def test_patched_model_survives_pickling(tmp_path):
    ref = _model("llama")
    ours = copy.deepcopy(ref)
    fastnlg.patch(ours)
    torch.save(ours, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert fastnlg.is_patched(loaded)
    _assert_same_step(loaded, ref)
    fastnlg.unpatch(loaded)
    fastnlg.unpatch(ours)
    assert _types(loaded) == _types(ref)


def test_a_patched_model_that_is_garbage_collected_releases_the_rope_function(fresh_rope):
    import gc

    rope = sys.modules["transformers.models.llama.modeling_llama"]
    model = _model("llama")
    fastnlg.patch(model)
    assert hasattr(rope.apply_rotary_pos_emb, "__fastnlg_original__")
    del model
    gc.collect()
    assert not hasattr(rope.apply_rotary_pos_emb, "__fastnlg_original__")
