import math

import pytest
import torch
from torch import nn

from workloads.attention import MLRA, CausalSelfAttention, LowRankQKV, effective_weight
from workloads.models import GPT, GPTConfig
from workloads.stabilizers import REGISTRY, SigmaReparamLinear, WeylAdamW, apply_sigma_reparam, resolve, sigma_reparam
from workloads.trainer import Trainer, build_model
from workloads.trial import TrialConfig


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


def _reference_sigma_reparam(weight, gamma, u, v, x, bias):
    """The previous SigmaReparamLinear forward (training, with grad): two normalised mat-vecs, then
    sigma = v^T W u through einsum. Returns the output and the updated (u, v)."""
    with torch.no_grad():
        v = nn.functional.normalize(weight @ u, dim=0)
        u = nn.functional.normalize(weight.t() @ v, dim=0)
    sigma = torch.einsum("o,oi,i->", v, weight, u)
    return nn.functional.linear(x, weight * (gamma / sigma), bias), u, v


def test_sigma_reparam_equals_reference_maths():
    torch.manual_seed(0)
    lin = SigmaReparamLinear(24, 40)
    with torch.no_grad():
        lin.weight.add_(0.3 * torch.randn_like(lin.weight))
    w = lin.weight.detach().clone().requires_grad_()
    gamma = lin.gamma.detach().clone().requires_grad_()
    bias = lin.bias.detach().clone().requires_grad_()
    u, v = lin.u.clone(), lin.v.clone()
    for _ in range(4):
        x = torch.randn(8, 24)
        out = lin(x)
        ref, u, v = _reference_sigma_reparam(w, gamma, u, v, x, bias)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lin.u, u)
        torch.testing.assert_close(lin.v, v)
    (out ** 2).sum().backward()
    (ref ** 2).sum().backward()
    torch.testing.assert_close(lin.weight.grad, w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lin.gamma.grad, gamma.grad, rtol=1e-4, atol=1e-6)


def test_sigma_reparam_power_iteration_is_fp32_under_bf16_autocast():
    lin = SigmaReparamLinear(32, 48)
    with torch.no_grad():  # a spectral gap (2 vs 1) so that 60 iterations converge in fp32
        q1, _ = torch.linalg.qr(torch.randn(48, 32))
        q2, _ = torch.linalg.qr(torch.randn(32, 32))
        spec = torch.linspace(1.0, 0.1, 32)
        spec[0] = 2.0
        lin.weight.copy_((q1 * spec) @ q2.T + 0.01 * torch.randn(48, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sigma = lin.sigma()
        out = lin(torch.randn(4, 32))
    assert sigma.dtype == torch.float32 and lin.u.dtype == lin.v.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    exact = torch.linalg.matrix_norm(lin.weight.detach().double(), 2)
    for _ in range(60):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sigma = lin.sigma()
    assert float(sigma.detach()) == pytest.approx(float(exact), rel=1e-5)  # bf16 would stop near 1e-2


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


# sigmaReparam's batched power step (issue 12): the model's pre-hook runs the power step of all
# same-shape layers at once; the per-layer path (``model.sigma_reparam_batched = False``) is the
# reference for losses, gradients and u/v buffers.
def _count_batched_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = sigma_reparam.batched_power_step

    def counted(layers):
        calls.append(len(layers))
        return real(layers)

    monkeypatch.setattr(sigma_reparam, "batched_power_step", counted)
    return calls


def _assert_same_state(batched: nn.Module, reference: nn.Module, none_is_zero: bool = False) -> None:
    for (name, p), (_, q) in zip(batched.named_parameters(), reference.named_parameters(), strict=True):
        if none_is_zero and q.grad is None and p.grad is not None:
            assert not p.grad.any(), name
            continue
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:  # float rounding (sums in another order): relative to the whole gradient
            err = float((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30))
            assert err <= 1e-5, f"grad of {name}: relative error {err:.2e}"  # measured <= 5.2e-6 (GPT), 1.9e-6 (ViT)
    for (name, b), (_, c) in zip(batched.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"buffer {name}: {m}")


def test_sigma_reparam_batched_gpt_training_equals_per_layer(monkeypatch):
    calls = _count_batched_steps(monkeypatch)
    cfg = TrialConfig(workload="gpt", depth=3, width=32, heads=2, seq_len=16, batch_size=4, steps=20,
                      stabilizers=("sigma_reparam",), device="cpu")
    batched, reference = Trainer(cfg), Trainer(cfg)
    reference.model.sigma_reparam_batched = False
    for step in range(4):
        loss_b, _, _ = batched.step(step, probe=step == 3)  # the probe step too (capture hooks)
        loss_r, _, _ = reference.step(step, probe=step == 3)
        torch.testing.assert_close(loss_b, loss_r, rtol=1e-5, atol=0)
        _assert_same_state(batched.model, reference.model)
    # GPT's four shapes (qkv, attn proj, fc, mlp proj), each a group of `depth` layers, once a step
    assert calls == [3] * 4 * 4
    assert all(m._batched_weight is None for m in batched.model.modules() if isinstance(m, SigmaReparamLinear))


def test_sigma_reparam_batched_vit_training_equals_per_layer(monkeypatch):
    calls = _count_batched_steps(monkeypatch)
    cfg = TrialConfig(workload="vit", depth=2, width=32, heads=2, img_size=16, patch_size=4,
                      stabilizers=("sigma_reparam",), device="cpu")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg))
    batched, reference = models
    reference.sigma_reparam_batched = False
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
        losses = []
        for model, opt in zip(models, opts):
            opt.zero_grad(set_to_none=True)
            loss = model.loss(x, y)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
        _assert_same_state(batched, reference)
        for opt in opts:
            opt.step()
    assert calls == [2] * 4 * 3
    # eval after training: no power step either way, the same outputs
    for m in models:
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(batched(x), reference(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 4 * 3


class _TwoLayers(nn.Module):
    """Two same-shape Linears; ``mode`` picks which run: both, the first twice, or a raise."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.mode = "both"

    def forward(self, x):
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "a_twice":
            return self.a(self.a(x))
        return self.b(self.a(x))


def _two_layer_pair() -> tuple[_TwoLayers, _TwoLayers]:
    """The same reparametrised ``_TwoLayers`` twice: batched, and per layer (the reference)."""
    pair = []
    for _ in range(2):
        torch.manual_seed(0)
        pair.append(apply_sigma_reparam(_TwoLayers()))
    pair[1].sigma_reparam_batched = False
    return pair[0], pair[1]


@pytest.mark.parametrize("mode", ["a_twice", "raise"])
def test_sigma_reparam_batched_unused_or_reused_layer_equals_per_layer(mode):
    """A layer that does not run in a forward keeps its u, v and its batched W_hat is dropped (its
    gradients are zeros, not None: the stacked weights reach it); one that runs twice steps twice,
    as per layer."""
    batched, reference = models = _two_layer_pair()
    x = torch.randn(3, 8)
    outs = []
    for m in models:
        m.mode = mode
        if mode == "raise":
            with pytest.raises(RuntimeError, match="boom"):
                m(x)
        else:
            outs.append(m(x))
            outs[-1].square().sum().backward()
    if outs:
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-7)
    _assert_same_state(batched, reference, none_is_zero=True)
    assert batched.a._batched_weight is None and batched.b._batched_weight is None
    # the next forward starts clean
    batched.mode = reference.mode = "both"
    torch.testing.assert_close(batched(x), reference(x), rtol=1e-5, atol=1e-7)
    _assert_same_state(batched, reference, none_is_zero=True)


def test_sigma_reparam_batched_power_step_is_fp32_under_bf16_autocast():
    batched, reference = models = _two_layer_pair()
    x = torch.randn(3, 8)
    outs = []
    for m in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(m(x))
    assert outs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-2, atol=1e-2)  # bf16 matmuls
    for name in ("a", "b"):
        for buf in ("u", "v"):
            got, want = getattr(getattr(batched, name), buf), getattr(getattr(reference, name), buf)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


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
    # matrices take p + (-lr wd p - lr/bc1 m/denom) as one add: AdamW's step to float rounding
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
    assert opt.fired_total == 0 and opt.last_stats["weyl/fire_rate"] == 0.0


def _reference_weyl_step(opt_state, params, lr, betas, eps, weight_decay, tau, threshold, squarings, w_iters, init_iters):
    """The per-matrix loop the batched WeylAdamW replaced (host syncs and all), same maths: kept as
    the reference the sync-free step must equal. Per matrix: the step direction D = U bc1 + wd bc1 W,
    sigma_1(D) from above (trace of a power of its Gram matrix), sigma_1(W) from below."""
    from workloads.stabilizers.weyl import init_vector, matrix_shape, power_iteration, spectral_norm_upper

    beta1, beta2 = betas
    wd = weight_decay
    for p in params:
        st = opt_state.setdefault(p, {})
        if not st:
            st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
            shape = matrix_shape(p)
            if shape:
                st["vw"] = init_vector(shape[0], shape[2], p.numel(), p.device)
        st["step"] += 1
        t = st["step"]
        st["m"].lerp_(p.grad, 1 - beta1)
        st["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        denom = (st["v"].sqrt() / math.sqrt(bc2)).add_(eps)
        shape = matrix_shape(p)
        if shape is None:
            p.data.mul_(1 - lr * wd).addcdiv_(st["m"], denom, value=-lr / bc1)
            continue
        c, r, n = shape
        it_w = max(w_iters, init_iters) if t == 1 else w_iters
        for j in range(c):  # each matrix on its own, floats on the host
            w = p.detach().reshape(c, r, n)[j:j + 1].clone()
            d = (st["m"] / denom).reshape(c, r, n)[j:j + 1] + wd * bc1 * w
            s_d = spectral_norm_upper(d, squarings)
            s_w, vw = power_iteration(w, st["vw"][j:j + 1], it_w)
            st["vw"][j:j + 1] = vw
            s_u, s_w = float(s_d) / bc1, float(s_w)
            step_lr = tau * s_w / s_u if lr * s_u > threshold * s_w else lr
            p.data.reshape(c, r, n)[j].add_(d[0], alpha=-step_lr / bc1)


def test_spectral_norm_upper_bounds_sigma_1_and_is_tight_with_a_gap():
    """tr(C^k)^(1/2k) >= sigma_1 for any matrix (no start vector, no iteration to converge), within
    its stated factor of it, and exact for rank one."""
    from workloads.stabilizers.weyl import spectral_norm_upper

    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(7, 32, 12, generator=g), torch.randn(5, 12, 40, generator=g),
            torch.sign(torch.randn(6, 48, 16, generator=g))]  # Adam-like +-1 directions
    for a in mats:
        for sq in (0, 2, 3, 5):
            up = spectral_norm_upper(a, sq).double()
            s = torch.linalg.svdvals(a.double())
            k = 2 ** (sq + 1)
            factor = ((s / s[:, :1]) ** (2 * k)).sum(-1) ** (1 / (2 * k))
            torch.testing.assert_close(up, s[:, 0] * factor, rtol=1e-4, atol=0)
            assert bool((up >= s[:, 0] * (1 - 1e-5)).all())
    u, v = torch.randn(3, 20, 1, generator=g), torch.randn(3, 1, 9, generator=g)
    rank_one = u @ v
    torch.testing.assert_close(spectral_norm_upper(rank_one).double(),
                               torch.linalg.matrix_norm(rank_one.double(), 2), rtol=1e-5, atol=0)
    assert float(spectral_norm_upper(torch.zeros(2, 4, 3)).max()) < 1e-20  # a zero step stays (about) zero


@pytest.mark.parametrize("tau", [0.02, 1e9])
def test_weyl_batched_step_equals_per_matrix_reference(tau):
    """Same-shape matrices stacked, MLRA's per-head batch, a conv kernel, timm-like tokens."""
    torch.manual_seed(0)
    shapes = [(32, 16), (32, 16), (16, 16), (6, 4, 8), (8, 3, 2, 2), (1, 5, 16), (16,)]
    ps = [nn.Parameter(0.1 * torch.randn(s)) for s in shapes]
    ps[3].matrix_batch_dims = 1
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    ref[3].matrix_batch_dims = 1
    kw = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, tau=tau, threshold=tau)
    opt = WeylAdamW(ps, squarings=2, weight_power_iters=1, init_power_iters=5, **kw)
    state: dict = {}
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        for p, q in zip(ps, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        _reference_weyl_step(state, ref, squarings=2, w_iters=1, init_iters=5, **kw)
        for p, q in zip(ps, ref):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-7)
    # matrices: 2 + 1 + 6 heads + 1 conv; (1, 5, 16) is a token table, not a matrix
    assert opt.matrix_steps_total == 6 * 10
    fired = opt.last_stats["weyl/fire_rate"]
    assert fired == (1.0 if tau < 1 else 0.0)


def test_matrix_shape_rule():
    from workloads.stabilizers.weyl import matrix_shape

    assert matrix_shape(torch.zeros(8, 4)) == (1, 8, 4)
    assert matrix_shape(torch.zeros(1, 1, 16)) is None          # timm cls_token
    assert matrix_shape(torch.zeros(1, 65, 16)) is None         # timm pos_embed
    assert matrix_shape(torch.zeros(16, 3, 4, 4)) == (1, 16, 48)  # conv patch embedding
    assert matrix_shape(torch.zeros(5)) is None
    up = LowRankQKV(32, 4, 3).up
    assert matrix_shape(up) == (12, 3, 8)                        # 3H per-head r x d_h matrices


def _spectral_norm(t):
    return torch.linalg.matrix_norm(t.double(), 2)


@pytest.mark.parametrize("kind,slack", [("low_rank_plus_noise", 0.01), ("gaussian_noise", 0.10)])
def test_weyl_cap_holds_against_svd(kind, slack):
    """sigma_1(W_t - W_{t-1}) <= tau sigma_1(W_{t-1}) at every step, checked with a full SVD, with
    the default iteration counts (no weight decay: the cap is on the AdamW direction)."""
    tau, m, n = 0.1, 64, 48
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    spec = torch.tensor([1.0, 0.98, 0.96] + [0.5 / (i + 1) for i in range(n - 3)])
    ws = [nn.Parameter(0.02 * torch.randn(m, n, generator=g)),        # random
          nn.Parameter(0.1 * (u[:, :n] * spec) @ v.T)]                 # clustered top, decaying tail
    opt = WeylAdamW(ws, lr=0.05, betas=(0.9, 0.95), weight_decay=0.0, tau=tau)
    b, c = torch.randn(m, 4, generator=g), torch.randn(4, n, generator=g)
    worst = 0.0
    for _ in range(30):
        for w in ws:
            if kind == "gaussian_noise":
                w.grad = torch.randn(m, n, generator=g)
            else:
                w.grad = (b @ c + 0.3 * torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)
                          + 0.1 * torch.randn(m, n, generator=g))
        before = [w.detach().clone() for w in ws]
        opt.step()
        assert opt.last_stats["weyl/fire_rate"] == 1.0
        for w0, w in zip(before, ws):
            ratio = float(_spectral_norm(w.detach() - w0) / _spectral_norm(w0)) / tau
            assert ratio <= 1 + slack
            worst = max(worst, ratio)
    assert worst >= 0.99  # it is the bound, not far below it


@pytest.mark.parametrize("workload", ["gpt", "vit"])
def test_weyl_cap_holds_at_every_matrix_step_against_svd(workload):
    """Issue 20: the realised sigma_1(W_t - W_{t-1}) / sigma_1(W_{t-1}) <= 1.05 tau at every
    matrix-step (the max, not a percentile) over 120 steps, at lr 0.1 and 1, weight decay 0 and 0.1
    (the step is the whole change of the matrix, decay included), by a full SVD. Before issue 20 the
    max reached 1.32 tau (GPT, lr 0.1). The bound must also be reached, not only respected."""
    from workloads.stabilizers.weyl import matrix_shape

    for lr in (0.1, 1.0):
        for wd in (0.0, 0.1):
            cfg = TrialConfig(workload=workload, depth=2, width=32, heads=2, seq_len=32, img_size=16, batch_size=4,
                              lr=lr, weight_decay=wd, schedule="constant", stabilizers=("weyl",), device="cpu",
                              steps=120)
            tr = Trainer(cfg)
            mats = [p for p in tr.model.parameters() if matrix_shape(p)]
            worst = 0.0
            for s in range(120):
                before = [p.detach().clone() for p in mats]
                tr.step(s, probe=False)
                for p, w0 in zip(mats, before):
                    c, r, n = matrix_shape(p)
                    ratio = _spectral_norm((p.detach() - w0).reshape(c, r, n)) / _spectral_norm(w0.reshape(c, r, n))
                    worst = max(worst, float(ratio.max()) / 0.1)
            assert worst <= 1.05, (workload, lr, wd, worst)
            assert worst >= 0.95, (workload, lr, wd, worst)  # it fired and the step went up to the cap
            assert tr.opt.fired_total > 0


def test_weyl_bound_holds_when_it_fires():
    tau = 0.01
    a, b = _mlp(), _mlp()
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    ref = torch.optim.AdamW(a.parameters(), foreach=False, **kw)
    opt = WeylAdamW(b.parameters(), tau=tau, squarings=6, weight_power_iters=30, **kw)
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


# ------------------------------------------------------------------------- what is a matrix
def _kinds(workload, stabilizers=()):
    from workloads import matrices

    cfg = TrialConfig(workload=workload, depth=2, width=32, heads=2, seq_len=16, img_size=16, window_size=2,
                      stabilizers=stabilizers, device="cpu")
    model = build_model(cfg)
    return model, matrices.mark(model)


@pytest.mark.parametrize("workload,stabilizers,expected", [
    ("gpt", (), {
        "wte.weight": "embedding",  # tied to lm_head: a token embedding, so not a matrix
        "wpe.weight": "embedding",
        "blocks.0.ln_1.weight": "norm", "blocks.0.ln_2.weight": "norm", "ln_f.weight": "norm",
        "blocks.0.attn.qkv.weight": "matrix", "blocks.0.attn.proj.weight": "matrix",
        "blocks.0.mlp.fc.weight": "matrix", "blocks.0.mlp.proj.weight": "matrix"}),
    ("gpt", ("mlra", "sigma_reparam"), {
        "wte.weight": "embedding", "blocks.1.attn.qkv.up": "matrix", "blocks.1.attn.qkv.down.weight": "matrix",
        "blocks.1.attn.qkv.down.gamma": "gain", "blocks.1.mlp.fc.gamma": "gain"}),
    ("vit", ("qk_norm",), {
        "net.cls_token": "class_token", "net.pos_embed": "embedding",
        "net.patch_embed.proj.weight": "matrix", "net.patch_embed.proj.bias": "bias",
        "net.blocks.0.norm1.weight": "norm", "net.blocks.0.norm1.bias": "norm",
        "net.blocks.0.attn.qkv.weight": "matrix", "net.blocks.0.attn.qkv.bias": "bias",
        "net.blocks.0.attn.q_norm.weight": "norm", "net.blocks.0.attn.proj.weight": "matrix",
        "net.blocks.0.mlp.fc1.weight": "matrix", "net.blocks.0.mlp.fc2.bias": "bias",
        "net.norm.weight": "norm", "net.head.weight": "matrix", "net.head.bias": "bias"}),
    ("swin", ("qk_norm",), {
        "net.patch_embed.proj.weight": "matrix", "net.patch_embed.norm.weight": "norm",
        "net.layers.0.blocks.0.attn.relative_position_bias_table": "position_bias",
        "net.layers.0.blocks.0.attn.qkv.qkv.weight": "matrix", "net.layers.0.blocks.0.attn.qkv.q_norm.weight": "norm",
        "net.layers.0.blocks.0.attn.proj.weight": "matrix", "net.layers.1.downsample.reduction.weight": "matrix",
        "net.layers.1.downsample.norm.weight": "norm", "net.head.fc.weight": "matrix", "net.head.fc.bias": "bias"}),
])
def test_matrix_rule_lists_every_tensor_of_each_model(workload, stabilizers, expected):
    """Issue 20: one rule (workloads.matrices) for Weyl and weight decay on all three models: a tensor
    is a matrix when it maps features to features; embeddings, position bias tables, class tokens,
    norms, biases and gains are not. Every parameter gets a kind; the listed ones are checked by
    name, and the optimizer's weight decay and Weyl's matrices follow the kinds exactly."""
    from workloads.stabilizers.weyl import matrix_shape
    from workloads.trainer import build_optimizer

    model, kinds = _kinds(workload, stabilizers)
    assert set(kinds) == {n for n, _ in model.named_parameters()}
    for name, kind in expected.items():
        assert kinds[name] == kind, name
    cfg = TrialConfig(workload=workload, stabilizers=("weyl",), weight_decay=0.1, device="cpu")
    opt = build_optimizer(cfg, model, torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (kinds[name] == "matrix") == (id(p) in decayed) == (matrix_shape(p) is not None), name


def test_matrix_rule_refuses_a_tensor_it_has_no_rule_for():
    from workloads import matrices

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.mystery = nn.Parameter(torch.zeros(3, 4))

    with pytest.raises(ValueError, match=r"mystery .*no rule"):
        matrices.classify(Odd())


# ------------------------------------------------------------------- sigmaReparam's scope
@pytest.mark.parametrize("workload", ["gpt", "vit", "swin"])
def test_sigma_reparam_scope_all_covers_every_linear_and_the_patch_embedding(workload):
    """Issue 20: ``scope: all`` (Zhai et al.) reparametrises every Linear and conv of the model,
    ``blocks`` (the default) only the blocks' Linears; both start as the plain model."""
    from workloads.stabilizers import SigmaReparamConv2d

    base = dict(workload=workload, depth=2, width=32, heads=2, seq_len=16, img_size=16, window_size=2, device="cpu")
    torch.manual_seed(0)
    plain = build_model(TrialConfig(**base))
    models = {}
    for scope in ("blocks", "all"):
        torch.manual_seed(0)
        models[scope] = build_model(TrialConfig(**base, stabilizers=("sigma_reparam",),
                                                stabilizer_options={"sigma_reparam": {"scope": scope}}))
    x = torch.randint(0, 256, (2, 16)) if workload == "gpt" else torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = plain.eval()(x)
    for scope, model in models.items():
        assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in
                       (model.modules() if scope == "all" else model.transformer_blocks().modules())), scope
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), want, rtol=1e-4, atol=1e-5)
    all_, blocks = models["all"], models["blocks"]
    if workload == "gpt":
        assert isinstance(all_.lm_head, SigmaReparamLinear) and all_.lm_head.weight is all_.wte.weight  # still tied
        assert type(blocks.lm_head) is nn.Linear
    else:
        assert isinstance(all_.net.patch_embed.proj, SigmaReparamConv2d)
        head = all_.net.head if workload == "vit" else all_.net.head.fc
        assert isinstance(head, SigmaReparamLinear)
        assert type(blocks.net.patch_embed.proj) is nn.Conv2d
    # it trains: a step with the conv's own power step, gradients reach its gamma
    all_.train()
    loss = all_.loss(x, x[:, :] if workload == "gpt" else torch.tensor([1, 2]))
    loss.backward()
    gammas = [m.gamma.grad for m in all_.modules() if hasattr(m, "gamma") and isinstance(m.gamma, nn.Parameter)]
    assert gammas and all(g is not None for g in gammas)


def test_sigma_reparam_conv_has_spectral_norm_gamma():
    from workloads.stabilizers import SigmaReparamConv2d

    conv = SigmaReparamConv2d.from_conv(nn.Conv2d(3, 16, 4, stride=4))
    with torch.no_grad():
        conv.weight.add_(0.3 * torch.randn_like(conv.weight))
        conv.gamma.fill_(1.5)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(100):
        conv(x)
    s = torch.linalg.svdvals(conv.effective_weight().detach().flatten(1))[0]
    assert float(s) == pytest.approx(1.5, rel=1e-3)


def test_sigma_reparam_scope_is_validated():
    from workloads.trial import ConfigError

    with pytest.raises(ConfigError, match=r"stabilizer_options\.sigma_reparam\.scope: 'everything' is not "
                                          r"allowed; allowed: \['blocks', 'all'\]"):
        TrialConfig(stabilizers=("sigma_reparam",), stabilizer_options={"sigma_reparam": {"scope": "everything"}})
