"""``compile: true`` runs the loss under torch.compile with the same numbers as eager.

On the 2-core CPU machine compiling one tiny GPT takes 45-70 s, so the test runs on CUDA, or on
the CPU when ``ABLATE_COMPILE_TESTS=1``."""

import os

import pytest
import torch

from workloads.trainer import Trainer
from workloads.trial import TrialConfig

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("ABLATE_COMPILE_TESTS") != "1",
    reason="torch.compile takes about a minute on the CPU; set ABLATE_COMPILE_TESTS=1")


@pytest.mark.parametrize("stabilizers", [(), ("sigma_reparam",), ("weyl", "qk_norm")])
def test_compiled_steps_equal_eager(stabilizers):
    cfg = TrialConfig(workload="gpt", depth=2, width=32, heads=2, seq_len=16, batch_size=2, steps=10,
                      stabilizers=stabilizers, compile=True, probe_interval=2)
    eager, compiled = Trainer(cfg.replace(compile=False)), Trainer(cfg)
    for s in range(3):
        a, _, _ = compiled.step(s, probe=s == 2)
        b, _, _ = eager.step(s, probe=s == 2)
        assert float(a) == pytest.approx(float(b), rel=1e-4)
