"""fastnlg train --task token-classification | sequence-classification | masked-lm on a tiny BERT (WordPiece
tokenizer trained on generated data): the runs learn, write their metrics and report, refuse bad data with
file and line, and refuse a model folder whose architecture does not fit the task."""
import json
import os

import pytest

from fastnlg import ner_data
from fastnlg.train import TrainConfig, train
from fastnlg.train.errors import ConfigError, DataError


@pytest.fixture(scope="session")
def enc(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    train_s, held_s = ner_data.ner_sentences(160, seed=0), ner_data.ner_sentences(24, seed=1, held_out=True)
    paths = {"ner_train": ner_data.write_conll(str(root / "train.conll"), train_s),
             "ner_eval": ner_data.write_token_jsonl(str(root / "eval.jsonl"), held_s),
             "cls_train": ner_data.write_jsonl(str(root / "cls_train.jsonl"), ner_data.sentiment_records(96, 0)),
             "cls_eval": ner_data.write_jsonl(str(root / "cls_eval.jsonl"), ner_data.sentiment_records(24, 1)),
             "mlm": ner_data.write_jsonl(str(root / "mlm.jsonl"),
                                         [{"text": " ".join(t)} for t, _ in train_s])}
    texts = [" ".join(t) for t, _ in train_s + held_s] + [r["text"] for r in ner_data.sentiment_records(120, 0)]
    paths["model"] = ner_data.build_tiny_bert(str(root / "bert"), texts)
    return paths


def _cfg(enc, out, kind, **kw):
    """A config of task `kind` on its generated files (kw on top, `task` too)."""
    files = {"token-classification": ("ner_train", "ner_eval"), "sequence-classification": ("cls_train", "cls_eval"),
             "masked-lm": ("mlm", None)}[kind]
    base = dict(task=kind, model=enc["model"], train_files=[enc[files[0]]],
                eval_files=[enc[files[1]]] if files[1] else [], output_dir=str(out), method="full", max_steps=30,
                batch_size=8, learning_rate=3e-3, log_every=5, eval_every=15, save_every=30, max_length=48,
                progress=False, device="cpu", tensorboard=False, warmup_steps=0)
    return TrainConfig.from_dict({**base, **kw})


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_token_classification_learns_and_reports(enc, tmp_path):
    last = train(_cfg(enc, tmp_path, "token-classification", max_steps=60, learning_rate=1e-2), log=lambda *_: None)
    rows = _metrics(tmp_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    # (a random-init 2-layer model, 60 steps, names never seen in training: F1 from 0 to about 0.3)
    assert last["eval_f1"] > 0.2 and set(last["eval_per_type"]) == {"PER", "ORG", "LOC"}, last
    with open(tmp_path / "model" / "config.json") as f:
        id2label = json.load(f)["id2label"]
    assert [id2label[str(i)] for i in range(7)] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    report = (tmp_path / "report.md").read_text()
    assert "| PER |" in report and "f1" in report
    assert "FastAddNormOutput" in (tmp_path / "patch_report.txt").read_text()


def test_sequence_classification_learns_and_lora_runs(enc, tmp_path):
    # (a random-init BERT finds the one word that decides after ~80 steps, then fits at once)
    last = train(_cfg(enc, tmp_path / "full", "sequence-classification", max_steps=120, eval_every=60),
                 log=lambda *_: None)
    assert last["eval_accuracy"] >= 0.9 and set(last["eval_per_class"]) == {"negative", "positive"}, last
    assert "| positive |" in (tmp_path / "full" / "report.md").read_text()
    # LoRA (PEFT's SEQ_CLS: the classifier trained in full): the run and the adapter it saves
    train(_cfg(enc, tmp_path / "lora", "sequence-classification", method="lora", max_steps=3), log=lambda *_: None)
    with open(tmp_path / "lora" / "adapter" / "adapter_config.json") as f:
        saved = json.load(f)
    assert saved["task_type"] == "SEQ_CLS" and "classifier" in (saved["modules_to_save"] or [])


def test_class_weights(enc, tmp_path):
    """class_weights (one per label, in label order) weight the patched loss; a wrong count and --no-patch are
    refused."""
    first = {}
    for name, weights in (("plain", []), ("uniform", ["2"] * 7), ("no_o", ["0"] + ["1"] * 6)):
        train(_cfg(enc, tmp_path / name, "token-classification", max_steps=1, log_every=1, class_weights=weights),
              log=lambda *_: None)
        first[name] = _metrics(tmp_path / name)[0]["loss"]
    assert first["uniform"] == pytest.approx(first["plain"], rel=1e-5)  # a weighted mean: uniform weights cancel
    assert abs(first["no_o"] - first["plain"]) > 1e-3
    with pytest.raises(ConfigError, match=r"class_weights=.* one weight per label, 7"):
        train(_cfg(enc, tmp_path / "bad", "token-classification", class_weights=["1", "2"]), log=lambda *_: None)
    with pytest.raises(ConfigError, match="class_weights.*patch on"):
        _cfg(enc, tmp_path / "bad2", "token-classification", class_weights=["1"] * 7, patch=False)


def test_qlora_token_classification(enc, tmp_path):
    """QLoRA on an encoder: the frozen linear layers in NF4 (fastnlg's NF4Linear on CPU), the LoRA layers over
    them fused (lora_linear), the classifier trained in full."""
    logs = []
    train(_cfg(enc, tmp_path, "token-classification", method="qlora", max_steps=3), log=logs.append)
    assert any("quantised to NF4" in line for line in logs), logs
    report = (tmp_path / "patch_report.txt").read_text()
    assert "-> lora_linear" in report and "FastAddNormOutput" in report, report


def test_masked_lm_trains_on_the_masked_tokens(enc, tmp_path):
    last = train(_cfg(enc, tmp_path, "masked-lm", max_steps=20, eval_fraction=0.1), log=lambda *_: None)
    rows = [r for r in _metrics(tmp_path) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] and 1 < last["eval_perplexity"] < 400, (rows, last)


def test_labels_given_fix_the_label_set(enc, tmp_path):
    labels = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
    train(_cfg(enc, tmp_path, "token-classification", max_steps=2, labels=labels), log=lambda *_: None)
    with open(tmp_path / "model" / "config.json") as f:
        assert json.load(f)["label2id"] == {n: i for i, n in enumerate(labels)}
    with pytest.raises(DataError, match=r"train.conll:\d+: label 'B-LOC' is not in the label set from --labels"):
        train(_cfg(enc, tmp_path / "b", "token-classification", labels=labels[:5]), log=lambda *_: None)


@pytest.mark.parametrize("name,content,error", [
    ("tags.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', r"tags.jsonl:1: 1 tags for 2 tokens"),
    ("empty.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": [], "tags": []}\n', r"empty.jsonl:2: empty sentence"),
    ("notag.conll", "Anna B-PER\nsaid\n", r"notag.conll:2: token 'said' has no tag"),
    ("field.jsonl", '{"tokens": ["a"], "tags": ["O"], "lang": "en"}\n', r"field.jsonl:1: field 'lang' is not used"),
])
def test_bad_token_data_names_file_and_line(enc, tmp_path, name, content, error):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=error):
        train(_cfg(enc, tmp_path / "out", "token-classification", train_files=[str(path)]), log=lambda *_: None)
    assert not (tmp_path / "out").exists()  # nothing written before the data is valid


def test_task_and_architecture_must_fit(enc, tmp_path, tiny):
    with pytest.raises(ConfigError, match=r"is an encoder \(bert.*use --task token-classification"):
        train(_cfg(enc, tmp_path, "masked-lm", task="causal-lm", train_files=[enc["mlm"]]), log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"task='masked-lm' is not allowed: .* \(llama\) has no masked-LM head"):
        train(_cfg(enc, tmp_path, "masked-lm", model=tiny["model"]), log=lambda *_: None)
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "a good day", "label": "positive"}\n')
    with pytest.raises(DataError, match=r"labelled.jsonl:1: field 'label' is not used by --task causal-lm.*"
                                        r"--task sequence-classification"):
        train(TrainConfig.from_dict(dict(model=tiny["model"], train_files=[str(labelled)], output_dir=str(tmp_path / "c"),
                                         device="cpu", progress=False, tensorboard=False)), log=lambda *_: None)


def test_seqeval_metrics_by_hand():
    """Entity-level scores as seqeval defines them: 2 gold entities, 2 predicted, 1 exact match."""
    from fastnlg.train.tasks.metrics import entity_metrics

    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"]]
    m = entity_metrics(gold, pred)
    assert m["eval_precision"] == 0.5 and m["eval_recall"] == 0.5 and m["eval_f1"] == 0.5
    assert m["eval_per_type"]["PER"]["f1-score"] == 1.0 and m["eval_per_type"]["LOC"]["recall"] == 0.0
    assert m["eval_token_accuracy"] == 0.75


def test_cli_train_eval_predict(enc, tmp_path, capsys):
    """The commands on a token-classification model: train, eval (the report table), predict (entities with
    their spans); a masked LM's train and eval; a sequence classifier's predict (label and probability)."""
    from fastnlg import cli
    from fastnlg.train import tasks

    assert cli.TASKS == tasks.NAMES
    common = ["--model", enc["model"], "--method", "full", "--batch-size", "8", "--progress", "false", "--device", "cpu",
              "--tensorboard", "false", "--learning-rate", "1e-2"]
    rc = cli.main(["train", "--task", "token-classification", "--train-files", enc["ner_train"], "--eval-files",
                   enc["ner_eval"], "--output-dir", str(tmp_path / "ner"), "--max-steps", "40", "--tag-column", "-1",
                   *common])
    assert rc == 0 and (tmp_path / "ner" / "report.md").exists()
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(tmp_path / "ner" / "model"), "--data", enc["ner_eval"]]) == 0
    out = capsys.readouterr().out
    assert "| PER |" in out and "| LOC |" in out and "f1 " in out
    assert cli.main(["predict", "--model", str(tmp_path / "ner" / "model"), "--text",
                     "Greta Fischer joined Riverside Bank in Leeds ."]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Greta Fischer") and all(line.startswith("  ") for line in out[1:]), out
    for line in out[1:]:
        if "(no entities)" not in line:
            kind, span, text, p = line.split("\t")
            start, end = map(int, span.strip("[]").split(":"))
            assert kind.strip() in ("PER", "ORG", "LOC") and text.strip("'") == out[0][start:end] and 0 < float(p) <= 1
    rc = cli.main(["train", "--task", "masked-lm", "--train-files", enc["mlm"], "--eval-fraction", "0.1",
                   "--output-dir", str(tmp_path / "mlm"), "--max-steps", "2", *common])
    capsys.readouterr()
    assert rc == 0 and cli.main(["eval", "--model", str(tmp_path / "mlm" / "model"), "--data", enc["mlm"]]) == 0
    assert "masked-token accuracy" in capsys.readouterr().out
    rc = cli.main(["train", "--task", "sequence-classification", "--train-files", enc["cls_train"], "--eval-files",
                   enc["cls_eval"], "--output-dir", str(tmp_path / "cls"), "--max-steps", "2", *common])
    capsys.readouterr()
    assert rc == 0 and cli.main(["predict", "--model", str(tmp_path / "cls" / "model"), "--text", "The hotel was great ."]) == 0
    label, p, text = capsys.readouterr().out.strip().split("\t")
    assert label in ("positive", "negative") and 0.5 <= float(p) <= 1 and text == "The hotel was great ."


@pytest.mark.slow
def test_ner_demo_quick(tmp_path):
    """fastnlg demo --task ner --quick: entity F1 rises by fine-tuning (MiniLM, or the tiny BERT fallback), and
    the report has the per-type table and the side-by-side ratio."""
    from fastnlg import demo_ner

    s = demo_ner.run(str(tmp_path), quick=True, device="cpu")
    assert s["after"]["eval_f1"] > s["before"]["eval_f1"] + 0.3, s
    report = (tmp_path / "report.md").read_text()
    assert "| PER |" in report and "side by side" in report and (tmp_path / "f1_by_type.png").exists()


def test_config_refuses_what_the_encoder_tasks_cannot_run(enc, tmp_path):
    for kw, error in ((dict(task="ner"), r"task='ner' is not allowed: one of"),
                      (dict(packing=True), r"packing=True is not allowed: false with task=token-classification"),
                      (dict(method="prompt-tuning"), r"method='prompt-tuning' is not allowed"),
                      (dict(model="llama-tiny"), r"model='llama-tiny' is not allowed: a local model folder"),
                      (dict(class_weights=["x"]), r"class_weights=\['x'\] is not allowed: numbers >= 0")):
        with pytest.raises(ConfigError, match=error):
            _cfg(enc, tmp_path, "token-classification", **kw)
    with pytest.raises(ConfigError, match=r"mlm_probability=1.5 is not allowed"):
        _cfg(enc, tmp_path, "masked-lm", mlm_probability=1.5)
