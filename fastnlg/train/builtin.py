"""Built-in model configs: `fastnlg train --model llama-small ...` trains a Llama-style model from scratch
(random initialisation, seeded) with a byte-level BPE tokenizer trained on the training data. Nothing is
downloaded; the demo builds its base model the same way. The model and tokenizer are saved to
`<output_dir>/base/` (reused on --resume), so eval, generate and merge take that folder as --model.

    llama-tiny    hidden 64,  2 layers, 4 heads, MLP 172,  vocabulary 400    (~0.1M parameters)
    llama-small   hidden 128, 4 layers, 4 heads, MLP 344,  vocabulary 800    (~0.9M)
    llama-base    hidden 512, 8 layers, 8 heads, MLP 1376, vocabulary 2000   (~26M)

Encoder-decoders (--task seq2seq), T5 with its relative position bias (32 buckets, max distance 128):
    t5-tiny       T5 v1.1 / Flan-T5 style: d_model 64, 2 + 2 layers, 4 heads of 16, gated-GELU MLP 128,
                  untied head, vocabulary 400                                        (~0.2M)
    t5-small      t5-small's shape (T5 v1.0): d_model 512, 6 + 6 layers, 8 heads of 64, ReLU MLP 2048,
                  tied embeddings (the decoder output scaled by d_model**-0.5), vocabulary 2000   (~36M)
"""
from __future__ import annotations

import os

CONFIGS = {
    "llama-tiny": dict(hidden=64, layers=2, heads=4, inter=172, vocab=400),
    "llama-small": dict(hidden=128, layers=4, heads=4, inter=344, vocab=800),
    "llama-base": dict(hidden=512, layers=8, heads=8, inter=1376, vocab=2000),
    "t5-tiny": dict(arch="t5", hidden=64, layers=2, heads=4, head_dim=16, inter=128, vocab=400,
                    ff="gated-gelu", tied=False),
    "t5-small": dict(arch="t5", hidden=512, layers=6, heads=8, head_dim=64, inter=2048, vocab=2000, ff="relu",
                     tied=True),
}
TASKS = {"llama": "causal-lm", "t5": "seq2seq"}  # what each architecture trains for (--task)


def task_of(name: str) -> str:
    """The task a built-in config trains for."""
    return TASKS[CONFIGS[name].get("arch", "llama")]


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
    """A randomly initialised (seeded) model for `tok`: a Llama-style causal LM with tied embeddings, or a
    T5 (decoder start = pad, as T5's)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if size.get("arch") == "t5":
        cfg = transformers.T5Config(vocab_size=len(tok), d_model=size["hidden"], d_kv=size["head_dim"],
                                    d_ff=size["inter"], num_layers=size["layers"], num_heads=size["heads"],
                                    feed_forward_proj=size["ff"], tie_word_embeddings=size["tied"],
                                    dropout_rate=size.get("dropout", 0.1),
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                    decoder_start_token_id=tok.pad_token_id)
        return transformers.T5ForConditionalGeneration(cfg)
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
