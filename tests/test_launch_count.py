"""Launch-count guard (issue 12): on the GPU the stabilizers are launch-bound, so their per-step
operator count must not grow with the number of matrices faster than the plain model's does.

Counts the non-view aten operators of one ``Trainer.step`` (forward, backward, optimizer) with a
``TorchDispatchMode``; reading the optimizer's CPU step counters (``_local_scalar_dense`` on CPU
tensors, no device work) is not counted.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from workloads.trial import Trainer, TrialConfig

_SKIP = {"aten._local_scalar_dense.default"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func) not in _SKIP:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _count(stabilizer: str, depth: int, opt_only: bool = False) -> int:
    cfg = TrialConfig(workload="gpt", depth=depth, width=32, heads=2, seq_len=16, batch_size=2,
                      stabilizers=(stabilizer,), device="cpu", steps=100)
    tr = Trainer(cfg)
    tr.step(0, probe=False)  # lazy state
    counter = OpCounter()
    if opt_only:
        with counter:
            tr.opt.step()
    else:
        with counter:
            tr.step(1, probe=False)
    return sum(counter.ops.values())


@pytest.fixture(scope="module")
def counts():
    return {(s, d): _count(s, d) for s in ("none", "weyl", "sigma_reparam") for d in (4, 12)}


def test_weyl_optimizer_ops_do_not_grow_with_the_number_of_matrices():
    assert _count("weyl", 12, opt_only=True) == _count("weyl", 4, opt_only=True)


def test_stabilizers_add_a_constant_factor_over_none(counts):
    growth = {s: counts[(s, 12)] - counts[(s, 4)] for s in ("none", "weyl", "sigma_reparam")}
    # weyl: the model is the plain one; its optimizer adds nothing per layer (torch's CPU AdamW does)
    assert growth["weyl"] <= growth["none"]
    assert counts[("weyl", 12)] <= 1.5 * counts[("none", 12)]
    # sigma_reparam: a fixed number of operators per Linear (power step, scale, gamma's AdamW step),
    # forward + backward: measured 2.6x none's per-layer growth on torch 2.14
    assert growth["sigma_reparam"] <= 3 * growth["none"]
    assert counts[("sigma_reparam", 12)] <= 3 * counts[("none", 12)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stabilizer", ["none", "weyl", "sigma_reparam", "qk_norm", "mlra"])
def test_no_host_sync_in_a_non_probe_step(stabilizer):
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call."""
    cfg = TrialConfig(workload="gpt", depth=2, width=64, heads=2, seq_len=32, batch_size=4,
                      stabilizers=(stabilizer,), device="cuda", precision="bf16", steps=100)
    tr = Trainer(cfg)
    tr.step(0, probe=False)
    x, y = tr.data.train.next()
    torch.cuda.synchronize()
    # the step's body without the loop's loss read (float(loss), the divergence detector's input)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with tr.autocast():
            loss = tr.model.loss(x, y)
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        tr.opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
