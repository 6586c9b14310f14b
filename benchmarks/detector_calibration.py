"""Calibrate early stopping against full runs.

Runs a grid of trials to the end with only non-finite stopping (``stop_on: [nonfinite]``), takes
each trial's final class from its final state (``workloads.outcome``), then replays the live
detector's code (``workloads.divergence.replay``) on each trial's recorded per-step training losses
and prints:

- the confusion matrix "stopped early / ran to the end" x final class for the default rule
  (``DivergenceConfig()``), and the fraction of the crashed trials' steps that stopping saves
  (counted from the trial loop's loss read after the stopping step: it reads every
  ``sync_interval`` steps);
- a search over the rule's parameters (grace, window, margin): for each, how many trials it would
  stop whose final class is not ``diverged`` (must be 0: a stopped trial is classed diverged) and
  the steps saved; the safest most-saving setting is printed.

Targets (issue "A crash is what the full run shows"): no trial stopped early whose final class is
stable (we ask more: none whose class is not diverged); at least half of the crashed trials' steps
saved.

    python benchmarks/detector_calibration.py                       # CPU: GPT smoke size + ViT/digits
    python benchmarks/detector_calibration.py --replay runs.json    # re-analyse recorded curves
    python benchmarks/detector_calibration.py --size gpu            # the gpt_warmup_ablation size (CUDA, bf16)

The per-step curves are written to ``--out`` (JSON) so that the analysis can be repeated.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workloads.divergence import DivergenceConfig, replay  # noqa: E402
from workloads.outcome import DEFAULT_CRASH, DEFAULT_KAPPA, Point, classify  # noqa: E402
from workloads.trial import TrialConfig  # noqa: E402

SYNC_INTERVAL = TrialConfig().sync_interval

LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
STABILIZERS = ["none", "weyl", "sigma_reparam", "mlra", "qk_norm"]
SIZES = {
    # the smoke spec's GPT (search_spaces/smoke.yaml) and a ViT of the same scale on digits
    "cpu": [
        ("gpt", dict(workload="gpt", depth=2, width=64, heads=2, seq_len=64, batch_size=16, steps=200,
                     schedule="constant", eval_interval=0, eval_batches=4, probe_interval=50,
                     device="cpu", threads=1)),
        ("vit", dict(workload="vit", depth=2, width=64, heads=2, img_size=16, patch_size=4, batch_size=32,
                     steps=200, schedule="constant", eval_interval=0, eval_batches=4, probe_interval=50,
                     device="cpu", threads=1)),
    ],
    # search_spaces/gpt_warmup_ablation.yaml's size, no warmup, cosine
    "gpu": [
        ("gpt-6x512", dict(workload="gpt", depth=6, width=512, heads=8, seq_len=256, batch_size=64, steps=800,
                           schedule="cosine", eval_interval=0, eval_batches=8, probe_interval=100,
                           device="cuda", precision="bf16")),
    ],
}


def _one(args: tuple[str, dict]) -> dict:
    name, fields = args
    from workloads.trial import run

    cfg = TrialConfig(**fields, stop_on=("nonfinite",))
    r = run(cfg)
    return {"name": name, "lr": cfg.lr, "stabilizer": cfg.stabilizer_label, "seed": cfg.seed,
            "steps": cfg.steps, "steps_run": r.steps_run, "initial_loss": r.initial_loss,
            "final_loss": r.final_loss if math.isfinite(r.final_loss) else "inf",
            "baseline": r.baseline_loss, "stop_reason": r.stop_reason, "wall_time": r.wall_time,
            "losses": [x if math.isfinite(x) else str(x) for x in r.train_losses]}


def run_grid(size: str, processes: int, seeds: int) -> list[dict]:
    jobs = []
    for (name, base), stab, lr, seed in itertools.product(SIZES[size], STABILIZERS, LRS, range(seeds)):
        jobs.append((name, {**base, "lr": lr, "seed": seed, "stabilizers": () if stab == "none" else (stab,)}))
    out, t0 = [], time.monotonic()
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        for i, rec in enumerate(pool.imap_unordered(_one, jobs), 1):
            out.append(rec)
            print(f"  [{i}/{len(jobs)}] {rec['name']} {rec['stabilizer']:<13} lr {rec['lr']:<6g} "
                  f"final {_f(rec['final_loss'])}  ({time.monotonic() - t0:.0f}s)", file=sys.stderr, flush=True)
    return out


def _f(v) -> float:
    return float(v)


def final_classes(records: list[dict], kappa: float = DEFAULT_KAPPA) -> list[str]:
    """The class of every full run, ``degraded`` within its (workload, stabilizer) cell."""
    cells = defaultdict(list)
    for i, r in enumerate(records):
        cells[(r["name"], r["stabilizer"])].append(i)
    classes = [""] * len(records)
    for idx in cells.values():
        pts = [Point(records[i]["lr"], records[i]["seed"], _f(records[i]["final_loss"]),
                     records[i]["initial_loss"], records[i]["baseline"],
                     "nonfinite" if records[i]["stop_reason"] == "nonfinite" else None) for i in idx]
        for i, c in zip(idx, classify(pts, kappa)):
            classes[i] = c
    return classes


def read_point(step: int, total: int, sync_interval: int) -> int:
    """The step at which the trial loop reads the loss of ``step`` (it reads every ``sync_interval``
    steps and at the last; probe and evaluation steps may read earlier, so this is conservative):
    a stop at ``step`` ends the run there."""
    return min(total - 1, -(-step // sync_interval) * sync_interval)


def evaluate(records: list[dict], classes: list[str], cfg: DivergenceConfig,
             crash: tuple[str, ...] = DEFAULT_CRASH, sync_interval: int = SYNC_INTERVAL) -> dict:
    """Replay the detector on every curve: confusion matrix, wrong stops, steps saved (the steps
    after the loss read that follows the stopping step)."""
    matrix: Counter = Counter()
    wrong, saved, crashed_steps, stops = 0, 0, 0, []
    for r, c in zip(records, classes):
        losses = [_f(x) for x in r["losses"]]
        if r["stop_reason"] == "nonfinite":  # stopped by the non-finite rule in the full run too
            ev_step, kind = next(i for i, x in enumerate(losses) if not math.isfinite(x)), "nonfinite"
        else:
            ev = replay(losses, r["initial_loss"], r["steps"], cfg)
            ev_step, kind = (ev.step, ev.kind) if ev else (None, None)
        stopped = ev_step is not None
        matrix[("stopped early" if stopped else "ran to the end", c)] += 1
        if stopped and c != "diverged":
            wrong += 1
        if c in crash:
            crashed_steps += r["steps"]
            if stopped:
                saved += r["steps"] - (read_point(ev_step, r["steps"], sync_interval) + 1)
        if stopped:
            stops.append((r, kind, ev_step))
    return {"matrix": matrix, "wrong": wrong, "saved": saved / crashed_steps if crashed_steps else 0.0,
            "stops": stops}


def print_matrix(matrix: Counter) -> None:
    from workloads.outcome import CLASSES

    cols = [c for c in CLASSES if any(matrix[(r, c)] for r in ("stopped early", "ran to the end"))]
    print("| | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for row in ("stopped early", "ran to the end"):
        print(f"| {row} | " + " | ".join(str(matrix[(row, c)]) for c in cols) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default="calibration_runs.json", help="where the recorded curves go (JSON)")
    ap.add_argument("--replay", help="analyse curves recorded by an earlier run instead of training")
    args = ap.parse_args(argv)

    if args.replay:
        records = json.loads(Path(args.replay).read_text())
    else:
        t0 = time.monotonic()
        records = run_grid(args.size, args.processes, args.seeds)
        Path(args.out).write_text(json.dumps(records))
        print(f"{len(records)} full runs in {time.monotonic() - t0:.0f}s; curves in {args.out}")
    classes = final_classes(records)
    for name in sorted({r["name"] for r in records}):
        counts = Counter(c for r, c in zip(records, classes) if r["name"] == name)
        print(f"{name}: final classes {dict(counts)}")

    default = DivergenceConfig()
    res = evaluate(records, classes, default)
    print(f"\nDefault rule: stop on non-finite loss, or median loss of the last {default.stop_window} steps >= "
          f"{default.stop_margin:g} x l_0 after {default.stop_grace:.0%} of the run\n")
    print_matrix(res["matrix"])
    print(f"\nstopped early but not ending diverged: {res['wrong']} (target 0)")
    print(f"steps of the crashed trials ({' + '.join(DEFAULT_CRASH)}) saved: {res['saved']:.1%} (target >= 50%)")
    for name in sorted({r["name"] for r in records}):
        sub = [i for i, r in enumerate(records) if r["name"] == name]
        part = evaluate([records[i] for i in sub], [classes[i] for i in sub], default)
        print(f"  {name}: {part['saved']:.1%} saved, {part['wrong']} wrong stops")

    print("\nRule search (grace x window x margin): wrong stops, steps saved")
    rows = []
    for grace, window, margin in itertools.product((0.05, 0.1, 0.25, 0.4, 0.6), (10, 20, 40),
                                                   (1.0, 1.1, 1.5, 2.0, 2.5, 3.0)):
        cfg = DivergenceConfig(stop_grace=grace, stop_window=window, stop_margin=margin)
        r = evaluate(records, classes, cfg)
        rows.append((r["wrong"], -r["saved"], grace, window, margin))
    rows.sort()
    show = rows[:5] + sorted((r for r in rows if r[0] > 0), key=lambda r: r[1])[:5]
    for wrong, neg_saved, grace, window, margin in show:
        print(f"  grace {grace:<5g} window {window:<3d} margin {margin:<4g} wrong {wrong}  saved {-neg_saved:.1%}")
    print(f"\nno stable-ending trial stopped: {'met' if res['wrong'] == 0 else 'NOT met'}; "
          f"half of the crashed trials' steps saved: {'met' if res['saved'] >= 0.5 else 'NOT met'} "
          f"({res['saved']:.1%}; the safest rule cannot save more when crashed runs end near l_0 or the "
          "baseline without blowing up)" if res["saved"] < 0.5 else "")
    return 0 if res["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
