"""Do outcome classes survive a resample of the eval windows?

A run's class is decided from its final validation loss, measured on ``eval_batches`` random
windows of the validation split. Another draw of windows is an equally valid measurement of the
same trained model; a class rule that flips under it decides on noise. This benchmark trains each
run of a sweep once (to the end, only a non-finite loss stops it), then measures the final model on
the original windows and on ``--resamples`` fresh draws (other window seeds), each with the
marginal baseline of exactly those windows, and classes the whole sweep once per draw
(``workloads.outcome.classify``, per cell). It prints, per grid and for the rule of
``workloads.outcome`` and for the rule it replaced (final loss against the whole split's baseline,
no margin; ``degraded`` normalised by l_0 - L*), the fraction of (run, draw) pairs whose class
equals the class on the original windows, and the runs whose class changed in any draw.

Grids: the smoke sweep (``search_spaces/smoke.yaml``: GPT 2 x 64, 200 steps, 5 LRs x 5 stabilizers)
and the boundary smoke config (GPT 2 x 64, 150 steps, constant LR, no warmup) on 7 LRs from 0.1 to 0.8,
where many runs end near the baseline.

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

from workloads import outcome  # noqa: E402
from workloads.outcome import DEFAULT_KAPPA, Point, best_gain, classify, paired_gap  # noqa: E402

STABILIZERS = ["none", "weyl", "sigma_reparam", "mlra", "qk_norm"]
GPT = dict(workload="gpt", depth=2, width=64, heads=2, seq_len=64, batch_size=16, schedule="constant",
           warmup_steps=0, eval_interval=0, eval_batches=4, probe_interval=50, device="cpu", threads=1)
GRIDS = {
    "smoke": (dict(GPT, steps=200), [3e-3, 3e-2, 1e-1, 3e-1, 1.0]),
    "boundary_smoke": (dict(GPT, steps=150), [0.1, 0.1414, 0.2, 0.2828, 0.4, 0.5657, 0.8]),
}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "calibration" / "class_stability.json"


def measure_run(args: tuple[str, dict, int]) -> dict:
    """Train one run to the end (non-finite loss stops it), then measure it on its own eval windows
    (draw 0) and on ``resamples`` fresh draws."""
    grid, fields, resamples = args
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
            "initial_loss": l0, "baseline": tr.data.baseline, "draws": draws}


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


def points_of(rec: dict, draw: int, paired: bool = True) -> Point:
    final, base_w, se = rec["draws"][draw]
    final = float(final)
    return Point(rec["lr"], rec["seed"], final, rec["initial_loss"], rec["baseline"], None,
                 base_w if paired else None, se if paired else None)


def classes_per_draw(records: list[dict], rule: str = "new") -> list[list[str]]:
    """``out[i][d]``: the class of run ``i`` when every run of the sweep is measured on draw ``d``
    (cells: grid and stabilizer)."""
    cells: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        cells[(r["grid"], r["stabilizer"], r.get("steps"))].append(i)
    n_draws = len(records[0]["draws"])
    out: list[list[str]] = [[""] * n_draws for _ in records]
    refs = {}  # (grid, steps, draw) -> the best gain of the workload and size
    for d in range(n_draws):
        for g, steps in {(r["grid"], r.get("steps")) for r in records}:
            refs[g, steps, d] = best_gain(points_of(r, d) for r in records if (r["grid"], r.get("steps")) == (g, steps))
    for (g, _, steps), idx in cells.items():
        for d in range(n_draws):
            pts = [points_of(records[i], d) for i in idx]
            cls = classify(pts, reference_gain=refs[g, steps, d]) if rule == "new" else old_classes(pts)
            for i, c in zip(idx, cls):
                out[i][d] = c
    return out


def stability(records: list[dict], rule: str = "new") -> tuple[float, list[int]]:
    """The fraction of (run, fresh draw) pairs whose class equals the class on the run's own
    windows (draw 0), and the runs whose class changed in some draw."""
    cls = classes_per_draw(records, rule)
    pairs = [(c[0] == x) for c in cls for x in c[1:]]
    flipped = [i for i, c in enumerate(cls) if len(set(c)) > 1]
    return sum(pairs) / len(pairs), flipped


def report(records: list[dict]) -> None:
    grids = sorted({r["grid"] for r in records})
    print("| grid | runs | draws | kept, this rule | runs that flip, this rule | kept, old rule | runs that flip, old rule |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for g in grids + ["all"]:
        recs = [r for r in records if g in ("all", r["grid"])]
        new, fn = stability(recs, "new")
        old, fo = stability(recs, "old")
        print(f"| {g} | {len(recs)} | {len(recs[0]['draws']) - 1} | {100 * new:.1f} % | {len(fn)} | "
              f"{100 * old:.1f} % | {len(fo)} |")
    print()
    for rule in ("new", "old"):
        cls = classes_per_draw(records, rule)
        for i, c in enumerate(cls):
            if len(set(c)) > 1:
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
                for lr in lrs:
                    jobs.append((g, dict(fields, lr=lr, stabilizers=() if st == "none" else (st,)), args.resamples))
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
                                        "windows, standard error of the paired difference]",
                                        "wall_s": round(wall, 1), "runs": clean}, indent=None))
        records = clean
    for r in records:
        r["draws"] = [[float(x) for x in d] for d in r["draws"]]
    report(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
