"""The boundary search on synthetic cells with a known crash curve: is LR50's 90 % interval right
(coverage), how close is LR50 (median |log(lr50 / true)|), and how many trials does it take against
a dense grid of LRs with k seeds each, fitted the same way?

Every synthetic cell has a true ``P(crash | lr) = F((log lr - mu) / s)`` (no lapse in the truth;
the model's lapse is its own robustness), in three kinds: *sharp* (band lr90/lr10 x1.2, qk_norm's
in issue #17), *medium* (x2) and *wide* (x5, the baseline's), with LR50 log-uniform inside the LR
range [1e-3, 1]. A trial's outcome is drawn from the cell's RNG and the trial's seed, so that a
run is exact (fixed RNG) and the search and the grid see independent draws.

* Search: the code ``ablate boundary`` runs (``orchestrator.boundary.search_local``: the cell's
  Optuna study, the Psi sampler, the stopping rule), method psi, stop at an interval of
  ``--resolution`` or ``--budget`` trials, ``--in-flight`` proposals at once.
* Grid: the 41 LRs at 2^(1/4) over the range, k = 1..K seeds each, the same posterior
  (``orchestrator.psychometric.fit``). Its trials to reach the width: 41 x the smallest k at which
  the median interval of the kind is narrower than ``--resolution``. The trials ratio is the
  search's mean trials (cells that hit the budget counted at the budget) over the grid's, per kind
  and over all cells.

Targets (issue #17): coverage 85-95 % over >= 200 cells; search/grid trials <= 0.3.

    python benchmarks/boundary_efficiency.py [--cells-per-kind 72] [--resolution 1.5] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from orchestrator import psychometric as psy
from orchestrator.boundary import Cell, search_local
from orchestrator.boundary_config import BoundaryConfig

LR_RANGE = (1e-3, 1.0)
KINDS = {"sharp (band x1.2)": 1.2, "medium (band x2)": 2.0, "wide (band x5)": 5.0}


def s_of_band(band: float) -> float:
    """The logistic's s for a band lr90 / lr10 (= 9^(2 s))."""
    return math.log(band) / (2 * psy.LN9)


def draw(cell_seed: int, trial_seed: int, lr: float, mu: float, s: float) -> bool:
    u = np.random.default_rng([cell_seed, trial_seed]).random()
    return bool(u < 1 / (1 + math.exp(-(math.log(lr) - mu) / s)))


def truths(per_kind: int, seed: int = 0) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for kind, band in KINDS.items():
        for mu in rng.uniform(math.log(3e-3), math.log(0.3), per_kind):
            out.append((kind, float(mu), s_of_band(band)))
    return out


def run_search(cells, cfg: BoundaryConfig) -> list[dict]:
    reps = []
    for i, (kind, mu, s) in enumerate(cells):
        def fake(c, i=i, mu=mu, s=s):
            crashed = draw(i, c.seed, c.lr, mu, s)
            return {"final_loss": math.inf if crashed else 1.0, "initial_loss": 5.0, "baseline_loss": 3.0,
                    "stop_reason": None}

        rep = search_local([Cell(f"c{i}", {}, {"workload": "gpt", "steps": 1})], cfg, None, f"c{i}", fake)[0]
        rep.update(kind=kind, true_lr50=math.exp(mu))
        reps.append(rep)
    return reps


def run_grid(cells, max_seeds: int) -> dict[int, list[psy.Fit]]:
    lrs = [float(v) for v in np.geomspace(*LR_RANGE, 41)]
    grid = psy.make_grid(LR_RANGE)
    fits: dict[int, list[psy.Fit]] = {}
    for k in range(1, max_seeds + 1):
        fits[k] = []
        for i, (_, mu, s) in enumerate(cells):
            xs = [lr for lr in lrs for _ in range(k)]
            ys = [draw(i, 10_000 + j * len(lrs) + n, lr, mu, s) for n, lr in enumerate(lrs) for j in range(k)]
            fits[k].append(psy.fit(LR_RANGE, xs, ys, grid))
    return fits


def covered(lo: float, hi: float, true: float) -> bool:
    return lo <= true <= hi


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells-per-kind", type=int, default=72)
    ap.add_argument("--resolution", type=float, default=1.5)
    ap.add_argument("--budget", type=int, default=80)
    ap.add_argument("--in-flight", type=int, default=1)
    ap.add_argument("--max-grid-seeds", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="write the tables as Markdown here too")
    args = ap.parse_args(argv)
    cells = truths(args.cells_per_kind)
    cfg = BoundaryConfig(lr_range=LR_RANGE, resolution=args.resolution, max_trials_per_cell=args.budget,
                         max_in_flight_per_cell=args.in_flight)
    t0 = time.perf_counter()
    reps = run_search(cells, cfg)
    t_search = time.perf_counter() - t0
    fits = run_grid(cells, args.max_grid_seeds)
    kinds = list(KINDS) + ["all"]
    lines = [f"Synthetic cells: {len(cells)} ({args.cells_per_kind} per kind), LR range {list(LR_RANGE)}, "
             f"psi search: stop at a 90 % interval of LR50 narrower than x{args.resolution:g} or {args.budget} "
             f"trials, {args.in_flight} in flight; dense grid: 41 LRs (2^(1/4)) x k seeds, the same fit.", "",
             "| cells | n | coverage of the 90 % interval | median abs log(lr50/true) | converged | "
             f"mean trials (search) | grid seeds k for median width <= x{args.resolution:g} | grid trials | "
             "trials ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    summary = {}
    need = {}  # kind -> grid seeds k at which the kind's median interval is narrower than the resolution
    for kind in KINDS:
        idx = [i for i, c in enumerate(cells) if c[0] == kind]
        need[kind] = next((k for k in sorted(fits) if np.median([fits[k][i].width for i in idx]) <= args.resolution),
                          None)
    for kind in kinds:
        idx = [i for i, c in enumerate(cells) if kind == "all" or c[0] == kind]
        rs = [reps[i] for i in idx]
        cov = float(np.mean([covered(r["lr50_low"], r["lr50_high"], r["true_lr50"]) for r in rs]))
        err = float(np.median([abs(math.log(r["lr50"] / r["true_lr50"])) for r in rs]))
        conv = float(np.mean([r["converged"] for r in rs]))
        trials = float(np.mean([r["n_trials"] for r in rs]))
        ks = [need[cells[i][0]] for i in idx]
        grid_trials = float(np.mean([41 * k for k in ks])) if None not in ks else None
        ratio = trials / grid_trials if grid_trials else None
        k_text = (str(ks[0]) if len(set(ks)) == 1 else "per kind") if None not in ks else f"> {args.max_grid_seeds}"
        summary[kind] = dict(n=len(rs), coverage=cov, median_abs_log_err=err, converged=conv, trials=trials,
                             grid_seeds=ks[0] if len(set(ks)) == 1 else None, grid_trials=grid_trials, ratio=ratio)
        lines.append(f"| {kind} | {len(rs)} | {100 * cov:.1f} % | {err:.3f} | {100 * conv:.0f} % | {trials:.1f} | "
                     + (f"{k_text} | {grid_trials:.0f} | {ratio:.2f} |" if grid_trials else
                        f"{k_text} | > {41 * args.max_grid_seeds} | < {trials / (41 * args.max_grid_seeds):.2f} |"))
    lines += ["", "Dense grid with the same fit, per k seeds: median interval width (x) and coverage, all cells:", "",
              "| k | trials | median width | coverage |", "| --- | --- | --- | --- |"]
    for k, fs in fits.items():
        cov = np.mean([covered(f.lr50_low, f.lr50_high, math.exp(c[1])) for f, c in zip(fs, cells)])
        lines.append(f"| {k} | {41 * k} | {np.median([f.width for f in fs]):.2f} | {100 * cov:.1f} % |")
    a = summary["all"]
    verdict = (f"coverage {100 * a['coverage']:.1f} % (target 85-95 %): "
               + ("met" if 0.85 <= a["coverage"] <= 0.95 else "MISSED")
               + "; trials ratio " + (f"{a['ratio']:.2f}" if a["ratio"] else "n/a") + " (target <= 0.3): "
               + ("met" if a["ratio"] is not None and a["ratio"] <= 0.3 else "MISSED"))
    lines += ["", verdict, f"(search: {t_search:.0f} s for {sum(r['n_trials'] for r in reps)} trials' proposals)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
