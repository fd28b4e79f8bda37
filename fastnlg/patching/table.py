"""What fastnlg.patch recognises, as data (DESIGN.md §4.4): rules `(kind, names, fuse, options)` that the
patcher applies in one walk over the model. A family is rows only; a family is listed only when
tests/models/test_patch.py (decoders), test_encoders.py or test_seq2seq.py checks it against the unpatched
model. Anything else is reported as skipped, never patched by guessing.

- kind: what the report calls the change (norm, mlp, cross_entropy, rope, attention, lora, linear4bit);
  patch()'s keyword of the same name turns the kind off (linear4bit goes with lora).
- names: a module matches when its class name, or `module.ClassName` for a name with a dot, matches one of
  these (fnmatch patterns). Each module gets the first matching rule of each kind, in table order, so the
  catch-all rules at the end of a kind only see what no family row took.
- fuse: the builder that does it (fastnlg/patching/builders.py) and its options.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from . import builders as b


class Rule(NamedTuple):
    kind: str
    names: tuple
    fuse: Callable
    options: dict = {}


RULES = (
    # RMSNorm -> FastRMSNorm. Llama's casting: w * x_hat.to(x.dtype) (x_hat rounded before the multiply);
    # Gemma's: ((1 + w) * x_hat).to(x.dtype) in fp32 (see fastnlg/ops/rms_norm.py).
    Rule("norm", ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"), b.rms_norm,
         {"offset": 0.0, "casting_mode": "llama"}),
    Rule("norm", ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"), b.rms_norm,
         {"offset": 1.0, "casting_mode": "gemma"}),
    # BERT's post-LN sublayer outputs LayerNorm(dropout(dense(h)) + input) -> FastAddNormOutput (add_layer_norm).
    Rule("norm", ("BertSelfOutput", "BertOutput", "RobertaSelfOutput", "RobertaOutput", "XLMRobertaSelfOutput",
                  "XLMRobertaOutput"), b.add_norm_output),
    Rule("norm", ("transformers.models.distilbert.modeling_distilbert.TransformerBlock",), b.distilbert_block),
    # BART's post-LN layers (mBART and Pegasus normalise first: their LayerNorms are plain) -> their forward with
    # the residual LayerNorms on add_layer_norm and fc1's bias + GELU on fastnlg.ops.gelu.
    Rule("norm", ("BartEncoderLayer",), b.bart_layer, {"decoder": False}),
    Rule("norm", ("BartDecoderLayer",), b.bart_layer, {"decoder": True}),
    # T5's RMSNorm (variance in fp32; x_hat in the weight's dtype when that is half) -> FastT5LayerNorm.
    Rule("norm", ("T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm"), b.t5_norm),
    Rule("norm", ("torch.nn.modules.normalization.LayerNorm",), b.layer_norm),
    Rule("norm", ("*Norm",), b.unknown),

    # Gated MLPs down_proj(act(gate) * up) -> FastGatedMLP; `act` names the config field holding act.
    # Phi-3 computes gate and up in one projection, gate_up_proj, and splits it in halves (gate first).
    Rule("mlp", ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP"), b.gated_mlp, {"act": "hidden_act"}),
    Rule("mlp", ("Gemma2MLP", "Gemma3MLP"), b.gated_mlp, {"act": "hidden_activation"}),
    Rule("mlp", ("Phi3MLP",), b.gated_mlp, {"act": "hidden_act"}),
    # GPT-2: c_proj(gelu(c_fc(x))) over Conv1D projections -> FastGPT2MLP (c_fc's bias fused into the GELU).
    Rule("mlp", ("GPT2MLP",), b.gpt2_mlp),
    # BERT's intermediate layer act(dense(x)), a GELU -> FastDenseGELU (dense's bias fused into the GELU).
    Rule("mlp", ("BertIntermediate", "RobertaIntermediate", "XLMRobertaIntermediate"), b.dense_gelu),
    Rule("mlp", ("transformers.models.distilbert.modeling_distilbert.FFN",), b.distilbert_ffn),
    # ModernBERT: Wo(act(a) * g), (a, g) = Wi(x) halves -> FastModernBertMLP (fastnlg.ops.geglu).
    Rule("mlp", ("ModernBertMLP",), b.modernbert_mlp),
    # T5 v1.1 / Flan-T5 / mT5: wo(act(wi_0(x)) * wi_1(x)), a gated GELU -> FastT5GatedMLP (fastnlg.ops.geglu);
    # T5 v1.0's ReLU MLP (T5DenseActDense) stays: eager ReLU is one op each way.
    Rule("mlp", ("T5DenseGatedActDense", "MT5DenseGatedActDense", "UMT5DenseGatedActDense"), b.t5_gated_mlp),
    Rule("mlp", ("*MLP", "*Intermediate"), b.unknown),

    # Causal LMs whose forward is "base model -> lm_head -> self.loss_function" (fastnlg.nn.causal_lm_forward);
    # `head` is the attribute holding the lm_head.
    Rule("cross_entropy", ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                           "GPT2LMHeadModel"), b.cross_entropy, {"head": "lm_head"}),
    # Encoder heads (their loss is CrossEntropyLoss() on the head's logits): classifiers -> fastnlg.ops.cross_entropy;
    # masked LMs -> the masked rows through the head's transform and the fused loss (`head`: the LM head's path).
    Rule("cross_entropy", ("BertForTokenClassification", "RobertaForTokenClassification",
                           "XLMRobertaForTokenClassification", "DistilBertForTokenClassification",
                           "ModernBertForTokenClassification"),
         b.classification_loss, {"sequence": False}),
    Rule("cross_entropy", ("BertForSequenceClassification", "RobertaForSequenceClassification",
                           "XLMRobertaForSequenceClassification", "DistilBertForSequenceClassification",
                           "ModernBertForSequenceClassification"),
         b.classification_loss, {"sequence": True}),
    Rule("cross_entropy", ("BertForMaskedLM",), b.masked_lm_loss,
         {"head": "cls.predictions", "decoder": "cls.predictions.decoder"}),
    Rule("cross_entropy", ("RobertaForMaskedLM", "XLMRobertaForMaskedLM"), b.masked_lm_loss,
         {"head": "lm_head", "decoder": "lm_head.decoder"}),
    Rule("cross_entropy", ("DistilBertForMaskedLM",), b.masked_lm_loss, {"head": "", "decoder": "vocab_projector"}),
    Rule("cross_entropy", ("ModernBertForMaskedLM",), b.masked_lm_loss,  # (its loss_function takes num_items)
         {"head": "head", "decoder": "decoder", "num_items": True}),
    # Encoder-decoders: the decoder's hidden state through the fused loss against the (aligned) labels; T5 scales
    # it by d_model**-0.5 when its config says so (tied embeddings; mT5 in this Transformers does not), BART's
    # family adds final_logits_bias.
    Rule("cross_entropy", ("T5ForConditionalGeneration",), b.seq2seq_lm_loss,
         {"family": "t5", "scale": "scale_decoder_outputs"}),
    Rule("cross_entropy", ("MT5ForConditionalGeneration",), b.seq2seq_lm_loss, {"family": "t5"}),
    Rule("cross_entropy", ("UMT5ForConditionalGeneration",), b.seq2seq_lm_loss,
         {"family": "t5", "scale": "tie_word_embeddings"}),
    Rule("cross_entropy", ("BartForConditionalGeneration", "MBartForConditionalGeneration",
                           "PegasusForConditionalGeneration"), b.seq2seq_lm_loss, {"family": "bart"}),
    Rule("cross_entropy", ("*ForCausalLM", "*LMHeadModel", "*ForConditionalGeneration", "*ForTokenClassification",
                           "*ForSequenceClassification",
                           "*ForMaskedLM"), b.unknown),

    # Attention layers calling their modelling module's apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    # with rotate_half (Phi-3's with partial rotary): that function -> fastnlg.ops.apply_rope, once per module.
    Rule("rope", ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention",
                  "Gemma2Attention", "Gemma3Attention", "Phi3Attention", "ModernBertAttention"), b.rope),

    # T5's first-layer attention computes the relative position bias that every layer adds: compute_bias ->
    # fastnlg.nn.hf_attention.RelativePositionBias, run by relative_position_attention (the kind goes with
    # patch's `attention`; it is what lets the attention implementation be set on these families).
    Rule("attention", ("T5Attention", "MT5Attention", "UMT5Attention"), b.t5_relative_bias),
    # BART, mBART, Pegasus: self- and cross-attention through the attention interface, no argument fastnlg's
    # attention lacks (these models do not declare _supports_attention_backend; the row stands for the check).
    Rule("attention", ("BartAttention", "MBartAttention", "PegasusAttention"), b.attention_interface),

    # PEFT LoRA layers over nn.Linear, GPT-2's Conv1D or bitsandbytes NF4 -> fastnlg.nn.peft_lora_forward.
    Rule("lora", ("peft.tuners.lora.layer.Linear", "peft.tuners.lora.bnb.Linear4bit"), b.peft_lora),
    Rule("lora", ("peft.tuners.lora.*",), b.unknown_lora),
    Rule("linear4bit", ("bitsandbytes.nn.modules.Linear4bit",), b.bnb_4bit),
)


def class_names(kind: str | None = None) -> set:
    """The exact class names the family rows list (no patterns, no qualified names)."""
    return {n for r in RULES if kind in (None, r.kind) for n in r.names if "*" not in n and "." not in n}
