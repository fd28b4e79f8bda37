"""The one load path: fastnlg.from_pretrained, the trainer (train/setup.py) and the command line (eval,
generate, merge) load a causal LM, its tokenizer, and the adapters and 4-bit base of QLoRA through these
functions.

    model, report = fastnlg.from_pretrained("path/to/model", load_in_4bit=True,
                                            lora={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})

4-bit is NF4 through bitsandbytes where it runs (CUDA with bitsandbytes installed: QLoRA as PEFT documents
it, double-quantised, prepared for k-bit training), else fastnlg's own NF4 (`fastnlg.nn.NF4Linear`, the
same format) on the frozen linear layers, after the adapters are attached.
"""
from __future__ import annotations

import importlib.util

import torch

from . import _quiet


def bitsandbytes_4bit_available(device: torch.device) -> bool:
    """Whether bitsandbytes' NF4 layers can hold the model: CUDA, with bitsandbytes installed."""
    return torch.device(device).type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def load_tokenizer(path: str, words: bool = False):
    """AutoTokenizer.from_pretrained(path), with EOS as the pad token where the tokenizer has none; words=True
    for pre-split words (token classification): byte-level BPE tokenizers (RoBERTa, GPT-2, ...) then add the
    prefix space they need to tokenise a word as it is tokenised inside a sentence."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    if words and _byte_level_bpe(tok) and not tok.init_kwargs.get("add_prefix_space"):
        tok = transformers.AutoTokenizer.from_pretrained(path, add_prefix_space=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(path: str, *, dtype: torch.dtype, device, bnb_4bit: bool = False, adapter: str | None = None,
                    auto_class: str = "AutoModelForCausalLM", **kwargs):
    """transformers.<auto_class>.from_pretrained(path) in `dtype` on `device` (a causal LM unless told);
    with bnb_4bit, its linear layers in bitsandbytes' NF4 (double-quantised, computing in `dtype`); with
    `adapter`, the PEFT adapter saved in that folder on top (PeftModel.from_pretrained)."""
    import transformers

    device = torch.device(device)
    cls = getattr(transformers, auto_class)
    if bnb_4bit:
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = cls.from_pretrained(path, quantization_config=q, device_map={"": device}, dtype=dtype, **kwargs)
    else:
        model = cls.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    if adapter:
        import peft

        with _quiet.peft_calls():
            model = peft.PeftModel.from_pretrained(model, adapter).to(device)
    return model


def _byte_level_bpe(tok) -> bool:
    """Whether the tokenizer is a byte-level BPE one (it takes add_prefix_space)."""
    return "add_prefix_space" in tok.init_kwargs or any(
        k in type(tok).__name__ for k in ("Roberta", "GPT2", "Bart", "Longformer", "Deberta"))


def load_causal_lm(path: str, **kwargs):
    """load_pretrained of a causal LM."""
    return load_pretrained(path, auto_class="AutoModelForCausalLM", **kwargs)


def load_config(path: str):
    import transformers

    return transformers.AutoConfig.from_pretrained(path)


def enable_checkpointing(model, *, use_reentrant: bool = False) -> None:
    """Gradient (activation) checkpointing on every decoder layer, under whichever name this Transformers
    version has (activation_checkpointing_enable from 5.2x on; the old name warns there). The reentrant form
    needs an input that requires grad, which it gets."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant:
        model.enable_input_require_grads()


def prepare_for_training(model, peft_config=None, *, four_bit: bool = False, gradient_checkpointing: bool = False,
                         use_reentrant: bool = False):
    """-> (model, names of the layers quantised to fastnlg's NF4). The QLoRA sequence in one place: a model
    loaded in bitsandbytes' 4 bits is prepared for k-bit training (with checkpointing, when asked, in the
    same form as below), else checkpointing is enabled directly; the PEFT adapters of `peft_config` are
    attached; `four_bit` without bitsandbytes quantises the frozen linear layers to NF4Linear after that
    (all Parameters frozen when there is no adapter: inference)."""
    bnb = getattr(model, "is_loaded_in_4bit", False)
    if bnb and peft_config is not None:
        import peft

        with _quiet.peft_calls():
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                         gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    elif gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=use_reentrant)
    if peft_config is not None:
        import peft

        with _quiet.peft_calls():
            model = peft.get_peft_model(model, peft_config)
    quantised = []
    if four_bit and not bnb:
        from .nn import quantize_linears

        if peft_config is None:
            model.requires_grad_(False)
        quantised = quantize_linears(model)
    return model, quantised


def lora_config(lora):
    """A peft.LoraConfig from a LoraConfig or a dict of its fields (task_type CAUSAL_LM unless given)."""
    import peft

    if isinstance(lora, peft.LoraConfig):
        return lora
    if not isinstance(lora, dict):
        raise TypeError(f"fastnlg.from_pretrained: lora must be a peft.LoraConfig or a dict, got {type(lora).__name__}")
    try:
        return peft.LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    except TypeError as exc:
        raise TypeError(f"fastnlg.from_pretrained: lora={lora}: {exc}") from None


def from_pretrained(path: str, *, load_in_4bit: bool = False, lora=None, dtype: torch.dtype | None = None,
                    device=None, gradient_checkpointing: bool = False, patch: bool = True, strict: bool = False,
                    **kwargs):
    """(model, report): the causal LM at `path` (a local folder; kwargs go to Transformers' from_pretrained).

    dtype: default bf16 on CUDA, fp32 on CPU. device: default CUDA when available. load_in_4bit: NF4 base
    weights (see the module docstring); without `lora` every linear layer but lm_head is frozen in 4 bits
    (inference). lora: a peft.LoraConfig or a dict of its fields; the adapters train, all else is frozen.
    gradient_checkpointing: on, in the form k-bit training needs. patch: fastnlg.patch(model, strict=strict)
    (report is None with patch=False)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_causal_lm(path, dtype=dtype, device=device,
                           bnb_4bit=load_in_4bit and bitsandbytes_4bit_available(device), **kwargs)
    model, _ = prepare_for_training(model, None if lora is None else lora_config(lora), four_bit=load_in_4bit,
                                    gradient_checkpointing=gradient_checkpointing)
    report = None
    if patch:
        from .patching import patch as _patch

        report = _patch(model, strict=strict)
    return model, report
