import math

import pytest
import torch

from workloads.attention import QKNormQKV
from workloads.models import GPT, GPTConfig
from workloads.stabilizers import SigmaReparamLinear
from workloads.trial import TrialConfig, build_model

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
    """The probe path (explicit attention) computes what the fused path computes."""
    cfg = TrialConfig(workload=workload, **SMALL)
    model = build_model(cfg).eval()
    x, _ = _batch(cfg)
    with torch.no_grad():
        fused = model(x)
        with model.capture_attention():
            probed = model(x)
    torch.testing.assert_close(probed, fused, rtol=1e-4, atol=1e-5)
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
