"""Do outcome classes survive a resample of the eval windows?

A run's class is decided from its final validation loss, measured on ``eval_batches`` random
windows of the validation split. Another draw of windows is an equally valid measurement of the
same trained model; a class rule that flips under it decides on noise. This benchmark trains each
run of a sweep once (to the end, only a non-finite loss stops it), then measures the final model on
the original windows and on ``--resamples`` fresh draws (other window seeds), each with the
marginal baseline of exactly those windows, and classes the whole sweep once per draw
(``workloads.outcome.classify``, per cell, against the cell's reference measured on the same draw).
It prints, per grid, the fraction of (run, draw) pairs whose class equals the class on the
original windows, and the runs whose class changed in any draw, for three rules: this one (a tenth
of the cell's own reference gain; ``degraded`` against the reference), #17's (a tenth of the best
gain of the workload and size, over every cell; ``degraded`` against the cell's best run), and the
one before #17 (final loss against the whole split's baseline, no margin; ``degraded`` normalised
by l_0 - L*).

Grids: the smoke sweep (``search_spaces/smoke.yaml``: GPT 2 x 64, 200 steps, 5 LRs x 5 stabilizers;
its reference, as for any grid sweep, is each cell's run at its lowest LR, 3e-3) and the boundary
smoke config (GPT 2 x 64, 150 steps, constant LR, no warmup) on 7 LRs from 0.1 to 0.8, where many
runs end near the baseline, with the reference a boundary search of that config runs first:
``REFERENCE_SEEDS`` seeds at the bottom of its ``lr_range``, 3e-3 (marked ``reference``; they are
not counted in the fractions, which are over the 60 grid runs).

    python benchmarks/class_stability.py                      # run the grids, write --out
    python benchmarks/class_stability.py --replay FILE        # re-analyse a recording

The recording (``docs/calibration/class_stability.json``) keeps per run and draw the final loss, the
draw's baseline and the standard error: everything ``classify`` needs (``tests/test_outcome.py``
re-decides it).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workloads.outcome import COLLAPSE_FRACTION, DEFAULT_KAPPA, Point, classify, paired_gap, trial_class  # noqa: E402

STABILIZERS = ["none", "weyl", "sigma_reparam", "mlra", "qk_norm"]
GPT = dict(workload="gpt", depth=2, width=64, heads=2, seq_len=64, batch_size=16, schedule="constant",
           warmup_steps=0, eval_interval=0, eval_batches=4, probe_interval=50, device="cpu", threads=1)
GRIDS = {
    "smoke": (dict(GPT, steps=200), [3e-3, 3e-2, 1e-1, 3e-1, 1.0]),
    "boundary_smoke": (dict(GPT, steps=150), [0.1, 0.1414, 0.2, 0.2828, 0.4, 0.5657, 0.8]),
}
REFERENCE = {"boundary_smoke": 3e-3}  # the bottom of search_spaces/boundary_smoke.yaml's lr_range
REFERENCE_SEEDS = 3  # the boundary search's default reference_seeds
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "calibration" / "class_stability.json"


def measure_run(args: tuple) -> dict:
    """Train one run to the end (non-finite loss stops it), then measure it on its own eval windows
    (draw 0) and on ``resamples`` fresh draws. ``args``: (grid, TrialConfig fields, resamples[,
    reference]): ``reference`` marks a reference run of its cell."""
    grid, fields, resamples = args[:3]
    reference = bool(args[3]) if len(args) > 3 else False
    import numpy as np
    import torch

    from workloads import data as data_mod
    from workloads.trainer import Trainer, evaluate_windows
    from workloads.trial import TrialConfig

    cfg = TrialConfig(**fields, stop_on=("nonfinite",))
    tr = Trainer(cfg)
    l0 = tr.evaluate()
    finite = True
    for step in range(cfg.steps):
        loss, _, _ = tr.step(step, False)
        if step % cfg.sync_interval == 0 or step == cfg.steps - 1:
            if not math.isfinite(float(loss)):
                finite = False
                break
    td = data_mod.load_text(cfg.data)
    nll = data_mod.text_marginal_nll(td)
    draws = []
    for r in range(resamples + 1):
        if r == 0:
            batches = tr.data.val_batches
        else:
            val = data_mod.TokenBatches(td.val, cfg.batch_size, cfg.seq_len, 20_000 + 1_000 * r + cfg.seed, tr.device)
            batches = [val.next() for _ in range(cfg.eval_batches)]
        base = data_mod.window_baselines(nll, batches)
        if finite:
            losses = evaluate_windows(tr.model, batches, tr.autocast)
            final = float(np.mean(losses))
        if not finite or not math.isfinite(final):
            draws.append([math.inf, float(np.mean(base)), math.nan])
            continue
        _, se = paired_gap(losses.tolist(), base.tolist())
        draws.append([final, float(np.mean(base)), se])
    return {"grid": grid, "stabilizer": cfg.stabilizer_label, "lr": cfg.lr, "seed": cfg.seed, "steps": cfg.steps,
            "initial_loss": l0, "baseline": tr.data.baseline, "draws": draws, "reference": reference}


def old_classes(points: list[Point], kappa: float = DEFAULT_KAPPA) -> list[str]:
    """The rule before issue 17: the final loss against the whole split's baseline, no margin;
    ``degraded`` normalised by l_0 - L*."""
    out = []
    for p in points:
        if not math.isfinite(p.final_loss) or p.final_loss >= p.initial_loss:
            out.append("diverged")
        elif p.final_loss >= p.baseline:
            out.append("collapsed")
        else:
            out.append("stable")
    learned = [p for p, c in zip(points, out) if c == "stable"]
    if learned:
        best = min(learned, key=lambda p: p.final_loss)
        for i, (p, c) in enumerate(zip(points, out)):
            if c == "stable" and p.lr > best.lr and \
                    (p.final_loss - best.final_loss) / (p.initial_loss - best.final_loss) > kappa:
                out[i] = "degraded"
    return out


def rule17_classes(points: list[Point], best_gain: float | None, kappa: float = DEFAULT_KAPPA) -> list[str]:
    """#17's rule: ``collapsed`` at a gain below a tenth of the best gain of the workload and size
    (``best_gain``, over every cell) or of the cell's own best, ``degraded`` against the cell's best
    run at a lower LR."""
    out = [trial_class(p.final_loss, p.initial_loss, p.reference, se=p.final_loss_se) for p in points]
    learned = [i for i, c in enumerate(out) if c == "stable"]
    if not learned:
        return out
    b = max(learned, key=lambda i: (points[i].gain, -points[i].lr))
    g_best = points[b].gain
    g_ref = max(g_best, best_gain or 0.0)
    for i in learned:
        p = points[i]
        if p.gain < COLLAPSE_FRACTION * g_ref:
            out[i] = "collapsed"
        elif p.lr > points[b].lr and (g_best - p.gain) / g_best > kappa:
            out[i] = "degraded"
    return out


def points_of(rec: dict, draw: int, paired: bool = True) -> Point:
    final, base_w, se = rec["draws"][draw]
    final = float(final)
    return Point(rec["lr"], rec["seed"], final, rec["initial_loss"], rec["baseline"], None,
                 base_w if paired else None, se if paired else None, bool(rec.get("reference")))


RULES = ("new", "17", "old")
"""This rule (the cell's own reference), #17's (the best gain of the workload), the one before #17."""


def classes_per_draw(records: list[dict], rule: str = "new") -> list[list[str]]:
    """``out[i][d]``: the class of run ``i`` when every run of the sweep is measured on draw ``d``
    (cells: grid and stabilizer). The rules before this one never had reference runs: they class
    the grid runs alone (a reference run's entry is "")."""
    cells: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if rule == "new" or not r.get("reference"):
            cells[(r["grid"], r["stabilizer"], r.get("steps"))].append(i)
    n_draws = len(records[0]["draws"])
    out: list[list[str]] = [[""] * n_draws for _ in records]
    best = {}  # #17: (grid, steps, draw) -> the best gain of the workload and size
    if rule == "17":
        for d in range(n_draws):
            for g, steps in {(r["grid"], r.get("steps")) for r in records}:
                pts = [points_of(r, d) for r in records if (r["grid"], r.get("steps")) == (g, steps)
                       and not r.get("reference")]
                gains = [p.gain for p in pts if p.gain is not None and trial_class(
                    p.final_loss, p.initial_loss, p.reference, se=p.final_loss_se) == "stable"]
                best[g, steps, d] = max(gains) if gains else None
    for (g, _, steps), idx in cells.items():
        for d in range(n_draws):
            pts = [points_of(records[i], d) for i in idx]
            cls = (classify(pts) if rule == "new" else rule17_classes(pts, best[g, steps, d]) if rule == "17"
                   else old_classes(pts))
            for i, c in zip(idx, cls):
                out[i][d] = c
    return out


def stability(records: list[dict], rule: str = "new") -> tuple[float, list[int]]:
    """The fraction of (grid run, fresh draw) pairs whose class equals the class on the run's own
    windows (draw 0), and the grid runs whose class changed in some draw (reference runs are not
    counted: they are the yardstick, at an LR where every rule calls them stable)."""
    cls = classes_per_draw(records, rule)
    grid = [i for i, r in enumerate(records) if not r.get("reference")]
    pairs = [(cls[i][0] == x) for i in grid for x in cls[i][1:]]
    flipped = [i for i in grid if len(set(cls[i])) > 1]
    return sum(pairs) / len(pairs), flipped


def references(records: list[dict]) -> list[str]:
    """Each cell's reference on its own windows: the LR, runs, mean gain and whether it learned."""
    from workloads.outcome import cell_reference

    cells: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        cells[(r["grid"], r["stabilizer"])].append(i)
    out = []
    for (g, st), idx in sorted(cells.items()):
        ref = cell_reference([points_of(records[i], 0) for i in idx])
        out.append(f"  reference of {g} {st}: lr {ref.lr:g}, {ref.finite}/{ref.runs} runs finite, gain "
                   + (f"{ref.gain:.3f}" if ref.gain is not None else "none")
                   + ("" if ref.learned else " (learned nothing: standard-error margin only)"))
    return out


def report(records: list[dict]) -> None:
    grids = sorted({r["grid"] for r in records})
    print("| grid | runs | draws | kept, this rule | runs that flip | kept, #17's rule | runs that flip | "
          "kept, rule before #17 | runs that flip |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for g in grids + ["all"]:
        recs = [r for r in records if g in ("all", r["grid"])]
        cols = []
        for rule in RULES:
            kept, flips = stability(recs, rule)
            cols += [f"{100 * kept:.1f} %", str(len(flips))]
        n = sum(not r.get("reference") for r in recs)
        print(f"| {g} | {n} | {len(recs[0]['draws']) - 1} | " + " | ".join(cols) + " |")
    print()
    print("\n".join(references(records)))
    print()
    for rule in RULES:
        cls = classes_per_draw(records, rule)
        for i, c in enumerate(cls):
            if len(set(c)) > 1 and not records[i].get("reference"):
                r = records[i]
                counts = {k: c.count(k) for k in sorted(set(c))}
                f0, b0, se0 = r["draws"][0]
                print(f"  {rule} rule: {r['grid']} {r['stabilizer']} lr {r['lr']:g}: own windows {c[0]} "
                      f"(L {float(f0):.3f}, B_w {b0:.3f}, se {se0:.3f}, B {r['baseline']:.3f}); draws {counts}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replay", type=Path, help="re-analyse a recording instead of running")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--resamples", type=int, default=20)
    ap.add_argument("--grids", default=",".join(GRIDS))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if args.replay:
        records = json.loads(args.replay.read_text())["runs"]
    else:
        jobs = []
        for g in args.grids.split(","):
            fields, lrs = GRIDS[g]
            for st in STABILIZERS:
                stabs = () if st == "none" else (st,)
                for lr in lrs:
                    jobs.append((g, dict(fields, lr=lr, stabilizers=stabs), args.resamples))
                if g in REFERENCE:  # the reference runs a boundary search of this config runs first
                    for seed in range(REFERENCE_SEEDS):
                        jobs.append((g, dict(fields, lr=REFERENCE[g], seed=seed, stabilizers=stabs), args.resamples,
                                     True))
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(args.workers) as pool:
            records = pool.map(measure_run, jobs)
        wall = time.perf_counter() - t0
        print(f"{len(records)} runs x {args.resamples + 1} window draws in {wall:.0f} s", file=sys.stderr)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        clean = [{**r, "draws": [[x if math.isfinite(x) else str(x) for x in d] for d in r["draws"]]}
                 for r in records]
        args.out.write_text(json.dumps({"about": "benchmarks/class_stability.py: per run, per window draw "
                                        "(0 = the run's own eval windows): [final loss, baseline of the draw's "
                                        "windows, standard error of the paired difference]; reference: a "
                                        "reference run of its cell (the boundary grid's, at its search's "
                                        "reference LR)",
                                        "wall_s": round(wall, 1), "runs": clean}, indent=None))
        records = clean
    for r in records:
        r["draws"] = [[float(x) for x in d] for d in r["draws"]]
    report(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
