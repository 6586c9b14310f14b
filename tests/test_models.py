import math

import numpy as np
import pytest
import torch

from workloads.attention import QKNormQKV
from workloads.models import GPT, GPTConfig
from workloads.stabilizers import SigmaReparamLinear
from workloads.trainer import build_model
from workloads.trial import TrialConfig

SMALL = dict(depth=2, width=32, heads=2, seq_len=16, img_size=16, patch_size=4, window_size=2)


def _batch(model_cfg: TrialConfig):
    if model_cfg.workload == "gpt":
        x = torch.randint(0, 256, (2, model_cfg.seq_len))
        return x, torch.randint(0, 256, (2, model_cfg.seq_len))
    return torch.randn(2, 3, model_cfg.img_size, model_cfg.img_size), torch.randint(0, 10, (2,))


@pytest.mark.parametrize("workload", ["gpt", "vit", "swin"])
@pytest.mark.parametrize("stabilizers", [(), ("qk_norm",), ("mlra",), ("sigma_reparam",),
                                         ("mlra", "qk_norm", "sigma_reparam")])
def test_every_model_builds_with_every_stabilizer_and_probes(workload, stabilizers):
    cfg = TrialConfig(workload=workload, stabilizers=stabilizers, **SMALL)
    model = build_model(cfg)
    x, y = _batch(cfg)
    loss = model.loss(x, y)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    n_layers = len(model.layers())
    assert n_layers == cfg.depth
    with model.capture_attention() as stats:
        model.loss(x, y)
    assert len(stats.layers) == n_layers
    for rec in stats.layers:
        assert 0 <= rec["entropy_min"] <= rec["entropy_mean"]
        assert math.isfinite(rec["max_logit"])
    qk = model.qk_weights()
    assert len(qk) == n_layers and all(wq.shape == wk.shape for wq, wk, _ in qk)
    if "sigma_reparam" in stabilizers:
        assert any(isinstance(m, SigmaReparamLinear) for m in model.modules())


@pytest.mark.parametrize("workload", ["gpt", "vit", "swin"])
def test_capture_does_not_change_the_function(workload):
    """Capturing attention does not change what the model computes: the probe statistics are a side
    computation (GPT and ViT run the same fused kernels, Swin timm's own path)."""
    cfg = TrialConfig(workload=workload, **SMALL)
    model = build_model(cfg).eval()
    x, _ = _batch(cfg)
    with torch.no_grad():
        fused = model(x)
        with model.capture_attention():
            probed = model(x)
    torch.testing.assert_close(probed, fused, rtol=0, atol=0)
    # hooks are gone afterwards: no stats collected outside the context
    with model.capture_attention() as stats:
        pass
    model(x)
    assert stats.layers == []


def test_gpt_attention_entropy_matches_explicit_softmax():
    model = GPT(GPTConfig(depth=1, width=16, heads=2, seq_len=8)).eval()
    x = torch.randint(0, 256, (3, 8))
    with torch.no_grad(), model.capture_attention() as stats:
        model(x)
        attn = model.blocks[0].attn
        h = model.blocks[0].ln_1(model.wte(x) + model.wpe(torch.arange(8)))
        q, k, _ = attn.qkv(h).view(3, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(8)
        logits = logits.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
        p = logits.softmax(-1)
        ent = -(torch.where(p > 0, p * p.log(), 0.0)).sum(-1).mean(dim=(0, 2))
    assert stats.layers[0]["entropy_min"] == pytest.approx(float(ent.min()), rel=1e-5)
    assert stats.layers[0]["max_logit"] == pytest.approx(float(logits[torch.isfinite(logits)].max()), rel=1e-5)


def test_swin_qk_norm_wraps_timm_qkv():
    model = build_model(TrialConfig(workload="swin", stabilizers=("qk_norm",), **SMALL))
    assert all(isinstance(a.qkv, QKNormQKV) for a in model.attn_modules)


def test_vit_qk_norm_uses_timm_own_argument():
    model = build_model(TrialConfig(workload="vit", stabilizers=("qk_norm",), **SMALL))
    assert all(isinstance(a.q_norm, torch.nn.LayerNorm) for a in model.attn_modules)


def test_qk_norm_before_the_transpose_gives_the_same_numbers():
    """QK-norm on the [B, T, H, D] view equals the previous LayerNorm on the permuted [B, H, T, D]."""
    import torch.nn.functional as F

    from workloads.attention import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, qk_norm=True)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 10, 32)
    q, k, v = attn.qkv(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    ref = attn.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(attn(x), ref, rtol=1e-6, atol=1e-6)


# ---- probe steps: statistics on the first items, in chunks; the output as on any step (issue 12) ----
PROBED = dict(SMALL, depth=4)  # Swin: the second block of stage 1 has shifted windows (a mask)


def _reference_logits(attn, x, mask):
    """Float64 pre-softmax logits of one attention module on its input ``x``, written out from its
    weights (not from the probe code)."""
    from workloads.attention import CausalSelfAttention

    if isinstance(attn, CausalSelfAttention):
        B, T, _ = x.shape
        q, k, _ = attn.qkv(x).view(B, T, 3, attn.num_heads, attn.head_dim).unbind(2)
        q, k = attn.q_norm(q).transpose(1, 2).double(), attn.k_norm(k).transpose(1, 2).double()
        logits = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)
        return logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    B, N, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    if hasattr(attn, "q_norm"):  # timm ViT Attention
        return (attn.q_norm(q).double() @ attn.k_norm(k).double().transpose(-2, -1)) * attn.scale
    logits = (q.double() * attn.scale) @ k.double().transpose(-2, -1) + attn._get_rel_pos_bias().double()
    if mask is not None:  # Swin: mask [windows, N, N], rows image-major
        logits = (logits.view(-1, mask.shape[0], attn.num_heads, N, N) + mask.double()[None, :, None])
        logits = logits.view(-1, attn.num_heads, N, N)
    return logits


def _reference_stats(model, x):
    """Per layer [entropy_min, entropy_mean, max_logit] of the explicit float64 softmax, for a
    forward of ``x`` alone."""
    from workloads.attention import CausalSelfAttention

    attn_modules = (model.attn_modules if hasattr(model, "attn_modules")
                    else [m for m in model.modules() if isinstance(m, CausalSelfAttention)])
    inputs = []

    def grab(m, args, kwargs):
        inputs.append((m, args[0], kwargs.get("mask")))

    handles = [a.register_forward_pre_hook(grab, with_kwargs=True) for a in attn_modules]
    with torch.no_grad():
        model(x)
        for h in handles:
            h.remove()
        out = []
        for attn, inp, mask in inputs:
            logits = _reference_logits(attn, inp, mask)
            p = logits.softmax(-1)
            ent = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0)).sum(-1).mean(dim=(0, 2))
            out.append([float(ent.min()), float(ent.mean()),
                        float(logits[torch.isfinite(logits) & (p > 0)].max())])
    return out


def _batch_of(cfg: TrialConfig, n: int):
    if cfg.workload == "gpt":
        return torch.randint(0, 256, (n, cfg.seq_len)), torch.randint(0, 256, (n, cfg.seq_len))
    return torch.randn(n, 3, cfg.img_size, cfg.img_size), torch.randint(0, 10, (n,))


@pytest.mark.parametrize("workload", ["gpt", "vit", "swin"])
@pytest.mark.parametrize("stabilizers", [(), ("qk_norm",)])
def test_probe_statistics_are_those_of_the_first_items(workload, stabilizers, monkeypatch):
    """capture_attention(batch=n) on a batch of 5 gives, per layer, the entropy and max logit of the
    explicit softmax of a forward of the first n items alone (so Swin's first n * windows rows are
    the first n images' windows), chunked or not."""
    from workloads import probes

    cfg = TrialConfig(workload=workload, stabilizers=stabilizers, **PROBED)
    model = build_model(cfg).eval()
    x, _ = _batch_of(cfg, 5)
    for n in (2, 4):
        ref = _reference_stats(model, x[:n])
        with torch.no_grad(), model.capture_attention(batch=n) as stats:
            model(x)
        assert len(stats.layers) == len(ref) == cfg.depth
        for rec, r in zip(stats.layers, ref):
            np.testing.assert_allclose([rec["entropy_min"], rec["entropy_mean"], rec["max_logit"]], r,
                                       rtol=1e-5, atol=1e-6)
        monkeypatch.setattr(probes, "PROBE_CHUNK", 7)  # one query row per chunk
        with torch.no_grad(), model.capture_attention(batch=n) as chunked:
            model(x)
        monkeypatch.undo()
        for rec, one in zip(chunked.layers, stats.layers):
            assert rec == pytest.approx(one, rel=1e-6, abs=1e-7)
    # the default subset is probes.PROBE_BATCH items
    with torch.no_grad(), model.capture_attention() as default:
        model(x)
    for rec, r in zip(default.layers, _reference_stats(model, x[:probes.PROBE_BATCH])):
        np.testing.assert_allclose(list(rec.values()), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workload", ["gpt", "vit", "swin"])
def test_a_probe_step_trains_like_any_step(workload):
    """Same batch, same weights (and the same RNG state: timm's Swin has stochastic depth): the
    loss and every gradient of a probe step equal a plain step's."""
    cfg = TrialConfig(workload=workload, **PROBED)
    model = build_model(cfg).train()
    x, y = _batch_of(cfg, 6)
    torch.manual_seed(1)
    plain = model.loss(x, y)
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with model.capture_attention() as stats:
        probed = model.loss(x, y)
    probed.backward()
    assert len(stats.layers) == cfg.depth
    assert float(probed.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_vit_keeps_timm_fused_attention_on_probe_steps(monkeypatch):
    model = build_model(TrialConfig(workload="vit", **SMALL))
    if not all(a.fused_attn for a in model.attn_modules):
        pytest.skip("timm's fused attention is switched off in this environment")
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with model.capture_attention() as stats:
        assert all(a.fused_attn for a in model.attn_modules)
        model(torch.randn(2, 3, 16, 16))
    assert len(stats.layers) == len(calls) == 2


def test_swin_fused_window_attention_is_off_only_inside_the_capture():
    """timm's (experimental) fused window attention never calls the softmax the probe hooks: where
    it is on, capture_attention turns it off for the forward inside and back on after."""
    cfg = TrialConfig(workload="swin", **PROBED)
    model = build_model(cfg).eval()
    for a in model.attn_modules:
        a.fused_attn = True
    x, _ = _batch_of(cfg, 3)
    with torch.no_grad(), model.capture_attention() as stats:
        assert not any(a.fused_attn for a in model.attn_modules)
        model(x)
    assert all(a.fused_attn for a in model.attn_modules)
    for rec, r in zip(stats.layers, _reference_stats(model, x)):
        np.testing.assert_allclose(list(rec.values()), r, rtol=1e-5, atol=1e-6)
