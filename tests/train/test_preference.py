"""fastnlg train --objective dpo | simpo: preference pairs of the demo's data-to-text task (a report that states the
record against one that changes or drops a field). A 30-step DPO run raises the held-out preference accuracy
(0 at the start: policy = reference) and logs margin / accuracy; the task's DPO loss equals TRL's math on the
model's own materialised logits (loss and gradients, patched and unpatched); gradient accumulation is exact;
LoRA's reference is the adapter-disabled base (no copy); bad data and bad configs stop with a clear message."""
import json

import pytest
import torch
import torch.nn.functional as F

from fastnlg.demo import make_records, preference_pairs
from fastnlg.train import TrainConfig, train
from fastnlg.train.errors import ConfigError, DataError
from fastnlg.train.tasks import get as get_task
from fastnlg.train.tasks import preference
from tests.tiny_model import metrics


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rows = preference_pairs(make_records(500, seed=3), seed=1)
    paths = {"train": folder / "train.jsonl", "eval": folder / "eval.jsonl"}
    paths["train"].write_text("".join(json.dumps(r) + "\n" for r in rows[:400]))
    paths["eval"].write_text("".join(json.dumps(r) + "\n" for r in rows[400:]))
    return {k: str(v) for k, v in paths.items()}


def _cfg(pairs, out, **kw):
    base = dict(model="llama-tiny", objective="dpo", method="full", train_files=[pairs["train"]],
                eval_files=[pairs["eval"]], output_dir=str(out), max_steps=4, batch_size=8, learning_rate=1e-3,
                log_every=2, eval_every=100, save_every=100, max_length=128, progress=False, device="cpu",
                tensorboard=False)
    return TrainConfig.from_dict({**base, **kw})


def _quiet(*_):
    pass


def test_preference_pairs_change_one_field():
    for p in preference_pairs(make_records(50, seed=0), seed=0):
        assert p["chosen"] != p["rejected"] and p["prompt"].startswith("Record: ")


def test_dpo_run_raises_held_out_preference_accuracy(pairs, tmp_path):
    last = train(_cfg(pairs, tmp_path, max_steps=30, eval_every=15, log_every=5, learning_rate=1e-2), log=_quiet)
    rows = metrics(tmp_path)
    logged = [r for r in rows if "loss" in r]
    assert all({"reward_margin", "preference_accuracy"} <= set(r) for r in logged)
    evals = [r for r in rows if "eval_loss" in r]
    # at step 0 the policy is the reference: every reward is 0, accuracy 0, the loss log 2
    assert last["eval_preference_accuracy"] > 0.55 and last["eval_reward_margin"] > 0, evals
    assert evals[-1]["eval_loss"] < 0.69


def test_dpo_loss_equals_trl_math_on_materialised_logits():
    """The task's loss (backbone -> fused_linear_logprobs -> dpo_loss) against TRL's DPO on the model's own logits
    (log_softmax, gather, sums, -logsigmoid(beta delta)), with a fixed reference; loss and every gradient, on the
    unpatched and the patched model."""
    import transformers

    import fastnlg

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).double()
    ids = torch.randint(0, 61, (6, 11))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100  # a shorter completion
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ref = torch.randn(6, dtype=torch.float64) - 20
    cfg = TrainConfig(beta=0.2)

    def trl_math():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        y = labels[:, 1:]
        logp = logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)
        seq = logp.sum(-1)
        delta = (seq[:3] - ref[:3]) - (seq[3:] - ref[3:])
        return -F.logsigmoid(0.2 * delta).mean()

    task = preference.Preference("dpo")
    task._reference_logps = lambda model, batch: ref
    for patched in (False, True):
        if patched:
            fastnlg.patch(model)
        model.zero_grad()
        theirs = trl_math()
        theirs.backward()
        g_theirs = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ours = task.training_loss(model, batch, cfg, n_step=3)
        ours.backward()
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
        for a, b in zip((p.grad for p in model.parameters()), g_theirs):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_gradient_accumulation_is_exact_and_lora_reference_is_the_base(pairs, tmp_path):
    one = train(_cfg(pairs, tmp_path / "one", max_steps=2, log_every=1), log=_quiet)
    two = train(_cfg(pairs, tmp_path / "two", max_steps=2, log_every=1, batch_size=4, grad_accum=2), log=_quiet)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["reward_margin"] == pytest.approx(one["reward_margin"], abs=1e-5)  # (a small difference of sums)

    task = get_task("causal-lm", "dpo")
    calls = []
    real = preference.completion_logps
    import peft

    def spy(model, batch):
        calls.append(any(getattr(m, "disable_adapters", False) for m in model.modules()
                         if isinstance(m, peft.tuners.lora.LoraLayer)))
        return real(model, batch)

    preference.completion_logps = spy
    try:
        from fastnlg.train import trainer

        run, _, _ = trainer._setup(_cfg(pairs, tmp_path / "lora", method="lora"), trainer.Dist.single(), _quiet)
        batch, n = run.batches.next()
        task.training_loss(run.model, batch, run.cfg, n)
    finally:
        preference.completion_logps = real
    assert calls == [True, False] and task._reference is None  # the reference: adapters off; no copy made


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "chosen": "a"}, r"train.jsonl:2: .*field 'rejected' is missing"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, r"train.jsonl:2: chosen and rejected are the same"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}, r"train.jsonl:2: field 'score' is not used"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, r"train.jsonl:2: field 'chosen' is empty"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"train.jsonl:2: field 'prompt' must be a string"),
])
def test_bad_data_names_file_and_line(tmp_path, record, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        train(_cfg({"train": str(path), "eval": str(path)}, tmp_path / "out"), log=_quiet)


def test_bad_configs(pairs, tmp_path):
    with pytest.raises(ConfigError, match=r"objective='ppo' is not allowed: one of \('sft', 'dpo', 'simpo', 'orpo', "
                                          r"'kto', 'distill'\)"):
        _cfg(pairs, tmp_path, objective="ppo")
    with pytest.raises(ConfigError, match="preference objectives and distillation train causal LMs"):
        _cfg(pairs, tmp_path, task="seq2seq", model="t5-tiny")
    with pytest.raises(ConfigError, match="reference model .* is not in the checkpoints"):
        _cfg(pairs, tmp_path, resume=True)
    with pytest.raises(ConfigError, match="packing"):
        _cfg(pairs, tmp_path, packing=True)


def test_fastnlg_eval_reports_margin_and_accuracy_of_held_out_pairs(pairs, tmp_path, capsys):
    """`fastnlg eval` on preference pairs: against the adapter-disabled base for a LoRA run (the run's own last
    evaluation), against --reference for a full one, reference-free without either."""
    from fastnlg import cli

    last = train(_cfg(pairs, tmp_path / "lora", method="lora", max_steps=3, eval_every=3, learning_rate=5e-3),
                 log=_quiet)
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(tmp_path / "lora" / "base"), "--adapter", str(tmp_path / "lora" / "adapter"),
                     "--data", pairs["eval"], "--max-length", "128", "--out", str(tmp_path / "ev")]) == 0
    out = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert out["reference"] == "the base (adapter disabled)"
    for key in ("eval_loss", "eval_reward_margin", "eval_preference_accuracy"):
        assert out[key] == pytest.approx(last[key], rel=1e-4, abs=1e-6), key
    assert cli.main(["eval", "--model", str(tmp_path / "lora" / "base"), "--data", pairs["eval"],
                     "--max-length", "128", "--out", str(tmp_path / "free")]) == 0
    free = json.loads((tmp_path / "free" / "eval.json").read_text())
    assert free["reference"] == "none" and 0 <= free["eval_preference_accuracy"] <= 1
