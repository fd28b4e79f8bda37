"""In eager mode the public ops run their custom op's implementation inside a plain autograd.Function
(fastnlg/ops/_eager.py: no torch.library dispatch round trips); that path gives exactly what the registered
custom op (torch.compile's path, checked by test_opcheck.py) gives, outputs and gradients, and meta tensors
still go through the op's fake implementation."""
import pytest
import torch

from fastnlg.ops import apply_rope, geglu, gelu, layer_norm, rms_norm, swiglu


def _cases():
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    return {"rms_norm": (lambda x, w: rms_norm(x, w, 1e-6, 0.5), (t(3, 5, 16), t(16))),
            "layer_norm": (layer_norm, (t(7, 16), t(16), t(16))),
            "swiglu": (swiglu, (t(4, 24), t(4, 24))),
            "geglu": (geglu, (t(4, 24), t(4, 24))),
            "gelu": (gelu, (t(4, 24), t(24))),
            "apply_rope": (apply_rope, (t(2, 4, 5, 8), t(2, 2, 5, 8), t(5, 8), t(5, 8)))}


@pytest.mark.parametrize("name", list(_cases()))
def test_eager_path_equals_the_custom_op(name, monkeypatch):
    from fastnlg.ops import _eager

    fn, inputs = _cases()[name]

    def run():
        xs = [x.clone().requires_grad_(name != "apply_rope" or i < 2) for i, x in enumerate(inputs)]
        out = fn(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.square().sum() for o in outs).backward()
        return outs, [x.grad for x in xs]
    outs, grads = run()
    assert all(type(o.grad_fn).__name__.endswith("_eagerBackward") for o in outs)  # the fast path ran
    monkeypatch.setattr(_eager, "_plain", lambda args: False)  # as under compile: the registered custom op
    ref_outs, ref_grads = run()
    assert all("GeneratedBackwardFor_fastnlg" in type(o.grad_fn).__name__ for o in ref_outs)
    for a, b in zip(outs + tuple(grads), ref_outs + tuple(ref_grads)):
        assert (a is None and b is None) or torch.equal(a, b)
    monkeypatch.undo()
    meta = fn(*[x.to("meta") for x in inputs])  # not a plain CPU/CUDA tensor: the op and its fake
    assert all(m.device.type == "meta" for m in (meta if isinstance(meta, tuple) else (meta,)))
