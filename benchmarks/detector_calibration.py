"""Calibrate early stopping against full runs, on runs the rule was not chosen on.

Runs grids of trials to the end with only non-finite stopping (``stop_on: [nonfinite]``), takes
each trial's final class from its final state (``workloads.outcome``), then replays the live
detector's code (``workloads.divergence.replay``) on each trial's recorded per-step training losses.
The runs are split in two halves (every other run in configuration, stabilizer, LR, seed order):

- on the *selection* half, a search over the loss rule's parameters (grace, window, margin) picks
  the rule that stops no run whose final class is not ``diverged`` and saves the most steps;
- on the *held-out* half, the previous default, non-finite stopping alone and the chosen rule are
  evaluated: the confusion matrix "stopped early" x final class, false stops (stopped, but the full
  run ended other than diverged), and the fraction of the crashed trials' steps saved beyond what
  non-finite stopping saves (counted from the trial loop's loss read after the stopping step).

Target (issue 17, "No early stop decides a class"): a default loss rule must make zero false stops
on the held-out half and save >= 15 % of the crashed trials' steps; otherwise the default is
``stop_on: [nonfinite]``.

    python benchmarks/detector_calibration.py --size cpu                 # GPT smoke size + ViT/digits, 200 steps
    python benchmarks/detector_calibration.py --size boundary,lengths    # 150 steps (boundary smoke), 100-1000
    python benchmarks/detector_calibration.py --size cpu,boundary,lengths --seed-offset 2   # new seeds of all
    python benchmarks/detector_calibration.py --replay a.json b.json     # re-analyse recorded curves
    python benchmarks/detector_calibration.py --size gpu                 # the gpt_warmup_ablation size (CUDA, bf16)

The per-step curves are written to ``--out`` (JSON) so that the analysis can be repeated; the CPU
recordings are ``docs/calibration/cpu_runs.json`` (200 steps),
``docs/calibration/cpu_runs_heldout.json`` (the boundary smoke config and 100-1000 steps) and
``docs/calibration/cpu_runs_replicates.json`` (all of them again, seeds shifted by 2).
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
    # held-out lengths and configs (issue 17): the boundary smoke config (150 steps, LRs 0.1-1, 2
    # seeds), GPT and ViT at 100 steps, GPT at 1000 and ViT at 600 steps
    "boundary": [
        ("gpt-150", dict(workload="gpt", depth=2, width=64, heads=2, seq_len=64, batch_size=16, steps=150,
                         schedule="constant", warmup_steps=0, eval_interval=0, eval_batches=4, probe_interval=50,
                         device="cpu", threads=1), [0.1, 0.2, 0.4, 0.6, 0.8058, 1.0], 2),
    ],
    "lengths": [
        ("gpt-100", dict(workload="gpt", depth=2, width=64, heads=2, seq_len=64, batch_size=16, steps=100,
                         schedule="constant", eval_interval=0, eval_batches=4, probe_interval=50,
                         device="cpu", threads=1), [0.03, 0.1, 0.3, 1.0], 1),
        ("gpt-1000", dict(workload="gpt", depth=2, width=64, heads=2, seq_len=64, batch_size=16, steps=1000,
                          schedule="constant", eval_interval=0, eval_batches=4, probe_interval=100,
                          device="cpu", threads=1), [0.1, 0.3, 1.0], 1),
        ("vit-100", dict(workload="vit", depth=2, width=64, heads=2, img_size=16, patch_size=4, batch_size=32,
                         steps=100, schedule="constant", eval_interval=0, eval_batches=4, probe_interval=50,
                         device="cpu", threads=1), [0.03, 0.1, 0.3, 1.0], 1),
        ("vit-600", dict(workload="vit", depth=2, width=64, heads=2, img_size=16, patch_size=4, batch_size=32,
                         steps=600, schedule="constant", eval_interval=0, eval_batches=4, probe_interval=100,
                         device="cpu", threads=1), [0.1, 0.3, 1.0], 1),
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
            "eval_baseline": r.eval_baseline,
            "final_loss_se": r.final_loss_se if math.isfinite(r.final_loss_se) else None,
            "losses": [x if math.isfinite(x) else str(x) for x in r.train_losses]}


def run_grid(size: str, processes: int, seeds: int, seed_offset: int = 0) -> list[dict]:
    """Every configuration of ``size`` run to the end; a grid without its own seed count takes
    ``seeds`` seeds. ``seed_offset`` shifts every seed (new replicates of a recorded grid)."""
    jobs = []
    for entry in SIZES[size]:
        name, base = entry[0], entry[1]
        lrs, n_seeds = (entry[2], entry[3]) if len(entry) > 2 else (LRS, seeds)
        for stab, lr, seed in itertools.product(STABILIZERS, lrs, range(seed_offset, seed_offset + n_seeds)):
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


def _point(r: dict) -> Point:
    return Point(r["lr"], r["seed"], _f(r["final_loss"]), r["initial_loss"], r["baseline"],
                 "nonfinite" if r["stop_reason"] == "nonfinite" else None, r.get("eval_baseline"),
                 r.get("final_loss_se"))


def final_classes(records: list[dict], kappa: float = DEFAULT_KAPPA) -> list[str]:
    """The class of every full run (``workloads.outcome.classify``) within its (config, stabilizer)
    cell, against the cell's own reference: as for any grid, its runs at its lowest LR. Runs
    recorded without per-window baselines (the 200-step recording of
    ``docs/calibration/cpu_runs.json``) fall back to the whole split's baseline."""
    cells = defaultdict(list)
    for i, r in enumerate(records):
        cells[(r["name"], r["stabilizer"])].append(i)
    classes = [""] * len(records)
    for idx in cells.values():
        for i, c in zip(idx, classify([_point(records[i]) for i in idx], kappa)):
            classes[i] = c
    return classes


def halves(records: list[dict]) -> tuple[list[int], list[int]]:
    """Indices of the half a rule is chosen on and of the held-out half: every other run in
    (configuration, stabilizer, LR, seed) order, so both halves span every configuration and LR."""
    order = sorted(range(len(records)), key=lambda i: (records[i]["name"], records[i]["stabilizer"],
                                                       records[i]["lr"], records[i]["seed"]))
    return order[0::2], order[1::2]


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


RULE_GRID = dict(grace=(0.05, 0.1, 0.25, 0.4, 0.6), window=(10, 20, 40), margin=(1.0, 1.1, 1.5, 2.0, 2.5, 3.0, 4.0))
NONFINITE_ONLY = DivergenceConfig(stop_on=("nonfinite",))
PREVIOUS = DivergenceConfig(stop_grace=0.25, stop_window=20, stop_margin=3.0, stop_on=("nonfinite", "above_initial"))
"""The default before issue 17, chosen on the 200-step runs it was checked on."""
MIN_SAVING = 0.15
"""A loss rule earns its place as the default only if it saves at least this fraction of the crashed
trials' steps beyond what stopping on a non-finite loss saves, with no false stop on held-out runs."""


def loss_rule(grace: float, window: int, margin: float) -> DivergenceConfig:
    return DivergenceConfig(stop_grace=grace, stop_window=window, stop_margin=margin,
                            stop_on=("nonfinite", "above_initial"))


def extra_saving(records: list[dict], classes: list[str], cfg: DivergenceConfig) -> tuple[float, int]:
    """(steps of the crashed trials the rule saves beyond stopping on non-finite losses alone, as a
    fraction of all their steps; the rule's false stops)."""
    r, base = evaluate(records, classes, cfg), evaluate(records, classes, NONFINITE_ONLY)
    return r["saved"] - base["saved"], r["wrong"]


def choose_rule(records: list[dict], classes: list[str]) -> tuple[tuple, list[tuple]]:
    """The loss rule chosen on ``records``: no false stop there, the most steps saved (ties: the
    later grace, the larger margin). Returns it and every candidate's (wrong, saved, grace, window,
    margin)."""
    rows = []
    for grace, window, margin in itertools.product(RULE_GRID["grace"], RULE_GRID["window"], RULE_GRID["margin"]):
        saved, wrong = extra_saving(records, classes, loss_rule(grace, window, margin))
        rows.append((wrong, saved, grace, window, margin))
    safe = [r for r in rows if r[0] == 0]
    best = max(safe, key=lambda r: (round(r[1], 9), r[2], r[4])) if safe else None
    return best, rows


def held_out_table(records: list[dict], classes: list[str], rules: dict[str, DivergenceConfig]) -> None:
    """Per rule: the confusion matrix (stopped early / ran to the end x final class) on ``records``,
    false stops and steps saved beyond non-finite stopping, as Markdown."""
    from workloads.outcome import CLASSES

    print("| rule | " + " | ".join(f"stopped: {c}" for c in CLASSES) + " | false stops | "
          "crashed-trial steps saved (beyond non-finite) |")
    print("| --- |" + " --- |" * (len(CLASSES) + 2))
    for name, cfg in rules.items():
        r = evaluate(records, classes, cfg)
        saved, wrong = extra_saving(records, classes, cfg)
        print(f"| {name} | " + " | ".join(str(r["matrix"][("stopped early", c)]) for c in CLASSES)
              + f" | {wrong} | {r['saved']:.1%} ({saved:+.1%}) |")
    counts = Counter(classes)
    print(f"\n(runs by final class: {dict(sorted(counts.items()))}; the others ran to the end)")


def describe(cfg: DivergenceConfig) -> str:
    if "above_initial" not in cfg.stop_on:
        return "non-finite loss only"
    return f"grace {cfg.stop_grace:g}, window {cfg.stop_window}, margin {cfg.stop_margin:g} x l_0"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="cpu", help=f"comma-separated grids to run: {', '.join(sorted(SIZES))}")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="added to every seed: new replicates of a recorded grid (e.g. 2 beside seeds 0-1)")
    ap.add_argument("--out", default="calibration_runs.json", help="where the recorded curves go (JSON)")
    ap.add_argument("--replay", nargs="+", help="analyse curves recorded by earlier runs instead of training")
    args = ap.parse_args(argv)

    if args.replay:
        records = [r for f in args.replay for r in json.loads(Path(f).read_text())]
    else:
        t0 = time.monotonic()
        records = [r for size in args.size.split(",") for r in run_grid(size, args.processes, args.seeds, args.seed_offset)]
        Path(args.out).write_text(json.dumps(records))
        print(f"{len(records)} full runs in {time.monotonic() - t0:.0f}s; curves in {args.out}")
    classes = final_classes(records)
    old = sum(1 for r in records if r.get("eval_baseline") is None)
    for name in sorted({r["name"] for r in records}):
        counts = Counter(c for r, c in zip(records, classes) if r["name"] == name)
        steps = sorted({r["steps"] for r in records if r["name"] == name})
        print(f"{name} ({steps} steps): final classes {dict(sorted(counts.items()))}")
    if old:
        print(f"({old} runs recorded without per-window baselines: classed against the whole split's baseline, "
              "no standard-error margin)")

    train, test = halves(records)
    tr_rec, tr_cls = [records[i] for i in train], [classes[i] for i in train]
    te_rec, te_cls = [records[i] for i in test], [classes[i] for i in test]
    best, rows = choose_rule(tr_rec, tr_cls)
    print(f"\nRule search on the selection half ({len(train)} runs; grace x window x margin): the safest that save most")
    for wrong, saved, grace, window, margin in sorted(rows, key=lambda r: (r[0], -r[1]))[:6]:
        print(f"  grace {grace:<5g} window {window:<3d} margin {margin:<4g} false stops {wrong}  saved {saved:+.1%}")
    opt_in = DivergenceConfig(stop_on=("nonfinite", "above_initial"))
    rules = {f"previous default ({describe(PREVIOUS)})": PREVIOUS,
             "non-finite loss only": NONFINITE_ONLY,
             f"the loss rule's defaults, opted into ({describe(opt_in)})": opt_in}
    if best is not None:
        rules[f"chosen on the other half ({describe(loss_rule(*best[2:]))})"] = loss_rule(*best[2:])
    print(f"\nHeld-out half ({len(test)} runs), stopped early by final class of the full run:\n")
    held_out_table(te_rec, te_cls, rules)
    print("\nPer configuration, held out:")
    for name in sorted({r["name"] for r in te_rec}):
        sub = [i for i, r in enumerate(te_rec) if r["name"] == name]
        parts = []
        for label, cfg in rules.items():
            saved, wrong = extra_saving([te_rec[i] for i in sub], [te_cls[i] for i in sub], cfg)
            parts.append(f"{label.split(' (')[0]}: {wrong} false, {saved:+.1%}")
        print(f"  {name}: " + "; ".join(parts))
    print(f"\nAll {len(records)} runs (both halves):\n")
    held_out_table(records, classes, rules)
    for label, cfg in rules.items():
        for r, kind, step in evaluate(records, classes, cfg)["stops"]:
            c = classes[records.index(r)]
            if c != "diverged":
                print(f"  false stop, {label.split(' (')[0]}: {r['name']} {r['stabilizer']} lr {r['lr']:g} seed {r['seed']}"
                      f" stopped at step {step} of {r['steps']}; run out it ended {c} at {_f(r['final_loss']):.3f}")
    ok = None
    if best is not None:
        saved, wrong = extra_saving(te_rec, te_cls, loss_rule(*best[2:]))
        ok = wrong == 0 and saved >= MIN_SAVING
        print(f"\nchosen rule on held-out runs: {wrong} false stops, {saved:+.1%} of the crashed trials' steps "
              f"beyond non-finite stopping (needs 0 and >= {MIN_SAVING:.0%})")
    default = DivergenceConfig()
    print(f"default now: {describe(default)}; recommended: "
          f"{describe(loss_rule(*best[2:])) if ok else 'non-finite loss only'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
