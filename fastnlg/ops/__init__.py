"""fastnlg's functional ops (DESIGN.md §3). Each has a `<op>_reference` in its module: the spec."""
from .add_layer_norm import add_layer_norm
from .attention import flash_attention
from .cross_entropy import cross_entropy
from .fused_linear_cross_entropy import fused_linear_cross_entropy
from .fused_linear_distillation_loss import fused_linear_distillation_loss
from .fused_linear_logprobs import fused_linear_logprobs
from .gelu import gelu
from .glu import geglu, swiglu
from .layer_norm import layer_norm
from .lora_linear import lora_linear
from .relative_position_attention import relative_position_attention
from .rms_norm import rms_norm
from .rope import apply_rope

__all__ = ["rms_norm", "layer_norm", "add_layer_norm", "apply_rope", "swiglu", "geglu", "gelu", "cross_entropy",
           "fused_linear_cross_entropy", "fused_linear_logprobs", "fused_linear_distillation_loss",
           "flash_attention", "relative_position_attention", "lora_linear"]
