import math

import numpy as np
import pytest
import torch

from workloads.probes import (attention_entropy, head_singular_values, spectral_concentration,
                              token_embedding_variability)


def test_entropy_uniform_rows_is_log_k():
    k = 7
    probs = torch.full((2, 3, 5, k), 1.0 / k)
    torch.testing.assert_close(attention_entropy(probs), torch.full((3,), math.log(k)))


def test_entropy_one_hot_rows_is_zero():
    probs = torch.zeros(2, 4, 6, 6)
    probs[..., 2] = 1.0
    assert torch.equal(attention_entropy(probs), torch.zeros(4))


def test_entropy_causal_uniform_rows_masked_zeros():
    T = 5
    probs = torch.zeros(1, 2, T, T)
    for i in range(T):
        probs[..., i, : i + 1] = 1.0 / (i + 1)
    expected = np.mean([math.log(i + 1) for i in range(T)])
    torch.testing.assert_close(attention_entropy(probs), torch.full((2,), expected, dtype=torch.float32))


def test_entropy_per_head_against_numpy():
    logits = torch.randn(3, 2, 4, 9)
    probs = logits.softmax(-1)
    p = probs.numpy().astype(np.float64)
    ref = -(p * np.log(p)).sum(-1).mean(axis=(0, 2))
    np.testing.assert_allclose(attention_entropy(probs).numpy(), ref, rtol=1e-5)


def test_entropy_rejects_wrong_rank():
    with pytest.raises(ValueError, match="batch, heads, q, k"):
        attention_entropy(torch.rand(4, 4))


def test_spectral_concentration_rank_one_is_one():
    heads, hd, d = 2, 4, 16
    w_q = torch.zeros(heads * hd, d)
    w_k = torch.zeros(heads * hd, d)
    w_q[0::hd] = torch.randn(heads, d)  # one non-zero row per head -> rank-1 product
    w_k[0::hd] = torch.randn(heads, d)
    torch.testing.assert_close(spectral_concentration(w_q, w_k, heads), torch.ones(heads))


@pytest.mark.parametrize("r", [1, 2, 4])
def test_spectral_concentration_equal_singular_values_is_one_over_r(r):
    heads, hd, d = 3, 4, 12
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    w_q = torch.zeros(heads * hd, d, dtype=torch.float64)
    w_k = torch.zeros(heads * hd, d, dtype=torch.float64)
    for h in range(heads):
        rows = q[h * hd: h * hd + r]  # r orthonormal rows: W_q[h]^T W_k[h] is a rank-r projection
        w_q[h * hd: h * hd + r] = 3.0 * rows
        w_k[h * hd: h * hd + r] = rows
    torch.testing.assert_close(spectral_concentration(w_q, w_k, heads), torch.full((heads,), 1.0 / r))


def test_head_singular_values_match_full_svd():
    heads, hd, d = 4, 8, 32
    w_q, w_k = torch.randn(heads * hd, d), torch.randn(heads * hd, d)
    got = head_singular_values(w_q, w_k, heads)
    for h in range(heads):
        prod = w_q[h * hd:(h + 1) * hd].double().T @ w_k[h * hd:(h + 1) * hd].double()  # [d, d]
        ref = torch.linalg.svdvals(prod)[:hd].float()
        torch.testing.assert_close(got[h], ref, rtol=1e-4, atol=1e-4)
    s2 = got.double() ** 2
    torch.testing.assert_close(spectral_concentration(w_q, w_k, heads), (s2[:, 0] / s2.sum(-1)).float())


def test_token_embedding_variability_known_matrix():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 2.0, -2.0, 2.0]])
    per_token = np.std(w.numpy(), axis=1, ddof=1)  # [1.2910, 0, 2.3094]
    mean, std = token_embedding_variability(w)
    assert isinstance(mean, float) and isinstance(std, float)
    assert mean == pytest.approx(per_token.mean(), rel=1e-6)
    assert std == pytest.approx(np.std(per_token, ddof=1), rel=1e-6)


def _svd_head_singular_values(w_q, w_k, heads):
    """The previous implementation: thin QR of the factors, then an SVD of the small core."""
    hd = w_q.shape[0] // heads
    a = w_q.double().reshape(heads, hd, -1).transpose(1, 2)
    b = w_k.double().reshape(heads, hd, -1).transpose(1, 2)
    _, r_a = torch.linalg.qr(a)
    _, r_b = torch.linalg.qr(b)
    return torch.linalg.svdvals(r_a @ r_b.transpose(1, 2))


@pytest.mark.parametrize("rank", [None, 2])
def test_cholesky_spectra_equal_the_svd_version(rank):
    """Full-rank heads (Cholesky) and MLRA-like rank-2 heads (eigh fallback), batched over layers."""
    from workloads.probes import layer_head_singular_values

    torch.manual_seed(0)
    heads, hd, d = 4, 8, 32
    layers = []
    for _ in range(3):
        if rank:
            w_q = (torch.randn(heads, hd, rank) @ torch.randn(heads, rank, d)).reshape(heads * hd, d)
            w_k = (torch.randn(heads, hd, rank) @ torch.randn(heads, rank, d)).reshape(heads * hd, d)
        else:
            w_q, w_k = torch.randn(heads * hd, d), torch.randn(heads * hd, d)
        layers.append((0.1 * w_q, 0.1 * w_k, heads))
    got = layer_head_singular_values(layers + [(torch.randn(12, 16), torch.randn(12, 16), 3)])
    for (w_q, w_k, h), s in zip(layers, got):
        ref = _svd_head_singular_values(w_q, w_k, h)
        torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head_singular_values(w_q, w_k, h), s)
        s2 = ref ** 2
        torch.testing.assert_close(spectral_concentration(w_q, w_k, h).double(), s2[:, 0] / s2.sum(-1),
                                   rtol=1e-6, atol=1e-6)
    assert got[-1].shape == (3, 4)


# ---- attention statistics on a subset, in chunks (issue 12) ----
def _reference_summary(logits):
    """The full-materialisation computation in float64: softmax of the whole [b, h, q, k] map,
    entropy per head averaged over batch and rows (0 log 0 = 0), min / mean over heads, max logit
    over finite positions of positive probability."""
    logits = logits.double()
    p = logits.softmax(-1)
    ent = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0)).sum(-1).mean(dim=(0, 2))
    top = logits[torch.isfinite(logits) & (p > 0)].max()
    return [float(ent.min()), float(ent.mean()), float(top)]


def _causal(logits):
    t = logits.shape[-1]
    return logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 100, 1 << 24])
def test_qk_summary_equals_the_full_softmax(causal, chunk):
    from workloads.probes import qk_attention_summary

    b, h, t, d = 3, 4, 13, 8
    q, k = 2 * torch.randn(b, h, t, d), 2 * torch.randn(b, h, t, d)
    logits = (q.double() @ k.double().transpose(-2, -1)) * d ** -0.5
    ref = _reference_summary(_causal(logits) if causal else logits)
    got = qk_attention_summary(q, k, d ** -0.5, causal=causal, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == (3,)
    np.testing.assert_allclose(got.tolist(), ref, rtol=1e-5)
    torch.testing.assert_close(got, qk_attention_summary(q, k, d ** -0.5, causal=causal, chunk=1 << 24))


@pytest.mark.parametrize("chunk", [1, 50, 1 << 24])
def test_logit_summary_with_swin_style_mask_equals_the_full_softmax(chunk):
    """Swin masks shifted windows with -100, not -inf: those positions keep a (tiny) probability,
    and count as allowed, exactly as in the full computation."""
    from workloads.probes import attention_summary

    logits = torch.randn(6, 2, 9, 9) * 3
    logits[:, :, :4, 5:] -= 100.0
    logits[0, 1, 2, 3] = float("-inf")
    got = attention_summary(logits, chunk=chunk)
    np.testing.assert_allclose(got.tolist(), _reference_summary(logits), rtol=1e-5)
    torch.testing.assert_close(got, attention_summary(logits, chunk=1 << 24))  # chunked = unchunked


def test_attention_stats_measure_the_first_items_only():
    from workloads.probes import AttentionStats

    q, k = torch.randn(5, 2, 7, 4), torch.randn(5, 2, 7, 4)
    windows = torch.randn(5 * 3, 2, 4, 4)  # 5 images x 3 windows, image-major
    stats = AttentionStats(batch=2)
    stats.add_qk(q, k, 0.5, causal=True)
    stats.add_logits(windows, per_item=3)
    logits = _causal((q[:2].double() @ k[:2].double().transpose(-2, -1)) * 0.5)
    refs = [_reference_summary(logits), _reference_summary(windows[:6])]
    assert len(stats.layers) == 2
    for rec, ref in zip(stats.layers, refs):
        assert list(rec) == ["entropy_min", "entropy_mean", "max_logit"]
        assert all(type(v) is float for v in rec.values())
        np.testing.assert_allclose(list(rec.values()), ref, rtol=1e-5)
    # a batch no larger than the subset is measured whole; None measures everything
    for n in (5, 9, None):
        whole = AttentionStats(batch=n)
        whole.add_logits(windows, per_item=3)
        np.testing.assert_allclose(list(whole.layers[0].values()), _reference_summary(windows), rtol=1e-5)
    with pytest.raises(ValueError, match="batch"):
        AttentionStats(batch=0)


def test_attention_stats_read_the_device_once(monkeypatch):
    """No host sync per layer: nothing is converted while layers are added; the first read of
    ``layers`` makes one transfer for all of them, later reads none."""
    from workloads.probes import AttentionStats

    stats = AttentionStats(batch=2)
    q = torch.randn(3, 2, 6, 4)
    calls = {"tolist": 0}
    tolist = torch.Tensor.tolist

    def counting(self):
        calls["tolist"] += 1
        return tolist(self)

    def forbidden(*_a, **_k):
        raise AssertionError("host sync while adding a layer")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", forbidden)
        m.setattr(torch.Tensor, "__float__", forbidden)
        m.setattr(torch.Tensor, "__bool__", forbidden)
        for _ in range(4):
            stats.add_qk(q, q, 0.5, causal=True)
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    assert len(stats.layers) == 4 and calls["tolist"] == 1
    assert len(stats.layers) == 4 and calls["tolist"] == 1
    stats.add_qk(q, q, 0.5)  # a layer added after a read is converted at the next read
    assert len(stats.layers) == 5 and calls["tolist"] == 2


def test_weight_probes_of_a_diverged_layer_are_nan_and_do_not_raise():
    """A probe step can see weights that are already non-finite (the loop reads the loss in blocks):
    that layer's spectra are NaN, the other layers of the same batched solve keep their values."""
    from workloads.probes import layer_head_singular_values

    g = torch.Generator().manual_seed(0)
    good = (torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g), 4)
    bad_q = good[0].clone()
    bad_q[3, 5] = float("nan")
    low_rank = torch.randn(32, 2, generator=g) @ torch.randn(2, 16, generator=g)  # eigh fallback path
    out = layer_head_singular_values([good, (bad_q, good[1], 4), (low_rank, good[1], 4)])
    torch.testing.assert_close(out[0], head_singular_values(*good))
    assert torch.isnan(out[1][0]).all() and torch.isfinite(out[1][1:]).all()  # head 0 holds the NaN
    assert torch.isfinite(out[2]).all()
    conc = spectral_concentration(bad_q, good[1], 4)
    assert torch.isnan(conc[0]) and torch.isfinite(conc[1:]).all()


@pytest.mark.parametrize("workload,lr", [("gpt", 0.3), ("vit", 0.1)])
def test_default_attention_probe_on_a_trained_model_is_within_2_percent_of_the_whole_batch(workload, lr):
    """Issue 19: a real model trained at the smoke size to where its heads near collapse (150 steps
    of 16 items at a high LR), probed on batches of 64 items. The default probe (``PROBE_BATCH``) gives each
    layer's minimum over heads of the mean entropy, and its max logit, within 2 % of the whole
    batch's; the earlier default, the first 4 items, misses by more than 2 % in some layer and batch
    (the minimum over heads of a subset's noisy means is biased low, a subset's max at most the
    batch's)."""
    from workloads.trainer import Trainer
    from workloads.trial import TrialConfig

    size = (dict(depth=2, width=64, heads=2, seq_len=64) if workload == "gpt"
            else dict(depth=2, width=64, heads=2, img_size=16, patch_size=4))
    tr = Trainer(TrialConfig(workload=workload, **size, batch_size=16, lr=lr, schedule="constant", steps=150,
                             eval_interval=0, device="cpu"))
    for s in range(150):
        tr.step(s, probe=False)
    off = {"default": 0, 4: 0}  # (batch, layer, statistic) more than 2 % from the whole batch's
    with torch.no_grad():
        for _ in range(3):
            x = torch.cat([tr.data.train.next()[0] for _ in range(4)])  # 64 items
            with tr.model.capture_attention(batch=None) as whole:
                tr.model(x)
            for key in off:
                kw = {} if key == "default" else {"batch": key}
                with tr.model.capture_attention(**kw) as probe:
                    tr.model(x)
                for a, b in zip(probe.layers, whole.layers, strict=True):
                    for stat in ("entropy_min", "max_logit"):
                        off[key] += abs(a[stat] - b[stat]) > 0.02 * abs(b[stat])
    assert off["default"] == 0
    assert off[4] > 0
