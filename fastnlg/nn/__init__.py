"""nn.Module wrappers around fastnlg.ops, shaped like the Hugging Face modules they replace."""
from .lm_head import FusedLMHead, causal_lm_forward, head_options_from_config, seq2seq_lm_forward
from .lora import LoRALinear, UnsupportedLoRA, peft_lora_forward, peft_state
from .mlp import FastGatedMLP, FastGPT2MLP
from .nf4_linear import NF4Linear, quantize_linears
from .norms import FastLayerNorm, FastRMSNorm

__all__ = ["FastRMSNorm", "FastLayerNorm", "FastGatedMLP", "FastGPT2MLP", "FusedLMHead", "causal_lm_forward",
           "seq2seq_lm_forward", "head_options_from_config",
           "LoRALinear", "NF4Linear", "quantize_linears", "UnsupportedLoRA", "peft_lora_forward", "peft_state"]
