"""TRL's SFTTrainer with a patched model, in both orders (patch the model, then build the trainer; build
the trainer, then patch trainer.model), with packing and with a peft_config: the per-step losses equal the
unpatched run's, the LoRA layers run the fused op, and the loss path TRL installs stays TRL's (reported)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import fastnlg  # noqa: E402
import fastnlg.nn.lora as lora_module  # noqa: E402

from .test_patch import _model  # noqa: E402

TEXTS = [f"record {i}: the weather in city {i % 7} is {'cold' if i % 3 else 'warm'} today, {i * 3} degrees"
         for i in range(24)]


@pytest.fixture(autouse=True)
def _cpu_backends(backend_env):
    backend_env.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def tokenizer():
    from fastnlg.train.builtin import train_tokenizer

    return train_tokenizer(TEXTS, 61)


def _run(tokenizer, tmp_path, *, patch, packing, use_peft):
    """Per-step training losses of 4 SFT steps; patch None (reference), "before" or "after" the trainer."""
    model = _model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    report = fastnlg.patch(model) if patch == "before" else None
    args = trl.SFTConfig(output_dir=str(tmp_path / str(patch)), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, packing=packing,
                         max_length=32, save_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0)
    kw = {"peft_config": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                         lora_dropout=0.0)} if use_peft else {}
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(
        [{"text": t} for t in TEXTS]), processing_class=tokenizer, **kw)
    if patch == "after":
        report = fastnlg.patch(trainer.model)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], report, trainer


@pytest.mark.parametrize("patch,packing,use_peft", [("after", False, False), ("after", True, True),
                                                    ("before", True, True), ("before", False, False)])
def test_sft_trainer_with_a_patched_model(tokenizer, tmp_path, monkeypatch, patch, packing, use_peft):
    ref, _, _ = _run(tokenizer, tmp_path, patch=None, packing=packing, use_peft=use_peft)
    calls = []
    fused = lora_module.lora_linear
    monkeypatch.setattr(lora_module, "lora_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    ours, report, trainer = _run(tokenizer, tmp_path, patch=patch, packing=packing, use_peft=use_peft)
    model = trainer.model
    assert len(ours) == len(ref) == 4
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-4, atol=1e-5)
    assert fastnlg.is_patched(model)
    assert report.count("norm") == 5 and report.count("mlp") == 2 and report.count("attention") == 1
    if use_peft:  # the adapters PEFT added (before: as they were registered; after: by the patch) are fused
        forwards = 2 if trainer.args.gradient_checkpointing else 1  # (TRL's default: on, recomputed in backward)
        assert len(calls) == 4 * 2 * 3 * forwards
    if patch == "after":  # TRL put its own fused LM head on the model: its loss path stays
        assert any(e.what == "cross_entropy" and "trl" in e.detail for e in report.skipped)
    fastnlg.unpatch(model)


PAIRS = [{"prompt": f"record {i}: city {i % 7}", "chosen": f" the weather in city {i % 7} is warm, {i * 3} degrees",
          "rejected": f" the weather in city {(i + 1) % 7} is cold"} for i in range(16)]


def _dpo(tokenizer, tmp_path, *, patch, use_peft):
    """Per-step DPO losses and reward margins of 3 steps of TRL's DPOTrainer (its fused head: log-probs without
    logits), patched (fastnlg's op under TRL's head) or not."""
    torch.manual_seed(0)
    model = _model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    import copy

    ref = None if use_peft else copy.deepcopy(model)  # (an in-memory model has no path TRL could load it from)
    report = fastnlg.patch(model) if patch else None
    args = trl.DPOConfig(output_dir=str(tmp_path / f"dpo{patch}{use_peft}"), max_steps=3,
                         per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, report_to=[],
                         use_cpu=True, max_length=40, save_strategy="no", seed=0, data_seed=0, beta=0.2,
                         dataloader_num_workers=0, gradient_checkpointing=False)
    kw = {"peft_config": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         lora_dropout=0.0)} if use_peft else {}
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                             processing_class=tokenizer, **kw)
    swapped = type(trl.trainer.utils._ChunkedLogProbFunction).__name__ == "type" and \
        trl.trainer.utils._ChunkedLogProbFunction.__name__ == "FastnlgChunkedLogProb"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [h["loss"] for h in logs], [h["rewards/margins"] for h in logs], report, trainer, swapped


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_dpo_trainer_runs_its_fused_head_on_fastnlg(tokenizer, tmp_path, use_peft):
    """TRL's DPOTrainer on a patched model: its fused head (trl.trainer.utils._ChunkedLogProbFunction) runs
    fastnlg.ops.fused_linear_logprobs while the model is patched (reported), and the per-step losses and reward
    margins equal the unpatched run's (TRL's own kernel); unpatch puts TRL's function back."""
    original = trl.trainer.utils._ChunkedLogProbFunction
    ref_loss, ref_margin, _, _, swapped = _dpo(tokenizer, tmp_path, patch=False, use_peft=use_peft)
    assert not swapped
    loss, margin, report, trainer, swapped = _dpo(tokenizer, tmp_path, patch=True, use_peft=use_peft)
    assert swapped and any("TRL's fused LM head" in e.detail for e in report.patched)
    assert len(loss) == len(ref_loss) == 3
    # (the log-probs are sums over ~20 tokens of values near -6 and the rewards beta x their differences: fp32
    # summation order moves them by ~1e-5 relative, which Adam's steps carry on)
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), rtol=5e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(margin), torch.tensor(ref_margin), rtol=0, atol=1e-3)
    fastnlg.unpatch(trainer.model)
    del trainer
    import gc

    gc.collect()
    assert trl.trainer.utils._ChunkedLogProbFunction is original
