"""The command line of one trial, ``python -m workloads.trial``: the argparse ``parser()`` built from
``TrialConfig``'s fields and their help (``workloads.config``), and ``main()``, which runs the trial
and prints its result as JSON (``check`` and ``run_and_print``, which ``ablate trial --from-run``
uses too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from workloads import data as data_mod
from workloads.config import ConfigError, TrialConfig
from workloads.divergence import DivergenceEvent
from workloads.loop import TrialResult, run
from workloads.trainer import trial_device


def parser() -> argparse.ArgumentParser:
    """The options of ``python -m workloads.trial``: one per ``TrialConfig`` field, its help and choices
    from the field's metadata, its default from the field."""
    p = argparse.ArgumentParser(
        prog="python -m workloads.trial",
        description="Run one ablate training trial in this process (no Ray, no MLflow) and print its "
                    "result as JSON; progress goes to stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrialConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f.metadata.get("help", f.name.replace("_", " "))
        if f.name == "stabilizer_options":
            p.add_argument(flag, type=json.loads, default={}, metavar="JSON",
                           help=help_ + ', e.g. \'{"weyl": {"tau": 0.05}, "mlra": {"rank": 4}}\'')
        elif f.name in ("stabilizers", "stop_on"):
            p.add_argument(flag, type=lambda s: tuple(x for x in s.replace(",", "+").split("+") if x and x != "none"),
                           default=default, metavar="A+B", help=help_)
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif f.name == "device":
            p.add_argument(flag, default=default, metavar="{auto,cpu,cuda,cuda:N}", help=help_)
        else:
            typ = {int: int, float: float}.get(type(default), str)
            if f.name == "vocab_size":
                typ = int
            p.add_argument(flag, type=typ, default=default, choices=f.metadata.get("choices"), help=help_)
    p.add_argument("--quiet", action="store_true", help="print only the final JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    quiet = args.pop("quiet")
    try:
        cfg = TrialConfig(**args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = check(cfg)
    if code:
        return code
    run_and_print(cfg, quiet)
    return 0


def check(cfg: TrialConfig) -> int:
    """What can refuse the trial before it starts (its data source, its device), as one ``error:``
    line on stderr: 0 when it can run, 2 a bad option, 1 a missing file."""
    try:
        data_mod.check_source(cfg.data, cfg.data_path, cfg.vocab_size)
        trial_device(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_and_print(cfg: TrialConfig, quiet: bool = False) -> TrialResult:
    """Run the trial, its progress on stderr (unless ``quiet``), its result as JSON on stdout."""

    def progress(step: int, metrics: dict[str, float], events: list[DivergenceEvent]) -> None:
        if quiet:
            return
        parts = [f"step {step:>5}"] + [f"{k} {metrics[k]:.4g}" for k in
                                       ("loss", "val_loss", "lr", "grad_norm", "attn_entropy/min",
                                        "spectral_conc/max", "max_logit") if k in metrics]
        print("  ".join(parts), file=sys.stderr)
        for e in events:
            print(f"  event: {e.kind} at step {e.step}: {e.detail}", file=sys.stderr)

    result = run(cfg, progress)
    out = result.to_dict()
    out.pop("final_metrics")
    out.pop("train_losses")
    out.pop("window_losses")
    out.pop("window_baselines")
    print(json.dumps(out, indent=2, default=str))
    return result
