"""The training step end to end, as `fastnlg train` runs it: one optimizer step (forward, backward, gradient
clipping, AdamW) of a Llama-style model through fastnlg.train's own loading, method set-up and
`forward_backward`, with fastnlg.patch ("fastnlg") vs plain Transformers ("eager"). Methods: full
fine-tuning, LoRA (r=16, all linear layers), QLoRA (bitsandbytes NF4 on CUDA when installed, else fastnlg's
NF4Linear) and LoRA with gradient checkpointing + activation offload to pinned CPU memory.

Reported per step: time, tokens/s and peak memory (CUDA: the allocator's peak above what was live before
the step, i.e. activations, gradients and optimizer state growth; CPU: the process's resident-set peak).
FLOPs (for TFLOP/s): 6 N P for full fine-tuning (P = parameters outside the embedding), 4 N P for the
adapter methods (no weight gradients of the frozen base), + 2 N P for the recomputation under checkpointing;
attention's T^2 terms are left out.

Sizes: CPU (quick) hidden 256, 4 layers, 4 x 256 tokens; CUDA a 1.1B Llama (TinyLlama's shape: hidden
2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocabulary 32000) at 4 x 2048 tokens, bf16 autocast.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import torch

from .harness import Bench, Case

SIZES = {
    "small": dict(hidden=256, layers=4, heads=4, kv=2, inter=688, vocab=2048, batch=4, seq=256),
    "1.1B": dict(hidden=2048, layers=22, heads=32, kv=4, inter=5632, vocab=32000, batch=4, seq=2048),
}
METHODS = ("full", "lora", "qlora", "lora+offload")


def cases(quick, device):
    name = "small" if quick or device != "cuda" else "1.1B"
    size = SIZES[name]
    return [Case(f"{m},{name},{size['batch']}x{size['seq']}", {**size, "method": m, "size": name}, i + 1)
            for i, m in enumerate(METHODS)]


def _params(p) -> int:
    h, i, L = p["hidden"], p["inter"], p["layers"]
    kv = h // p["heads"] * p["kv"]
    return L * (2 * h * h + 2 * h * kv + 3 * h * i) + h * p["vocab"]  # layers + LM head


def flops(p, mode):
    n = p["batch"] * p["seq"]
    per_token = 6 if p["method"] == "full" else 4
    if p["method"] == "lora+offload":
        per_token += 2  # the checkpointed forward runs twice
    return per_token * n * _params(p)


class Step:
    """Builds the model for one implementation at a time (the other one is unpatched and freed first:
    fastnlg.patch's RoPE swap is module-wide) and runs optimizer steps on a fixed packed batch."""

    def __init__(self, p, device, dtype):
        self.p, self.device, self.dtype = p, torch.device(device), dtype
        self.dir = tempfile.mkdtemp(prefix="fastnlg-step-")
        weakref.finalize(self, shutil.rmtree, self.dir, True)
        self.current, self.model = None, None
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=g)
        self.batch = {"input_ids": ids, "labels": ids.clone(),
                      "position_ids": torch.arange(p["seq"]).expand(p["batch"], -1).contiguous()}
        self.tokens = int(ids.numel())

    def _config(self, patch):
        from fastnlg.train import TrainConfig

        method = self.p["method"]
        offload = method == "lora+offload"
        return TrainConfig(model=self.dir, method="lora" if offload else method, lora_r=16, lora_alpha=32,
                           learning_rate=1e-5, max_steps=10 ** 6, gradient_checkpointing=offload,
                           offload_activations=offload, patch=patch,
                           precision="bf16" if self.device.type == "cuda" and self.dtype != torch.float32 else "fp32")

    def _build(self, patch):
        import transformers

        import fastnlg
        from fastnlg.train.trainer import load_model, make_optimizer, prepare_method

        self.free()
        if not os.path.exists(os.path.join(self.dir, "config.json")):
            p = self.p
            cfg = transformers.LlamaConfig(hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                                           num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                                           intermediate_size=p["inter"], vocab_size=p["vocab"],
                                           max_position_embeddings=p["seq"], tie_word_embeddings=False)
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(self.dir)
        cfg = self._config(patch)
        model = prepare_method(load_model(cfg, self.device), cfg, log=lambda *_: None)
        if patch:
            fastnlg.patch(model)
        model.train()
        self.params = [q for q in model.parameters() if q.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg, self.device)
        self.model, self.cfg, self.current = model, cfg, patch

    def free(self):
        if self.model is not None:
            import fastnlg

            if self.current:
                fastnlg.unpatch(self.model)
            self.model = self.optimizer = self.params = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def __call__(self, patch: bool):
        from fastnlg.train.trainer import forward_backward

        if self.current is not patch or self.model is None:
            self._build(patch)
        n = int((self.batch["labels"][:, 1:] != -100).sum())
        loss = forward_backward(self.model, [(self.batch, n)], self.cfg, self.device)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def make_inputs(p, device, dtype):
    return {"step": Step(p, device, dtype)}


def fastnlg_step(step):
    return step(True)


def eager_step(step):
    return step(False)


BENCH = Bench("train_step", cases, make_inputs, {"fastnlg": fastnlg_step, "eager": eager_step}, flops=flops,
              modes=("step",), x_label="method", tokens=lambda p: p["batch"] * p["seq"])
