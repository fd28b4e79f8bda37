"""fastnlg train --task seq2seq: T5 built from scratch (the t5-tiny built-in) on the demo's data-to-text records and
on {"source", "target"} pairs; the run learns, its fused-loss steps equal the unpatched ones, gradient
accumulation is exact, the training log counts token accuracy; bad data stops with file and line; the task and
the model's architecture must fit; the commands (train, eval with BLEU/ROUGE through generate, generate, merge)."""
import json
import re

import pytest
import torch
import transformers

from fastnlg import cli
from fastnlg.train import TrainConfig, train
from fastnlg.train.errors import ConfigError, DataError
from fastnlg.train.tasks import seq2seq
from tests.tiny_model import losses, metrics


def _cfg(tiny, out, **kw):
    base = dict(task="seq2seq", model="t5-tiny", train_files=[tiny["train"]], eval_files=[tiny["eval"]],
                output_dir=str(out), method="full", max_steps=4, batch_size=8, learning_rate=3e-3, log_every=1,
                eval_every=4, save_every=4, max_length=96, progress=False, device="cpu", tensorboard=False)
    return TrainConfig.from_dict({**base, **kw})


def _quiet(*_):
    pass


def test_trains_from_scratch_and_learns(tiny, tmp_path):
    last = train(_cfg(tiny, tmp_path, max_steps=40, eval_every=20, log_every=5, learning_rate=1e-2), log=_quiet)
    lost = losses(tmp_path)
    assert lost[-1] < 0.6 * lost[0], lost
    evals = [r for r in metrics(tmp_path) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and 0 < last["eval_token_accuracy"] <= 1
    assert all(0 <= r["token_accuracy"] <= 1 for r in metrics(tmp_path) if "loss" in r)
    report = (tmp_path / "patch_report.txt").read_text()
    assert "FusedLMHead + seq2seq_lm_forward" in report and "relative_position_attention" in report
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"] and config["feed_forward_proj"] == "gated-gelu"


def test_patched_steps_equal_unpatched_and_accumulation_is_exact(tiny, tmp_path, monkeypatch):
    """The fused loss (no logits) gives the unpatched run's losses; two micro-batches of 4 give the steps of
    one batch of 8 (the mean over the step's target tokens, not the mean of the micro-batches' means; T5's
    dropout off, or the two would draw other masks)."""
    from fastnlg.train import builtin

    monkeypatch.setitem(builtin.CONFIGS, "t5-tiny", {**builtin.CONFIGS["t5-tiny"], "dropout": 0.0})
    def run(name, **kw):
        train(_cfg(tiny, tmp_path / name, **kw), log=_quiet)
        return losses(tmp_path / name)

    patched, plain, accumulated = run("p"), run("u", patch=False), run("a", batch_size=4, grad_accum=2)
    torch.testing.assert_close(torch.tensor(patched), torch.tensor(plain), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(accumulated), torch.tensor(patched), rtol=2e-4, atol=1e-5)
    hits = [r["token_accuracy"] for r in metrics(tmp_path / "p") if "loss" in r]
    assert hits == pytest.approx([r["token_accuracy"] for r in metrics(tmp_path / "u") if "loss" in r], abs=1e-6)


def test_record_forms_and_their_source_text(tmp_path):
    from fastnlg.train.data import render_data_to_text

    forms = [({"source": "a b", "target": "c"}, "a b"), ({"document": "long text", "summary": "short"}, "long text"),
             ({"input": "x y", "output": "z"}, "x y"),
             ({"input": {"city": "Oslo", "temp": 3}, "output": "Oslo, 3 degrees"},
              render_data_to_text({"city": "Oslo", "temp": 3}))]
    for i, (record, source) in enumerate(forms):
        path = tmp_path / f"f{i}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        (example,) = seq2seq.read_examples(str(path))
        assert example.source == source and example.target == list(record.values())[1]
        assert example.fields == (record["input"] if isinstance(record.get("input"), dict) else None)


def test_rows_end_in_eos_truncate_and_pad():
    import tokenizers

    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "<unk>": 4},
                                                             unk_token="<unk>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>")
    ex = [seq2seq.Example("a b a b a", "b", None, "f:1"), seq2seq.Example("a", "a b", None, "f:2")]
    rows = seq2seq.rows_of(ex, tok, max_length=4)
    assert rows[0]["input_ids"].tolist() == [2, 3, 2, 1] and rows[0]["labels"].tolist() == [3, 1]
    batch = seq2seq.collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 3, 2, 1], [2, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[3, 1, -100], [2, 3, 1]]
    with pytest.raises(DataError, match=r"f:1: the source is 6 tokens > max_length 4 \(truncation is off\)"):
        seq2seq.rows_of(ex, tok, max_length=4, truncate=False)


@pytest.mark.parametrize("content, error", [
    ('{"source": "a", "target": "b"}\n{"source": "a"}\n', r"bad.jsonl:2: --task seq2seq records need one of"),
    ('{"source": "a", "target": "b", "label": 1}\n', r"bad.jsonl:1: field 'label' is not used by --task seq2seq"),
    ('{"source": "a", "target": ""}\n', r"bad.jsonl:1: field 'target' is empty"),
    ('{"input": {}, "output": "x"}\n', r"bad.jsonl:1: field 'input' is an empty object"),
    ('{"input": 3, "output": "x"}\n', r"bad.jsonl:1: field 'input' must be a string or an object of fields, got int"),
    ('{"source": "a", "target": "b"}\n{"document": "a", "summary": "b"}\n', r"bad.jsonl:2: a \{document, summary\}"),
])
def test_bad_data_names_file_and_line(tiny, tmp_path, content, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=error):
        train(_cfg(tiny, tmp_path / "out", train_files=[str(path)], eval_files=[]), log=_quiet)
    assert not (tmp_path / "out").exists()


def test_task_and_architecture_must_fit(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"task='seq2seq' is not allowed: .* \(llama\) is not an encoder-decoder; "
                                          r"use --task causal-lm"):
        train(_cfg(tiny, tmp_path, model=tiny["model"]), log=_quiet)
    with pytest.raises(ConfigError, match=r"built-in config for it \(llama-tiny, llama-small, llama-base\); t5-tiny "
                                          r"is a seq2seq model"):
        _cfg(tiny, tmp_path, task="causal-lm")
    folder = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=16,
                                                                  num_layers=1, num_heads=2)).save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"is an encoder-decoder \(t5\); a causal-LM run would drop its encoder; use "
                                          r"--task seq2seq"):
        train(_cfg(tiny, tmp_path / "c", task="causal-lm", model=str(folder), tokenizer=tiny["model"]), log=_quiet)


def test_the_commands(tiny, tmp_path, capsys):
    """train (LoRA on a trained t5-tiny), eval (loss, BLEU, ROUGE, slot accuracy from generate), generate,
    merge (the merged model loads in plain Transformers with the adapter's logits)."""
    import peft

    common = ["--task", "seq2seq", "--train-files", tiny["train"], "--eval-files", tiny["eval"], "--batch-size", "8",
              "--max-length", "96", "--progress", "false", "--device", "cpu", "--tensorboard", "false"]
    assert cli.main(["train", "--model", "t5-tiny", "--method", "full", "--max-steps", "6", "--learning-rate", "1e-2",
                     "--output-dir", str(tmp_path / "full"), *common]) == 0
    base = str(tmp_path / "full" / "model")
    assert cli.main(["train", "--model", base, "--method", "lora", "--max-steps", "2",
                     "--output-dir", str(tmp_path / "lora"), *common]) == 0
    adapter = str(tmp_path / "lora" / "adapter")
    # every LoRA layer on the fused lora_linear: 2 encoder blocks x (q, k, v, o, wi_0, wi_1, wo) and 2 decoder
    # blocks x (self q, k, v, o, cross q, k, v, o, wi_0, wi_1, wo)
    report = (tmp_path / "lora" / "patch_report.txt").read_text()
    assert re.search(r"lora +36 +Linear -> lora_linear", report), report
    assert json.loads(open(adapter + "/adapter_config.json").read())["task_type"] == "SEQ_2_SEQ_LM"
    capsys.readouterr()
    assert cli.main(["eval", "--model", base, "--adapter", adapter, "--data", tiny["eval"], "--generate", "4",
                     "--max-new-tokens", "8", "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    m = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert {"eval_loss", "eval_perplexity", "eval_token_accuracy", "bleu", "rouge1", "rougeL", "slot_accuracy"} <= set(m)
    examples = [json.loads(line) for line in open(tmp_path / "ev" / "examples.jsonl")]
    assert len(examples) == 4 and examples[0]["input"].startswith("Record: ")
    capsys.readouterr()
    assert cli.main(["generate", "--model", base, "--prompt", examples[0]["input"], "--max-new-tokens", "6",
                     "--num-beams", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--model", base, "--adapter", adapter, "--out", str(merged)]) == 0
    assert "AutoModelForSeq2SeqLM" in capsys.readouterr().out
    ids, dec = torch.tensor([[5, 9, 20, 7, 1]]), torch.tensor([[0, 4, 8]])
    plain = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(merged)).eval()
    with_adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForSeq2SeqLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, decoder_input_ids=dec).logits,
                                   with_adapter(input_ids=ids, decoder_input_ids=dec).logits, rtol=1e-4, atol=1e-5)
