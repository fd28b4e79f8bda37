"""Built-in model configs: `fastnlg train --model llama-small ...` trains a Llama-style model from scratch
(random initialisation, seeded) with a byte-level BPE tokenizer trained on the training data. Nothing is
downloaded; the demo builds its base model the same way. The model and tokenizer are saved to
`<output_dir>/base/` (reused on --resume), so eval, generate and merge take that folder as --model.

    llama-tiny    hidden 64,  2 layers, 4 heads, MLP 172,  vocabulary 400    (~0.1M parameters)
    llama-small   hidden 128, 4 layers, 4 heads, MLP 344,  vocabulary 800    (~0.9M)
    llama-base    hidden 512, 8 layers, 8 heads, MLP 1376, vocabulary 2000   (~26M)
"""
from __future__ import annotations

import os

CONFIGS = {
    "llama-tiny": dict(hidden=64, layers=2, heads=4, inter=172, vocab=400),
    "llama-small": dict(hidden=128, layers=4, heads=4, inter=344, vocab=800),
    "llama-base": dict(hidden=512, layers=8, heads=8, inter=1376, vocab=2000),
}


def train_tokenizer(texts: list, vocab: int):
    """A byte-level BPE tokenizer (pad, bos, eos specials) trained on `texts`; deterministic for given texts."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def build_model(tok, size: dict, max_length: int, seed: int = 0):
    """A randomly initialised (seeded) Llama-style causal LM for `tok`, with tied embeddings."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                                   num_attention_heads=size["heads"], num_key_value_heads=size["heads"] // 2,
                                   intermediate_size=size["inter"], max_position_embeddings=max_length,
                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def save(folder: str, tok, size: dict, max_length: int, seed: int = 0) -> str:
    """The model for `tok` and the tokenizer, saved as a Transformers model folder."""
    os.makedirs(folder, exist_ok=True)
    build_model(tok, size, max_length, seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
