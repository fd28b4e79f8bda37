"""What fastnlg.patch recognises, as data (DESIGN.md §4.4): Transformers class names and module functions,
mapped to what replaces them. A family is listed only when tests/models/test_patch.py checks it against the
unpatched model; anything else is reported as skipped, never patched by guessing.
"""

# RMSNorm classes -> (offset of the scale, casting mode): Llama's w * x_hat.to(x.dtype) (x_hat rounded before
# the multiply), Gemma's ((1 + w) * x_hat).to(x.dtype) in fp32 (see fastnlg/ops/rms_norm.py).
RMS_NORMS = {
    "LlamaRMSNorm": (0.0, "llama"), "MistralRMSNorm": (0.0, "llama"), "Qwen2RMSNorm": (0.0, "llama"),
    "Qwen3RMSNorm": (0.0, "llama"), "GemmaRMSNorm": (1.0, "gemma"), "Gemma2RMSNorm": (1.0, "gemma"),
}

# Gated MLPs computing down_proj(act(gate_proj(x)) * up_proj(x)) -> the config field naming act.
GATED_MLPS = {
    "LlamaMLP": "hidden_act", "MistralMLP": "hidden_act", "Qwen2MLP": "hidden_act", "Qwen3MLP": "hidden_act",
    "GemmaMLP": "hidden_act", "Gemma2MLP": "hidden_activation",
}

# Causal LMs whose forward is "base model -> lm_head -> self.loss_function" (fastnlg.nn.causal_lm_forward)
# -> the attribute holding the head.
CAUSAL_LMS = {
    "LlamaForCausalLM": "lm_head", "MistralForCausalLM": "lm_head", "Qwen2ForCausalLM": "lm_head",
    "Qwen3ForCausalLM": "lm_head", "GemmaForCausalLM": "lm_head", "Gemma2ForCausalLM": "lm_head",
    "GPT2LMHeadModel": "lm_head",
}

# Modelling modules whose attention layers call the module-level apply_rotary_pos_emb(q, k, cos, sin,
# unsqueeze_dim=1) with rotate_half: fastnlg.ops.apply_rope computes the same.
ROPE_MODULES = (
    "transformers.models.llama.modeling_llama", "transformers.models.mistral.modeling_mistral",
    "transformers.models.qwen2.modeling_qwen2", "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.gemma.modeling_gemma", "transformers.models.gemma2.modeling_gemma2",
)

# PEFT LoRA layer classes run by fastnlg.nn.peft_lora_forward (base nn.Linear or bnb 4-bit NF4).
LORA_LAYERS = ("peft.tuners.lora.layer.Linear", "peft.tuners.lora.bnb.Linear4bit")
