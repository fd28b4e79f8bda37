"""What `fastnlg train --task` trains: each task says which model class it loads (and which architectures
fit), how it reads and checks its data, how rows become batches, and how it is evaluated.

    causal-lm                (default) next-token loss on text, prompt/completion, chat, data-to-text
    token-classification     NER-style tagging: CoNLL or {"tokens", "tags"}; entity-level P/R/F1 (seqeval)
    sequence-classification  {"text", ["text_pair",] "label"}; accuracy, macro-F1, per-class report
    masked-lm                {"text"} (or .txt), 15% of the tokens masked (80/10/10); loss, perplexity, accuracy
    seq2seq                  encoder-decoders: {"source", "target"} (or document/summary, input/output, records);
                             loss, perplexity, token accuracy; BLEU / ROUGE through generate in `fastnlg eval`
    --objective dpo | simpo | orpo   causal LMs on preference pairs {"prompt", "chosen", "rejected"}
                             (tasks/preference.py); kto on {"prompt", "completion", "label"} (tasks/kto.py)
    --objective distill      causal LMs on the causal-lm data, against --teacher (tasks/distill.py)

The trainer works through the Task interface below; tasks/causal_lm.py, classification.py, masked_lm.py and
seq2seq.py implement it.
"""
from __future__ import annotations

NAMES = ("causal-lm", "token-classification", "sequence-classification", "masked-lm", "seq2seq")


class Task:
    """A task's hooks (every method gets the run's config; rows are dicts of tensors)."""

    name: str = ""
    auto_class: str = ""  # the transformers Auto class the model folder is loaded with
    peft_task_type: str | None = None
    token_accuracy: bool = False  # whether the training log counts next-token accuracy (causal LMs)

    def check_model(self, config, path: str) -> None:
        """A ConfigError when the folder's architecture does not fit the task (naming the task that fits)."""

    def load_kwargs(self, cfg, tok, model_config) -> dict:
        """Extra from_pretrained arguments (the label set of a classifier); may read the data."""
        return {}

    def configure(self, model, cfg) -> None:
        """After the model is loaded: what the task sets on it (a classifier's class weights)."""

    def corpus(self, paths) -> list:
        """The texts of the training files, for a built-in config's tokenizer (train/builtin.py)."""
        from .. import data

        return data.corpus(paths)

    def rows(self, cfg, tok, dist) -> tuple[list, list, str]:
        """-> (training rows, held-out rows, a description of the data); DataError on bad data."""
        raise NotImplementedError

    def held_out(self, cfg, tok) -> list:
        """The rows of cfg.eval_files alone, for `fastnlg eval` (after load_kwargs)."""
        raise NotImplementedError

    def prepare(self, rows: list) -> list:
        """The global micro-batch's rows before counting and sharding (masked LM masks here)."""
        return rows

    def count(self, rows: list) -> int:
        """Target tokens (or examples) of rows, for the step's exact loss scaling (here: the labels not ignored)."""
        from ..data import IGNORE

        return sum(int((r["labels"] != IGNORE).sum()) for r in rows)

    def collate(self, rows: list, pad_id: int) -> dict:
        raise NotImplementedError

    def batch_tokens(self, batch: dict) -> int:
        """Tokens a batch feeds the model (the training log's tokens/s)."""
        return int(batch["input_ids"].numel())

    aligned: bool = False  # whether the model's logits line up with its labels (seq2seq) or predict the next token

    def token_hits(self, logits, labels):
        """[correct, counted] target tokens of an unpatched model's training logits."""
        from ..evaluate import token_hits

        return token_hits(logits, labels, self.aligned)

    def training_loss(self, model, batch: dict, cfg, n_step: int):
        """The step's share of the loss for a task that computes its own (a preference objective), or None:
        the model's forward computes it (forward_kwargs)."""
        return None

    def train_stats(self, dist) -> dict:
        """What the task adds to a training log line since the last one (a preference objective's reward margin)."""
        return {}

    def forward_kwargs(self, n_step: int) -> dict:
        """What the training forward gets besides the batch: None means the task scales the model's mean
        loss by its batch's share of the step's targets (local_count)."""
        return None

    def local_count(self, batch: dict):
        """count() of a collated batch, as a device tensor (no host read in the training step)."""
        from ..data import IGNORE

        return (batch["labels"] != IGNORE).sum()

    @staticmethod
    def eval_batches(model, rows: list, collate, batch_size: int, device):
        """(rows of the batch, the batch on `device`, the model's output) over `rows`, in eval mode under
        no_grad; the model's training mode comes back afterwards."""
        import torch

        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(rows), batch_size):
                    chunk = rows[i:i + batch_size]
                    batch = {k: v.to(device) for k, v in collate(chunk).items()}
                    yield chunk, batch, model(**batch)
        finally:
            model.train(was)

    def evaluate(self, model, rows: list, tok, cfg, device, dist) -> dict:
        """Held-out metrics, with eval_loss (early stopping) among them."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        return f"eval loss {metrics['eval_loss']:.4f}"

    def report(self, metrics: dict) -> str:
        """report.md's task section (markdown) for the last evaluation."""
        return ""


def of_model(config) -> str:
    """The task a saved model was trained for, from its architecture (a causal LM when nothing else fits)."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in (("ForTokenClassification", "token-classification"),
                             ("ForSequenceClassification", "sequence-classification"), ("ForMaskedLM", "masked-lm")):
            if arch.endswith(suffix):
                return task
    return "causal-lm"


def load(cfg, device, *, adapter: str | None = None, config=None):
    """(task, model in fp32 on `device`, tokenizer) of cfg.model for cfg.task, outside a training run (eval,
    predict, the demo): the task reads cfg's files and checks their labels against the label set
    (load_kwargs); `config` (default: cfg.model's) is the config that label set comes from, e.g. an adapter
    folder's; `adapter` goes on top."""
    import torch

    from ...loading import load_config, load_pretrained, load_tokenizer

    task = get(cfg.task, cfg.objective)
    tok = load_tokenizer(cfg.model, words=cfg.task == "token-classification")
    kwargs = task.load_kwargs(cfg, tok, config if config is not None else load_config(cfg.model))
    model = load_pretrained(cfg.model, dtype=torch.float32, device=device, adapter=adapter, auto_class=task.auto_class,
                            **kwargs)
    return task, model, tok


def get(name: str, objective: str = "sft") -> Task:
    """The task `name` trains, under `objective` (sft, or a preference objective of a causal LM)."""
    from .causal_lm import CausalLM
    from .classification import SequenceClassification, TokenClassification
    from .masked_lm import MaskedLM
    from .seq2seq import Seq2Seq

    if objective == "kto":
        from .kto import KTO

        return KTO()
    if objective == "distill":
        from .distill import Distill

        return Distill()
    if objective != "sft":
        from .preference import Preference

        return Preference(objective)

    tasks = {"causal-lm": CausalLM, "token-classification": TokenClassification,
             "sequence-classification": SequenceClassification, "masked-lm": MaskedLM, "seq2seq": Seq2Seq}
    return tasks[name]()
