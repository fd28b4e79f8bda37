"""Running the trainer on several processes (`torchrun --nproc-per-node N -m fastnlg.cli train ...`, or
`fastnlg train --nproc N`): DDP or FSDP2 (`torch.distributed.fsdp.fully_shard`), NCCL on CUDA and gloo on CPU.

The split of the work: every rank reads the same data in the same seeded order; a micro-batch of the global
batch is `batch_size` rows per rank, and rank r takes rows [r*batch_size, (r+1)*batch_size). The loss is
normalised by the target tokens of the *global* micro-batches (every rank can count them without
communicating), and multiplied by the world size because DDP and FSDP average gradients over ranks, so the
gradients are exactly those of one process running the global batch. Only rank 0 logs and writes files;
every rank takes part in the collectives that gather a checkpoint.

`Dist.single()` is the one-process case: every helper is then a no-op, so the loop has one shape.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

MODES = ("ddp", "fsdp")


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    owns_group: bool = False  # this trainer initialised the process group (and destroys it at the end)

    @classmethod
    def single(cls) -> "Dist":
        return cls()

    @classmethod
    def from_env(cls, mode: str) -> "Dist":
        """torchrun's environment -> a Dist (initialising the process group when needed)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        if mode not in MODES:
            raise ValueError(f"distributed={mode!r}; allowed: {MODES}")
        import torch.distributed as dist

        owns = not dist.is_initialized()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if owns:
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        return cls(world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank, mode=mode,
                   owns_group=owns)

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if self.on and name == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def wrap(self, model):
        """DDP, or FSDP2 with one shard group per decoder layer and one for the rest."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            dev = next(model.parameters()).device
            # buffers (rotary tables, NF4 weights) are the same on every process: no broadcast each forward
            return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                           broadcast_buffers=False)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for module in decoder_layers(model):
                fully_shard(module)
            fully_shard(model)
        return model

    def unwrap(self, model):
        return model.module if self.mode == "ddp" else model

    def no_grad_sync(self, model, last: bool):
        """Gradients are reduced on the last micro-batch of a step only."""
        if not self.on or last:
            return contextlib.nullcontext()
        if self.mode == "ddp":
            return model.no_sync()
        return _fsdp_no_sync(model)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()

    def shard(self, rows: list, batch_size: int) -> list:
        """This rank's rows of a global micro-batch of world * batch_size rows."""
        return rows[self.rank * batch_size:(self.rank + 1) * batch_size]

    # --- state that is sharded under FSDP: every rank calls these, rank 0 gets the full tensors -----------
    def full_state(self, model, trainable_only: bool) -> dict:
        model = self.unwrap(model)
        out = {}
        for name, p in model.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[name] = t.contiguous().cpu()
        if not trainable_only:  # buffers that are saved with the model (e.g. none for Llama, rotary is not)
            names = set(dict(model.named_parameters()))
            for name, t in model.state_dict().items():
                if name not in names and name not in out:
                    out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).contiguous().cpu()
        return out

    def load_params(self, model, values: dict) -> None:
        params = dict(self.unwrap(model).named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                p = params[name]
                if hasattr(p, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(p.to_local().device, p.dtype), p.device_mesh,
                                              p.placements).to_local()
                    p.to_local().copy_(value)
                else:
                    p.copy_(value)

    def optimizer_state(self, model, optimizer) -> dict:
        if self.mode != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        if self.mode != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))


def decoder_layers(model) -> list:
    """The repeated blocks of a Transformers causal LM (the ModuleList that holds the most parameters)."""
    best, size = [], 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = list(module), n
    if not best:
        raise ValueError(f"{type(model).__name__}: no repeated decoder layers found to shard with FSDP")
    return best


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
