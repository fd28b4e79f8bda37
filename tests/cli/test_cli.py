"""The command line: user errors exit 2 with one line naming the problem, --help of every subcommand, and
train -> eval -> generate -> merge end to end (the merged model loads in plain Transformers with the same
logits), and the demo in its --quick size."""
import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers

from fastnlg.cli import main

SUBCOMMANDS = ["train", "eval", "generate", "merge", "demo"]


def _cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "fastnlg.cli", *args], capture_output=True, text=True, input=input,
                          timeout=600)


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert "example:" in capsys.readouterr().out


def _train_args(tiny, out, *extra):
    return ["train", "--model", tiny["model"], "--train-files", tiny["train"], "--output-dir", str(out),
            "--max-length", "96", "--batch-size", "4", "--progress", "false", "--device", "cpu", *extra]


def _one_line_error(r, pattern):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and pattern in last, r.stderr[-2000:]
    return last


def _in_process(capsys, *args):
    """main(args) in this process, as _cli's result (the error paths: no subprocess start for each)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_user_errors(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    # one as a process (exit code, stderr), the others through main() itself
    _one_line_error(_cli(*_train_args(tiny, tmp_path / "o", "--train-files", str(bad))), "bad.jsonl:2: invalid JSON")
    assert not (tmp_path / "o").exists()  # nothing written before the data is valid
    run = functools.partial(_in_process, capsys)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"modle": "x"}))
    _one_line_error(run(*_train_args(tiny, tmp_path / "o", "--config", str(cfg))), "unknown config key 'modle'")
    _one_line_error(run(*_train_args(tiny, tmp_path / "o", "--max-steps", "many")), "'max_steps' must be int")
    _one_line_error(run(*_train_args(tiny, tmp_path / "o", "--method", "magic")), "method='magic' is not allowed")
    _one_line_error(run("train", "--model", str(tmp_path / "nope"), "--train-files", tiny["train"]),
                    "model=")
    _one_line_error(run(*_train_args(tiny, tmp_path / "empty", "--resume")), "holds no checkpoint to resume from")
    _one_line_error(run("eval", "--model", str(tmp_path / "nope"), "--data", tiny["eval"]), "no such model folder")
    _one_line_error(run("merge", "--model", tiny["model"], "--out", str(tmp_path / "m")), "merge needs --adapter")


@pytest.mark.parametrize("hidden,args", [("matplotlib", ()), ("seqeval", ("--task", "token-classification"))])
def test_a_missing_package_is_named_before_any_work(tiny, tmp_path, hidden, args):
    """With a package the command will import hidden from import, it stops at once with one line naming the
    package and the extra, and writes nothing (the demo used to crash in its plot after pre-training)."""
    code = ("import sys; sys.modules[sys.argv[1]] = None; from fastnlg.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    r = subprocess.run([sys.executable, "-c", code, hidden, *_train_args(tiny, tmp_path / "o", *args)],
                       capture_output=True, text=True, timeout=600)
    package = {"matplotlib": "matplotlib", "seqeval": "seqeval"}[hidden]
    line = _one_line_error(r, f"fastnlg train needs {package}, which is not installed")
    assert "pip install 'fastnlg[train]'" in line and not (tmp_path / "o").exists()


def test_train_eval_generate_merge(tiny, tmp_path, capsys, monkeypatch):
    """The commands end to end, in this process (main() as the console script runs it; the process
    behaviour, exit codes and stderr, is test_user_errors')."""
    import io

    run = functools.partial(_in_process, capsys)
    out = tmp_path / "run"
    r = run(*_train_args(tiny, out, "--max-steps", "8", "--method", "lora", "--eval-every", "4", "--log-every", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    adapter = str(out / "adapter")
    r = run("eval", "--model", tiny["model"], "--adapter", adapter, "--data", tiny["eval"], "--generate", "4",
            "--max-new-tokens", "8", "--out", str(tmp_path / "ev"), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(open(tmp_path / "ev" / "eval.json").read())
    assert {"eval_loss", "eval_perplexity", "bleu", "rougeL"} <= set(metrics)
    assert (tmp_path / "ev" / "examples.md").exists()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Record: city: Oslo\nText:\n"))  # prompts from stdin
    r = run("generate", "--model", tiny["model"], "--adapter", adapter, "--device", "cpu", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-3000:]
    merged = tmp_path / "merged"
    r = run("merge", "--model", tiny["model"], "--adapter", adapter, "--out", str(merged), "--nf4")
    assert r.returncode == 0, r.stderr[-3000:]
    import peft

    from fastnlg.quant import NF4Weight, quantize_nf4

    ids = torch.tensor([[1, 5, 9, 20, 7]])
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    with_adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]),
                                                  adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-5)
    # --nf4: every merged linear weight but the head, as fastnlg's NF4 of exactly that weight
    linears = {n: m.weight for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    files = sorted(os.listdir(merged / "nf4"))
    assert files == sorted(n + ".safetensors" for n in linears)
    for name, w in linears.items():
        q = NF4Weight.load(str(merged / "nf4" / (name + ".safetensors")))
        ref = quantize_nf4(w.detach())
        assert q.shape == w.shape and torch.equal(q.packed, ref.packed) and torch.equal(q.absmax, ref.absmax)
        assert (q.dequantize(torch.float32) - w).abs().max() <= 0.2 * w.abs().max()


def test_demo_quick(tmp_path):
    """The README's first command at CI size: every promised file; fine-tuning shows on the held-out records (loss
    falls; BLEU, ROUGE-L and slot accuracy rise); the speed ratio is a side-by-side measurement with its spread."""
    r = _cli("demo", "--quick", "--out", str(tmp_path / "demo"), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    for name in ("report.md", "metrics.jsonl", "examples.md", "examples.jsonl", "loss.png", "lr.png", "eval.png",
                 "finetune/adapter/adapter_model.safetensors", "finetune_unpatched/metrics.jsonl", "data/train.jsonl"):
        assert (out / name).exists(), name
    summary = json.loads(open(out / "metrics.jsonl").readline())
    before, after = summary["before"], summary["after"]
    assert after["eval_loss"] < before["eval_loss"]
    for metric, gain in (("bleu", 5.0), ("rougeL", 5.0), ("slot_accuracy", 10.0)):
        assert after[metric] >= before[metric] + gain, (metric, before[metric], after[metric])
    report = open(out / "report.md").read()
    assert "BLEU" in report and "ROUGE-L" in report and "--no-patch" in report
    assert re.search(r"side by side .*: \d+\.\d\dx \[p20-p80 \d+\.\d\d-\d+\.\d\d, 15 rounds\]", report), report
    assert "| ratio |" not in report  # no ratio of the two runs made one after the other
    # a clean first run (run from the repository root): fastnlg's own output, no third-party alarms
    alarming = [line for line in (r.stdout + r.stderr).splitlines()
                if any(word in line for word in ("Failed", "Traceback", "FutureWarning", "DeprecationWarning"))]
    assert not alarming, alarming


def test_bench_runs_from_the_installed_package(tmp_path):
    """fastnlg bench outside the checkout (benchmarks/ installs as fastnlg.benchmarks)."""
    r = subprocess.run([sys.executable, "-m", "fastnlg.cli", "bench", "--ops", "geglu", "--rep", "1", "--out",
                        str(tmp_path / "b")], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    md = open(tmp_path / "b" / "summary.md").read()
    assert "## geglu" in md and "| fastnlg |" in md


@pytest.mark.slow  # (45 s: the default tier keeps the decoder-only demo; `make test-all` runs this)
def test_demo_t5_quick(tmp_path, capsys):
    """`fastnlg demo --model t5 --quick`: the encoder-decoder learns the task (held-out loss falls, slot accuracy
    rises), every promised file, the side-by-side line; beside the decoder-only demo when its summary is there."""
    from fastnlg import demo_t5

    out = tmp_path / "demo-t5"
    assert main(["demo", "--model", "t5", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    for name in ("report.md", "metrics.jsonl", "examples.md", "loss.png", "train/model/model.safetensors",
                 "train_unpatched/metrics.jsonl"):
        assert (out / name).exists(), name
    s = json.loads(open(out / "metrics.jsonl").readline())
    assert s["after"]["eval_loss"] < s["before"]["eval_loss"]
    assert s["after"]["slot_accuracy"] > s["before"]["slot_accuracy"], (s["before"], s["after"])
    report = (out / "report.md").read_text()
    assert "side by side" in report and "Run `fastnlg demo`" in report and "| - city |" in report
    decoder = {"size": "quick", "after": {**s["after"], "eval_loss": 1.5, "slot_accuracy_by_field": {"city": 5.0}}}
    demo_t5.write_report(str(out), s, [], demo_t5.SIZES["quick"], decoder)
    report = (out / "report.md").read_text()
    assert "decoder-only demo after fine-tuning" in report and "| eval loss |" in report
    city = next(line for line in report.splitlines() if line.startswith("| - city |"))
    assert city.rstrip().endswith("| 5 |"), city
