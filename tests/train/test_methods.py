"""Every training method through PEFT's own modules (so adapters save and load in PEFT's format), patched and
unpatched; QLoRA on fastnlg's NF4 base where bitsandbytes' 4-bit needs CUDA; gradient checkpointing with the
checkpointed layer inputs offloaded; early stopping; TensorBoard logging; the config combinations refused."""
import os
import shutil
import sys
import types

import pytest
import torch
import transformers

from fastnlg.train import ConfigError, data, train
from fastnlg.train.evaluate import loss_metrics
from tests.tiny_model import losses, metrics, train_config

_cfg, _rows, _losses = train_config, metrics, losses


@pytest.mark.parametrize("method", ["qlora", "prompt-tuning", "prefix", "ia3", "adalora"])
def test_peft_method_trains_saves_and_reloads(tiny, tmp_path, method):
    """Patched and unpatched runs agree step by step; the saved adapter, loaded by plain PEFT on the base
    model (for QLoRA: on its NF4 base), gives the trainer's last eval loss."""
    import peft

    ours = _cfg(tiny, tmp_path / "p", method=method)
    ref = _cfg(tiny, tmp_path / "u", method=method, patch=False)
    train(ours, log=lambda *_: None)
    train(ref, log=lambda *_: None)
    a, b = _losses(ours.output_dir), _losses(ref.output_dir)
    assert len(a) == 4 and all(map(torch.isfinite, torch.tensor(a)))
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
    assert a[-1] != a[0]  # it trained

    tok = transformers.AutoTokenizer.from_pretrained(tiny["model"])
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "p" / "adapter"))
    if method == "qlora":
        from fastnlg.nn import NF4Linear, quantize_linears

        quantize_linears(loaded)
        assert sum(isinstance(m, NF4Linear) for m in loaded.modules()) == 14  # 7 linears x 2 layers, not the head
    samples, _ = data.load_samples(tiny["eval"], tok, 96)
    ev = loss_metrics(loaded, data.pad_rows(samples, tok.pad_token_id), tok.pad_token_id, 4, "cpu")
    last = [r for r in _rows(ours.output_dir) if "eval_loss" in r][-1]
    assert abs(ev["eval_loss"] - last["eval_loss"]) < 1e-4, (ev, last)


def test_qlora_adapter_is_a_lora_adapter(tiny, tmp_path):
    """QLoRA's adapter has exactly LoRA's keys and config (it loads on the full-precision base for merging)."""
    from safetensors.torch import load_file

    q = _cfg(tiny, tmp_path / "q", method="qlora", max_steps=1)
    lo = _cfg(tiny, tmp_path / "l", method="lora", max_steps=1)
    train(q, log=lambda *_: None)
    train(lo, log=lambda *_: None)
    keys = [sorted(load_file(os.path.join(c.output_dir, "adapter", "adapter_model.safetensors"))) for c in (q, lo)]
    assert keys[0] == keys[1] and len(keys[0]) == 28


def test_checkpointing_with_offload_gives_the_same_losses(tiny, tmp_path, monkeypatch):
    """Gradient checkpointing (reentrant, for the offload) and activation offload do not change the losses,
    and every decoder layer's input went through the offload hook."""
    shapes = []
    real = torch.autograd.graph.save_on_cpu

    class Counting(real):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def counted(t):
                shapes.append(tuple(t.shape))
                return pack(t)
            self.pack_hook = counted

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    plain = _cfg(tiny, tmp_path / "a", method="lora", max_steps=3)
    off = _cfg(tiny, tmp_path / "b", method="lora", max_steps=3, gradient_checkpointing=True,
               offload_activations=True)
    train(plain, log=lambda *_: None)
    assert shapes == []
    train(off, log=lambda *_: None)
    torch.testing.assert_close(torch.tensor(_losses(off.output_dir)), torch.tensor(_losses(plain.output_dir)),
                               rtol=1e-5, atol=1e-6)
    hidden = [s for s in shapes if s == (4, 96, 32)]  # (batch, max_length, hidden): the layer inputs
    assert len(hidden) >= 3 * 2, shapes  # steps x layers


def test_early_stopping(tiny, tmp_path):
    """With a learning rate too small to change fp32 weights, the eval loss never improves: patience 2
    stops the run after the third evaluation and keeps a checkpoint there."""
    logs = []
    cfg = _cfg(tiny, tmp_path, method="full", learning_rate=1e-30, max_steps=20, eval_every=1,
               early_stopping_patience=2, save_every=100)
    train(cfg, log=logs.append)
    evals = [r["step"] for r in _rows(cfg.output_dir) if "eval_loss" in r]
    assert evals == [1, 2, 3]
    assert any("early stopping at step 3" in m for m in logs)
    assert os.path.isdir(tmp_path / "checkpoint-3") and not os.path.exists(tmp_path / "checkpoint-20")


def test_tensorboard_logging_when_installed(tiny, tmp_path, monkeypatch):
    """The trainer logs every metric to a SummaryWriter when torch.utils.tensorboard imports (a stand-in
    here, so the test does not need the tensorboard package), and never needs it."""
    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("dir", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(_cfg(tiny, tmp_path / "tb", method="lora", max_steps=2, eval_every=2, tensorboard=True),
          log=lambda *_: None)
    assert calls[0] == ("dir", str(tmp_path / "tb" / "tensorboard")) and calls[-1] == ("close",)
    assert ("train/loss", 1) in calls and ("train/loss", 2) in calls and ("eval_loss", 2) in calls
    calls.clear()
    train(_cfg(tiny, tmp_path / "off", method="lora", max_steps=1, tensorboard=False), log=lambda *_: None)
    assert calls == []


@pytest.mark.parametrize("values, key", [
    ({"method": "prefix", "packing": True}, "packing"),
    ({"method": "lora", "offload_activations": True}, "offload_activations"),
    ({"optimizer": "adamw8bit", "device": "cpu"}, "optimizer"),
    ({"method": "adalora", "lora_r": 4, "adalora_target_r": 8}, "adalora_target_r"),
    ({"distributed": "zero3"}, "distributed"),
])
def test_impossible_combinations_are_refused(tiny, tmp_path, values, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(tiny, tmp_path, **values)


def test_prompt_methods_default_to_no_packing(tiny, tmp_path):
    assert _cfg(tiny, tmp_path, method="prompt-tuning").packing is False
    assert _cfg(tiny, tmp_path, method="lora").packing is True


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_bf16_runs_patched_as_unpatched(tiny, tmp_path, method):
    """precision bf16 (autocast; the frozen base of LoRA/QLoRA stored in bf16, full fine-tuning over fp32
    weights): the patched run trains like the unpatched one (bf16 rounding apart)."""
    ours = _cfg(tiny, tmp_path / "p", method=method, precision="bf16")
    ref = _cfg(tiny, tmp_path / "u", method=method, precision="bf16", patch=False)
    train(ours, log=lambda *_: None)
    train(ref, log=lambda *_: None)
    a, b = torch.tensor(_losses(ours.output_dir)), torch.tensor(_losses(ref.output_dir))
    assert torch.isfinite(a).all() and a[-1] < a[0]
    torch.testing.assert_close(a, b, rtol=2e-2, atol=0)


def test_builtin_config_trains_from_scratch(tiny, tmp_path):
    """--model llama-tiny: a tokenizer trained on the data and a seeded random Llama, saved to base/ after
    the data is valid; the loss falls; the base loads in plain Transformers; resume reuses it."""
    cfg = _cfg(tiny, tmp_path / "run", model="llama-tiny", method="full", max_steps=30, eval_every=10,
               save_every=10, learning_rate=3e-3)
    logs = []
    train(cfg, log=logs.append)
    assert any("built llama-tiny from scratch" in m for m in logs)
    evals = [r["eval_loss"] for r in _rows(cfg.output_dir) if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.5
    base = tmp_path / "run" / "base"
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    assert model.config.hidden_size == 64 and model.config.vocab_size == len(tok) <= 400
    shutil.rmtree(tmp_path / "run" / "checkpoint-30")
    again = _cfg(tiny, tmp_path / "run", model="llama-tiny", method="full", max_steps=30, eval_every=10,
                 save_every=10, learning_rate=3e-3, resume=True)
    before = _losses(cfg.output_dir)
    train(again, log=lambda *_: None)
    assert _losses(cfg.output_dir) == before


def test_unknown_model_name_is_refused(tiny, tmp_path):
    with pytest.raises(ConfigError, match="not a built-in config"):
        _cfg(tiny, tmp_path, model="llama-huge")


def test_fifty_step_lora_run_learns(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, method="lora", max_steps=50, eval_every=25, save_every=50, learning_rate=5e-3)
    train(cfg, log=lambda *_: None)
    rows = _rows(cfg.output_dir)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 50 and evals[1] < evals[0] and sum(losses[-10:]) < sum(losses[:10])


def test_training_token_accuracy_patched_and_unpatched(tiny, tmp_path):
    """Each log line has the training tokens' accuracy (argmax == next label, over the loss's tokens): read
    chunk by chunk inside the fused loss when patched, from the returned logits when not; the two agree, and
    the counts equal an argmax over materialised logits of the same model (checked on FusedLMHead directly)."""
    ours = _cfg(tiny, tmp_path / "p", method="lora", lora_dropout=0.0, grad_accum=2)
    ref = _cfg(tiny, tmp_path / "u", method="lora", lora_dropout=0.0, grad_accum=2, patch=False)
    train(ours, log=lambda *_: None)
    train(ref, log=lambda *_: None)
    a = [r["token_accuracy"] for r in _rows(ours.output_dir) if "loss" in r]
    b = [r["token_accuracy"] for r in _rows(ref.output_dir) if "loss" in r]
    assert len(a) == len(b) == 4 and all(0.0 <= x <= 1.0 for x in a)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=0.02, rtol=0)

    from fastnlg.nn import FusedLMHead

    torch.manual_seed(0)
    head = FusedLMHead(16, 40, chunk_size=5)
    head.accuracy_counts = torch.zeros(2)
    hidden, labels = torch.randn(3, 7, 16), torch.randint(0, 40, (3, 7))
    labels[0, :3] = -100
    logits = head(hidden)
    labels[1, 3] = int(logits[1, 2].argmax())  # a sure hit
    head.loss(hidden, labels)
    target = labels[:, 1:]
    hits = ((logits[:, :-1].argmax(-1) == target) & (target != -100)).sum()
    assert head.accuracy_counts.tolist() == [float(hits), float((target != -100).sum())]
