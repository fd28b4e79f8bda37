"""fastnlg.losses against TRL's own loss code (TRL 1.16, pinned), run on materialised logits in fp64.

TRL's DPO, KTO and GRPO losses live inside their trainers' _compute_loss: each runs here as TRL's code on a
stand-in trainer (the attributes it reads) and a tiny fp64 LM whose forward gives TRL's fused-head output from
full logits. fastnlg's side is the path a user takes: fused_linear_logprobs on the hidden states (no logits),
sequence_logps, the loss. Losses and gradients (to the embedding and the head) must agree to fp64 rounding.
"""
import collections
import types

import pytest
import torch

from fastnlg import losses as L
from fastnlg.ops import fused_linear_logprobs

trl = pytest.importorskip("trl")
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

V, C, T = 23, 8, 7


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def unwrap_model(self, m):
        return m


class _TinyLM(torch.nn.Module):
    """Embedding -> tanh -> head, fp64. forward(..., labels, fused_lm_head=True) is TRL's fused-head output, from
    materialised logits; `hidden` is what fastnlg's path feeds the fused op."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, C).double()
        self.head = torch.nn.Linear(C, V, bias=False).double()

    def hidden(self, input_ids):
        return torch.tanh(self.emb(input_ids))

    def forward(self, input_ids=None, labels=None, fused_lm_head=False, **_):
        logits = self.head(self.hidden(input_ids))[:, :-1]
        y = labels[:, 1:]
        logp_all = logits.log_softmax(-1)
        logp = logp_all.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
        mask = y != -100
        p = logp_all.exp()
        return FusedCausalLMOutput(
            loss=None, log_probs=logp.masked_fill(~mask, 0), entropy=-(p * logp_all).sum(-1).masked_fill(~mask, 0),
            log_sum_sq_probs=torch.logsumexp(2 * logp_all, -1), mean_logits=logits.mean(-1),
            is_top1=(logits.argmax(-1) == y) & mask, label_mask=mask)


def _fake_trainer(model, **attrs):
    base = dict(model=model, accelerator=_Accelerator(), aux_loss_enabled=False, precompute_ref_logps=True,
                _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0,
                _tp_size=1)
    return types.SimpleNamespace(**{**base, **attrs})


def _batch(B, seed=0):
    """input_ids (B, T), a completion mask (the prompt is the first 2-3 tokens; padding at the end)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i in range(B):
        start, end = 2 + i % 2, T - (i % 3)
        mask[i, start:end] = 1
    return ids, mask


def _our_token_logps(model, ids, completion_mask):
    """fastnlg's path: the fused op on the hidden states, (B, T - 1) per-token log-probs, 0 off the completion."""
    h = model.hidden(ids)[:, :-1]
    y = ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    B = ids.shape[0]
    return fused_linear_logprobs(h.reshape(-1, C), model.head.weight, y.reshape(-1), chunk_size=5).view(B, T - 1)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                                       ("robust", 0.2)])
def test_dpo_equals_trl(loss_type, label_smoothing):
    from trl.trainer.dpo_trainer import DPOTrainer

    torch.manual_seed(0)
    model = _TinyLM()
    B = 3
    ids, cm = _batch(2 * B)
    ref = torch.randn(2 * B, dtype=torch.float64) - 5
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": cm,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    fake = _fake_trainer(model, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
                         loss_weights=[1.0], beta=0.3, label_smoothing=label_smoothing, use_weighting=False)
    theirs = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    g_theirs = _grads(model, theirs)

    seq = L.sequence_logps(_our_token_logps(model, ids, cm))
    lengths = cm.sum(1)
    losses, chosen_r, rejected_r = L.dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=0.3, loss_type=loss_type,
                                              label_smoothing=label_smoothing, chosen_lengths=lengths[:B],
                                              rejected_lengths=lengths[B:])
    ours = losses.mean()
    g_ours = _grads(model, ours)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    m = fake._metrics["train"]
    assert chosen_r.mean().item() == pytest.approx(m["rewards/chosen"][-1], rel=1e-10)
    assert (chosen_r - rejected_r).mean().item() == pytest.approx(m["rewards/margins"][-1], rel=1e-9, abs=1e-12)


def test_dpo_label_smoothing_is_conservative_dpo():
    """sigmoid with label_smoothing is cDPO, the form TRL's CPO keeps: cpo_loss on the log-ratios."""
    c, r, rc, rr = (torch.randn(5, dtype=torch.float64) for _ in range(4))
    ours = L.dpo_loss(c, r, rc, rr, beta=0.2, label_smoothing=0.1)[0]
    theirs = L.cpo_loss(c - rc, r - rr, beta=0.2, label_smoothing=0.1)[0]
    torch.testing.assert_close(ours, theirs)
    free = L.dpo_loss(c, r, beta=0.2)[0]  # reference-free: log p_ref = 0
    torch.testing.assert_close(free, L.dpo_loss(c, r, torch.zeros(5).double(), torch.zeros(5).double(), beta=0.2)[0])


@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", 0.0), ("simpo", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                             ("sigmoid", 0.3)])
def test_cpo_and_simpo_equal_trl(loss_type, alpha):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    c, r = -torch.rand(6, dtype=torch.float64) * 3, -torch.rand(6, dtype=torch.float64) * 3
    fake = types.SimpleNamespace(alpha=alpha, beta=2.0, loss_type=loss_type, simpo_gamma=0.7, label_smoothing=0.1,
                                 accelerator=_Accelerator())
    for ours, theirs in zip(L.cpo_loss(c, r, beta=2.0, loss_type=loss_type, label_smoothing=0.1, simpo_gamma=0.7,
                                       alpha=alpha), CPOTrainer.cpo_loss(fake, c, r)):
        torch.testing.assert_close(ours, theirs)
    if loss_type == "simpo":
        torch.testing.assert_close(L.simpo_loss(c, r, beta=2.0, gamma=0.7, label_smoothing=0.1)[0],
                                   CPOTrainer.cpo_loss(fake, c, r)[0])


def test_orpo_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    c, r = -torch.rand(6, dtype=torch.float64) * 2 - 1e-3, -torch.rand(6, dtype=torch.float64) * 2 - 1e-3
    c[0] = -0.01  # both branches of log(1 - e^x)
    fake = types.SimpleNamespace(beta=0.25, accelerator=_Accelerator())
    # TRL computes in fp32 (.float()); fastnlg promotes to at least fp32, so fp32 inputs match it exactly and
    # fp64 inputs stay fp64 (equal to TRL's figures within fp32 rounding)
    for ours, theirs in zip(L.orpo_loss(c.float(), r.float(), beta=0.25), ORPOTrainer.odds_ratio_loss(fake, c, r)):
        torch.testing.assert_close(ours, theirs)
    for ours, theirs in zip(L.orpo_loss(c, r, beta=0.25), ORPOTrainer.odds_ratio_loss(fake, c, r)):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, theirs.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_equals_trl(loss_type):
    from trl.trainer.kto_trainer import KTOTrainer

    torch.manual_seed(1)
    model = _TinyLM()
    ids, cm = _batch(5, seed=3)
    label = torch.tensor([True, False, True, True, False])
    ref = torch.randn(5, dtype=torch.float64) - 4
    kl_policy, kl_ref = torch.randn(5, dtype=torch.float64) - 3, torch.randn(5, dtype=torch.float64) - 4
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": cm, "label": label,
              "ref_logps": ref, "ref_KL_logps": kl_ref}
    fake = _fake_trainer(model, calculate_KL=loss_type == "kto", loss_type=loss_type, beta=0.4,
                         desirable_weight=1.3, undesirable_weight=0.8,
                         _compute_kl_logps=lambda model, batch: kl_policy)
    theirs = KTOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    g_theirs = _grads(model, theirs)

    seq = L.sequence_logps(_our_token_logps(model, ids, cm))
    losses, chosen_r, rejected_r, kl = L.kto_loss(seq[label], seq[~label], kl_policy, ref[label], ref[~label], kl_ref,
                                                  beta=0.4, desirable_weight=1.3, undesirable_weight=0.8,
                                                  loss_type=loss_type)
    ours = losses.nanmean()
    g_ours = _grads(model, ours)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert kl.item() == pytest.approx(fake._metrics["train"]["kl"][-1])


@pytest.mark.parametrize("loss_type,level,beta", [("grpo", "token", 0.0), ("bnpo", "token", 0.04),
                                                  ("dr_grpo", "token", 0.0), ("dapo", "token", 0.04),
                                                  ("grpo", "sequence", 0.04)])
def test_grpo_equals_trl(loss_type, level, beta):
    from trl.trainer.grpo_trainer import GRPOTrainer

    torch.manual_seed(2)
    model = _TinyLM()
    ids, cm = _batch(4, seed=5)
    P = 3  # prompt length: the completion is ids[:, P:]
    comp_mask = cm[:, P:]
    tok = _our_token_logps(model, ids, torch.ones_like(cm))[:, P - 1:]  # (B, T - P): logp of each completion token
    old = tok.detach() + 0.3 * torch.randn_like(tok)  # a policy that has moved: some ratios clip
    ref = tok.detach() + 0.2 * torch.randn_like(tok)
    adv = torch.randn(4, dtype=torch.float64)
    n_items = comp_mask.sum() + 5  # the accumulated batch's completion tokens (dapo)

    def theirs_fn(logps):
        args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
        fake = _fake_trainer(
            model, _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
            top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
            args=args, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
            current_gradient_accumulation_steps=1, max_completion_length=T - P, _entropy_bonus_enabled=False)
        inputs = {"prompt_ids": ids[:, :P], "prompt_mask": torch.ones_like(ids[:, :P]), "completion_ids": ids[:, P:],
                  "completion_mask": comp_mask, "advantages": adv, "old_per_token_logps": old,
                  "ref_per_token_logps": ref, "num_items_in_batch": n_items}
        return GRPOTrainer._compute_loss(fake, model, inputs), fake

    theirs, fake = theirs_fn(tok)
    g_theirs = _grads(model, theirs)
    tok = _our_token_logps(model, ids, torch.ones_like(cm))[:, P - 1:]
    out = L.grpo_loss(tok, old, adv, comp_mask, ref_per_token_logps=ref, beta=beta, epsilon_low=0.2,
                      epsilon_high=0.28, loss_type=loss_type, max_completion_length=T - P,
                      num_items_in_batch=n_items, importance_sampling_level=level)
    g_ours = _grads(model, out.loss)
    torch.testing.assert_close(out.loss, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    m = fake._metrics["train"]
    if beta:
        assert out.mean_kl.item() == pytest.approx(m["kl"][-1], rel=1e-9)
    clipped = sum(m[k][-1] for k in ("clip_ratio/low_mean", "clip_ratio/high_mean") if m.get(k))
    assert out.clip_ratio.item() == pytest.approx(clipped, rel=1e-6, abs=1e-12)  # (TRL logs it in fp32)


def test_gradient_accumulation_is_exact():
    """Two micro-batches reduced with the whole batch's count give the large batch's loss and gradient (DPO);
    GRPO's dapo with num_items_in_batch likewise."""
    torch.manual_seed(3)
    c, r = torch.randn(8, dtype=torch.float64, requires_grad=True), torch.randn(8, dtype=torch.float64,
                                                                               requires_grad=True)
    L.reduce(L.dpo_loss(c, r, beta=0.5)[0]).backward()
    full = (c.grad.clone(), r.grad.clone())
    c.grad = r.grad = None
    for s in (slice(0, 3), slice(3, 8)):
        L.reduce(L.dpo_loss(c[s], r[s], beta=0.5)[0], num_items_in_batch=8).backward()
    torch.testing.assert_close((c.grad, r.grad), full)

    lp = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(6, 5) > 0.3).long()
    adv = torch.randn(6, dtype=torch.float64)
    L.grpo_loss(lp, None, adv, mask, loss_type="dapo").loss.backward()
    full = lp.grad.clone()
    lp.grad = None
    for s in (slice(0, 2), slice(2, 6)):
        L.grpo_loss(lp[s], None, adv[s], mask[s], loss_type="dapo", num_items_in_batch=mask.sum()).loss.backward()
    torch.testing.assert_close(lp.grad, full)


def test_bad_input():
    x = torch.randn(4)
    with pytest.raises(ValueError, match=r"one value per example.*chosen_logps \(4,\).*rejected_logps \(3,\)"):
        L.dpo_loss(x, x[:3])
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, hinge, ipo, robust"):
        L.dpo_loss(x, x, loss_type="kto")
    with pytest.raises(ValueError, match="give both reference log-probabilities"):
        L.dpo_loss(x, x, x)
    with pytest.raises(ValueError, match=r"must be 1-D.*\(4, 2\)"):
        L.orpo_loss(torch.randn(4, 2), x)
    with pytest.raises(TypeError, match="floating"):
        L.cpo_loss(x, torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="needs ref_per_token_logps"):
        L.grpo_loss(torch.randn(2, 3), None, torch.randn(2), torch.ones(2, 3), beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        L.grpo_loss(torch.randn(2, 3), None, torch.randn(2), torch.ones(2, 3), loss_type="dr_grpo")
    with pytest.raises(ValueError, match=r"completion_mask \(2, 4\) must match"):
        L.grpo_loss(torch.randn(2, 3), None, torch.randn(2), torch.ones(2, 4))
