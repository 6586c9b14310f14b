
import pytest
import torch
from torch import nn

from workloads.attention import MLRA, CausalSelfAttention, LowRankQKV, effective_weight
from workloads.models import GPT, GPTConfig
from workloads.stabilizers import REGISTRY, SigmaReparamLinear, WeylAdamW, apply_sigma_reparam, resolve


# ------------------------------------------------------------------------------ sigmaReparam
def test_sigma_reparam_effective_weight_has_spectral_norm_gamma():
    lin = SigmaReparamLinear(24, 40)
    with torch.no_grad():
        lin.weight.add_(0.3 * torch.randn_like(lin.weight))  # move W away from the SVD'd init
        lin.gamma.fill_(2.5)
    x = torch.randn(8, 24)
    for _ in range(100):  # power-iteration warm-up: one step per training forward
        lin(x)
    s = torch.linalg.svdvals(lin.effective_weight().detach())[0]
    assert float(s) == pytest.approx(2.5, rel=1e-3)


def test_sigma_reparam_gradient_reaches_gamma():
    lin = SigmaReparamLinear(16, 16, bias=False)
    x = torch.randn(4, 16)
    out = lin(x)
    out.sum().backward()
    # out is linear in gamma: d sum(out) / d gamma = sum(out) / gamma
    assert lin.gamma.grad is not None
    torch.testing.assert_close(lin.gamma.grad, out.sum().detach() / lin.gamma.detach())
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_sigma_reparam_starts_as_the_plain_layer_and_eval_does_not_iterate():
    plain = nn.Linear(12, 20)
    sr = SigmaReparamLinear.from_linear(plain)
    x = torch.randn(3, 12)
    torch.testing.assert_close(sr(x), plain(x), rtol=1e-5, atol=1e-6)
    sr.eval()
    u = sr.u.clone()
    with torch.no_grad():
        sr.weight.mul_(3.0)
    sr(x)
    assert torch.equal(sr.u, u)


def test_apply_sigma_reparam_to_gpt_blocks_only():
    model = GPT(GPTConfig(depth=2, width=32, heads=2, seq_len=16))
    x = torch.randint(0, 256, (2, 16))
    before = model(x).detach()
    apply_sigma_reparam(model)
    swapped = [m for m in model.blocks.modules() if isinstance(m, SigmaReparamLinear)]
    assert len(swapped) == 2 * 4  # qkv, proj, fc, mlp proj per block
    assert not any(type(m) is nn.Linear for m in model.blocks.modules())
    assert model.lm_head.weight is model.wte.weight  # tied head untouched
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ Weyl
def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3))


def _train(model, opt, steps=15):
    g = torch.Generator().manual_seed(7)
    snapshots = []
    for _ in range(steps):
        x = torch.randn(16, 10, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        snapshots.append(before)
    return snapshots


def test_weyl_equals_adamw_when_the_bound_never_fires():
    a, b = _mlp(), _mlp()
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    _train(a, torch.optim.AdamW(a.parameters(), foreach=False, **kw))
    opt = WeylAdamW(b.parameters(), tau=1e9, **kw)
    _train(b, opt)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert opt.fired_total == 0 and opt.last_stats["weyl/fire_rate"] == 0.0


def test_weyl_bound_holds_when_it_fires():
    tau = 0.01
    a, b = _mlp(), _mlp()
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    ref = torch.optim.AdamW(a.parameters(), foreach=False, **kw)
    opt = WeylAdamW(b.parameters(), tau=tau, power_iters=300, weight_power_iters=300, **kw)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)
        # same weights and gradients for both: compare one step of each
        with torch.no_grad():
            for pa, pb in zip(a.parameters(), b.parameters()):
                pa.copy_(pb)
        for m in (a, b):
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        before = [p.detach().clone() for p in b.parameters()]
        ref.step()
        opt.step()
        assert opt.last_stats["weyl/fire_rate"] == 1.0
        for w0, pa, pb in zip(before, a.parameters(), b.parameters()):
            if w0.dim() < 2:
                continue
            d_weyl, d_adam = w0 - pb.detach(), w0 - pa.detach()
            s_w = torch.linalg.svdvals(w0.double())[0]
            s_upd = torch.linalg.svdvals(d_weyl.double())[0]
            assert s_upd <= tau * s_w * (1 + 1e-4)   # sigma_1(step) <= tau sigma_1(W_{t-1})
            assert s_upd >= tau * s_w * (1 - 1e-2)   # ... and it is the bound, not less
            cos = torch.nn.functional.cosine_similarity(d_weyl.flatten(), d_adam.flatten(), dim=0)
            assert float(cos) > 1 - 1e-5             # same direction as AdamW's step
    assert 0 < opt.last_stats["weyl/min_lr_scale"] < 1


def test_weyl_rejects_bad_options():
    with pytest.raises(ValueError, match="tau"):
        WeylAdamW(nn.Linear(2, 2).parameters(), tau=0)
    with pytest.raises(ValueError, match="threshold"):
        WeylAdamW(nn.Linear(2, 2).parameters(), tau=0.5, threshold=0.1)


# ------------------------------------------------------------------------------------ MLRA
def test_mlra_shape_and_parameter_count():
    d, h, r = 64, 4, 8
    mlra, std = MLRA(d, h, rank=r), CausalSelfAttention(d, h)
    x = torch.randn(2, 10, d)
    assert mlra(x).shape == (2, 10, d) == std(x).shape
    hd = d // h
    expected = d * 3 * h * r + 3 * h * r * hd + d * d  # down, per-head up, dense output proj
    assert sum(p.numel() for p in mlra.parameters()) == expected
    assert sum(p.numel() for p in std.parameters()) == 3 * d * d + d * d
    assert expected < 4 * d * d


def test_low_rank_qkv_effective_weight_is_what_forward_applies():
    qkv = LowRankQKV(32, 4, 3)
    x = torch.randn(5, 32)
    w = effective_weight(qkv)
    assert w.shape == (96, 32)
    torch.testing.assert_close(qkv(x), x @ w.T, rtol=1e-5, atol=1e-6)
    for h in range(4):  # each head's W_q block has rank <= r
        assert torch.linalg.matrix_rank(w[h * 8:(h + 1) * 8].double().T @ w[32 + h * 8: 32 + (h + 1) * 8].double()) <= 3


# ------------------------------------------------------------------------------- registry
def test_registry_names_and_errors():
    assert set(REGISTRY) == {"none", "weyl", "sigma_reparam", "mlra", "qk_norm"}
    assert [s.name for s in resolve("weyl+qk_norm")] == ["weyl", "qk_norm"]
    assert resolve(("none",)) == []
    with pytest.raises(ValueError, match=r"unknown \['bogus'\].*allowed"):
        resolve(("bogus",))
    with pytest.raises(ValueError, match="cannot be combined"):
        resolve(("none", "weyl"))
    with pytest.raises(ValueError, match="unknown option 'rnk'"):
        resolve(("mlra",), {"mlra": {"rnk": 2}})
    with pytest.raises(ValueError, match="is not a int"):
        resolve(("mlra",), {"mlra": {"rank": 2.5}})
