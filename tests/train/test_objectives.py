"""fastnlg train --objective orpo | kto | distill (beside test_preference.py's dpo / simpo): each task's loss equals
the objective's math on the models' own materialised logits in fp64 (loss and gradients, unpatched and patched):
ORPO's per-example NLL minus beta log sigmoid(log odds); KTO with TRL's KL baseline from the completions cycled
by one in the micro-batch; distillation against TRL GKD's generalized_jsd_loss. Short runs log the objective's
figures, distillation lowers the held-out divergence and accumulates exactly, and bad data / configs stop with
a clear message."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

import fastnlg
from fastnlg.demo import make_records, preference_pairs
from fastnlg.train import TrainConfig, builtin, train
from fastnlg.train.data import IGNORE, Sample
from fastnlg.train.errors import ConfigError, DataError
from fastnlg.train.tasks import get as get_task
from tests.tiny_model import metrics

V = 61


def _llama(seed, hidden=32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).double()


def _token_logps(model, ids, mask, labels):
    """Per-token log p(label) of the model's own logits (B, T - 1), 0 where ignored; and the mask."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    y = labels[:, 1:]
    keep = y != IGNORE
    return logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * keep, keep


def _check_same(model, ours_fn, theirs_fn):
    """ours_fn() and theirs_fn() give the same loss and gradients, unpatched and then patched."""
    for patched in (False, True):
        if patched:
            fastnlg.patch(model)
        model.zero_grad()
        theirs = theirs_fn()
        theirs.backward()
        g_theirs = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ours = ours_fn()
        ours.backward()
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
        for a, b in zip((p.grad for p in model.parameters()), g_theirs):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    fastnlg.unpatch(model)


def test_orpo_loss_equals_its_math_on_materialised_logits():
    model = _llama(0)
    ids = torch.randint(0, V, (6, 11))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[1, 9:] = IGNORE  # a shorter chosen completion
    mask = (labels != IGNORE) | (torch.arange(11) < 4)
    batch = {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}
    beta = 0.3

    def theirs():
        logp, keep = _token_logps(model, ids, mask.long(), labels)
        mean = logp.sum(-1) / keep.sum(-1)
        chosen, rejected = mean[:3], mean[3:]
        log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
        return (-chosen - beta * F.logsigmoid(log_odds)).mean()

    task = get_task("causal-lm", "orpo")
    _check_same(model, lambda: task.training_loss(model, batch, TrainConfig(beta=beta), n_step=3), theirs)


def _kto_rows():
    torch.manual_seed(1)
    rows = []
    for i, (p, c) in enumerate([(4, 5), (3, 6), (5, 3), (4, 4), (2, 6)]):
        prompt, completion = torch.randint(0, V, (p,)).tolist(), torch.randint(0, V, (c,)).tolist()
        rows.append((Sample(prompt + completion, [IGNORE] * p + completion, f"x:{i}"), p, i % 2 == 0))
    return rows


def test_kto_loss_equals_trl_math_with_its_kl_baseline():
    """KTO on the task's collated micro-batch against the math built here from the rows: the KL rows are each
    prompt with the previous example's completion (TRL 1.16's KTO collator cycles completions by +1), the
    baseline z the clamped mean policy-minus-reference log-ratio of those, detached; the reference a fixed
    other model (as method=full's frozen copy)."""
    model, reference = _llama(0), _llama(7).requires_grad_(False)
    rows = _kto_rows()
    task = get_task("causal-lm", "kto")
    task.max_length = 64
    task._reference = reference
    batch = task.collate(rows, pad_id=0)
    beta, w_good, w_bad = 0.4, 1.0, 1.5
    cfg = TrainConfig(beta=beta, kto_desirable_weight=w_good, kto_undesirable_weight=w_bad)

    def seq_logps(m, samples):
        out = []
        for s in samples:
            ids = torch.tensor([s.ids])
            lab = torch.tensor([[IGNORE] + s.labels[1:]])
            out.append(_token_logps(m, ids, torch.ones_like(ids), lab)[0].sum())
        return torch.stack(out)

    def theirs():
        examples = [s for s, _, _ in rows]
        kl_rows = [Sample(s.ids[:k] + rows[i - 1][0].ids[rows[i - 1][1]:], [], "") for i, (s, k, _) in enumerate(rows)]
        for r, (_, k, _) in zip(kl_rows, rows):
            r.labels = [IGNORE] * k + r.ids[k:]
        with torch.no_grad():
            z = (seq_logps(model, kl_rows) - seq_logps(reference, kl_rows)).mean().clamp(min=0)
        assert z > 0  # (the baseline takes part)
        ratio = seq_logps(model, examples) - seq_logps(reference, examples)
        good = torch.tensor([label for _, _, label in rows])
        loss = torch.where(good, w_good * (1 - torch.sigmoid(beta * (ratio - z))),
                           w_bad * (1 - torch.sigmoid(beta * (z - ratio))))
        return loss.mean()

    _check_same(model, lambda: task.training_loss(model, batch, cfg, n_step=len(rows)), theirs)


@pytest.mark.parametrize("loss,beta,temperature", [("forward_kl", 0.0, 1.0), ("reverse_kl", 1.0, 1.0),
                                                   ("jsd", 0.3, 2.0)])
def test_distillation_loss_equals_trl_gkd_on_materialised_logits(loss, beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    student, teacher = _llama(0), _llama(3, hidden=48).requires_grad_(False)
    ids = torch.randint(0, V, (4, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels[2, 9:] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    n = int((labels[:, 1:] != IGNORE).sum())
    task = get_task("causal-lm", "distill")
    task.teacher = teacher
    cfg = TrainConfig(objective="distill", distill_loss=loss, distill_beta=0.3, distill_temperature=temperature)

    def theirs():
        s = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        return gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels[:, 1:], beta=beta, temperature=temperature)

    _check_same(student, lambda: task.training_loss(student, batch, cfg, n_step=n), theirs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("objectives")
    recs = make_records(300, seed=5)
    pairs = preference_pairs(recs, seed=1)
    kto = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 else p["rejected"], "label": bool(i % 2)}
           for i, p in enumerate(pairs)]
    sft = [{"input": r["input"], "output": r["output"]} for r in recs]
    paths = {}
    for name, rows in (("pairs", pairs), ("kto", kto), ("sft", sft)):
        for split, part in (("train", rows[:-40]), ("eval", rows[-40:])):
            paths[f"{name}_{split}"] = str(folder / f"{name}_{split}.jsonl")
            with open(paths[f"{name}_{split}"], "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in part)
    # a teacher: llama-small's shape, randomly initialised with its (tied) head scaled up so that its next-token
    # distributions are far from the student's near-uniform ones, and a tokenizer trained on the data
    from fastnlg.train.data import corpus

    tok = builtin.train_tokenizer(corpus([paths["sft_train"]]), builtin.CONFIGS["llama-tiny"]["vocab"])
    teacher = builtin.build_model(tok, builtin.CONFIGS["llama-small"], 128, seed=4)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)
    paths["teacher"] = str(folder / "teacher")
    teacher.save_pretrained(paths["teacher"])
    tok.save_pretrained(paths["teacher"])
    return paths


def _cfg(data, out, name, **kw):
    base = dict(model="llama-tiny", method="full", train_files=[data[f"{name}_train"]],
                eval_files=[data[f"{name}_eval"]], output_dir=str(out), max_steps=4, batch_size=8,
                learning_rate=1e-3, log_every=2, eval_every=100, save_every=100, max_length=128, progress=False,
                device="cpu", tensorboard=False)
    return TrainConfig.from_dict({**base, **kw})


def _quiet(*_):
    pass


@pytest.mark.parametrize("objective,name,keys", [
    ("orpo", "pairs", {"reward_margin", "preference_accuracy", "rewards_chosen", "rewards_rejected"}),
    ("kto", "kto", {"reward_margin", "rewards_chosen", "rewards_rejected", "kl"}),
])
def test_short_runs_log_the_objectives_figures(data, tmp_path, objective, name, keys):
    method = "lora" if objective == "kto" else "full"  # (kto's reference: the adapter-disabled base)
    last = train(_cfg(data, tmp_path, name, objective=objective, method=method, eval_every=4), log=_quiet)
    logged = [r for r in metrics(tmp_path) if "loss" in r]
    assert logged and all(keys <= set(r) for r in logged)
    assert {f"eval_{k}" for k in keys} - {"eval_preference_accuracy"} <= set(last)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)


def test_distill_run_lowers_the_divergence_and_accumulates_exactly(data, tmp_path):
    """A built-in student takes the teacher's tokenizer; 16 steps lower the held-out divergence; batch 8 equals
    4 x 2 accumulated (the loss over the step's target tokens)."""
    last = train(_cfg(data, tmp_path / "run", "sft", objective="distill", teacher=data["teacher"], max_steps=16,
                      eval_every=4, log_every=4, learning_rate=3e-3), log=_quiet)
    evals = [r["eval_loss"] for r in metrics(tmp_path / "run") if "eval_loss" in r]
    assert evals[-1] < 0.85 * evals[0], evals
    assert {"eval_ce_loss", "eval_perplexity", "eval_token_accuracy"} <= set(last)
    one = train(_cfg(data, tmp_path / "one", "sft", objective="distill", teacher=data["teacher"], max_steps=2,
                     log_every=1), log=_quiet)
    two = train(_cfg(data, tmp_path / "two", "sft", objective="distill", teacher=data["teacher"], max_steps=2,
                     log_every=1, batch_size=4, grad_accum=2), log=_quiet)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_bad_kto_data_names_file_and_line(data, tmp_path):
    for record, message in [({"prompt": "p", "completion": "a"}, r"kto.jsonl:2: .*field 'label' is missing"),
                            ({"prompt": "p", "completion": "a", "label": "yes"}, r"kto.jsonl:2: field 'label' must be"),
                            ({"prompt": "p", "completion": " ", "label": True}, r"kto.jsonl:2: field 'completion' is "),
                            ({"prompt": "p", "chosen": "a", "label": True}, r"kto.jsonl:2: .*'completion' is missing")]:
        path = tmp_path / "kto.jsonl"
        path.write_text(json.dumps({"prompt": "p", "completion": "a", "label": True}) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=message):
            train(_cfg({"kto_train": str(path), "kto_eval": str(path)}, tmp_path / "out", "kto", objective="kto"),
                  log=_quiet)


def test_bad_configs(data, tmp_path):
    with pytest.raises(ConfigError, match="batch_size=1 is not allowed: >= 2 with objective=kto"):
        _cfg(data, tmp_path, "kto", objective="kto", batch_size=1)
    with pytest.raises(ConfigError, match="teacher='' is not allowed: a causal-LM model folder"):
        _cfg(data, tmp_path, "sft", objective="distill")
    with pytest.raises(ConfigError, match="given only with objective=distill"):
        _cfg(data, tmp_path, "sft", teacher=data["teacher"])
    with pytest.raises(ConfigError, match="reference model .* is not in the checkpoints"):
        _cfg(data, tmp_path, "kto", objective="kto", resume=True)
    # a teacher whose tokenizer is not the student's
    other = builtin.save(str(tmp_path / "other"), builtin.train_tokenizer(["quite different words"] * 50, 300),
                         builtin.CONFIGS["llama-tiny"], 128)
    student = builtin.save(str(tmp_path / "student"), builtin.train_tokenizer(["some text here"] * 50, 300),
                           builtin.CONFIGS["llama-tiny"], 128)
    with pytest.raises(ConfigError, match="its tokenizer differs from the student's"):
        train(_cfg(data, tmp_path / "x", "sft", objective="distill", teacher=other, model=student), log=_quiet)
