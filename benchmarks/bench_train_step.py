"""The training step end to end, as `fastnlg train` runs it: one optimizer step (forward, backward, gradient
clipping, AdamW) of a Llama-shaped model (random weights, built from a config) through fastnlg.train's own
method set-up and `forward_backward`. Implementations:
    fastnlg             fastnlg.patch
    eager               plain Transformers + PEFT, its default attention (SDPA): the baseline of the targets
    hf-eager-attention  plain Transformers + PEFT with attn_implementation="eager"
    liger               Liger-Kernel's Llama patch (a "not installed" row where it is missing)
Methods: full fine-tuning, LoRA (r=16, all linear layers), QLoRA (bitsandbytes NF4 on CUDA when installed,
else fastnlg's NF4Linear) and LoRA with gradient checkpointing + activation offload to pinned CPU memory.

Reported per step: time, tokens/s and peak memory (CUDA: the allocator's peak above what was live before
the step; CPU: the process's resident-set peak). FLOPs (for TFLOP/s): 6 N P for full fine-tuning (P =
parameters outside the embedding), 4 N P for the adapter methods (no weight gradients of the frozen base),
+ 2 N P for the recomputation under checkpointing; attention's T^2 terms are left out.

Sizes: CPU a small Llama (hidden 256, 4 layers) at 4 x 256 tokens; CUDA a 1.1B Llama (TinyLlama's shape)
at 16k tokens a step (LoRA at 512, 2048 and 8192 tokens a sequence; the others at 2048; offload at 8192) and
an 8B-shaped Llama (Llama 3 8B's shape) with QLoRA at 2 x 2048, bf16 autocast.

`python -m benchmarks.bench_train_step --side-by-side --out DIR` times the patched and unpatched steps
alternately (tiny and small sizes, full and LoRA) and writes the median ratio with its spread.
`python -m benchmarks.bench_train_step --max-context --out DIR` (CUDA) finds, per method and
implementation, the longest single sequence whose step fits a fixed memory budget (binary search over
multiples of 512, out-of-memory caught), and writes max_context.json / max_context.md with the targets:
>= 2x tokens/s, <= 40% of peak memory, >= 4x the context of plain Transformers + PEFT (+ bitsandbytes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import weakref

import torch

from .harness import Bench, Case
from .peers import NotInstalled, available

SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, inter=172, vocab=512),
    "small": dict(hidden=256, layers=4, heads=4, kv=2, inter=688, vocab=2048),
    "1.1B": dict(hidden=2048, layers=22, heads=32, kv=4, inter=5632, vocab=32000),
    "8B": dict(hidden=4096, layers=32, heads=32, kv=8, inter=14336, vocab=128256),
    # encoders (BERT, token classification with 7 tags: the NER program): all-MiniLM-L6-v2's shape, BERT-base's
    "minilm": dict(arch="bert", hidden=384, layers=6, heads=12, kv=12, inter=1536, vocab=30522),
    "bert-base": dict(arch="bert", hidden=768, layers=12, heads=12, kv=12, inter=3072, vocab=30522),
    "bert-tiny": dict(arch="bert", hidden=64, layers=2, heads=4, kv=4, inter=128, vocab=1000),  # (rehearsals)
}
NER_TAGS = 7
METHODS = ("full", "lora", "qlora", "lora+offload")
TOKENS_PER_STEP = 16384
TARGETS = {"speedup": 2.0, "memory_ratio": 0.40, "context_ratio": 4.0}


def _case(method, size, batch, seq, x):
    return Case(f"{method},{size},{batch}x{seq}", {**SIZES[size], "method": method, "size": size, "batch": batch,
                                                     "seq": seq}, x)


def cases(quick, device):
    if quick or device != "cuda":
        return [_case(m, "small", 4, 256, i + 1) for i, m in enumerate(METHODS)]
    out = [_case("lora", "1.1B", TOKENS_PER_STEP // s, s, s) for s in (512, 2048, 8192)]
    out += [_case("full", "1.1B", TOKENS_PER_STEP // 2048, 2048, 2048),
            _case("qlora", "1.1B", TOKENS_PER_STEP // 2048, 2048, 2048),
            _case("lora+offload", "1.1B", TOKENS_PER_STEP // 8192, 8192, 8192),
            _case("qlora", "8B", 2, 2048, 2048),
            _case("full", "bert-base", 32, 128, 128), _case("lora", "bert-base", 32, 128, 128)]
    return out


def _params(p) -> int:
    h, i, L = p["hidden"], p["inter"], p["layers"]
    if p.get("arch") == "bert":
        return L * (4 * h * h + 2 * h * i)  # attention and MLP (the 7-tag classifier is negligible)
    kv = h // p["heads"] * p["kv"]
    return L * (2 * h * h + 2 * h * kv + 3 * h * i) + h * p["vocab"]  # layers + LM head


def flops(p, mode):
    n = p["batch"] * p["seq"]
    per_token = 6 if p["method"] == "full" else 4
    if p["method"] == "lora+offload":
        per_token += 2  # the checkpointed forward runs twice
    return per_token * n * _params(p)


class _Liger:
    """Liger-Kernel's instance patch of a Llama; it also rebinds module-level names of Transformers' Llama
    module, which are put back when the model is freed."""

    def __init__(self, model):
        import transformers.models.llama.modeling_llama as llama
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        self.module, self.saved = llama, dict(vars(llama))
        self.forward = llama.LlamaForCausalLM.forward
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)

    def undo(self):
        for name, value in self.saved.items():
            setattr(self.module, name, value)
        self.module.LlamaForCausalLM.forward = self.forward


class Step:
    """Builds the model for one implementation at a time (the previous one is unpatched and freed first:
    fastnlg.patch's RoPE swap and Liger's patch are module-wide) and runs optimizer steps on a fixed batch."""

    def __init__(self, p, device, dtype):
        self.p, self.device, self.dtype = p, torch.device(device), dtype
        self.encoder = p.get("arch") == "bert"
        self.dir = tempfile.mkdtemp(prefix="fastnlg-step-")
        weakref.finalize(self, shutil.rmtree, self.dir, True)
        self.current, self.model, self.undo = None, None, None
        self.set_shape(p["batch"], p["seq"])

    def set_shape(self, batch, seq):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.p["vocab"], (batch, seq), generator=g)
        if self.encoder:
            self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                          "labels": torch.randint(0, NER_TAGS, (batch, seq), generator=g)}
        else:
            self.batch = {"input_ids": ids, "labels": ids.clone(),
                          "position_ids": torch.arange(seq).expand(batch, -1).contiguous()}
        self.tokens = int(ids.numel())

    def _config(self, impl):
        from fastnlg.train import TrainConfig

        method = self.p["method"]
        offload = method == "lora+offload"
        bf16 = self.device.type == "cuda" and self.dtype != torch.float32
        return TrainConfig(model=self.dir, task="token-classification" if self.encoder else "causal-lm",
                           method="lora" if offload else method, lora_r=16, lora_alpha=32,
                           learning_rate=1e-5, max_steps=10 ** 6, gradient_checkpointing=offload,
                           offload_activations=offload, patch=impl == "fastnlg", precision="bf16" if bf16 else "fp32")

    def _hf_config(self):
        import transformers

        p = self.p
        if self.encoder:
            return transformers.BertConfig(hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                                           num_attention_heads=p["heads"], intermediate_size=p["inter"],
                                           vocab_size=p["vocab"], max_position_embeddings=max(p["seq"], 512),
                                           num_labels=NER_TAGS)
        return transformers.LlamaConfig(hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                                        num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                                        intermediate_size=p["inter"], vocab_size=p["vocab"],
                                        max_position_embeddings=max(p["seq"], 131072), tie_word_embeddings=False)

    def _load(self, cfg):
        """The model as fastnlg.train loads it: from a saved folder (small sizes, and bitsandbytes' 4-bit),
        else built on the device directly in the dtype the trainer would load (an 8B model is never written)."""
        import transformers

        from fastnlg.train.setup import bnb_4bit, load_model
        from fastnlg.train.tasks import get as get_task

        big = self.device.type == "cuda" and self.p["size"] in ("1.1B", "8B")
        if not big or bnb_4bit(cfg, self.device):
            if not os.path.exists(os.path.join(self.dir, "config.json")):
                torch.manual_seed(0)
                dtype = torch.bfloat16 if big else torch.float32
                getattr(transformers, get_task(cfg.task).auto_class).from_config(
                    self._hf_config(), dtype=dtype).save_pretrained(self.dir)
            return load_model(cfg, self.device, get_task(cfg.task))
        frozen = cfg.method != "full" and cfg.precision != "fp32"
        torch.manual_seed(0)
        with torch.device(self.device):
            model = transformers.AutoModelForCausalLM.from_config(
                self._hf_config(), dtype=torch.bfloat16 if frozen else torch.float32)
        return model  # (prepare_method enables gradient checkpointing as the trainer does)

    def _build(self, impl):
        import fastnlg
        from fastnlg.train.setup import make_optimizer, prepare_method

        self.free()
        if impl == "liger":
            why = available("liger_kernel")
            if why is not None:
                raise NotInstalled(why)
        cfg = self._config(impl)
        model = self._load(cfg)
        if impl == "hf-eager-attention":
            model.set_attn_implementation("eager")
        model = prepare_method(model, cfg, log=lambda *_: None)
        if impl == "fastnlg":
            fastnlg.patch(model)
            self.undo = lambda: fastnlg.unpatch(model)
        elif impl == "liger":
            self.undo = _Liger(model.get_base_model() if hasattr(model, "get_base_model") else model).undo
        model.train()
        self.params = [q for q in model.parameters() if q.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg, self.device)
        self.model, self.cfg, self.current = model, cfg, impl

    def free(self):
        if self.undo is not None:
            self.undo()
        self.model = self.optimizer = self.params = self.undo = None
        self.current = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __call__(self, impl: str):
        from fastnlg.train.trainer import forward_backward

        if self.current != impl or self.model is None:
            self._build(impl)
        labels = self.batch["labels"] if self.encoder else self.batch["labels"][:, 1:]
        n = int((labels != -100).sum())
        loss = forward_backward(self.model, [(self.batch, n)], self.cfg, self.device)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def make_inputs(p, device, dtype):
    return {"step": Step(p, device, dtype)}


IMPLS = ("fastnlg", "eager", "hf-eager-attention", "liger")
BENCH = Bench("train_step", cases, make_inputs, {name: (lambda step, _n=name: step(_n)) for name in IMPLS},
              flops=flops, modes=("step",), x_label="tokens per sequence", tokens=lambda p: p["batch"] * p["seq"])


def targets_markdown(rows) -> str:
    """The end-to-end targets per configuration: fastnlg vs plain Transformers + PEFT (the "eager" rows)."""
    by = {(r.case, r.impl): r for r in rows if r.op == "train_step" and r.median_ms == r.median_ms}
    lines = ["## train_step targets", "", f"fastnlg vs plain Transformers + PEFT: tokens/s >= {TARGETS['speedup']:g}x, "
             f"peak memory <= {TARGETS['memory_ratio']:.0%}.", "",
             "| case | tokens/s ratio | peak memory ratio | verdict |", "|---|---|---|---|"]
    for (case, impl), ours in by.items():
        base = by.get((case, "eager"))
        if impl != "fastnlg" or base is None or ours.ratio is None:
            continue
        speed = ours.ratio  # side by side with eager (harness.run_benchmarks)
        mem = ours.peak_mem_mb / base.peak_mem_mb if ours.peak_mem_mb and base.peak_mem_mb else None
        below = [k for k, ok in (("speed", speed >= TARGETS["speedup"]),
                                 ("memory", mem is not None and mem <= TARGETS["memory_ratio"])) if not ok]
        lines.append(f"| {case} | {ours.speedup()} | {'' if mem is None else f'{mem:.2f}'} | "
                     f"{'met' if not below else 'BELOW TARGET: ' + ', '.join(below)} |")
    return "\n".join(lines) + "\n"


def max_context(method: str, impl: str, size: str, device: str, budget_gb: float, hi: int = 131072) -> int:
    """The longest single sequence (a multiple of 512) whose training step fits budget_gb of GPU memory."""
    p = {**SIZES[size], "method": method, "size": size, "batch": 1, "seq": 512}
    step = Step(p, device, torch.bfloat16)
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb / total))

    def fits(seq):
        step.set_shape(1, seq)
        try:
            step(impl)
            torch.cuda.synchronize()
            return True
        except torch.OutOfMemoryError:
            step.free()
            return False

    try:
        if not fits(512):
            return 0
        lo, top = 512, hi
        while top - lo > 512:
            mid = (lo + top) // 2 // 512 * 512
            lo, top = (mid, top) if fits(mid) else (lo, mid)
        return lo
    finally:
        step.free()
        torch.cuda.set_per_process_memory_fraction(1.0)


def side_by_side(sizes=("tiny", "small"), methods=("full", "lora"), batch=4, seq=256, rounds=15,
                 device="cpu") -> str:
    """fastnlg's step against plain Transformers + PEFT's, the two models alive together and their steps
    alternating (benchmarks/side_by_side.py), per size and method: a markdown table of the median ratio with
    its p20-p80 spread and verdict. fastnlg.patch's RoPE swap is module-wide, so the unpatched model runs
    fastnlg's RoPE too (which can only flatter the baseline)."""
    from .side_by_side import compare

    lines = [f"# Training step, fastnlg.patch against plain Transformers + PEFT, side by side ({device}, "
             f"{torch.get_num_threads()} threads, {batch} x {seq} tokens, fp32)", "",
             "Ratio: unpatched step time / patched step time per round (> 1: fastnlg is faster).", "",
             "| size | method | fastnlg ms | unpatched ms | ratio [p20-p80, rounds] | verdict |", "|---|---|---|---|---|---|"]
    for size in sizes:
        for method in methods:
            p = {**SIZES[size], "method": method, "size": size, "batch": batch, "seq": seq}
            steps = {name: Step(p, device, torch.float32) for name in ("fastnlg", "eager")}
            result = compare({name: (lambda s=steps[name], n=name: s(n)) for name in steps}, device=device,
                             baseline="eager", rounds=rounds)
            for step in steps.values():
                step.free()
            ms, ratio = result.ms, result.ratio("fastnlg")
            lines.append(f"| {size} | {method} | {ms['fastnlg'].median:.1f} | {ms['eager'].median:.1f} | {ratio} | "
                         f"{ratio.verdict()} |")
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def t5_side_by_side(batch=4, source=128, target=32, rounds=11, device="cpu", feed_forward_proj="relu") -> str:
    """A t5-small-shaped training step (d_model 512, 8 heads of 64, d_ff 2048, 6 + 6 layers, 32128 tokens, T5
    v1.0's ReLU MLP; AdamW), fastnlg.patch against the unpatched model, the two alive together and their steps
    alternating: a markdown table of the median ratio with its p20-p80 spread and verdict."""
    import copy

    import transformers

    import fastnlg

    from .side_by_side import compare

    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6, vocab_size=32128,
                                feed_forward_proj=feed_forward_proj, decoder_start_token_id=0)
    models = {"eager": transformers.T5ForConditionalGeneration(cfg).to(device).train()}
    models["fastnlg"] = copy.deepcopy(models["eager"])
    fastnlg.patch(models["fastnlg"])
    g = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(2, 32128, (batch, source), generator=g),
            "labels": torch.randint(2, 32128, (batch, target), generator=g)}
    data["attention_mask"] = torch.ones_like(data["input_ids"])
    data["attention_mask"][0, source // 2:] = 0  # one padded source: the encoder's key padding mask
    data = {k: v.to(device) for k, v in data.items()}
    optims = {n: torch.optim.AdamW(m.parameters(), lr=1e-5) for n, m in models.items()}

    def step(name):
        models[name](**data).loss.backward()
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)
    result = compare({n: (lambda n=n: step(n)) for n in models}, device=device, baseline="eager", rounds=rounds)
    ms, ratio = result.ms, result.ratio("fastnlg")
    return "\n".join([
        f"# T5 training step (t5-small's shape, {feed_forward_proj}), fastnlg.patch against unpatched, side by side "
        f"({device}, {torch.get_num_threads()} threads, {batch} x {source} source + {target} target tokens, fp32)",
        "", "Ratio: unpatched step time / patched step time per round (> 1: fastnlg is faster).", "",
        "| fastnlg ms | unpatched ms | ratio [p20-p80, rounds] | verdict |", "|---|---|---|---|",
        f"| {ms['fastnlg'].median:.1f} | {ms['eager'].median:.1f} | {ratio} | {ratio.verdict()} |"]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side-by-side", action="store_true", help="patched vs unpatched steps alternated, tiny and small "
                    "sizes (on CPU without CUDA): side_by_side.md")
    ap.add_argument("--encoder", action="store_true", help="with --side-by-side: BERT token classification at the "
                    "MiniLM shape, 8 x 128 tokens (and BERT-base's on CUDA)")
    ap.add_argument("--t5", action="store_true", help="with --side-by-side: a t5-small-shaped step (4 x 128 source "
                    "+ 32 target tokens)")
    ap.add_argument("--max-context", action="store_true")
    ap.add_argument("--budget-gb", type=float, default=24.0, help="the memory budget (a consumer GPU: 24)")
    ap.add_argument("--size", default="1.1B", choices=list(SIZES))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.side_by_side:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.t5:
            text = t5_side_by_side(device=device)
        elif args.encoder:
            text = side_by_side(("minilm", "bert-base") if device == "cuda" else ("minilm",), batch=8, seq=128,
                                device=device)
        else:
            text = side_by_side(device=device)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "side_by_side.md"), "w") as f:
            f.write(text)
        return 0
    if not args.max_context or not torch.cuda.is_available():
        ap.error("--max-context needs a CUDA device")
    found = {}
    for method in METHODS:
        for impl in ("fastnlg", "eager"):
            found[f"{method}/{impl}"] = max_context(method, impl, args.size, "cuda", args.budget_gb)
            print(f"{method:14} {impl:8} longest sequence in {args.budget_gb:g} GB: {found[f'{method}/{impl}']}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "max_context.json"), "w") as f:
        json.dump({"size": args.size, "budget_gb": args.budget_gb, "gpu": torch.cuda.get_device_name(),
                   "longest": found}, f, indent=1)
    lines = [f"# Longest sequence whose training step fits {args.budget_gb:g} GB ({args.size} Llama, "
             f"{torch.cuda.get_device_name()})", "", "| method | fastnlg | plain Transformers + PEFT | ratio | "
             f"target >= {TARGETS['context_ratio']:g}x |", "|---|---|---|---|---|"]
    for method in METHODS:
        a, b = found[f"{method}/fastnlg"], found[f"{method}/eager"]
        ratio = a / b if b else float("inf")
        lines.append(f"| {method} | {a} | {b} | {ratio:.2f}x | "
                     f"{'met' if ratio >= TARGETS['context_ratio'] else 'BELOW TARGET'} |")
    with open(os.path.join(args.out, "max_context.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
