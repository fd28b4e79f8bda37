"""fastnlg.train: the thin fine-tuning library behind `fastnlg train | eval | generate | merge | demo`.

    from fastnlg.train import TrainConfig, train
    train(TrainConfig(model="./my-model", train_files=["data.jsonl"], method="lora", output_dir="out/run1"))

data.py (formats, validation, packing), config.py (TrainConfig), trainer.py (the loop), checkpoint.py
(atomic save / exact resume), evaluate.py (loss, perplexity, accuracy, BLEU, ROUGE, slot accuracy,
generation), distributed.py (DDP / FSDP2 under torchrun), builtin.py (models built from a config).
"""
from .config import ConfigError, TrainConfig  # noqa: F401
from .data import DataError  # noqa: F401
from .trainer import train  # noqa: F401
