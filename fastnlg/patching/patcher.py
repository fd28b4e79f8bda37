"""fastnlg.patch / fastnlg.unpatch: one generic pass over a model that applies the tables in table.py.

    report = fastnlg.patch(model)     # a Transformers causal LM, a PEFT model around one, 4-bit or not
    print(report)                     # what was patched, what was skipped and why
    fastnlg.unpatch(model)            # every change undone, in reverse order

Every change keeps the model's Parameters and state_dict keys as they were (replacement modules share the
original Parameters), so optimizers, checkpoints and PEFT's save_pretrained see the same model:
- norm: RMSNorm classes of the table -> FastRMSNorm rounding as the family does, nn.LayerNorm ->
  FastLayerNorm (module swap);
- mlp: gated MLPs of the table -> FastGatedMLP over the same gate/up/down projections (module swap); its
  activation rounds once (more accurate than eager), or, with eager_rounding=True, as the eager module does;
- cross_entropy: the causal LM's lm_head -> FusedLMHead and its forward -> causal_lm_forward (the loss
  without logits in training), on the instance;
- attention: config attn implementation -> "fastnlg" (fastnlg.nn.hf_attention);
- rope: the modelling module's apply_rotary_pos_emb -> fastnlg.ops.apply_rope (a module-level function,
  shared by every model of that family; restored when the last patched model is unpatched);
- lora: PEFT LoRA linear layers -> forward computed by fastnlg.ops.lora_linear from the layer's live state
  (on the instance: set_adapter, merge, disable_adapter and save_pretrained keep working). A state it cannot
  run (DoRA, ...) is skipped at patch time; if the state changes to one later, that call runs PEFT's own
  forward and says so once in the log. A bitsandbytes 4-bit layer without an adapter keeps bitsandbytes'
  forward (reported as skipped).
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
import weakref

from torch import nn

from . import table
from .report import Entry, PatchReport

logger = logging.getLogger("fastnlg")
_PATCHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (report, undo callbacks)
_ROPE_PATCHES: dict = {}  # module name -> [original function, number of patched models using it]
_warned: set = set()


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def _hf_model(model):
    """The Transformers PreTrainedModel in `model` (itself, or under PEFT's wrappers), or None."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def _swap(model, path, new, undo):
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    setattr(parent, name, new)
    undo.append(lambda: setattr(parent, name, old))


def _with_signature_of(fn, original):
    """fn(self, **named) behind `original`'s exact signature: positional calls bind as they would to the
    original, and code that inspects forward (generate builds position_ids only when forward takes them)
    sees the same parameters."""
    sig = inspect.signature(original)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        named = sig.bind(self, *args, **kwargs).arguments
        named.pop(next(iter(sig.parameters)))  # self
        extra = named.pop(var_kw, {}) if var_kw else {}
        return fn(self, **named, **extra)
    forward.__signature__ = sig
    return forward


def _set_forward(module, fn, undo):
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = types.MethodType(fn, module)
    undo.append(lambda: setattr(module, "forward", previous) if had else module.__dict__.pop("forward", None))


def _patch_modules(model, report, undo, *, norm, mlp, eager_rounding=False):
    from ..nn import FastGatedMLP, FastLayerNorm, FastRMSNorm

    for path, module in list(model.named_modules()):
        name = type(module).__name__
        if norm and name in table.RMS_NORMS:
            offset, casting = table.RMS_NORMS[name]
            _swap(model, path, FastRMSNorm.from_module(module, offset=offset, casting_mode=casting), undo)
            report.patched.append(Entry(path, "norm", f"{name} -> FastRMSNorm"))
        elif norm and type(module) is nn.LayerNorm:
            if len(module.normalized_shape) == 1 and module.weight is not None:
                _swap(model, path, FastLayerNorm.from_module(module), undo)
                report.patched.append(Entry(path, "norm", "LayerNorm -> FastLayerNorm"))
            else:
                report.skipped.append(Entry(path, "norm", "LayerNorm over several dims or without affine"))
        elif norm and name.endswith("Norm") and path:
            report.skipped.append(Entry(path, "norm", f"{name}: type not in the table"))
        elif mlp and name in table.GATED_MLPS:
            act = getattr(getattr(module, "config", None), table.GATED_MLPS[name], None)
            try:
                new = FastGatedMLP.from_module(module, act, eager_rounding=eager_rounding)
            except ValueError as exc:  # an activation the fused ops do not implement
                report.skipped.append(Entry(path, "mlp", str(exc)))
                continue
            _swap(model, path, new, undo)
            report.patched.append(Entry(path, "mlp", f"{name} -> FastGatedMLP({act})"))
        elif mlp and name.endswith("MLP"):
            report.skipped.append(Entry(path, "mlp", f"{name}: type not in the table"))


def _patch_lm_heads(model, report, undo):
    from ..nn import FusedLMHead, causal_lm_forward, head_options_from_config

    for path, module in list(model.named_modules()):
        name = type(module).__name__
        if not hasattr(module, "config") or not name.endswith(("ForCausalLM", "LMHeadModel")):
            continue
        if type(module).__module__.startswith("peft."):
            continue  # PEFT's wrapper: the Transformers model inside it is what gets patched (and reported)
        attr = table.CAUSAL_LMS.get(name)
        head = getattr(module, attr, None) if attr else None
        if attr is None:
            report.skipped.append(Entry(path, "cross_entropy", f"{name}: type not in the table"))
        elif type(head) is not nn.Linear:
            report.skipped.append(Entry(path, "cross_entropy", f"{attr} is a {type(head).__name__}, not nn.Linear"))
        else:
            _swap(model, f"{path}.{attr}" if path else attr,
                  FusedLMHead.from_linear(head, **head_options_from_config(module.config)), undo)
            _set_forward(module, _with_signature_of(causal_lm_forward, type(module).forward), undo)
            report.patched.append(Entry(path, "cross_entropy", f"{name}.{attr} -> FusedLMHead + causal_lm_forward"))


def _patch_attention(hf, report, undo):
    from ..nn import hf_attention

    if hf is None:
        report.skipped.append(Entry("", "attention", "no Transformers model inside"))
        return
    if not getattr(type(hf), "_supports_attention_backend", False):
        report.skipped.append(Entry("", "attention", f"{type(hf).__name__} does not use AttentionInterface"))
        return
    hf_attention.register()
    previous = hf.config._attn_implementation
    hf.set_attn_implementation(hf_attention.NAME)
    undo.append(lambda: hf.set_attn_implementation(previous))
    report.patched.append(Entry("", "attention", f"attn_implementation {previous!r} -> {hf_attention.NAME!r}"))


def _rope_function(original):
    from ..ops import apply_rope

    signature = inspect.signature(original)  # (q, k, cos, sin, [position_ids,] unsqueeze_dim=1) by version

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        """fastnlg.ops.apply_rope (with the call's unsqueeze_dim 1 or 2, position_ids, partial rotary) where
        the tensors are what it takes (4-D q, k of one dtype, constant cos/sin), else the original function."""
        try:
            bound = signature.bind(q, k, cos, sin, *args, **kwargs).arguments
        except TypeError:
            bound = None
        extra = set(bound or ()) - {"q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"}
        unsqueeze_dim = (bound or {}).get("unsqueeze_dim", 1)
        standard = (bound is not None and not extra and unsqueeze_dim in (1, 2) and q.dim() == 4 and k.dim() == 4
                    and q.dtype == k.dtype and cos.dim() in (2, 3) and cos.shape[-1] <= q.shape[-1]
                    and k.shape[-1] == q.shape[-1] and not cos.requires_grad and not sin.requires_grad)
        if standard:
            return apply_rope(q, k, cos, sin, position_ids=bound.get("position_ids"), unsqueeze_dim=unsqueeze_dim)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__fastnlg_original__ = original
    return apply_rotary_pos_emb


def _patch_rope(hf, report, undo):
    modules = sorted({type(m).__module__ for m in hf.modules()} & set(table.ROPE_MODULES)) if hf is not None else []
    if not modules:
        report.skipped.append(Entry("", "rope", "no modelling module with the standard apply_rotary_pos_emb"))
    for name in modules:
        module = sys.modules[name]
        entry = _ROPE_PATCHES.get(name)
        if entry is None:
            entry = _ROPE_PATCHES[name] = [module.apply_rotary_pos_emb, 0]
            module.apply_rotary_pos_emb = _rope_function(entry[0])
        entry[1] += 1

        def release(name=name, module=module):
            entry = _ROPE_PATCHES[name]
            entry[1] -= 1
            if entry[1] == 0:
                module.apply_rotary_pos_emb = entry[0]
                del _ROPE_PATCHES[name]
        undo.append(release)
        report.patched.append(Entry(f"module:{name}", "rope", "apply_rotary_pos_emb -> fastnlg.ops.apply_rope"))


def _fused_lora_forward(layer, x, *args, **kwargs):
    from ..nn import UnsupportedLoRA, peft_lora_forward

    try:
        return peft_lora_forward(layer, x, *args, **kwargs)
    except UnsupportedLoRA as exc:
        if str(exc) not in _warned:
            _warned.add(str(exc))
            logger.warning("fastnlg: a patched LoRA layer runs PEFT's forward: %s", exc)
        return type(layer).forward(layer, x, *args, **kwargs)


def _patch_lora(model, report, undo):
    from ..nn import UnsupportedLoRA, peft_state

    for path, module in list(model.named_modules()):
        qual = _qualname(module)
        if qual in table.LORA_LAYERS:
            try:
                peft_state(module)
            except UnsupportedLoRA as exc:
                report.skipped.append(Entry(path, "lora", str(exc)))
                continue
            _set_forward(module, _fused_lora_forward, undo)
            report.patched.append(Entry(path, "lora", f"{type(module).__name__} -> lora_linear"))
        elif qual.startswith("peft.tuners.lora.") and hasattr(module, "lora_A"):
            report.skipped.append(Entry(path, "lora", f"PEFT LoRA {type(module).__name__}: not a linear layer"))
        elif type(module).__name__ == "Linear4bit" and not qual.startswith("peft."):
            parent = model.get_submodule(path.rpartition(".")[0])
            if not hasattr(parent, "lora_A"):  # a base layer under a PEFT LoRA layer is that layer's business
                report.skipped.append(Entry(path, "linear4bit", "4-bit layer without LoRA: bitsandbytes' own path"))


def patch(model: nn.Module, *, attention: bool = True, cross_entropy: bool = True, norm: bool = True,
          rope: bool = True, mlp: bool = True, lora: bool = True, strict: bool = False,
          eager_rounding: bool = False) -> PatchReport:
    """Swap fastnlg's fused kernels into `model` in place; returns what was patched and skipped (see the
    module docstring). Raises ValueError when the model is already patched, and with strict=True when
    anything of a kind asked for was skipped (the model is then left unpatched). eager_rounding=True makes
    the gated-MLP activation round as the unpatched module (bit-for-bit SwiGLU outputs in bf16/fp16)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastnlg.patch: expected an nn.Module, got {type(model).__name__}")
    if model in _PATCHED:
        raise ValueError("fastnlg.patch: this model is already patched; call fastnlg.unpatch(model) first")
    report, undo = PatchReport(), []
    hf = _hf_model(model)
    try:
        if lora:
            _patch_lora(model, report, undo)
        if norm or mlp:
            _patch_modules(model, report, undo, norm=norm, mlp=mlp, eager_rounding=eager_rounding)
        if cross_entropy:
            _patch_lm_heads(model, report, undo)
            if not any(e.what == "cross_entropy" for e in report.patched + report.skipped):
                report.skipped.append(Entry("", "cross_entropy", f"{type(model).__name__} is not a causal LM in "
                                            "fastnlg's table: no fused loss (layers may still be patched)"))
        if attention:
            _patch_attention(hf, report, undo)
        if rope:
            _patch_rope(hf, report, undo)
        asked = {"attention": attention, "cross_entropy": cross_entropy, "norm": norm, "rope": rope, "mlp": mlp,
                 "lora": lora, "linear4bit": lora}
        missed = [e for e in report.skipped if asked.get(e.what, True)]
        if strict and missed:
            raise ValueError("fastnlg.patch(strict=True): not patched:\n" + "\n".join(
                f"  {e.what}: {e.detail} ({e.path or 'model'})" for e in missed[:20])
                + (f"\n  ... and {len(missed) - 20} more" if len(missed) > 20 else ""))
    except BaseException:
        for fn in reversed(undo):  # never leave a half-patched model
            fn()
        raise
    _PATCHED[model] = (report, undo)
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Undo fastnlg.patch(model) exactly (original modules, forwards, attention setting, functions); returns
    the report of the patch it undid."""
    if model not in _PATCHED:
        raise ValueError("fastnlg.unpatch: this model was not patched by fastnlg.patch")
    report, undo = _PATCHED.pop(model)
    for fn in reversed(undo):
        fn()
    return report


def is_patched(model: nn.Module) -> bool:
    return model in _PATCHED
