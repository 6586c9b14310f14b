"""One training trial: a model, a stabilizer set, a learning-rate schedule, probes and a divergence
detector. Pure PyTorch: no Ray, no MLflow. Run it from Python (``run(TrialConfig(...))``), from the
command line (``python -m workloads.trial --help``) or under any scheduler.

This module is the entry point; the parts live in their own modules:

- ``workloads.config``: ``TrialConfig`` (each field's help in its metadata), ``ConfigError``
- ``workloads.trainer``: building (device, model, optimizer, LR schedule, data), evaluation, probe
  metrics and ``Trainer`` (the step)
- ``workloads.loop``: ``run``, ``TrialResult``, the ``Reporter`` type
- ``workloads.cli``: the ``python -m workloads.trial`` parser and ``main``
"""

import sys

from workloads.cli import main
from workloads.config import ConfigError, TrialConfig
from workloads.loop import TrialResult, run

__all__ = ["ConfigError", "TrialConfig", "TrialResult", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
