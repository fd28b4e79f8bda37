"""fastnlg.patch / fastnlg.unpatch: the rules of table.py applied in one walk over a model.

    report = fastnlg.patch(model)     # a Transformers causal LM, a PEFT model around one, 4-bit or not
    print(report)                     # what was patched, what was skipped and why
    fastnlg.unpatch(model)            # every fastnlg change undone, on the model as it is now

Every change keeps the model's Parameters and state_dict keys as they were (replacement modules share the
original Parameters), so optimizers, checkpoints and PEFT's save_pretrained see the same model:
- norm: RMSNorm classes of the table -> FastRMSNorm rounding as the family does, nn.LayerNorm ->
  FastLayerNorm (module swap);
- mlp: gated MLPs of the table -> FastGatedMLP over the same projections (module swap); its activation rounds
  once (more accurate than eager), or, with eager_rounding=True, as the eager module does; GPT-2's MLP ->
  FastGPT2MLP (c_fc's bias fused into the GELU);
- cross_entropy: the causal LM's lm_head -> FusedLMHead and its forward -> causal_lm_forward (the loss
  without logits in training), on the instance; a head set later (resize_token_embeddings) is fused too;
- attention: config attn implementation -> "fastnlg" (fastnlg.nn.hf_attention);
- rope: the modelling module's apply_rotary_pos_emb -> fastnlg.ops.apply_rope (a module-level function,
  shared by every model of that family; restored when no patched model uses it any more);
- lora: PEFT LoRA linear layers -> forward computed by fastnlg.ops.lora_linear from the layer's live state
  (on the instance: set_adapter, merge, disable_adapter and save_pretrained keep working). A state it cannot
  run (DoRA, ...) is skipped at patch time; if the state changes to one later, that call runs PEFT's own
  forward and says so once in the log. A bitsandbytes 4-bit layer without an adapter keeps bitsandbytes'
  forward (reported as skipped).

Nothing is remembered outside the model: a replacement module carries the module it replaced, an instance
method of fastnlg's is marked, and the patched model holds a small record (its report, the attention setting
it replaced, the rope functions it holds). So unpatch undoes what is in the model *now*: modules PEFT or
Transformers put into a patched model since (LoRA wrappers, merged layers, a resized head) are kept, and a
deepcopy or unpickled copy of a patched model is patched and can be unpatched on its own. A module set into
a patched model later (PEFT's LoRA layers from get_peft_model or add_adapter, ...) is patched by the same
rules as it is registered (a global module-registration hook that acts on patched models only); patching a
patched model again fuses whatever is still unfused. A forward another library already replaced on the
instance (TRL's fused LM head, accelerate's hooks) is left to it and reported.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
import weakref
from fnmatch import fnmatchcase

from torch import nn

from . import table
from .report import Entry, PatchReport

logger = logging.getLogger("fastnlg")
_STATE = "_fastnlg_state"  # on the patched model: its _State
_ORIGINAL = "_fastnlg_original"  # on a replacement module: the module it replaced (not a registered child)
_MARK = "__fastnlg__"  # on fastnlg's instance-method functions
_IN = "_fastnlg_in"  # on every module of a patched model: its _State (modules registered into it get fused)
_ROPE: dict = {}  # modelling module name -> [original apply_rotary_pos_emb, WeakSet of the _States using it]
_warned: set = set()


class Skipped(Exception):
    """Raised by a builder: this module is left alone, for the reason given."""


class _State:
    """The record a patched model holds. Deep copies and unpickled copies take their own hold on the rope
    functions (and register the attention implementation), so they stay patched on their own."""

    def __init__(self):
        self.report, self.attention_previous, self.rope = PatchReport(), None, set()
        self.kinds, self.eager_rounding = set(), False  # what patch() was asked for (for modules added later)

    def __setstate__(self, state):
        self.__dict__.update(state)
        for name in self.rope:
            _hold_rope(name, self)
        if self.attention_previous is not None:
            from ..nn import hf_attention
            hf_attention.register()


# ---- the walk ----------------------------------------------------------------------------------------------

class _Walk:
    """One patch() call: the state it adds to, and how to roll its own changes back if it fails."""

    def __init__(self, model, state, eager_rounding, registering=False):
        self.model, self.state, self.eager_rounding, self.undo = model, state, eager_rounding, []
        self.registering = registering  # `model` is a module being registered (see _on_register)
        self.new_root = None  # its replacement, which the registration hook returns

    def swap(self, path, old, new):
        if not path and not self.registering:
            raise Skipped("the model itself: fastnlg.patch changes a model in place, it cannot replace it")
        new.__dict__[_ORIGINAL] = old
        if not path:
            self.new_root = new
            return
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        setattr(parent, name, new)
        self.undo.append(lambda: setattr(parent, name, old))

    def set_method(self, module, name, fn):
        _set_method(module, name, fn)
        self.undo.append(lambda: _restore_method(module, name))


def _matches(rule, module) -> bool:
    cls = type(module)
    name, qual = cls.__name__, f"{cls.__module__}.{cls.__name__}"
    return any(fnmatchcase(qual if "." in pattern else name, pattern) for pattern in rule.names)


def _set_method(module, name, fn):
    """module.<name> = fn bound to module (on the instance), keeping an instance method it had before."""
    if name in module.__dict__:
        module.__dict__[f"_fastnlg_previous_{name}"] = module.__dict__[name]
    module.__dict__[name] = types.MethodType(fn, module)


def _ours(module, name) -> bool:
    return getattr(getattr(module.__dict__.get(name), "__func__", None), _MARK, False)


def _restore_method(module, name):
    previous = module.__dict__.pop(f"_fastnlg_previous_{name}", None)
    if previous is None:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = previous


def _mark(fn):
    setattr(fn, _MARK, True)
    return fn


# ---- builders: (walk, path, module, **rule options) -> detail, or (path, detail), or None (not theirs) --------

def _fuse_rms_norm(walk, path, module, offset, casting_mode):
    from ..nn import FastRMSNorm
    walk.swap(path, module, FastRMSNorm.from_module(module, offset=offset, casting_mode=casting_mode))
    return f"{type(module).__name__} -> FastRMSNorm"


def _fuse_layer_norm(walk, path, module):
    from ..nn import FastLayerNorm
    if len(module.normalized_shape) != 1 or module.weight is None:
        raise Skipped("LayerNorm over several dims or without affine")
    walk.swap(path, module, FastLayerNorm.from_module(module))
    return "LayerNorm -> FastLayerNorm"


def _fuse_gated_mlp(walk, path, module, act):
    from ..nn import FastGatedMLP
    activation = getattr(getattr(module, "config", None), act, None)
    try:
        new = FastGatedMLP.from_module(module, activation, eager_rounding=walk.eager_rounding)
    except ValueError as exc:  # an activation the fused ops do not implement
        raise Skipped(str(exc)) from None
    walk.swap(path, module, new)
    return f"{type(module).__name__} -> FastGatedMLP({activation})"


def _fuse_gpt2_mlp(walk, path, module):
    from ..nn import FastGPT2MLP
    try:
        new = FastGPT2MLP.from_module(module)
    except ValueError as exc:
        raise Skipped(str(exc)) from None
    walk.swap(path, module, new)
    return f"GPT2MLP -> FastGPT2MLP({new.activation})"


def _fuse_lm_head(walk, path, module, head):
    from ..nn import FusedLMHead, causal_lm_forward, head_options_from_config
    if _ours(module, "forward"):
        return None  # fused by an earlier patch() of this model
    if "forward" in module.__dict__:  # TRL's fused LM head, accelerate's hooks, ...: their forward stays
        raise Skipped(f"{type(module).__name__}.forward was already replaced on the instance (by "
                      f"{_owner(module.__dict__['forward'])}); its loss path is kept")
    linear = getattr(module, head, None)
    if type(linear) is not nn.Linear:
        raise Skipped(f"{head} is a {type(linear).__name__}, not nn.Linear")
    walk.swap(f"{path}.{head}" if path else head, linear,
              FusedLMHead.from_linear(linear, **head_options_from_config(module.config)))
    original = type(module).forward

    def forward(self, **named):
        if isinstance(getattr(self, head), FusedLMHead):
            return causal_lm_forward(self, **named)
        return original(self, **named)  # the head was replaced by one fastnlg does not fuse: the model's own

    def set_output_embeddings(self, new):
        """As the model's, but a new nn.Linear head (resize_token_embeddings) is fused like the old one."""
        old = getattr(self, head)
        if isinstance(old, FusedLMHead) and type(new) is nn.Linear:
            fused = FusedLMHead.from_linear(new, **head_options_from_config(self.config))
            fused.accuracy_counts = old.accuracy_counts
            fused.__dict__[_ORIGINAL] = new
            new = fused
        type(self).set_output_embeddings(self, new)

    walk.set_method(module, "forward", _mark(_with_signature_of(forward, original)))
    walk.set_method(module, "set_output_embeddings", _mark(set_output_embeddings))
    return f"{type(module).__name__}.{head} -> FusedLMHead + causal_lm_forward"


def _owner(fn) -> str:
    """The package whose code `fn` runs (by its source file: functools.wraps copies the wrapped __module__)."""
    import os
    import re

    fn = getattr(fn, "__func__", fn)
    fn = getattr(fn, "func", fn)  # functools.partial
    path = getattr(getattr(fn, "__code__", None), "co_filename", "")
    found = re.search(r"(?:site|dist)-packages[/\\]([^/\\]+)", path)
    return found.group(1) if found else os.path.basename(path) or "another library"


def _fuse_rope(walk, path, module):
    name = type(module).__module__
    if name in walk.state.rope:
        return None
    if not callable(getattr(sys.modules[name], "apply_rotary_pos_emb", None)):
        raise Skipped(f"{name} has no apply_rotary_pos_emb")
    state = walk.state
    _hold_rope(name, state)
    state.rope.add(name)
    walk.undo.append(lambda: (state.rope.discard(name), _release_rope(name, state)))
    return f"module:{name}", "apply_rotary_pos_emb -> fastnlg.ops.apply_rope"


def _fuse_peft_lora(walk, path, module):
    from ..nn import UnsupportedLoRA, peft_state
    if _ours(module, "forward"):
        return None
    try:
        peft_state(module)
    except UnsupportedLoRA as exc:
        raise Skipped(str(exc)) from None
    walk.set_method(module, "forward", _fused_lora_forward)
    return f"{type(module).__name__} -> lora_linear"


def _unknown_lora(walk, path, module):
    if not hasattr(module, "lora_A"):
        return None
    raise Skipped(f"PEFT LoRA {type(module).__name__}: not a linear layer")


def _bnb_4bit(walk, path, module):
    if hasattr(walk.model.get_submodule(path.rpartition(".")[0]), "lora_A"):
        return None  # the base layer of a PEFT LoRA layer is that layer's business
    raise Skipped("4-bit layer without LoRA: bitsandbytes' own path")


def _unknown(walk, path, module):
    if type(module).__module__.startswith("peft."):
        return None  # PEFT's wrappers: the Transformers model inside them is what gets patched (and reported)
    raise Skipped(f"{type(module).__name__}: type not in the table")


_BUILDERS = {"rms_norm": _fuse_rms_norm, "layer_norm": _fuse_layer_norm, "gated_mlp": _fuse_gated_mlp,
             "gpt2_mlp": _fuse_gpt2_mlp,
             "lm_head": _fuse_lm_head, "rope": _fuse_rope, "peft_lora": _fuse_peft_lora,
             "unknown_lora": _unknown_lora, "bnb_4bit": _bnb_4bit, "unknown": _unknown}


def _apply_rules(walk, kinds, report):
    for path, module in list(walk.model.named_modules()):
        if _ORIGINAL in module.__dict__:
            continue  # a fastnlg module from an earlier patch()
        done = set()
        for rule in table.RULES:
            if rule.kind not in kinds or rule.kind in done or not _matches(rule, module):
                continue
            done.add(rule.kind)
            try:
                result = _BUILDERS[rule.fuse](walk, path, module, **rule.options)
            except Skipped as exc:
                report.skipped.append(Entry(path, rule.kind, str(exc)))
                continue
            if result is not None:
                where, detail = result if isinstance(result, tuple) else (path, result)
                report.patched.append(Entry(where, rule.kind, detail))


# ---- what the rules do not cover: the attention setting ----------------------------------------------------

def _patch_attention(walk, hf, report):
    from ..nn import hf_attention

    if hf is None:
        report.skipped.append(Entry("", "attention", "no Transformers model inside"))
        return
    if not getattr(type(hf), "_supports_attention_backend", False):
        report.skipped.append(Entry("", "attention", f"{type(hf).__name__} does not use AttentionInterface"))
        return
    previous = hf.config._attn_implementation
    if previous == hf_attention.NAME:
        return
    hf_attention.register()
    hf.set_attn_implementation(hf_attention.NAME)
    walk.state.attention_previous = previous
    walk.undo.append(lambda: hf.set_attn_implementation(previous))
    report.patched.append(Entry("", "attention", f"attn_implementation {previous!r} -> {hf_attention.NAME!r}"))


def _hf_model(model):
    """The Transformers PreTrainedModel in `model` (itself, or under PEFT's wrappers), or None."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def _with_signature_of(fn, original):
    """fn(self, **named) behind `original`'s exact signature: positional calls bind as they would to the
    original, and code that inspects forward (generate builds position_ids only when forward takes them)
    sees the same parameters."""
    sig = inspect.signature(original)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if not args and var_kw and var_kw not in kwargs:  # all by keyword (as Trainer and generate call it):
            return fn(self, **kwargs)  # named ones and the rest go to fn as bind would send them (no bind)
        named = sig.bind(self, *args, **kwargs).arguments
        named.pop(next(iter(sig.parameters)))  # self
        extra = named.pop(var_kw, {}) if var_kw else {}
        return fn(self, **named, **extra)
    forward.__signature__ = sig
    return forward


# ---- rope: module-level functions shared by every model of a family ----------------------------------------

def _rope_function(original):
    from ..ops import apply_rope

    signature = inspect.signature(original)  # (q, k, cos, sin, [position_ids,] unsqueeze_dim=1) by version
    params = list(signature.parameters.values())
    four = [(p.name, p.kind) for p in params[:4]] == [(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                                      for n in ("q", "k", "cos", "sin")] and all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[4:])
    # (four: the four tensors alone are a complete call, binding as q, k, cos, sin)

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        """fastnlg.ops.apply_rope (with the call's unsqueeze_dim 1 or 2, position_ids, partial rotary) where
        the tensors are what it takes (4-D q, k of one dtype, constant cos/sin), else the original function."""
        if four and not args and not kwargs:  # how the modelling code calls it: nothing more to bind
            bound = {}
        else:
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


def _hold_rope(name, state):
    """`state`'s model uses the fused apply_rotary_pos_emb of modelling module `name` until it is unpatched
    or garbage-collected."""
    import importlib

    module = importlib.import_module(name)
    entry = _ROPE.get(name)
    if entry is None:
        entry = _ROPE[name] = [module.apply_rotary_pos_emb, weakref.WeakSet()]
        module.apply_rotary_pos_emb = _rope_function(entry[0])
    if state not in entry[1]:
        entry[1].add(state)
        weakref.finalize(state, _release_rope, name, None)


def _release_rope(name, state):
    """Drops `state`'s hold (None: one that was garbage-collected); the original function comes back when no
    live patched model holds it."""
    entry = _ROPE.get(name)
    if entry is None:
        return
    if state is not None:
        entry[1].discard(state)
    if not list(entry[1]):  # (iterating a WeakSet yields the live holders only)
        module = sys.modules[name]
        if getattr(module.apply_rotary_pos_emb, "__fastnlg_original__", None) is entry[0]:
            module.apply_rotary_pos_emb = entry[0]  # (a function someone set since is left alone)
        del _ROPE[name]


def _fused_lora_forward(layer, x, *args, **kwargs):
    from ..nn import UnsupportedLoRA, peft_lora_forward

    try:
        return peft_lora_forward(layer, x, *args, **kwargs)
    except UnsupportedLoRA as exc:
        if str(exc) not in _warned:
            _warned.add(str(exc))
            logger.warning("fastnlg: a patched LoRA layer runs PEFT's forward: %s", exc)
        return type(layer).forward(layer, x, *args, **kwargs)


_mark(_fused_lora_forward)


# ---- modules registered into a patched model later (get_peft_model, add_adapter, ...) ----------------------

_hook = None


def _on_register(parent, name, child):
    """Global module-registration hook: a module set into a patched model (PEFT's LoRA wrappers around its
    projections, ...) is patched by the same rules (its report entries are added to the model's); returns
    the replacement when the module itself is replaced."""
    state = parent.__dict__.get(_IN)
    if state is None or not isinstance(child, nn.Module) or child.__dict__.get(_IN) is state:
        return None
    walk = _Walk(child, state, state.eager_rounding, registering=True)
    report = PatchReport()
    _apply_rules(walk, state.kinds - {"rope"}, report)
    where = f"(added {type(parent).__name__}.{name})"
    state.report.patched += [e._replace(path=f"{where}.{e.path}" if e.path else where) for e in report.patched]
    state.report.skipped += [e._replace(path=f"{where}.{e.path}" if e.path else where) for e in report.skipped]
    new = walk.new_root or child
    _mark_tree(new, state)
    return walk.new_root


def _mark_tree(model, state):
    global _hook
    if _hook is None:
        import torch
        _hook = torch.nn.modules.module.register_module_module_registration_hook(_on_register)
    for m in model.modules():
        m.__dict__[_IN] = state


# ---- the public functions ----------------------------------------------------------------------------------

def _states(model):
    return [m for m in model.modules() if _STATE in m.__dict__]


def patch(model: nn.Module, *, attention: bool = True, cross_entropy: bool = True, norm: bool = True,
          rope: bool = True, mlp: bool = True, lora: bool = True, strict: bool = False,
          eager_rounding: bool = False) -> PatchReport:
    """Swap fastnlg's fused kernels into `model` in place; returns what was patched and skipped (see the
    module docstring). On a patched model it fuses what was added since (its report lists those changes).
    Raises ValueError with strict=True when anything of a kind asked for was skipped (this call's changes
    are then undone). eager_rounding=True makes the gated-MLP activation round as the unpatched module
    (bit-for-bit SwiGLU outputs in bf16/fp16)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastnlg.patch: expected an nn.Module, got {type(model).__name__}")
    hf = _hf_model(model)
    holders = _states(model)
    state = holders[0].__dict__[_STATE] if holders else _State()
    kinds = {k for k, on in (("norm", norm), ("mlp", mlp), ("cross_entropy", cross_entropy), ("rope", rope),
                             ("lora", lora), ("linear4bit", lora)) if on}
    walk, report = _Walk(model, state, eager_rounding), PatchReport()
    try:
        _apply_rules(walk, kinds, report)
        if cross_entropy and not any(e.what == "cross_entropy" for e in
                                     report.patched + report.skipped + state.report.patched):
            report.skipped.append(Entry("", "cross_entropy", f"{type(model).__name__} is not a causal LM in "
                                        "fastnlg's table: no fused loss (layers may still be patched)"))
        if rope and not state.rope:
            report.skipped.append(Entry("", "rope", "no attention layer in the table calls apply_rotary_pos_emb"))
        if attention:
            _patch_attention(walk, hf, report)
        missed = [e for e in report.skipped if e.what in kinds | ({"attention"} if attention else set())]
        if strict and missed:
            raise ValueError("fastnlg.patch(strict=True): not patched:\n" + "\n".join(
                f"  {e.what}: {e.detail} ({e.path or 'model'})" for e in missed[:20])
                + (f"\n  ... and {len(missed) - 20} more" if len(missed) > 20 else ""))
    except BaseException:
        for fn in reversed(walk.undo):  # never leave a half-patched model
            fn()
        raise
    state.report.patched += report.patched
    state.report.skipped += report.skipped
    state.kinds |= kinds
    state.eager_rounding = eager_rounding
    if not holders:
        (hf if hf is not None else model).__dict__[_STATE] = state
    _mark_tree(model, state)
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Undo every fastnlg change in `model` as it is now: each replacement module gives way to the module it
    replaced, holding the replacement's current Parameters and children (so adapters added, layers merged
    and heads resized since are kept); fastnlg's instance methods, the attention setting and the rope
    functions are restored. Refuses (changing nothing) when that would drop a Parameter or child module.
    Returns the report of what was patched."""
    holders = _states(model)
    if not holders:
        raise ValueError("fastnlg.unpatch: this model was not patched by fastnlg.patch")
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
             if child is not None and _ORIGINAL in child.__dict__]
    for parent, name, new in swaps:
        old = new.__dict__[_ORIGINAL]
        lost = [n for slots in ("_parameters", "_buffers", "_modules") for n, v in getattr(new, slots).items()
                if v is not None and n not in getattr(old, slots)]
        if lost:
            path = next(p for p, m in model.named_modules() if m is new)
            raise ValueError(f"fastnlg.unpatch: {path} ({type(new).__name__}) holds {lost}, which the "
                             f"{type(old).__name__} it replaced has no place for; nothing was changed")
    params_before = {id(p) for p in model.parameters()}
    for parent, name, new in reversed(swaps):  # inner replacements first
        old = new.__dict__[_ORIGINAL]
        for slots in ("_parameters", "_buffers", "_modules"):
            getattr(old, slots).update({n: v for n, v in getattr(new, slots).items() if n in getattr(old, slots)})
        old.train(new.training)
        parent._modules[name] = old
    for module in model.modules():
        module.__dict__.pop(_IN, None)
        for method in ("forward", "set_output_embeddings"):
            if _ours(module, method):
                _restore_method(module, method)
    report = PatchReport()
    for holder in holders:
        state = holder.__dict__.pop(_STATE)
        if state.attention_previous is not None and \
                getattr(getattr(holder, "config", None), "_attn_implementation", None) == "fastnlg":
            holder.set_attn_implementation(state.attention_previous)
        for name in state.rope:
            _release_rope(name, state)
        report.patched += state.report.patched
        report.skipped += state.report.skipped
    if {id(p) for p in model.parameters()} != params_before:
        raise RuntimeError("fastnlg.unpatch: the model's Parameters changed while unpatching (a bug in fastnlg)")
    return report


def is_patched(model: nn.Module) -> bool:
    """Whether `model`, or a model inside it (under PEFT's wrappers), holds fastnlg changes."""
    return bool(_states(model))
