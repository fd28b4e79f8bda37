"""The trainer on a GPU (gpu tier): no host synchronisation inside a training step between logs (the
issue's "no host syncs beyond logging", checked with torch.cuda.set_sync_debug_mode through the trainer's
sync_debug option), patched and unpatched bf16 runs agreeing, QLoRA on bitsandbytes' 4-bit when installed."""
import importlib.util

import pytest
import torch

from fastnlg.train import train
from tests.tiny_model import losses, train_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cfg(tiny, out, **kw):
    return train_config(tiny, out, **{"max_steps": 8, "log_every": 4, "eval_every": 100, "save_every": 100,
                                      "learning_rate": 1e-3, "device": "cuda", **kw})


_losses = losses


@pytest.mark.parametrize("method", ["full", "lora"])
def test_no_host_sync_inside_a_step_unpatched(tiny, tmp_path, method):
    """sync_debug=True sets set_sync_debug_mode("error") for every step but the first (kernel tuning) and the
    logging ones: any .item(), .tolist(), bool(tensor) or synchronising copy in the step raises."""
    cfg = _cfg(tiny, tmp_path, method=method, patch=False, sync_debug=True, precision="bf16")
    train(cfg, log=lambda *_: None)
    assert len(_losses(cfg.output_dir)) == 2


@pytest.mark.parametrize("method", ["full", "lora"])
def test_patched_step_makes_only_the_named_host_reads(tiny, tmp_path, method, monkeypatch):
    """The same steps patched, with every synchronising call recorded by the fastnlg function that made it:
    each must be one of tests/host_syncs.ALLOWED (the loss's label check, the mask's form once per mask, ...);
    any other read fails, naming where it happens."""
    from fastnlg.train import trainer
    from tests import host_syncs

    monkeypatch.setattr(trainer, "SYNC_DEBUG_MODE", "warn")
    cfg = _cfg(tiny, tmp_path, method=method, patch=True, sync_debug=True, precision="bf16")
    with host_syncs.record(set_mode=False) as seen:
        train(cfg, log=lambda *_: None)
    assert len(_losses(cfg.output_dir)) == 2
    assert not host_syncs.unexpected(seen), f"host reads inside a training step: {dict(seen)}"


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_bf16_patched_trains_as_unpatched(tiny, tmp_path, method):
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed: QLoRA runs on fastnlg's NF4Linear (tested on CPU)")
    ours = _cfg(tiny, tmp_path / "p", method=method, precision="bf16", log_every=1)
    ref = _cfg(tiny, tmp_path / "u", method=method, precision="bf16", log_every=1, patch=False)
    train(ours, log=lambda *_: None)
    train(ref, log=lambda *_: None)
    a, b = torch.tensor(_losses(ours.output_dir)), torch.tensor(_losses(ref.output_dir))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=2e-2, atol=0)
