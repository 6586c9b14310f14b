"""Issue 20: SEC comparable across stabilizers. SEC = s_1^2 / sum s_i^2 of W_q[h]^T W_k[h] lies in
[1/r, 1], r the rank of the head's factorisation (d_h dense, MLRA's r); the probes report it
normalised by that floor next to the raw value, ``spectral_conc_norm/layer{i}`` and ``/max``."""

import pytest
import torch

from workloads import probes
from workloads.trainer import build_model, weight_probes
from workloads.trial import TrialConfig


@pytest.mark.parametrize("r", [2, 3, 8])
def test_normalised_sec_is_zero_at_the_floor_and_one_for_rank_one(r):
    assert float(probes.normalized_concentration(torch.tensor(1.0 / r), r)) == pytest.approx(0.0, abs=1e-7)
    assert float(probes.normalized_concentration(torch.tensor(1.0), r)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rank"):
        probes.normalized_concentration(torch.tensor(1.0), 1)


def _reference(model, layer, heads):
    """Raw and normalised SEC of one layer by a full SVD of every head's W_q[h]^T W_k[h]."""
    w_q, w_k, h = (t.detach() if torch.is_tensor(t) else t for t in model.qk_weights()[layer])
    hd = w_q.shape[0] // h
    secs = []
    for i in range(h):
        s = torch.linalg.svdvals(w_q[i * hd:(i + 1) * hd].double().T @ w_k[i * hd:(i + 1) * hd].double())
        secs.append(float(s[0] ** 2 / (s ** 2).sum()))
    return max(secs)


@pytest.mark.parametrize("workload", ["gpt", "vit", "swin"])
@pytest.mark.parametrize("stabilizers,rank", [((), None), (("mlra",), 3), (("mlra", "qk_norm"), None)])
def test_probe_reports_sec_normalised_by_the_rank_of_the_factorisation(workload, stabilizers, rank):
    opts = {"mlra": {"rank": rank}} if rank else {}
    cfg = TrialConfig(workload=workload, depth=2, width=32, heads=2, seq_len=16, img_size=16, window_size=2,
                      stabilizers=stabilizers, stabilizer_options=opts, device="cpu")
    torch.manual_seed(0)
    model = build_model(cfg)
    d_h = 32 // 2
    want_rank = d_h if "mlra" not in stabilizers else (rank or d_h // 2)
    assert model.qk_ranks()[0] == want_rank
    m = probes.read(weight_probes(model))
    for i in range(len(model.qk_weights())):
        r = model.qk_ranks()[i]
        sec = _reference(model, i, None)
        assert m[f"spectral_conc/layer{i}"] == pytest.approx(sec, rel=1e-4)
        assert m[f"spectral_conc_norm/layer{i}"] == pytest.approx((sec - 1 / r) / (1 - 1 / r), rel=1e-4, abs=1e-6)
    norms = [v for k, v in m.items() if k.startswith("spectral_conc_norm/layer")]
    assert m["spectral_conc_norm/max"] == max(norms)
