"""A causal LM's (and an encoder-decoder's) lm_head + loss without the (tokens x vocab) logits.

`FusedLMHead` is an `nn.Linear` (same `weight`/`bias` Parameters, so tied embeddings, state_dict keys and
`get_output_embeddings()` are unchanged) with one more method, `loss(hidden, labels, ...)`, which runs
`fastnlg.ops.fused_linear_cross_entropy` with Hugging Face's causal-LM loss semantics
(`transformers.loss.loss_utils.ForCausalLMLoss`):

    labels (B, T) -> pad one ignore_index on the right, drop the first: shift_labels[b, t] = labels[b, t + 1]
    loss = CE(logit_scale * hidden @ W^T (+ b), with softcap), mean over non-ignored tokens,
           or sum / num_items_in_batch when the Trainer passes num_items_in_batch.

`causal_lm_forward` is a drop-in `forward` for CausalLM classes whose forward is "base model -> lm_head ->
loss_function" (Llama, Mistral, Qwen2/3, Gemma 1/2/3 text, Phi-3, GPT-2, ...): with labels in training mode
it returns the loss and `logits=None`; otherwise (evaluation, generation, no labels) ordinary logits, and
the loss on them when labels are given. The patcher decides which classes it applies to (DESIGN.md §4.4).
`seq2seq_lm_forward` does the same for encoder-decoders (T5's and BART's families), whose labels are already
aligned with the decoder positions.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import cross_entropy, fused_linear_cross_entropy


class FusedLMHead(nn.Linear):
    """nn.Linear(C, V) whose `loss` never materialises the logits. `softcap` (Gemma 2's
    final_logit_softcapping) and `logit_scale` (a multiplier on the logits) apply to both paths."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, softcap: float | None = None,
                 logit_scale: float | None = None, ignore_index: int = -100, chunk_size: int | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._configure(softcap, logit_scale, ignore_index, chunk_size)

    def _configure(self, softcap, logit_scale, ignore_index, chunk_size):
        if softcap is not None and not softcap >= 0:
            raise ValueError(f"FusedLMHead: softcap must be > 0, or 0 / None for off, got {softcap}")
        self.softcap, self.logit_scale = softcap or None, logit_scale
        self.ignore_index, self.chunk_size = ignore_index, chunk_size
        # set to a (2,) tensor to count [argmax == label, counted tokens] in every loss call (the fused loss
        # reads the argmax chunk by chunk; the counts stay on the device)
        self.accuracy_counts: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "FusedLMHead":
        """Shares `linear`'s Parameters (no copy); `to_linear()` gives an nn.Linear back."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FusedLMHead.from_linear: expected nn.Linear, got {type(linear).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._configure(options.pop("softcap", None), options.pop("logit_scale", None),
                       options.pop("ignore_index", -100), options.pop("chunk_size", None))
        if options:
            raise TypeError(f"FusedLMHead.from_linear: unknown options {sorted(options)}")
        return new

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits, exactly as the model would return them (scaled, then softcapped)."""
        logits = super().forward(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor | None = None, *, shift_labels=None,
             num_items_in_batch=None, extra_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Causal-LM loss of hidden (B, T, C) against labels (B, T) (shifted here) or shift_labels (B, T)
        (already aligned: a seq2seq model's labels), with no (B*T, V) tensor in forward or backward.
        `extra_bias` (V,) is added to the logits besides the head's own bias (BART's final_logits_bias)."""
        shift_labels = _shift(labels, shift_labels, self.ignore_index, hidden.shape[:-1])
        h, weight, bias = hidden.reshape(-1, hidden.shape[-1]), self.weight, self.bias  # (autocast: the loss op's)
        if extra_bias is not None:
            bias = extra_bias if bias is None else bias + extra_bias
        if self.logit_scale is not None:  # s (h W^T + b) = (s h) W^T + s b
            h = h * self.logit_scale
            bias = None if bias is None else bias * self.logit_scale
        y = shift_labels.reshape(-1).to(h.device)
        counts = self.accuracy_counts
        out = fused_linear_cross_entropy(h, weight, y, bias=bias, ignore_index=self.ignore_index, softcap=self.softcap,
                                         num_items_in_batch=num_items_in_batch, chunk_size=self.chunk_size,
                                         loss_dtype=torch.float32,  # HF's loss is fp32
                                         return_token_accuracy=counts is not None)
        if counts is None:
            return out
        n = (y != self.ignore_index).sum()
        counts += torch.stack([torch.round(out.token_accuracy.nan_to_num(0.0) * n), n]).to(counts)
        return out.loss

    def extra_repr(self) -> str:
        return super().extra_repr() + f", softcap={self.softcap}, logit_scale={self.logit_scale}, fused_loss=True"


def _shift(labels, shift_labels, ignore_index, lead_shape):
    if shift_labels is None:
        if labels is None:
            raise ValueError("FusedLMHead.loss: pass labels (B, T) or shift_labels (B, T)")
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if tuple(shift_labels.shape) != tuple(lead_shape):
        raise ValueError(f"FusedLMHead.loss: labels {tuple(shift_labels.shape)} must match hidden's leading "
                         f"dimensions {tuple(lead_shape)}")
    return shift_labels


def active_head(module) -> FusedLMHead | None:
    """The FusedLMHead that computes `module`'s output: `module` itself, or, for a PEFT ModulesToSaveWrapper around
    one (`modules_to_save=["lm_head"]`), the module its forward would run: the trained copy of the active adapter,
    or the original when adapters are disabled or the active one has no copy (PEFT's own rule). None otherwise:
    a head fastnlg does not fuse runs the model's own forward."""
    if isinstance(module, FusedLMHead):
        return module
    if not (isinstance(module, nn.Module) and "original_module" in module._modules
            and "modules_to_save" in module._modules):
        return None
    active = list(getattr(module, "active_adapters", None) or [])
    copies = module._modules["modules_to_save"]
    if getattr(module, "disable_adapters", False) or not active or any(a not in copies for a in active):
        inner = module._modules["original_module"]
    else:
        inner = copies[active[0]]
    return inner if isinstance(inner, FusedLMHead) else None


def causal_lm_forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
    """forward for a CausalLM whose lm_head is a FusedLMHead (bound by the patcher). Arguments as in
    Transformers; `num_items_in_batch` and `shift_labels` go to the loss, everything else to the base model."""
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    return_dict = kwargs.pop("return_dict", None)
    base = getattr(self, self.base_model_prefix)
    outputs = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs.last_hidden_state
    module = self.lm_head
    head = active_head(module)  # (a PEFT modules_to_save wrapper: its active copy)
    if head is None:
        raise TypeError(f"causal_lm_forward: lm_head is a {type(module).__name__}, not a FusedLMHead (or a PEFT "
                        "wrapper around one)")
    loss = logits = None
    has_labels = labels is not None or shift_labels is not None
    if has_labels and self.training and not logits_to_keep:
        loss = head.loss(hidden, labels, shift_labels=shift_labels, num_items_in_batch=num_items)
    else:
        if isinstance(logits_to_keep, int):
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            logits = module(hidden[:, keep, :])  # (the module itself: PEFT's hooks, e.g. mixed adapter batches)
        else:
            logits = module(hidden[:, logits_to_keep, :])
        if has_labels:
            sl = _shift(labels, shift_labels, head.ignore_index, logits.shape[:-1])
            loss = cross_entropy(logits.float().reshape(-1, logits.shape[-1]), sl.reshape(-1).to(logits.device),
                                 ignore_index=head.ignore_index, num_items_in_batch=num_items)
    cls = CausalLMOutputWithCrossAttentions if getattr(outputs, "cross_attentions", None) is not None \
        else CausalLMOutputWithPast
    fields = {"loss": loss, "logits": logits, "past_key_values": getattr(outputs, "past_key_values", None),
              "hidden_states": getattr(outputs, "hidden_states", None),
              "attentions": getattr(outputs, "attentions", None)}
    if cls is CausalLMOutputWithCrossAttentions:
        fields["cross_attentions"] = outputs.cross_attentions
    out = cls(**fields)
    return out.to_tuple() if return_dict is False else out


def seq2seq_lm_forward(self, original, family: str, scale: str | None, named: dict):
    """forward for a *ForConditionalGeneration (encoder-decoder) whose lm_head is a FusedLMHead (bound by the
    patcher; `original` is the class's own forward). With labels in training mode: the decoder inputs from
    the labels as the model makes them (prepare_decoder_input_ids_from_labels), the decoder's last hidden
    state through the fused loss against the labels as they are (a seq2seq model's labels are aligned with
    its decoder positions), the mean over the labels not ignored as the model's CrossEntropyLoss() takes it
    (these models take no num_items_in_batch), logits=None. Otherwise the model's own forward.

    family "t5": encoder, then decoder (T5, mT5, UMT5), the decoder output scaled by d_model**-0.5 where the config
    flag named by `scale` is set (T5's scale_decoder_outputs: tied embeddings); "bart": the base model
    `self.model` (BART, mBART, Pegasus), final_logits_bias added to the logits, the cache off as the model
    turns it off with labels."""
    from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

    head = active_head(self.lm_head)
    if named.get("labels") is None or not self.training or head is None:
        return original(self, **named)
    named = dict(named)
    labels = named.pop("labels")
    return_dict = named.pop("return_dict", None)
    named.pop("num_items_in_batch", None)  # (the model's own loss is the mean over its labels)
    if named.get("decoder_input_ids") is None and named.get("decoder_inputs_embeds") is None:
        named["decoder_input_ids"] = self.prepare_decoder_input_ids_from_labels(labels=labels)
    extra_bias = None
    if family == "bart":
        named["use_cache"] = False
        outputs = self.model(**named, return_dict=True)
        hidden = outputs.last_hidden_state
        extra_bias = self.final_logits_bias.reshape(-1).to(hidden.device)
        fields = {k: getattr(outputs, k) for k in ("past_key_values", "decoder_hidden_states", "decoder_attentions",
                                                    "cross_attentions", "encoder_last_hidden_state",
                                                    "encoder_hidden_states", "encoder_attentions")}
    else:
        a = {k: named.pop(k, None) for k in ("input_ids", "attention_mask", "decoder_input_ids",
                                             "decoder_attention_mask", "encoder_outputs", "past_key_values",
                                             "inputs_embeds", "decoder_inputs_embeds", "use_cache")}
        enc = a["encoder_outputs"]
        if enc is None:
            enc = self.encoder(input_ids=a["input_ids"], attention_mask=a["attention_mask"],
                               inputs_embeds=a["inputs_embeds"], **named)
        elif not isinstance(enc, BaseModelOutput):
            enc = BaseModelOutput(last_hidden_state=enc[0], hidden_states=enc[1] if len(enc) > 1 else None,
                                  attentions=enc[2] if len(enc) > 2 else None)
        dec = self.decoder(input_ids=a["decoder_input_ids"], attention_mask=a["decoder_attention_mask"],
                           inputs_embeds=a["decoder_inputs_embeds"], past_key_values=a["past_key_values"],
                           encoder_hidden_states=enc[0], encoder_attention_mask=a["attention_mask"],
                           use_cache=a["use_cache"], **named)
        hidden = dec[0]
        if scale is not None and getattr(self.config, scale, False):
            hidden = hidden * (self.model_dim ** -0.5)
        fields = {"past_key_values": getattr(dec, "past_key_values", None),
                  "decoder_hidden_states": getattr(dec, "hidden_states", None),
                  "decoder_attentions": getattr(dec, "attentions", None),
                  "cross_attentions": getattr(dec, "cross_attentions", None),
                  "encoder_last_hidden_state": enc.last_hidden_state, "encoder_hidden_states": enc.hidden_states,
                  "encoder_attentions": enc.attentions}
    loss = head.loss(hidden, shift_labels=labels.to(hidden.device), extra_bias=extra_bias)
    out = Seq2SeqLMOutput(loss=loss, logits=None, **fields)
    return out.to_tuple() if return_dict is False else out


def head_options_from_config(config) -> dict:
    """FusedLMHead options the known model families keep in their config: Gemma 2/3's
    final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling (logits are divided by it)."""
    options = {}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "final_logit_softcapping", None) is not None:
        options["softcap"] = float(text.final_logit_softcapping)
    if getattr(text, "logit_scale", None) is not None:
        options["logit_scale"] = float(text.logit_scale)
    if getattr(text, "logits_scaling", None) is not None:
        options["logit_scale"] = 1.0 / float(text.logits_scaling)
    return options
