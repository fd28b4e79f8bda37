"""The loop: exact accumulation, schedules, the NaN guard, patched vs unpatched losses, atomic checkpoints with
exact resume after a kill, and the metrics (BLEU / ROUGE against values computed by hand)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers

from fastnlg.train import TrainConfig, data, train
from fastnlg.train.evaluate import bleu, rouge
from fastnlg.train.setup import lr_lambda
from tests.tiny_model import losses, train_config


def _cfg(tiny, out, **kw):
    return train_config(tiny, out, **{"max_steps": 6, "eval_every": 3, "save_every": 3, "learning_rate": 1e-3, **kw})


_losses = losses


def test_accumulation_equals_one_large_batch(tiny):
    """Two micro-batches with num_items_in_batch = all their target tokens give the gradients of one batch."""
    tok = transformers.AutoTokenizer.from_pretrained(tiny["model"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]).double()
    samples, _ = data.load_samples(tiny["train"], tok, 96)
    rows = data.pad_rows(samples[:6], tok.pad_token_id)
    parts = [data.collate(rows[:2], tok.pad_token_id), data.collate(rows[2:], tok.pad_token_id)]
    n = sum(data.target_tokens(b) for b in parts)
    for b in parts:
        model(**b, num_items_in_batch=n, use_cache=False).loss.backward()
    acc = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    whole = data.collate(rows, tok.pad_token_id)
    model(**whole, use_cache=False).loss.backward()  # mean over the large batch's target tokens
    for a, p in zip(acc, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-12)


def test_schedules():
    cfg = TrainConfig(warmup_steps=4, max_steps=14, schedule="cosine")
    f = lr_lambda(cfg)
    assert [f(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == 1.0 and abs(f(9) - 0.5) < 1e-12 and abs(f(14)) < 1e-12
    cfg.schedule = "linear"
    assert abs(lr_lambda(cfg)(9) - 0.5) < 1e-12 and lr_lambda(cfg)(20) == 0.0


def test_patched_and_unpatched_runs_agree(tiny, tmp_path):
    """Same seed, same data: the LoRA loss curve with fastnlg.patch equals the plain one within fp32 rounding,
    and the outputs are all there."""
    ours = _cfg(tiny, tmp_path / "p", method="lora", learning_rate=1e-2)
    ref = _cfg(tiny, tmp_path / "u", method="lora", learning_rate=1e-2, patch=False)
    train(ours, log=lambda *_: None)
    train(ref, log=lambda *_: None)
    a, b = _losses(ours.output_dir), _losses(ref.output_dir)
    evals = [r["eval_loss"] for r in map(json.loads, open(os.path.join(ours.output_dir, "metrics.jsonl")))
             if "eval_loss" in r]
    assert len(a) == 6 and evals[-1] < evals[0]  # the held-out loss falls (train losses are of other batches)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
    for name in ("adapter/adapter_model.safetensors", "config.json", "patch_report.txt", "loss.png", "eval.png",
                 "checkpoint-6/trainable.safetensors", "checkpoint-3/optimizer.pt"):
        assert os.path.exists(os.path.join(ours.output_dir, name)), name


def test_nan_guard_stops_after_consecutive_bad_steps(tiny, tmp_path):
    with pytest.raises(FloatingPointError, match="2 non-finite steps in a row"):
        train(_cfg(tiny, tmp_path, method="full", learning_rate=1e30, max_grad_norm=1e38, max_bad_steps=2,
                   max_steps=20, save_every=1), log=lambda *_: None)


def test_kill_and_resume_is_exact(tiny, tmp_path):
    """A run killed (SIGKILL) mid-way and resumed gives the uninterrupted run's per-step losses bit for bit."""
    full = _cfg(tiny, tmp_path / "full", method="full", max_steps=30, save_every=2, eval_every=100)
    train(full, log=lambda *_: None)
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "fastnlg.cli", "train", "--model", tiny["model"], "--train-files", tiny["train"],
            "--eval-files", tiny["eval"], "--output-dir", str(out), "--max-length", "96", "--batch-size", "4",
            "--max-steps", "30", "--log-every", "1", "--eval-every", "100", "--save-every", "2", "--method", "full",
            "--learning-rate", "1e-3", "--progress", "false", "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint-4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-4").exists(), "the run ended before its fourth step"
    assert not (out / "checkpoint-30").exists()
    train(_cfg(tiny, out, method="full", max_steps=30, save_every=2, eval_every=100, resume=True), log=lambda *_: None)
    assert _losses(out) == _losses(full.output_dir)
    assert sorted(os.listdir(out)).count("checkpoint-30") == 1 and not any(n.startswith(".tmp") for n in os.listdir(out))
    assert len([n for n in os.listdir(out) if n.startswith("checkpoint-")]) == 2  # keep_checkpoints


def test_bleu_and_rouge_by_hand():
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    precisions = [5 / 6, 3 / 5, 2 / 4, 1 / 3]  # matched n-grams / hypothesis n-grams, n = 1..4; same length: BP 1
    expected = 100 * math.exp(sum(math.log(p) for p in precisions) / 4)
    assert abs(bleu([hyp], [ref]) - expected) < 1e-9
    r = rouge(["the cat sat"], ["the cat ran"])
    assert abs(r["rouge1"] - 200 / 3) < 1e-9 and abs(r["rouge2"] - 50) < 1e-9 and abs(r["rougeL"] - 200 / 3) < 1e-9
    assert abs(bleu([ref], [ref]) - 100.0) < 1e-9


def test_slot_accuracy_by_hand():
    from fastnlg.train.evaluate import slot_accuracy

    records = [{"city": "Oslo", "high": 4, "low": -4}, {"city": "Lima", "high": 14, "low": 1}]
    outputs = ["In OSLO it reaches 14 degrees and -4 at night.",  # city yes, high 4 no (only 14), low -4 yes
               "Lima: 14 to 21."]  # city yes, high 14 yes, low 1 no (only in 14 / 21)
    m = slot_accuracy(records, outputs)
    assert m["slot_accuracy_by_field"] == {"city": 100.0, "high": 50.0, "low": 50.0}
    assert abs(m["slot_accuracy"] - 100 * 4 / 6) < 1e-9
