"""The `fastnlg` command.

    fastnlg demo [--quick]        fine-tune a small model on a data-to-text task, patched vs unpatched, report
    fastnlg demo --task ner       fine-tune all-MiniLM-L6-v2 for named entities: F1 per type, patched vs unpatched
    fastnlg demo --model t5       the data-to-text task with a T5 (encoder-decoder), beside the decoder-only run
    fastnlg train --config run.yaml --model DIR --train-files data.jsonl ...   (flags override the file)
    fastnlg train --task token-classification | sequence-classification | masked-lm ...   (encoders: BERT, ...)
    fastnlg train --task seq2seq --model t5-tiny --train-files pairs.jsonl ...   (encoder-decoders: T5, BART)
    fastnlg eval --model DIR [--adapter DIR] --data eval.jsonl      loss/perplexity/accuracy, BLEU/ROUGE, examples;
                                                                    entity / class reports for classifiers
    fastnlg predict --model DIR --text "..."                        entities with spans, or the label
    fastnlg generate --model DIR [--adapter DIR] --prompt "..."     (or --prompts-file F, or stdin)
    fastnlg merge --model DIR --adapter DIR --out DIR               LoRA merged into the base, safetensors
    fastnlg bench [--suite ops|e2e|all] [--compare DIR] ...   the benchmark suite (fastnlg bench --help)
    fastnlg aot                   the ahead-of-time compile check of every Triton kernel for sm_75 to sm_120

User errors (bad config, bad data with file and line, missing path) exit with status 2 and one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

TASKS = ("causal-lm", "token-classification", "sequence-classification", "masked-lm", "seq2seq")  # tasks.NAMES


class UserError(Exception):
    pass


def _user_errors():
    """The exceptions that are the user's to fix (imported late, so --help stays fast)."""
    from .train.config import ConfigError
    from .train.data import DataError
    from .train.errors import CheckpointError

    return (UserError, ConfigError, DataError, CheckpointError, FileNotFoundError)


# What the commands import once they run (metrics, plots, progress, configs), by import name -> pip name; the
# encoder tasks' metrics too. All come with the [train] extra.
TRAIN_NEEDS = {"matplotlib": "matplotlib", "sacrebleu": "sacrebleu", "rouge_score": "rouge-score", "tqdm": "tqdm",
               "yaml": "PyYAML"}
ENCODER_NEEDS = {"seqeval": "seqeval", "sklearn": "scikit-learn"}


def check_dependencies(command: str, encoder: bool) -> None:
    """A UserError naming the first missing package `command` will import, before any work is done."""
    import importlib.util

    for module, package in {**TRAIN_NEEDS, **(ENCODER_NEEDS if encoder else {})}.items():
        if importlib.util.find_spec(module) is None:
            raise UserError(f"fastnlg {command} needs {package}, which is not installed: pip install 'fastnlg[train]' "
                            f"(or pip install {package})")


def _encoder_run(args) -> bool:
    """Whether this command runs an encoder task (their metrics need seqeval and scikit-learn)."""
    if args.cmd == "demo":
        return args.task == "ner"
    if args.cmd == "predict":
        return True
    task = getattr(args, "task", None)
    if args.cmd == "train" and task is None and getattr(args, "config", None):
        return True  # (the task may be in the config file: check the encoder packages too)
    return bool(task) and task not in ("causal-lm", "seq2seq")


def _benchmarks(argv):
    from .benchmarks.run import main as run  # benchmarks/ installs as fastnlg.benchmarks

    return run(argv)


def _train_parser(sub):
    from .train.config import TrainConfig

    p = sub.add_parser("train", help="fine-tune a model (full, LoRA, QLoRA, prompt/prefix tuning, IA3, AdaLoRA, BitFit)", epilog=(
        "example: fastnlg train --model ./my-model --train-files data.jsonl --method lora --max-steps 500 "
        "--output-dir out/run1\nexample: fastnlg train --config run.yaml --method qlora --gradient-checkpointing true\n"
        "example: fastnlg train --config run.yaml --nproc 2 --distributed fsdp    (= torchrun --nproc-per-node 2 -m "
        "fastnlg.cli train --config run.yaml --distributed fsdp)"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML or JSON file of TrainConfig keys (flags override it)")
    p.add_argument("--no-patch", action="store_true", help="the same run without fastnlg.patch, for comparison")
    p.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint in --output-dir "
                   "(a damaged one is skipped, with why; a changed configuration or data stops it)")
    p.add_argument("--resume-force", action="store_true", help="--resume even where the configuration or the data "
                   "differ from the checkpoint's (it names what differs)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run on N processes (torchrun --standalone --nproc-per-node N; DDP or FSDP2 by --distributed, "
                        "gloo on CPU, NCCL on GPUs); the same as torchrun --nproc-per-node N -m fastnlg.cli train ...")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("resume", "resume_force"):
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="VALUE",
                           help=f"(default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()})")
    return p


def cmd_train(args) -> int:
    from .train.config import TrainConfig, load_config_file
    from .train.trainer import check_startable, train

    values = load_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in ("resume", "resume_force"):
            values[f.name] = v
    if args.no_patch:
        values["patch"] = False
    if args.resume or args.resume_force:
        values["resume"] = True
    if args.resume_force:
        values["resume_force"] = True
    cfg = TrainConfig.from_dict(values)
    check_startable(cfg)  # before any process starts (train() in each process then finds it checked)
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: needs a number of processes >= 1")
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc, args.argv)
    try:
        train(cfg)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last checkpoint in {cfg.output_dir} is intact; continue with the same command "
              "and --resume", file=sys.stderr)
        return 130
    return 0


def _torchrun(nproc: int, argv: list) -> int:
    """fastnlg train ... --nproc N -> torchrun --standalone --nproc-per-node N -m fastnlg.cli train ..."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "fastnlg.cli", *rest]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def _require_folders(*paths) -> None:
    for path in paths:
        if path and not os.path.isdir(path):
            raise UserError(f"{path}: no such model folder")


def _config_folder(args) -> str:
    """The folder whose config.json describes the model to run: the adapter's when it saved one (a
    classifier's label set), else the model's."""
    _require_folders(args.model, args.adapter)
    return args.adapter if args.adapter and os.path.isfile(os.path.join(args.adapter, "config.json")) else args.model


def _load(model_dir, adapter, device):
    """(model in fp32 with the adapter on top, tokenizer, device) for eval, generate and merge: a causal LM,
    or the encoder-decoder a seq2seq folder holds."""
    import torch

    from .loading import load_config, load_pretrained, load_tokenizer
    from .train import tasks
    from .train.setup import pick_device

    _require_folders(model_dir, adapter)
    dev = pick_device(device)
    task = tasks.get(tasks.of_model(load_config(model_dir)))
    if task.name not in ("causal-lm", "seq2seq"):
        raise UserError(f"{model_dir}: a {task.name} model (this command runs causal LMs and encoder-decoders)")
    model = load_pretrained(model_dir, dtype=torch.float32, device=dev, adapter=adapter, auto_class=task.auto_class)
    return model, load_tokenizer(model_dir), dev


def _encoder(args, task_name: str, data_files: list):
    """(task, model, tokenizer, device, cfg) of a saved encoder model for eval / predict: its label set is
    its own (config.json of the model, or of the adapter folder), so data labels outside it are refused."""
    from .loading import load_config
    from .train import tasks
    from .train.config import TrainConfig
    from .train.setup import pick_device

    config = load_config(_config_folder(args))
    names = ([config.id2label[i] for i in sorted(config.id2label)]
             if task_name in ("token-classification", "sequence-classification") else [])
    cfg = TrainConfig(task=task_name, model=args.model, eval_files=data_files, labels=names,
                      max_length=getattr(args, "max_length", 512), batch_size=getattr(args, "batch_size", 16))
    dev = pick_device(args.device)
    task, model, tok = tasks.load(cfg, dev, adapter=args.adapter, config=config)
    model.eval()
    return task, model, tok, dev, cfg


def _task_of(args) -> str:
    from .loading import load_config
    from .train.tasks import of_model

    if getattr(args, "task", None):
        return args.task
    return of_model(load_config(_config_folder(args)))


def cmd_eval(args) -> int:
    import json

    from .train import data
    from .train.evaluate import generation_metrics, loss_metrics

    _require_folders(args.model, args.adapter)
    task_name = _task_of(args)
    if task_name == "seq2seq":
        return _eval_seq2seq(args)
    if task_name != "causal-lm":
        check_dependencies("eval", True)
        task, model, tok, dev, cfg = _encoder(args, task_name, [args.data])
        metrics = task.evaluate(model, task.held_out(cfg, tok), tok, cfg, dev, None)
        print(task.report(metrics) or task.summary(metrics))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "eval.json"), "w") as f:
                json.dump(metrics, f, indent=2)
        return 0
    first = data.read_records(args.data)[0][0]
    if "chosen" in first and "rejected" in first:
        return _eval_preference(args)
    model, tok, dev = _load(args.model, args.adapter, args.device)
    samples, fmt = data.load_samples(args.data, tok, args.max_length)
    metrics = loss_metrics(model, data.pad_rows(samples, tok.pad_token_id), tok.pad_token_id, args.batch_size, dev)
    examples = []
    if fmt in ("prompt_completion", "data_to_text") and args.generate > 0:
        records = data.read_records(args.data)[:args.generate]
        pairs = [data.prompt_of(r, fmt, w) for r, w in records]
        gen, examples = generation_metrics(model, tok, pairs, dev, max_new_tokens=args.max_new_tokens,
                                           batch_size=args.batch_size,
                                           records=[r["input"] for r, _ in records] if fmt == "data_to_text" else None)
        metrics.update(gen)
    _write_eval(args, metrics, examples)
    return 0


def _write_eval(args, metrics: dict, examples: list) -> None:
    import json

    from .train.evaluate import save_examples

    print(json.dumps(metrics, indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        if examples:
            save_examples(examples, os.path.join(args.out, "examples"))


def _eval_preference(args) -> int:
    """A causal LM on preference pairs {"prompt", "chosen", "rejected"} (train/tasks/preference.py): the DPO loss,
    reward margin and preference accuracy against the reference: --reference's model, else the base under
    --adapter (the adapter disabled), else none (log p_ref = 0: does the model give the chosen completion the
    higher log-probability)."""
    from .train.config import TrainConfig
    from .train.tasks.preference import Preference

    model, tok, dev = _load(args.model, args.adapter, args.device)
    task = Preference("dpo", reference_free=not (args.reference or args.adapter))
    if args.reference:
        task._reference = _load(args.reference, None, args.device)[0].requires_grad_(False)
    cfg = TrainConfig(objective="dpo", beta=args.beta, batch_size=args.batch_size, eval_files=[args.data],
                      max_length=args.max_length)
    metrics = task.evaluate(model, task.held_out(cfg, tok), tok, cfg, dev, None)
    metrics["reference"] = args.reference or ("the base (adapter disabled)" if args.adapter else "none")
    _write_eval(args, metrics, [])
    return 0


def _eval_seq2seq(args) -> int:
    """An encoder-decoder on {"source", "target"} records (train/tasks/seq2seq.py): loss, perplexity and token
    accuracy over the targets; BLEU, ROUGE (and slot accuracy for data-to-text records) of what it generates
    for the first --generate sources."""
    task, model, tok, dev, cfg = _encoder(args, "seq2seq", [args.data])
    metrics, examples = task.evaluate_generating(model, tok, cfg, dev, args.generate, args.max_new_tokens,
                                                 args.batch_size)
    _write_eval(args, metrics, examples)
    return 0


def cmd_predict(args) -> int:
    task_name = _task_of(args)
    if task_name not in ("token-classification", "sequence-classification"):
        raise UserError(f"{args.model}: predict runs classification models; this one is a {task_name} model "
                        "(fastnlg generate runs causal LMs)")
    task, model, tok, dev, _ = _encoder(args, task_name, [])
    for text in args.text:
        found = task.predict(model, tok, text, dev)
        if task_name == "sequence-classification":
            label, p = found[0]
            print(f"{label}\t{p:.3f}\t{text}")
            continue
        print(text)
        for kind, start, end, span, p in found:
            print(f"  {kind}\t[{start}:{end}]\t{span!r}\t{p:.3f}")
        if not found:
            print("  (no entities)")
    return 0


def cmd_generate(args) -> int:
    import torch
    import transformers

    prompts = list(args.prompt or [])
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise UserError(f"{args.prompts_file}: no such file")
        prompts += [line.rstrip("\n") for line in open(args.prompts_file) if line.strip()]
    if not prompts and sys.stdin is not None and not sys.stdin.isatty():
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise UserError("no prompt: give --prompt, --prompts-file or lines on stdin")
    model, tok, dev = _load(args.model, args.adapter, args.device)
    model.eval()
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt").to(dev)
        streamer = transformers.TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, num_beams=args.num_beams,
                  pad_token_id=tok.pad_token_id, streamer=streamer if args.num_beams == 1 else None)
        if args.temperature > 0:
            kw.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        with torch.no_grad():
            out = model.generate(**enc, **kw)
        if args.num_beams > 1:  # (an encoder-decoder's output is its decoder's tokens: no prompt in front)
            start = 0 if model.config.is_encoder_decoder else enc["input_ids"].shape[1]
            print(tok.decode(out[0, start:], skip_special_tokens=True))
    return 0


def cmd_merge(args) -> int:
    if not args.adapter:
        raise UserError("merge needs --adapter")
    model, tok, _ = _load(args.model, args.adapter, "cpu")
    merged = model.merge_and_unload()
    merged.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    auto = "AutoModelForSeq2SeqLM" if merged.config.is_encoder_decoder else "AutoModelForCausalLM"
    print(f"merged model written to {args.out} (loads with transformers.{auto}, no fastnlg needed)")
    if args.nf4:
        from .quant import quantize_nf4

        os.makedirs(os.path.join(args.out, "nf4"), exist_ok=True)
        for name, mod in merged.named_modules():
            if type(mod).__name__ == "Linear" and mod.weight.numel() % 2 == 0 and "lm_head" not in name:
                quantize_nf4(mod.weight.detach()).save(os.path.join(args.out, "nf4", name + ".safetensors"))
        print(f"NF4 copies of the linear weights in {os.path.join(args.out, 'nf4')}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="fastnlg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fastnlg {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="fine-tune a small model on a data-to-text task, with a report",
                       epilog="example: fastnlg demo --quick --out out/demo")
    d.add_argument("--quick", action="store_true", help="CI size (under a minute)")
    d.add_argument("--out", default=None, help="default: out/demo (out/demo-ner with --task ner, out/demo-t5 with --model t5)")
    d.add_argument("--task", choices=("data-to-text", "ner"), default="data-to-text",
                   help="ner: fine-tune all-MiniLM-L6-v2 (offline) for named entities, F1 per type before and after")
    d.add_argument("--model", choices=("llama", "t5"), default="llama",
                   help="t5: the data-to-text task with an encoder-decoder (T5 trained from scratch, --task seq2seq), "
                        "beside the decoder-only demo's figures when out/demo is there")
    d.add_argument("--device", default="auto")
    _train_parser(sub)
    for name, helptext in (("eval", "evaluate a model or adapter on a data file"),
                           ("generate", "generate from prompts (streams tokens)"),
                           ("merge", "merge a LoRA adapter into its base model")):
        s = sub.add_parser(name, help=helptext, epilog=f"example: fastnlg {name} --model out/run1/model"
                           + (" --adapter out/run1/adapter" if name != "eval" else " --data eval.jsonl"))
        s.add_argument("--model", required=True, help="a local Transformers model folder")
        s.add_argument("--adapter", help="a PEFT adapter folder (fastnlg train's adapter/)")
        s.add_argument("--device", default="auto")
        if name == "eval":
            s.add_argument("--data", required=True)
            s.add_argument("--task", choices=TASKS, help="default: the model's own (from its architecture)")
            s.add_argument("--max-length", type=int, default=512)
            s.add_argument("--batch-size", type=int, default=16)
            s.add_argument("--generate", type=int, default=64, help="records to generate for BLEU/ROUGE (0: none)")
            s.add_argument("--max-new-tokens", type=int, default=64)
            s.add_argument("--out", help="folder for eval.json and the examples table")
            s.add_argument("--reference", help="preference pairs: the reference model folder (default: the base "
                                               "under --adapter, else none)")
            s.add_argument("--beta", type=float, default=0.1, help="preference pairs: DPO's beta for the rewards")
        elif name == "generate":
            s.add_argument("--prompt", action="append")
            s.add_argument("--prompts-file")
            s.add_argument("--max-new-tokens", type=int, default=64)
            s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
            s.add_argument("--top-k", type=int)
            s.add_argument("--top-p", type=float)
            s.add_argument("--num-beams", type=int, default=1)
        else:
            s.add_argument("--out", required=True)
            s.add_argument("--nf4", action="store_true", help="also NF4 copies of the linear weights")
    s = sub.add_parser("predict", help="entities or the label of texts, with a classification model",
                       epilog='example: fastnlg predict --model out/ner/model --text "Anna Novak joined Bluepeak Labs"')
    s.add_argument("--model", required=True, help="a token- or sequence-classification model folder")
    s.add_argument("--adapter", help="a PEFT adapter folder (fastnlg train's adapter/)")
    s.add_argument("--text", action="append", required=True, help="a text (repeat for several)")
    s.add_argument("--task", choices=TASKS[1:3], help="default: the model's own (from its architecture)")
    s.add_argument("--device", default="auto")
    sub.add_parser("bench", help="benchmark suite; extra options go to benchmarks.run", add_help=False)
    sub.add_parser("aot", help="AOT compile check of every Triton kernel", add_help=False)
    return p


def _version() -> str:
    from . import __version__

    return __version__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    args.argv = argv
    if rest and args.cmd not in ("bench", "aot"):
        print(f"fastnlg {args.cmd}: unknown arguments {' '.join(rest)}", file=sys.stderr)
        return 2
    try:
        if args.cmd in ("train", "eval", "demo", "predict"):
            check_dependencies(args.cmd, _encoder_run(args))
        if args.cmd == "demo":
            if args.task == "ner":
                if args.model != "llama":
                    raise UserError("--task ner runs all-MiniLM-L6-v2 (an encoder): leave --model out")
                from .demo_ner import run
                default = "out/demo-ner"
            elif args.model == "t5":
                from .demo_t5 import run
                default = "out/demo-t5"
            else:
                from .demo import run
                default = "out/demo"
            run(args.out or default, quick=args.quick, device=args.device)
            return 0
        if args.cmd == "bench":
            return _benchmarks(rest)
        if args.cmd == "aot":
            from fastnlg.aot import main as aot_main

            return aot_main(rest)
        return {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "merge": cmd_merge,
                "predict": cmd_predict}[args.cmd](args)
    except _user_errors() as exc:
        print(f"fastnlg {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an out-of-memory is the user's setting to change, anything else is a bug
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            print(f"fastnlg {args.cmd}: out of memory: lower --batch-size or --max-length", file=sys.stderr)
            return 2
        print(f"fastnlg {args.cmd}: internal error (a bug; please report it with the traceback above)",
              file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
