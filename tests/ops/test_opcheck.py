"""torch.library.opcheck on every fastnlg custom op (schema, fake/meta implementation against the real one
(shapes, dtypes and strides), autograd registration, AOT dispatch), on each CPU backend, with contiguous and
strided inputs: what torch.compile relies on."""
import pytest
import torch

import fastnlg.ops  # noqa: F401  (registers the ops)
from tests.conftest import backend_params


def _rows(*shape, grad=True, strided=False):
    t = torch.randn(*shape)
    if strided:  # a transposed view, as HF hands q/k to RoPE
        t = torch.randn(shape[0], shape[2], shape[1], *shape[3:]).transpose(1, 2) if len(shape) == 4 else \
            torch.randn(*shape[:-1], shape[-1] * 2)[..., ::2]
    return t.requires_grad_(grad)


def _cases(strided):
    x, w = _rows(3, 5, 16, strided=strided), torch.randn(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    q, k = _rows(2, 4, 5, 8, strided=strided), _rows(2, 2, 5, 8, strided=strided)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    g, u = _rows(3, 5, 16, strided=strided), _rows(3, 5, 16, strided=strided)
    dy = torch.randn(3, 5, 16)
    rstd = torch.rand(15) + 0.5
    mean = torch.randn(15)
    ops = torch.ops.fastnlg
    kv = _rows(2, 2, 7, 8, strided=strided)
    table, kpm = torch.randn(8, 4, requires_grad=True), torch.rand(2, 7) > 0.3
    rpa = (q, kv, kv, table, kpm, True, 1.0, False, 8, 12, 2, 0.0, 0)  # (GQA, causal with a query offset)
    o, lse = (t.detach() for t in ops.relative_position_attention_fwd(*rpa))
    return [
        ("relative_position_attention_fwd", ops.relative_position_attention_fwd, rpa),
        ("relative_position_attention_bwd", ops.relative_position_attention_bwd,
         (torch.randn_like(o), q.detach(), kv.detach(), kv.detach(), o, lse, table.detach(), *rpa[4:])),
        ("rms_norm_fwd", ops.rms_norm_fwd, (x, w, 1e-6, 0.0, False)),
        ("rms_norm_fwd_llama", ops.rms_norm_fwd, (x, w, 1e-6, 0.0, True)),
        ("rms_norm_bwd", ops.rms_norm_bwd, (dy, x.detach(), w.detach(), rstd, 0.0, True)),
        ("layer_norm_fwd", ops.layer_norm_fwd, (x, w, b, 1e-5)),
        ("layer_norm_bwd", ops.layer_norm_bwd, (dy, x.detach(), w.detach(), mean, rstd, True, True)),
        ("add_layer_norm_fwd", ops.add_layer_norm_fwd, (x, g, w, b, 1e-5)),
        ("add_layer_norm_bwd", ops.add_layer_norm_bwd, (dy, u.detach(), x.detach(), w.detach(), mean, rstd, True, True)),
        ("add_layer_norm_bwd_eager", ops.add_layer_norm_bwd, (dy, None, x.detach(), w.detach(), mean, rstd, True,
                                                              False)),  # (no sum gradient, no db)
        ("rope_fwd", ops.rope_fwd, (q, k, cos, sin)),
        ("rope_bwd", ops.rope_bwd, (q.detach(), k.detach(), cos, sin)),
        ("glu_fwd", ops.glu_fwd, (g, u, 0, False)),
        ("glu_fwd_eager", ops.glu_fwd, (g, u, 1, True)),
        ("glu_bwd", ops.glu_bwd, (dy, g.detach(), u.detach(), 2)),
        ("gelu_fwd", ops.gelu_fwd, (g, b, True)),
        ("gelu_fwd_eager", ops.gelu_fwd, (g, None, False)),  # (no bias)
        ("gelu_bwd", ops.gelu_bwd, (dy, g.detach(), b.detach(), True, True)),
    ]


# every CPU backend on contiguous and strided inputs; the Triton interpreter (slow) on the strided ones only,
# which make the same checks
OPCHECK_PARAMS = [pytest.param(p.values[0], p.values[1], strided, id=f"{'strided' if strided else 'contiguous'}-{p.id}")
                  for p in backend_params() if p.values[0] == "cpu" for strided in (False, True)
                  if strided or p.values[1] != "triton"]


@pytest.mark.parametrize("device,backend,strided", OPCHECK_PARAMS)
def test_opcheck_every_custom_op(device, backend, strided, use_backend):
    use_backend(backend)
    cases = _cases(strided)
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastnlg::")}
    assert registered <= {name.rsplit("_llama", 1)[0].rsplit("_eager", 1)[0] for name, _, _ in cases}, registered
    for _name, op, args in cases:
        torch.library.opcheck(op, args)
