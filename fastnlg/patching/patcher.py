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
- attention: config attn implementation -> "fastnlg" (fastnlg.nn.hf_attention); T5's compute_bias -> a
  RelativePositionBias that it runs with relative_position_attention (on the instance);
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

import sys
from fnmatch import fnmatchcase

from torch import nn

from . import table, trl_head
from .builders import ORIGINAL, Skipped, ours, restore_method, set_method
from .report import Entry, PatchReport
from .rope import hold as _hold_rope
from .rope import release as _release_rope

_STATE = "_fastnlg_state"  # on the patched model: its _State
_IN = "_fastnlg_in"  # on every module of a patched model: its _State (modules registered into it get fused)


class _State:
    """The record a patched model holds. Deep copies and unpickled copies take their own hold on the rope
    functions (and register the attention implementation), so they stay patched on their own."""

    def __init__(self):
        self.report, self.attention_previous, self.rope = PatchReport(), None, set()
        self.trl_head = None  # TRL's fused-head swap (trl_head.py): True held, False not possible here, None not tried
        self.kinds, self.eager_rounding = set(), False  # what patch() was asked for (for modules added later)

    def __setstate__(self, state):
        self.__dict__.update(state)
        for name in self.rope:
            _hold_rope(name, self)
        if self.__dict__.get("trl_head"):
            trl_head.hold(self)
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
        new.__dict__[ORIGINAL] = old
        if not path:
            self.new_root = new
            return
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        setattr(parent, name, new)
        self.undo.append(lambda: setattr(parent, name, old))

    def set_method(self, module, name, fn):
        set_method(module, name, fn)
        self.undo.append(lambda: restore_method(module, name))


def _matches(rule, module) -> bool:
    cls = type(module)
    name, qual = cls.__name__, f"{cls.__module__}.{cls.__name__}"
    return any(fnmatchcase(qual if "." in pattern else name, pattern) for pattern in rule.names)


def _apply_rules(walk, kinds, report):
    for path, module in list(walk.model.named_modules()):
        if ORIGINAL in module.__dict__:
            continue  # a fastnlg module from an earlier patch()
        done = set()
        for rule in table.RULES:
            if rule.kind not in kinds or rule.kind in done or not _matches(rule, module):
                continue
            done.add(rule.kind)
            try:
                result = rule.fuse(walk, path, module, **rule.options)
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
    by_rule = any(e.what == "attention" for e in report.patched + walk.state.report.patched)
    if not getattr(type(hf), "_supports_attention_backend", False) and not by_rule:
        report.skipped.append(Entry("", "attention", f"{type(hf).__name__} does not declare attention backends "
                                    "(_supports_attention_backend); its own attention runs"))
        return
    previous = hf.config._attn_implementation
    if previous == hf_attention.NAME:
        return
    hf_attention.register()
    hf.set_attn_implementation(hf_attention.NAME)
    walk.state.attention_previous = previous
    walk.undo.append(lambda: hf.set_attn_implementation(previous))
    report.patched.append(Entry("", "attention", f"attn_implementation {previous!r} -> {hf_attention.NAME!r}"))


def _patch_trl_head(walk, hf, state, report):
    """A causal LM (hf: the Transformers model in the patched one) patched after `import trl`: TRL's fused LM
    head (its preference / RL trainers') runs on fastnlg.ops.fused_linear_logprobs while the model is patched
    (trl_head.py)."""
    if "trl" not in sys.modules or getattr(hf.config, "is_encoder_decoder", False) or \
            not type(hf).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return
    why = trl_head.available()
    if why is not None:
        state.trl_head = False
        walk.undo.append(lambda: setattr(state, "trl_head", None))
        report.skipped.append(Entry(f"module:{trl_head.MODULE}", "trl_head", why))
        return
    trl_head.hold(state)
    state.trl_head = True
    walk.undo.append(lambda: (trl_head.release(state), setattr(state, "trl_head", None)))
    report.patched.append(Entry(f"module:{trl_head.MODULE}", "trl_head",
                                f"TRL's fused LM head ({trl_head.ATTR}) -> fastnlg.ops.fused_linear_logprobs"))


def _hf_model(model):
    """The Transformers PreTrainedModel in `model` (itself, or under PEFT's wrappers), or None."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


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


def _has_rotary(model) -> bool:
    """Whether the model has rotary position embeddings (a *RotaryEmbedding module, or RoPE in its config)."""
    if any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules()):
        return True
    config = getattr(_hf_model(model) or model, "config", None)
    keys = ("rope_theta", "rope_parameters", "rotary_dim", "rotary_pct", "rotary_emb_base")
    return any(getattr(config, key, None) is not None for key in keys)


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
                             ("attention", attention), ("lora", lora), ("linear4bit", lora)) if on}
    walk, report = _Walk(model, state, eager_rounding), PatchReport()
    try:
        _apply_rules(walk, kinds, report)
        if cross_entropy and not any(e.what == "cross_entropy" for e in
                                     report.patched + report.skipped + state.report.patched):
            report.skipped.append(Entry("", "cross_entropy", f"{type(model).__name__} has no loss rule in "
                                        "fastnlg's table: no fused loss (layers may still be patched)"))
        if rope and not state.rope:
            if _has_rotary(model):
                report.skipped.append(Entry("", "rope", "no attention layer in the table calls apply_rotary_pos_emb"))
            else:  # (strict ignores it: there is nothing to fuse)
                report.not_applicable.append(Entry("", "rope", f"{type(model).__name__} has no rotary position "
                                                   "embedding (its positions are absolute or relative)"))
        if cross_entropy and hf is not None and state.__dict__.get("trl_head") is None:
            _patch_trl_head(walk, hf, state, report)
        if attention:
            _patch_attention(walk, hf, report)
        missed = [e for e in report.skipped if e.what in kinds]
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
    state.report.not_applicable += report.not_applicable
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
             if child is not None and ORIGINAL in child.__dict__]
    for _, _, new in swaps:
        old = new.__dict__[ORIGINAL]
        lost = [n for slots in ("_parameters", "_buffers", "_modules") for n, v in getattr(new, slots).items()
                if v is not None and n not in getattr(old, slots)]
        if lost:
            path = next(p for p, m in model.named_modules() if m is new)
            raise ValueError(f"fastnlg.unpatch: {path} ({type(new).__name__}) holds {lost}, which the "
                             f"{type(old).__name__} it replaced has no place for; nothing was changed")
    params_before = {id(p) for p in model.parameters()}
    for parent, name, new in reversed(swaps):  # inner replacements first
        old = new.__dict__[ORIGINAL]
        for slots in ("_parameters", "_buffers", "_modules"):
            getattr(old, slots).update({n: v for n, v in getattr(new, slots).items() if n in getattr(old, slots)})
        old.train(new.training)
        parent._modules[name] = old
    for module in model.modules():
        module.__dict__.pop(_IN, None)
        for method in ("forward", "set_output_embeddings", "compute_bias"):
            if ours(module, method):
                restore_method(module, method)
    report = PatchReport()
    for holder in holders:
        state = holder.__dict__.pop(_STATE)
        if state.attention_previous is not None and \
                getattr(getattr(holder, "config", None), "_attn_implementation", None) == "fastnlg":
            holder.set_attn_implementation(state.attention_previous)
        for name in state.rope:
            _release_rope(name, state)
        if state.__dict__.get("trl_head"):
            trl_head.release(state)
        report.patched += state.report.patched
        report.skipped += state.report.skipped
    if {id(p) for p in model.parameters()} != params_before:
        raise RuntimeError("fastnlg.unpatch: the model's Parameters changed while unpatching (a bug in fastnlg)")
    return report


def is_patched(model: nn.Module) -> bool:
    """Whether `model`, or a model inside it (under PEFT's wrappers), holds fastnlg changes."""
    return bool(_states(model))
