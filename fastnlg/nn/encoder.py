"""Encoder pieces (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ModernBERT): the post-LN sublayer output on
fastnlg.ops.add_layer_norm, ModernBERT's GeGLU MLP, and the heads' losses on fastnlg's losses.

- FastAddNormOutput replaces BertSelfOutput / BertOutput (and RoBERTa's): LayerNorm(dropout(dense(h)) + input)
  with the residual add inside the LayerNorm's one pass; distilbert_block_forward does the same for
  DistilBERT's TransformerBlock (its two residual LayerNorms), and FastDistilBertFFN fuses its lin1 bias + GELU;
  bart_encoder_layer_forward / bart_decoder_layer_forward do both for BART's (post-LN) layers.
- classification_forward: token and sequence classification (single-label) compute their loss with
  fastnlg.ops.cross_entropy (class weights from `model.loss_class_weight` when set); regression and
  multi-label problems keep the model's own loss.
- masked_lm_forward: in training, the masked-LM loss runs only the masked rows through the head's transform
  and fastnlg.ops.fused_linear_cross_entropy over the vocabulary, never building the (tokens x vocab) logits;
  evaluation and calls without labels return the model's own logits.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import add_layer_norm, cross_entropy, fused_linear_cross_entropy, geglu, gelu
from ..ops.gelu import gelu_backend
from .mlp import gelu_approximate

IGNORE_INDEX = -100  # what Transformers' CrossEntropyLoss() ignores in these heads


class FastAddNormOutput(nn.Module):
    """LayerNorm(dropout(dense(hidden_states)) + input_tensor), over the module's own dense, dropout and
    LayerNorm (same state_dict keys)."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "FastAddNormOutput":
        norm = module.LayerNorm
        if len(norm.normalized_shape) != 1 or norm.weight is None:
            raise ValueError(f"FastAddNormOutput: {type(module).__name__}.LayerNorm is not a 1-D affine LayerNorm")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dense, new.LayerNorm, new.dropout = module.dense, norm, module.dropout
        return new

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.dense(hidden_states))
        norm = self.LayerNorm
        return add_layer_norm(h, input_tensor, norm.weight, norm.bias, norm.eps)


def distilbert_block_forward(self, hidden_states, attention_mask=None, **kwargs):
    """DistilBERT's TransformerBlock.forward with both residual LayerNorms on add_layer_norm."""
    attention_output, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    sa, out = self.sa_layer_norm, self.output_layer_norm
    attention_output = add_layer_norm(attention_output, hidden_states, sa.weight, sa.bias, sa.eps)
    return add_layer_norm(self.ffn(attention_output), attention_output, out.weight, out.bias, out.eps)


class FastDistilBertFFN(nn.Module):
    """DistilBERT's FFN, dropout(lin2(act(lin1(x)))) with a GELU, lin1's bias added inside fastnlg.ops.gelu
    (over the module's own lin1, lin2, dropout)."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "FastDistilBertFFN":
        if module.chunk_size_feed_forward:
            raise ValueError(f"FastDistilBertFFN: chunk_size_feed_forward={module.chunk_size_feed_forward} "
                             "(chunked feed-forward) is the model's own path")
        approximate = gelu_approximate("FastDistilBertFFN", module.activation)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.lin1, new.lin2, new.dropout, new.activation = module.lin1, module.lin2, module.dropout, module.activation
        new.approximate = approximate
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.lin2(linear_gelu(self.lin1, x, self.approximate, self.activation)))


def linear_gelu(linear: nn.Module, x: torch.Tensor, approximate: str, activation: nn.Module) -> torch.Tensor:
    """activation(linear(x)) for a GELU `activation` (its fastnlg.ops.gelu `approximate`): a plain nn.Linear's bias
    is added inside the GELU's one pass; any other layer (a PEFT LoRA layer, ...) runs as it is, then the
    fused GELU; where gelu would run on its torch backend (aten's GELU), the eager computation."""
    if not torch.compiler.is_compiling() and gelu_backend(x, approximate) == "torch":
        return activation(linear(x))
    if type(linear) is nn.Linear and linear.bias is not None:
        h = nn.functional.linear(x, linear.weight)
        return gelu(h, linear.bias.to(h.dtype), approximate=approximate)
    return gelu(linear(x), approximate=approximate)


def _bart_ffn_norm(self, h: torch.Tensor) -> torch.Tensor:
    """A BART layer's feed-forward block after its attention: LN(h + dropout(fc2(dropout(act(fc1 h)))))."""
    approximate = gelu_approximate(type(self).__name__, self.activation_fn)
    f = linear_gelu(self.fc1, h, approximate, self.activation_fn)
    f = nn.functional.dropout(f, p=self.activation_dropout, training=self.training)
    f = nn.functional.dropout(self.fc2(f), p=self.dropout, training=self.training)
    ln = self.final_layer_norm
    return add_layer_norm(f, h, ln.weight, ln.bias, ln.eps)


def _dropout_add_norm(self, out: torch.Tensor, residual: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    return add_layer_norm(nn.functional.dropout(out, p=self.dropout, training=self.training), residual, ln.weight,
                          ln.bias, ln.eps)


def bart_encoder_layer_forward(self, hidden_states, attention_mask, **kwargs):
    """BartEncoderLayer.forward (post-LN) with both residual LayerNorms on add_layer_norm and fc1's bias + GELU
    in fastnlg.ops.gelu; fp16's clamp as the model does it."""
    out, _ = self.self_attn(hidden_states, attention_mask=attention_mask, **kwargs)
    h = _bart_ffn_norm(self, _dropout_add_norm(self, out, hidden_states, self.self_attn_layer_norm))
    if h.dtype == torch.float16 and not torch.isfinite(h).all():
        clamp = torch.finfo(h.dtype).max - 1000
        h = torch.clamp(h, min=-clamp, max=clamp)
    return h


def bart_decoder_layer_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                               encoder_attention_mask=None, past_key_values=None, use_cache=True, **kwargs):
    """BartDecoderLayer.forward (post-LN: self-attention, cross-attention, feed-forward) with its three residual
    LayerNorms on add_layer_norm and fc1's bias + GELU in fastnlg.ops.gelu."""
    out, _ = self.self_attn(hidden_states, past_key_values=past_key_values, attention_mask=attention_mask, **kwargs)
    h = _dropout_add_norm(self, out, hidden_states, self.self_attn_layer_norm)
    if encoder_hidden_states is not None:
        out, _ = self.encoder_attn(h, key_value_states=encoder_hidden_states, attention_mask=encoder_attention_mask,
                                   past_key_values=past_key_values, **kwargs)
        h = _dropout_add_norm(self, out, h, self.encoder_attn_layer_norm)
    return _bart_ffn_norm(self, h)


class FastModernBertMLP(nn.Module):
    """ModernBERT's MLP, Wo(drop(act(a) * g)) with (a, g) the halves of Wi(x), on fastnlg.ops.geglu (over the
    module's own Wi, Wo, drop)."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "FastModernBertMLP":
        approximate = gelu_approximate("FastModernBertMLP", module.act)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.Wi, new.act, new.drop, new.Wo, new.approximate = module.Wi, module.act, module.drop, module.Wo, approximate
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        a, g = self.Wi(hidden_states).chunk(2, dim=-1)
        return self.Wo(self.drop(geglu(a, g, approximate=self.approximate)))


class FastT5GatedMLP(nn.Module):
    """T5 v1.1 / Flan-T5 / mT5's T5DenseGatedActDense, wo(dropout(act(wi_0(x)) * wi_1(x))) with the gated-GELU
    on fastnlg.ops.geglu (over the module's own wi_0, wi_1, wo, dropout; wo's input cast to wo's dtype as T5
    does, for its fp32-kept wo)."""

    @classmethod
    def from_module(cls, module: nn.Module) -> "FastT5GatedMLP":
        approximate = gelu_approximate("FastT5GatedMLP", module.act)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.wi_0, new.wi_1, new.wo, new.dropout, new.act = module.wi_0, module.wi_1, module.wo, module.dropout, module.act
        new.approximate = approximate
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.dropout(geglu(self.wi_0(hidden_states), self.wi_1(hidden_states), approximate=self.approximate))
        w = getattr(self.wo, "weight", None)
        if isinstance(w, torch.Tensor) and h.dtype != w.dtype and w.dtype != torch.int8:
            h = h.to(w.dtype)
        return self.wo(h)


def _problem_type(model, labels) -> str:
    """The config's problem_type, set as Transformers' sequence classifiers set it on their first loss."""
    config = model.config
    if config.problem_type is None:
        if model.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    return config.problem_type


def classification_forward(model, original, sequence: bool, named: dict):
    """The forward of a *ForTokenClassification / *ForSequenceClassification `model` whose model-own forward is
    `original`: its logits, and the cross-entropy on fastnlg.ops.cross_entropy."""
    labels = named.pop("labels", None)
    if labels is not None and sequence and _problem_type(model, labels) != "single_label_classification":
        return original(model, labels=labels, **named)  # regression / multi-label: the model's own loss
    return_dict = named.pop("return_dict", None)
    out = original(model, return_dict=True, **named)
    if labels is not None:
        logits = out.logits
        weight = getattr(model, "loss_class_weight", None)
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                             weight=None if weight is None else weight.to(logits.device, torch.float32),
                             ignore_index=IGNORE_INDEX)
        out = type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
    return out.to_tuple() if return_dict is False else out


# What a masked-LM head computes before its decoder, per head class (DistilBERT's head is the model itself).
MLM_TRANSFORMS = {
    "BertLMPredictionHead": lambda head, h: head.transform(h),
    "RobertaLMHead": lambda head, h: head.layer_norm(nn.functional.gelu(head.dense(h))),
    "XLMRobertaLMHead": lambda head, h: head.layer_norm(nn.functional.gelu(head.dense(h))),
    "DistilBertForMaskedLM": lambda head, h: head.vocab_layer_norm(head.activation(head.vocab_transform(h))),
    "ModernBertPredictionHead": lambda head, h: head(h),
}


def masked_lm_forward(model, original, head_path: str, decoder: str, num_items: bool, named: dict):
    """The forward of a *ForMaskedLM `model` (its own forward `original`): its head's transform at `head_path`
    ("" for the model itself), its vocabulary projection at `decoder`; with num_items, the loss honours
    HF Trainer's num_items_in_batch as the model's own loss_function does."""
    from transformers.modeling_outputs import MaskedLMOutput

    labels = named.get("labels")
    if labels is None or not model.training:
        return original(model, **named)
    named.pop("labels")
    return_dict = named.pop("return_dict", None)
    items = named.pop("num_items_in_batch", None) if num_items else None
    base = getattr(model, model.base_model_prefix)
    outputs = base(return_dict=True, **named)
    hidden = outputs[0]
    head = model.get_submodule(head_path) if head_path else model
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).to(hidden.device)
    if not torch.compiler.is_compiling():  # the masked rows only (about 15%): the transform skips the rest
        rows = torch.nonzero(y != IGNORE_INDEX).squeeze(-1)
        h, y = h.index_select(0, rows), y.index_select(0, rows)
    h = MLM_TRANSFORMS[type(head).__name__](head, h)
    projection = model.get_submodule(decoder)
    loss = fused_linear_cross_entropy(h, projection.weight, y, bias=projection.bias, ignore_index=IGNORE_INDEX,
                                      num_items_in_batch=items, loss_dtype=torch.float32)
    out = MaskedLMOutput(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                         attentions=getattr(outputs, "attentions", None))
    return out.to_tuple() if return_dict is False else out
