"""Trials per cell and final bracket width: the boundary search against a dense LR grid at equal
resolution, through the same search code (``orchestrator.boundary.search_local``: the cell studies,
sampler and stopping rule that ``ablate boundary`` runs under Ray Tune).

1. Synthetic, noise-free: a fake trial that diverges above a known LR, for many known boundaries
   spread over the range. Checks that every final bracket contains the true boundary.
2. Real: the CPU GPT workload at the boundary smoke size (2 layers, width 64, 150 steps, no warmup,
   constant LR), baseline and qk_norm cells, crash = diverged or collapsed; the dense grid is run
   too, and its bracket (``workloads.outcome.bracket``) compared with the search's.

Target (issue #4): at most a quarter of the grid's trials at the same resolution, and the bracket
contains the true boundary in every synthetic case.

    python benchmarks/boundary_efficiency.py [--skip-real]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from orchestrator.boundary import BoundaryConfig, Cell, dense_grid_size, search_local
from workloads.outcome import Point, bracket
from workloads.trial import TrialConfig, run

CFG = BoundaryConfig(lr_range=(1e-4, 1.0), resolution=2 ** 0.25, max_trials_per_cell=20)


def dense_grid(lo: float, hi: float, n: int) -> list[float]:
    return [float(f"{v:.6g}") for v in np.geomspace(lo, hi, n)]


def synthetic(storage_dir: Path) -> tuple[list[int], list[float], bool]:
    truths = np.geomspace(1.3e-4, 0.9, 25)
    trials, widths, ok = [], [], True
    for i, truth in enumerate(truths):
        n = [0]

        def fake(cfg: TrialConfig, truth=truth, n=n) -> dict:
            n[0] += 1
            crashed = cfg.lr > truth
            return {"final_loss": math.inf if crashed else 1.0, "initial_loss": 5.0, "baseline_loss": 3.0,
                    "stop_reason": "nonfinite" if crashed else None}

        cell = Cell(f"synthetic-{i}", {}, {"workload": "gpt", "steps": 1})
        rep = search_local([cell], CFG, f"sqlite:///{storage_dir / 'synthetic.db'}", f"s{i}", fake)[0]
        trials.append(n[0])
        widths.append(rep["bracket_width"])
        ok &= rep["stable_lr"] <= truth < rep["crash_lr"]
    return trials, widths, ok


TINY = dict(workload="gpt", depth=2, width=64, heads=2, seq_len=64, batch_size=16, steps=150,
            warmup_steps=0, schedule="constant", eval_interval=0, eval_batches=4, probe_interval=25,
            threads=1, device="cpu")


def real(storage_dir: Path, cfg: BoundaryConfig) -> None:
    def evaluate(c: TrialConfig) -> dict:
        return run(c).to_dict()

    for stab in ((), ("qk_norm",)):
        label = "+".join(stab) or "none"
        cell = Cell(label, {"stabilizers": label}, {**TINY, "stabilizers": stab})
        t0 = time.perf_counter()
        n = [0]

        def counted(c: TrialConfig) -> dict:
            n[0] += 1
            return evaluate(c)

        rep = search_local([cell], cfg, f"sqlite:///{storage_dir / 'real.db'}", f"real-{label}", counted)[0]
        t_search = time.perf_counter() - t0
        grid = dense_grid(*cfg.lr_range, dense_grid_size(cfg))
        t0 = time.perf_counter()
        points = []
        for lr in grid:
            r = evaluate(TrialConfig(**{**TINY, "stabilizers": stab, "lr": lr}))
            points.append(Point(lr, 0, r["final_loss"], r["initial_loss"], r["baseline_loss"], r["stop_reason"]))
        t_grid = time.perf_counter() - t0
        b = bracket(points, cfg.crash, cfg.kappa)
        crash, stable = b.crash_lr, b.stable_lr
        print(f"  {label:<8} search: {n[0]:>3} trials, bracket [{_f(rep['stable_lr'])}, {_f(rep['crash_lr'])}] "
              f"width {rep['bracket_width']:.3f}x, {t_search:5.1f}s | grid: {len(grid)} trials, "
              f"bracket [{_f(stable)}, {_f(crash)}] width {(crash / stable if crash and stable else math.inf):.3f}x, "
              f"{t_grid:5.1f}s | trials ratio {n[0] / len(grid):.2f}")


def _f(v):
    return f"{v:.4g}" if v else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    dense = dense_grid_size(CFG)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        trials, widths, ok = synthetic(d)
        print(f"synthetic, noise-free: lr range {CFG.lr_range}, resolution {CFG.resolution:.4f}x, 25 boundaries")
        print(f"  search: {np.mean(trials):.1f} trials per cell (max {max(trials)}), final bracket width "
              f"<= {max(widths):.4f}x")
        print(f"  dense grid: {dense} trials per cell, bracket width {CFG.resolution:.4f}x")
        print(f"  trials ratio search/grid: {np.mean(trials) / dense:.3f} (max {max(trials) / dense:.3f}); "
              f"bracket contains the true boundary in every case: {ok}")
        target = max(trials) <= dense / 4 and ok
        if not args.skip_real:
            real_cfg = BoundaryConfig(lr_range=(1e-3, 3.0), resolution=2 ** 0.25, max_trials_per_cell=20)
            print(f"real CPU GPT (2 x 64, 150 steps): lr range {real_cfg.lr_range}, "
                  f"dense grid {dense_grid_size(real_cfg)} trials")
            real(d, real_cfg)
    print("target met" if target else "target MISSED")


if __name__ == "__main__":
    main()
