"""The patcher's builders: what each row of table.py does to a module it matches.

A builder is `(walk, path, module, **rule options)` -> a detail for the report, `(where, detail)`, or None
(the module is not its business); it raises Skipped with the reason when it leaves the module alone. It
changes the model only through `walk` (walk.swap for a module, walk.set_method for an instance method), which
records how to undo it. Replacement modules carry the module they replaced (ORIGINAL) and fastnlg's
instance methods are marked (MARK), which is all unpatch needs.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
import types

from torch import nn

from .rope import hold, release

logger = logging.getLogger("fastnlg")
ORIGINAL = "_fastnlg_original"  # on a replacement module: the module it replaced (not a registered child)
MARK = "__fastnlg__"  # on fastnlg's instance-method functions
_warned: set = set()


class Skipped(Exception):
    """Raised by a builder: this module is left alone, for the reason given."""


def set_method(module, name, fn):
    """module.<name> = fn bound to module (on the instance), keeping an instance method it had before."""
    if name in module.__dict__:
        module.__dict__[f"_fastnlg_previous_{name}"] = module.__dict__[name]
    module.__dict__[name] = types.MethodType(fn, module)


def ours(module, name) -> bool:
    return getattr(getattr(module.__dict__.get(name), "__func__", None), MARK, False)


def restore_method(module, name):
    previous = module.__dict__.pop(f"_fastnlg_previous_{name}", None)
    if previous is None:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = previous


def mark(fn):
    setattr(fn, MARK, True)
    return fn


def _swap(walk, path, module, cls, describe):
    """Swap in cls.from_module(module) (a ValueError from it: Skipped with its message); describe(new)."""
    try:
        new = cls.from_module(module)
    except ValueError as exc:
        raise Skipped(str(exc)) from None
    walk.swap(path, module, new)
    return describe(new)


def rms_norm(walk, path, module, offset, casting_mode):
    from ..nn import FastRMSNorm
    walk.swap(path, module, FastRMSNorm.from_module(module, offset=offset, casting_mode=casting_mode))
    return f"{type(module).__name__} -> FastRMSNorm"


def layer_norm(walk, path, module):
    from ..nn import FastLayerNorm
    if len(module.normalized_shape) != 1 or module.weight is None:
        raise Skipped("LayerNorm over several dims or without affine")
    walk.swap(path, module, FastLayerNorm.from_module(module))
    return "LayerNorm -> FastLayerNorm"


def gated_mlp(walk, path, module, act):
    from ..nn import FastGatedMLP
    activation = getattr(getattr(module, "config", None), act, None)
    try:
        new = FastGatedMLP.from_module(module, activation, eager_rounding=walk.eager_rounding)
    except ValueError as exc:  # an activation the fused ops do not implement
        raise Skipped(str(exc)) from None
    walk.swap(path, module, new)
    return f"{type(module).__name__} -> FastGatedMLP({activation})"


def gpt2_mlp(walk, path, module):
    from ..nn import FastGPT2MLP
    return _swap(walk, path, module, FastGPT2MLP, lambda new: f"GPT2MLP -> FastGPT2MLP({new.activation})")


def _fuse_head(walk, path, module, head):
    """module.<head> (an nn.Linear) -> a FusedLMHead sharing its Parameters, and set_output_embeddings that
    fuses a new nn.Linear head (resize_token_embeddings) like the old one."""
    from ..nn import FusedLMHead, head_options_from_config
    linear = getattr(module, head, None)
    if type(linear) is not nn.Linear:
        raise Skipped(f"{head} is a {type(linear).__name__}, not nn.Linear")
    walk.swap(f"{path}.{head}" if path else head, linear,
              FusedLMHead.from_linear(linear, **head_options_from_config(module.config)))

    def set_output_embeddings(self, new):
        """As the model's, but a new nn.Linear head (resize_token_embeddings) is fused like the old one."""
        old = getattr(self, head)
        if isinstance(old, FusedLMHead) and type(new) is nn.Linear:
            fused = FusedLMHead.from_linear(new, **head_options_from_config(self.config))
            fused.accuracy_counts = old.accuracy_counts
            fused.__dict__[ORIGINAL] = new
            new = fused
        type(self).set_output_embeddings(self, new)

    walk.set_method(module, "set_output_embeddings", mark(set_output_embeddings))


def cross_entropy(walk, path, module, head):
    from ..nn import causal_lm_forward
    from ..nn.lm_head import active_head
    if not _forward_replaceable(module):  # (TRL's fused LM head, accelerate's hooks, ...: their forward stays)
        return None  # fused by an earlier patch() of this model
    _fuse_head(walk, path, module, head)
    original = type(module).forward

    def forward(self, **named):
        if active_head(getattr(self, head)) is not None:  # (also in a PEFT modules_to_save wrapper)
            return causal_lm_forward(self, **named)
        return original(self, **named)  # the head was replaced by one fastnlg does not fuse: the model's own

    walk.set_method(module, "forward", mark(_with_signature_of(forward, original)))
    return f"{type(module).__name__}.{head} -> FusedLMHead + causal_lm_forward"


def seq2seq_lm_loss(walk, path, module, family, scale=None):
    """An encoder-decoder's lm_head -> FusedLMHead; its training loss through it (fastnlg.nn.seq2seq_lm_forward)."""
    from ..nn import seq2seq_lm_forward
    if not _forward_replaceable(module):
        return None
    _fuse_head(walk, path, module, "lm_head")
    original = type(module).forward

    def forward(self, **named):
        return seq2seq_lm_forward(self, original, family, scale, named)

    walk.set_method(module, "forward", mark(_with_signature_of(forward, original)))
    return f"{type(module).__name__}.lm_head -> FusedLMHead + seq2seq_lm_forward"


def add_norm_output(walk, path, module):
    from ..nn.encoder import FastAddNormOutput
    return _swap(walk, path, module, FastAddNormOutput, lambda new: f"{type(module).__name__} -> FastAddNormOutput (add_layer_norm)")


def dense_gelu(walk, path, module):
    from ..nn.mlp import FastDenseGELU
    return _swap(walk, path, module, FastDenseGELU, lambda new: f"{type(module).__name__} -> FastDenseGELU({new.approximate})")


def _forward_replaceable(module) -> bool:
    """False when fastnlg's forward is already on the instance; Skipped when another library's is."""
    if ours(module, "forward"):
        return False
    if "forward" in module.__dict__:
        raise Skipped(f"{type(module).__name__}.forward was already replaced on the instance (by "
                      f"{_owner(module.__dict__['forward'])}); its loss path is kept")
    return True


def classification_loss(walk, path, module, sequence):
    from ..nn.encoder import classification_forward
    if not _forward_replaceable(module):
        return None
    original = type(module).forward

    def forward(self, **named):
        return classification_forward(self, original, sequence, named)

    walk.set_method(module, "forward", mark(_with_signature_of(forward, original)))
    return f"{type(module).__name__}: loss -> fastnlg.ops.cross_entropy"


def masked_lm_loss(walk, path, module, head, decoder, num_items=False):
    from ..nn.encoder import MLM_TRANSFORMS, masked_lm_forward
    if not _forward_replaceable(module):
        return None
    lm_head = module.get_submodule(head) if head else module
    if type(lm_head).__name__ not in MLM_TRANSFORMS:
        raise Skipped(f"{head or 'the model'} is a {type(lm_head).__name__}, not a masked-LM head fastnlg knows")
    if type(module.get_submodule(decoder)) is not nn.Linear:
        raise Skipped(f"{decoder} is not an nn.Linear")
    original = type(module).forward

    def forward(self, **named):
        return masked_lm_forward(self, original, head, decoder, num_items, named)

    walk.set_method(module, "forward", mark(_with_signature_of(forward, original)))
    return f"{type(module).__name__}: training loss -> transform of the masked rows + fused_linear_cross_entropy"


def bart_layer(walk, path, module, decoder):
    from ..nn.encoder import bart_decoder_layer_forward, bart_encoder_layer_forward
    from ..nn.mlp import gelu_approximate
    if not _forward_replaceable(module):
        return None
    names = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm") if decoder else \
        ("self_attn_layer_norm", "final_layer_norm")
    for name in names:
        norm = getattr(module, name)
        if len(norm.normalized_shape) != 1 or norm.weight is None:
            raise Skipped(f"{name} is not a 1-D affine LayerNorm")
    try:
        approximate = gelu_approximate(type(module).__name__, module.activation_fn)
    except ValueError as exc:
        raise Skipped(str(exc)) from None
    fn = bart_decoder_layer_forward if decoder else bart_encoder_layer_forward
    walk.set_method(module, "forward", mark(_with_signature_of(fn, type(module).forward)))
    return (f"{type(module).__name__}: residual LayerNorms -> add_layer_norm, fc1 bias + GELU -> gelu "
            f"({approximate})")


def distilbert_block(walk, path, module):
    from ..nn.encoder import distilbert_block_forward
    if not _forward_replaceable(module):
        return None
    for name in ("sa_layer_norm", "output_layer_norm"):
        norm = getattr(module, name)
        if len(norm.normalized_shape) != 1 or norm.weight is None:
            raise Skipped(f"{name} is not a 1-D affine LayerNorm")
    walk.set_method(module, "forward", mark(_with_signature_of(distilbert_block_forward, type(module).forward)))
    return "TransformerBlock: residual LayerNorms -> add_layer_norm"


def modernbert_mlp(walk, path, module):
    from ..nn.encoder import FastModernBertMLP
    return _swap(walk, path, module, FastModernBertMLP, lambda new: f"ModernBertMLP -> FastModernBertMLP(geglu {new.approximate})")


def t5_norm(walk, path, module):
    from ..nn.norms import FastT5LayerNorm
    return _swap(walk, path, module, FastT5LayerNorm, lambda new: f"{type(module).__name__} -> FastT5LayerNorm")


def t5_gated_mlp(walk, path, module):
    from ..nn.encoder import FastT5GatedMLP
    return _swap(walk, path, module, FastT5GatedMLP, lambda new: f"T5DenseGatedActDense -> FastT5GatedMLP(geglu "
                 f"{new.approximate})")


def attention_interface(walk, path, module):
    """An attention layer that calls Transformers' attention interface with nothing fastnlg's attention does
    not implement (BART's family: self- and cross-attention, key padding, causal): the module is left as it
    is, and the row lets the model's attention implementation be set to "fastnlg"."""
    return "calls the attention interface -> fastnlg's flash_attention"


def t5_relative_bias(walk, path, module):
    """T5's attention layer with a bias table: compute_bias -> a RelativePositionBias marker (while the
    attention implementation is "fastnlg"), which fastnlg's attention runs as relative_position_attention."""
    if not getattr(module, "has_relative_attention_bias", False) or ours(module, "compute_bias"):
        return None
    walk.set_method(module, "compute_bias", _t5_compute_bias)
    return "compute_bias -> fastnlg.ops.relative_position_attention (no (1, H, T, S) bias)"


@mark
def _t5_compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
    from ..nn.hf_attention import RelativePositionBias

    marker = RelativePositionBias.of(self, query_length, key_length, past_seen_tokens)
    if marker is not None:
        return marker
    return type(self).compute_bias(self, query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)


def distilbert_ffn(walk, path, module):
    from ..nn.encoder import FastDistilBertFFN
    return _swap(walk, path, module, FastDistilBertFFN, lambda new: f"FFN -> FastDistilBertFFN({new.approximate})")


def _owner(fn) -> str:
    """The package whose code `fn` runs (by its source file: functools.wraps copies the wrapped __module__)."""
    fn = getattr(fn, "__func__", fn)
    fn = getattr(fn, "func", fn)  # functools.partial
    path = getattr(getattr(fn, "__code__", None), "co_filename", "")
    found = re.search(r"(?:site|dist)-packages[/\\]([^/\\]+)", path)
    return found.group(1) if found else os.path.basename(path) or "another library"


def rope(walk, path, module):
    name = type(module).__module__
    if name in walk.state.rope:
        return None
    if not callable(getattr(sys.modules[name], "apply_rotary_pos_emb", None)):
        raise Skipped(f"{name} has no apply_rotary_pos_emb")
    state = walk.state
    hold(name, state)
    state.rope.add(name)
    walk.undo.append(lambda: (state.rope.discard(name), release(name, state)))
    return f"module:{name}", "apply_rotary_pos_emb -> fastnlg.ops.apply_rope"


def peft_lora(walk, path, module):
    from ..nn import UnsupportedLoRA, peft_state
    if ours(module, "forward"):
        return None
    try:
        peft_state(module)
    except UnsupportedLoRA as exc:
        raise Skipped(str(exc)) from None
    walk.set_method(module, "forward", fused_lora_forward)
    return f"{type(module).__name__} -> lora_linear"


def unknown_lora(walk, path, module):
    if not hasattr(module, "lora_A"):
        return None
    raise Skipped(f"PEFT LoRA {type(module).__name__}: not a linear layer")


def bnb_4bit(walk, path, module):
    if hasattr(walk.model.get_submodule(path.rpartition(".")[0]), "lora_A"):
        return None  # the base layer of a PEFT LoRA layer is that layer's business
    raise Skipped("4-bit layer without LoRA: bitsandbytes' own path")


def unknown(walk, path, module):
    if type(module).__module__.startswith("peft."):
        return None  # PEFT's wrappers: the Transformers model inside them is what gets patched (and reported)
    raise Skipped(f"{type(module).__name__}: type not in the table")


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


def fused_lora_forward(layer, x, *args, **kwargs):
    from ..nn import UnsupportedLoRA, peft_lora_forward

    try:
        return peft_lora_forward(layer, x, *args, **kwargs)
    except UnsupportedLoRA as exc:
        if str(exc) not in _warned:
            _warned.add(str(exc))
            logger.warning("fastnlg: a patched LoRA layer runs PEFT's forward: %s", exc)
        return type(layer).forward(layer, x, *args, **kwargs)


mark(fused_lora_forward)
