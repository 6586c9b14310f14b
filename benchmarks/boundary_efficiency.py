"""The boundary search on synthetic cells with a known crash curve, where the model is right and
where it is not: is LR50's 90 % interval right (coverage, overall and among the cells that stopped
on ``interval``), how close is LR50 (median |log(lr50 / true)|), is a boundary outside the range
reported as censored with a true bound, and how many trials does it take against a dense grid of
LRs with k seeds each, fitted the same way?

Families (x = log lr, m = log of the true LR50; ``F_b`` the logistic whose 10-90 % band lr90/lr10
is x b, ``F_b(x) = 1 / (1 + exp(-(x - m) / s_b))``, ``s_b = ln b / (2 ln 9)``). The true LR50 of
every family is the lowest LR at which the true P(crash) reaches 0.5; for all of them that is
exp(m). m is log-uniform in [3e-3, 0.3] of the LR range [1e-3, 1] except where said:

* ``logistic sharp``: F_1.2 (qk_norm's band in issue 17);
* ``logistic wide``: F_5 (the baseline's);
* ``probit``: Phi((x - m) / sigma), band x2 (sigma = ln 2 / (2 * 1.2816));
* ``Cauchy``: 1/2 + arctan((x - m) / g) / pi, band x2 (g = ln 2 / (2 tan(0.4 pi))): heavy tails,
  P(crash) 1.6 % a decade below LR50;
* ``plateau``: max(F_2, 0.3 on [LR50 / 10, LR50)): P(crash) 0.3 over the decade below;
* ``island``: F_2, except P(crash) 0.1 on [LR50 10^0.4, LR50 10^0.6]: a stable island half a decade
  above;
* ``bump``: max(F_2, 0.4 exp(-u^2 / 2)), u = (x - m + 0.5 ln 10) / (0.1 ln 10): a bump of crashes
  up to 0.4 half a decade below;
* ``above range``: F_2 with LR50 log-uniform in [2, 20] (the range tops at 1);
* ``below range``: F_2 with LR50 log-uniform in [5e-5, 5e-4] (the range starts at 1e-3).

A trial's outcome is drawn from the cell's RNG and the trial's seed, so that a run is exact and the
search and the grid see independent draws.

* Search: what ``ablate boundary`` runs (``orchestrator.boundary.search_local``: the cell's Optuna
  study, the Psi sampler, the stopping rule), stop at an interval of ``--resolution`` (the rule of
  ``orchestrator.psychometric.stop_reason``), LR50 outside the range, or ``--budget`` trials,
  ``--in-flight`` proposals at once. A cell is *covered* when its 90 % interval holds the true
  LR50; a censored cell (``censored`` above / below, no LR50) when its one-sided bound is true
  (true LR50 > bound for above, < bound for below).
* Grid: 41 LRs at 2^(1/4) over the range, each moved to the nearest point of the fit's lattice
  (at most 1.9 % away), k = 1, 2, ... seeds each, the same fit (``psychometric.fit``). Its trials
  for a family: 41 x the smallest k at which the family's median interval is at most
  ``--resolution`` (for the censored families: 41, one pass). The trials ratio is the search's mean
  trials (cells that hit the budget counted at the budget) over the grid's.
* Grid check: the first 8 trials of the first cells' searches fitted on the default grid and on a
  fine one (LR50 lattice step 1 % instead of 3.7 %, 161 widths instead of 41): how far the
  interval ends and width move, and whether the stop decision changes.
* Placement time: ms per proposal at 0, 1 and 3 trials pending (median of repeats, a mid-search
  posterior).
* ``--replay N``: N cells per family inside the range, each run to the budget with the search's
  placement (``psychometric.next_lr``; placement does not depend on when a search stops), LR50's
  summaries kept after every trial; every stopping rule of :data:`RULES` is replayed on the same
  runs (coverage overall and among the cells that stopped on ``interval``, mean trials): the
  evidence for the rule ``psychometric.stop_reason`` uses.

Targets (issue 31): coverage 85-95 % for every family, overall and among cells that stopped on
``interval``; median |log error| < 0.1; search / grid trials <= 0.3; intervals at 8 trials within
5 % of the fine grid's.

    python benchmarks/boundary_efficiency.py [--cells 200] [--workers 2] [--in-flight 1] [--out FILE.md]
    python benchmarks/boundary_efficiency.py --replay 100 --no-search --out FILE.md   # the stopping rules
    python benchmarks/boundary_efficiency.py --quick     # a few cells per family (the test's size)
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread per worker
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import NamedTuple  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from orchestrator import psychometric as psy  # noqa: E402
from orchestrator.boundary import Cell, search_local  # noqa: E402
from orchestrator.boundary_config import BoundaryConfig  # noqa: E402

LR_RANGE = (1e-3, 1.0)
LN10 = math.log(10.0)


def s_of_band(band: float) -> float:
    """The logistic's s for a band lr90 / lr10 (= 9^(2 s))."""
    return math.log(band) / (2 * psy.LN9)


def logistic(d: float, band: float) -> float:
    return 1 / (1 + math.exp(-max(min(d / s_of_band(band), 500), -500)))


def probit(d: float, band: float = 2.0) -> float:
    return 0.5 * math.erfc(-d / (math.log(band) / (2 * 1.2815515655446004)) / math.sqrt(2))


def cauchy(d: float, band: float = 2.0) -> float:
    return 0.5 + math.atan(d / (math.log(band) / (2 * math.tan(0.4 * math.pi)))) / math.pi


def plateau(d: float) -> float:
    return max(logistic(d, 2.0), 0.3 if -LN10 <= d < 0 else 0.0)


def island(d: float) -> float:
    return 0.1 if 0.4 * LN10 <= d <= 0.6 * LN10 else logistic(d, 2.0)


def bump(d: float) -> float:
    return max(logistic(d, 2.0), 0.4 * math.exp(-0.5 * ((d + 0.5 * LN10) / (0.1 * LN10)) ** 2))


class Family(NamedTuple):
    p: Callable[[float], float]      # true P(crash) at x = m + d
    lr50: tuple[float, float]        # the true LR50 is log-uniform in this interval


INSIDE = (3e-3, 0.3)
FAMILIES = {
    "logistic sharp": Family(lambda d: logistic(d, 1.2), INSIDE),
    "logistic wide": Family(lambda d: logistic(d, 5.0), INSIDE),
    "probit": Family(probit, INSIDE),
    "Cauchy": Family(cauchy, INSIDE),
    "plateau": Family(plateau, INSIDE),
    "island": Family(island, INSIDE),
    "bump": Family(bump, INSIDE),
    "above range": Family(lambda d: logistic(d, 2.0), (2.0, 20.0)),
    "below range": Family(lambda d: logistic(d, 2.0), (5e-5, 5e-4)),
}
CENSORED_FAMILIES = {"above range": "above", "below range": "below"}


def truths(per_family: int, seed: int = 0, families: list[str] | None = None) -> list[tuple[str, float]]:
    """(family, log true LR50) per cell, drawn per family from its own stream."""
    out = []
    for k, name in enumerate(FAMILIES):
        if families and name not in families:
            continue
        lo, hi = FAMILIES[name].lr50
        rng = np.random.default_rng([seed, k])
        out += [(name, float(m)) for m in rng.uniform(math.log(lo), math.log(hi), per_family)]
    return out


def draw(cell_seed: int, trial_seed: int, lr: float, family: str, m: float) -> bool:
    u = np.random.default_rng([cell_seed, trial_seed]).random()
    return bool(u < FAMILIES[family].p(math.log(lr) - m))


def covered(rep: dict, true: float) -> bool:
    """The cell's statement holds: its 90 % interval holds the truth, or its censored bound does."""
    if rep.get("censored") == "above":
        return true > rep["lr50_bound"]
    if rep.get("censored") == "below":
        return true < rep["lr50_bound"]
    return rep["lr50_low"] <= true <= rep["lr50_high"]


def search_cell(job: tuple) -> dict:
    """One cell's search (run in a worker): the search's report, its trials in order."""
    i, family, m, cfg = job
    seq: list[tuple[float, bool]] = []

    def fake(c):
        crashed = draw(i, c.seed, c.lr, family, m)
        seq.append((c.lr, crashed))
        return {"final_loss": math.inf if crashed else 1.0, "initial_loss": 5.0, "baseline_loss": 3.0,
                "stop_reason": None}

    rep = search_local([Cell(f"c{i}", {}, {"workload": "gpt", "steps": 1})], cfg, None, f"c{i}", fake)[0]
    rep.update(family=family, true_lr50=math.exp(m), sequence=seq)
    return rep


def grid_lrs(grid: psy.Grid) -> list[float]:
    """41 LRs at 2^(1/4) over the range, each on the nearest lattice point of ``grid``."""
    lo = math.log(LR_RANGE[0])
    out = []
    for x in np.linspace(lo, math.log(LR_RANGE[1]), 41):
        t = min(max(round((x - lo) / grid.step), 0), grid.top)
        out.append(math.exp(lo + t * grid.step))
    return out


def grid_fit(job: tuple) -> tuple[float, dict]:
    """The dense grid's fit of one cell at k seeds: (width or inf when censored, as_dict)."""
    i, family, m, k = job
    grid = psy.grid_for(LR_RANGE)
    lrs = grid_lrs(grid)
    xs = [lr for lr in lrs for _ in range(k)]
    ys = [draw(i, 10_000 + j * len(lrs) + n, lr, family, m) for n, lr in enumerate(lrs) for j in range(k)]
    f = psy.fit(LR_RANGE, xs, ys, grid)
    return (f.width if f.censored is None else math.inf), {**f.as_dict(), "true_lr50": math.exp(m)}


FINE = dict(max_step=0.01, n_s=161)
_FINE: list[psy.Grid] = []


def fine_grid() -> psy.Grid:
    if not _FINE:  # built once per worker (its tables are ~200 MB)
        _FINE.append(psy.make_grid(LR_RANGE, **FINE))
    return _FINE[0]


def fine_check(job: tuple) -> dict:
    """The first 8 trials of a search on the default and the fine grid."""
    seq, resolution = job
    lrs, ys = [lr for lr, _ in seq[:8]], [c for _, c in seq[:8]]
    a = psy.fit(LR_RANGE, lrs, ys, psy.grid_for(LR_RANGE))
    b = psy.fit(LR_RANGE, lrs, ys, fine_grid())
    return {"low": abs(math.log(a.lr50_low / b.lr50_low)), "high": abs(math.log(a.lr50_high / b.lr50_high)),
            "width": abs(math.log(a.width / b.width)), "median": abs(math.log(a.lr50 / b.lr50)),
            "stop_flip": (a.width <= resolution) != (b.width <= resolution)}


REPLAY_COLS = ("med", "l90", "h90", "l95", "h95", "q10", "q90", "wc50", "above", "below")


def replay_cell(job: tuple) -> dict:
    """One cell run to the budget with the search's placement (``psychometric.next_lr``, nothing
    stops it), with LR50's summaries after every trial: what any stopping rule would have seen.
    ``wc50``: the width of LR50's 90 % interval given ``s`` at least its posterior median."""
    i, family, m, budget = job
    grid = psy.grid_for(LR_RANGE)
    cands = psy.candidates(grid)
    n_x, n_s = len(grid.x50), len(grid.log_s)
    ll = grid.log_prior.reshape(n_x, n_s, -1).copy()
    lo, hi = math.log(LR_RANGE[0]), math.log(LR_RANGE[1])
    lrs: list[float] = []
    ys: list[bool] = []
    rows = []
    for n in range(budget):
        lr = psy.next_lr(grid, lrs, ys, (), cands)
        c = draw(i, n, lr, family, m)
        lrs.append(lr)
        ys.append(c)
        _, lp, lq = psy.run_rows(grid, lr)
        ll += (lp if c else lq).reshape(n_x, n_s, -1)
        w = np.exp(ll - ll.max()).sum(axis=2)
        w /= w.sum()
        mw = w.sum(axis=1)
        q = psy.lr50_quantiles(grid, mw, (0.5, 0.05, 0.95, 0.025, 0.975, 0.1, 0.9))
        j = int(np.searchsorted(np.cumsum(w.sum(axis=0)), 0.5))
        c_lo, c_hi = psy.lr50_quantiles(grid, w[:, j:].sum(axis=1), (0.05, 0.95))
        rows.append((*q, c_hi - c_lo, float(mw[grid.x50 > hi + 1e-12].sum()), float(mw[grid.x50 < lo - 1e-12].sum())))
    return {"family": family, "m": m, "rows": np.array(rows)}


RULES = {"90 % interval <= resolution (the rule)": dict(stat="w90"),
         "95 % interval <= resolution": dict(stat="w95"),
         "90 % interval <= resolution 3 trials running": dict(stat="w90", k=3),
         "90 % interval <= resolution 8 trials running": dict(stat="w90", k=8),
         "90 % interval given s >= its median": dict(stat="wc50")}


def replay(cells: list[dict], rule: dict, resolution: float, budget: int, min_trials: int) -> list[tuple]:
    """Each replayed cell under a stopping rule: (family, stop reason, trials, covered)."""
    c = {k: i for i, k in enumerate(REPLAY_COLS)}
    lo, hi = math.log(LR_RANGE[0]), math.log(LR_RANGE[1])
    out = []
    for cell in cells:
        rows, streak, stop, why = cell["rows"], 0, budget, "budget"
        for n in range(1, budget + 1):
            r = rows[n - 1]
            w = {"w90": r[c["h90"]] - r[c["l90"]], "w95": r[c["h95"]] - r[c["l95"]], "wc50": r[c["wc50"]]}[rule["stat"]]
            streak = streak + 1 if n >= min_trials and w <= math.log(resolution) else 0
            if streak >= rule.get("k", 1):
                stop, why = n, "interval"
                break
            if n >= min_trials and max(r[c["above"]], r[c["below"]]) >= psy.EDGE_MASS:
                stop, why = n, "range_edge"
                break
        r = rows[stop - 1]
        if r[c["above"]] >= 0.5:
            cov = cell["m"] > min(r[c["q10"]], hi)
        elif r[c["below"]] >= 0.5:
            cov = cell["m"] < max(r[c["q90"]], lo)
        else:
            cov = r[c["l90"]] <= cell["m"] <= r[c["h90"]]
        out.append((cell["family"], why, stop, bool(cov)))
    return out


def replay_table(cells: list[dict], fams: list[str], args) -> list[str]:
    lines = ["", f"Stopping rules replayed on the same runs ({len(cells) // len(fams)} cells a family, each run to "
             f"{args.budget} trials with the search's placement): coverage overall / among the cells that stopped on "
             "interval (how many) / mean trials:", "", "| rule | " + " | ".join(fams) + " |",
             "| --- |" + " --- |" * len(fams)]
    for name, rule in RULES.items():
        res = replay(cells, rule, args.resolution, args.budget, BoundaryConfig(lr_range=LR_RANGE).min_trials_per_cell)
        row = []
        for fam in fams:
            rs = [x for x in res if x[0] == fam]
            iv = [x for x in rs if x[1] == "interval"]
            row.append(f"{pct(np.mean([x[3] for x in rs]))} / {pct(np.mean([x[3] for x in iv]) if iv else None)} "
                       f"({len(iv)}) / {np.mean([x[2] for x in rs]):.1f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def placement_ms(repeats: int = 7) -> dict[int, float]:
    """ms per proposal with 0, 1 and 3 trials pending, after 12 runs of a logistic (band x2) cell."""
    grid = psy.grid_for(LR_RANGE)
    cands = psy.candidates(grid)
    rng = np.random.default_rng(1)
    lrs: list[float] = []
    ys: list[bool] = []
    for _ in range(12):
        lr = psy.next_lr(grid, lrs, ys, (), cands)
        lrs.append(lr)
        ys.append(bool(rng.random() < logistic(math.log(lr) - math.log(0.03), 2.0)))
    out = {}
    for n in (0, 1, 3):
        pend = cands[30:30 + n]
        ts = []
        for r in range(repeats):
            grid.clear_cache()  # the posterior computed afresh, as for a new trial
            t0 = time.perf_counter()
            psy.next_lr(grid, lrs, ys, pend, cands)
            ts.append(time.perf_counter() - t0)
        out[n] = 1000 * float(np.median(ts))
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=200, help="cells per family")
    ap.add_argument("--resolution", type=float, default=1.5)
    ap.add_argument("--budget", type=int, default=80)
    ap.add_argument("--in-flight", type=int, default=1)
    ap.add_argument("--max-grid-seeds", type=int, default=8)
    ap.add_argument("--fine-cells", type=int, default=90, help="cells whose first 8 trials the fine grid refits")
    ap.add_argument("--replay", type=int, default=0, metavar="N",
                    help="also replay the stopping rules (RULES) on N cells per family inside the range, run to the budget")
    ap.add_argument("--no-search", action="store_true", help="only the replay (with --replay)")
    ap.add_argument("--families", default=None, help="comma-separated subset of the families")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--quick", action="store_true", help="3 cells per family, grid k <= 2, 4 fine-grid cells")
    ap.add_argument("--out", type=Path, default=None, help="write the tables as Markdown here too")
    args = ap.parse_args(argv)
    if args.quick:
        args.cells, args.max_grid_seeds, args.fine_cells, args.budget = 3, 2, 4, min(args.budget, 30)
        args.replay = min(args.replay, 2)
    fams = args.families.split(",") if args.families else list(FAMILIES)
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        ap.error(f"--families: {unknown} unknown; allowed: {list(FAMILIES)}")
    cells = truths(args.cells, families=fams)
    cfg = BoundaryConfig(lr_range=LR_RANGE, resolution=args.resolution, max_trials_per_cell=args.budget,
                         max_in_flight_per_cell=args.in_flight)
    t0 = time.perf_counter()
    pool = mp.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    imap = pool.imap if pool else map
    replayed: list[dict] = []
    try:
        if args.replay:
            inside = [f for f in fams if f not in CENSORED_FAMILIES]
            jobs = [(1_000_000 + i, f, m, args.budget) for i, (f, m) in enumerate(truths(args.replay, 1, inside))]
            for n, r in enumerate(imap(replay_cell, jobs)):
                replayed.append(r)
                if (n + 1) % max(1, len(jobs) // 10) == 0:
                    print(f"  replay: {n + 1}/{len(jobs)} cells, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        t_replay = time.perf_counter() - t0
        if args.no_search:
            text = "\n".join(replay_table(replayed, inside, args)[1:])
            print(text)
            if args.out:
                args.out.write_text(text + "\n")
            return {"_replay": replayed}
        reps = []
        for n, rep in enumerate(imap(search_cell, [(i, f, m, cfg) for i, (f, m) in enumerate(cells)])):
            reps.append(rep)
            if (n + 1) % max(1, len(cells) // 20) == 0:
                print(f"  search: {n + 1}/{len(cells)} cells, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        t_search = time.perf_counter() - t0 - t_replay
        need: dict[str, int | None] = {}
        grid_cov: dict[str, dict[int, float]] = {f: {} for f in fams}
        for fam in fams:
            idx = [i for i, c in enumerate(cells) if c[0] == fam]
            need[fam] = None
            for k in range(1, args.max_grid_seeds + 1):
                out = list(imap(grid_fit, [(i, fam, cells[i][1], k) for i in idx]))
                grid_cov[fam][k] = float(np.mean([covered(d, d["true_lr50"]) for _, d in out]))
                if fam in CENSORED_FAMILIES or np.median([w for w, _ in out]) <= args.resolution:
                    need[fam] = k
                    break
        t_grid = time.perf_counter() - t0 - t_search - t_replay
        chosen = [reps[i] for i in np.linspace(0, len(reps) - 1, min(args.fine_cells, len(reps))).astype(int)]
        fine = list(imap(fine_check, [(r["sequence"], args.resolution) for r in chosen if len(r["sequence"]) >= 8]))
    finally:
        if pool:
            pool.close()
            pool.join()
    timing = placement_ms()
    summary = report(reps, fams, need, grid_cov, fine, timing, args, t_search, t_grid, replayed)
    return summary


def report(reps, fams, need, grid_cov, fine, timing, args, t_search, t_grid, replayed) -> dict:
    lines = [f"Synthetic cells: {len(reps)} ({args.cells} per family), LR range {list(LR_RANGE)}; psi search: "
             f"stop when LR50's {100 * psy.STOP_LEVEL:g} % interval (the one reported) is at most "
             f"x{args.resolution:g}, when LR50 lies outside the range with probability >= {psy.EDGE_MASS:g} "
             f"(censored: the one-sided {100 * psy.LEVEL:g} % bound is reported), or after {args.budget} trials; "
             f"{args.in_flight} in flight. Dense grid: 41 LRs (2^(1/4)) x k seeds, the same fit.", "",
             "| family | n | coverage | coverage, stopped on interval (n) | censored (bound true) | "
             "median abs log(lr50/true) | mean trials | grid k, trials | trials ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    summary: dict[str, dict] = {}
    inside = [f for f in fams if f not in CENSORED_FAMILIES]
    groups = {f: [f] for f in fams}
    if inside and len(inside) < len(fams):
        groups["inside the range"] = inside
    groups["all"] = fams
    for name, members in groups.items():
        rs = [r for r in reps if r["family"] in members]
        cov = float(np.mean([covered(r, r["true_lr50"]) for r in rs]))
        iv = [r for r in rs if r["stop_reason"] == "interval"]
        cov_iv = float(np.mean([covered(r, r["true_lr50"]) for r in iv])) if iv else None
        cens = [r for r in rs if r["censored"]]
        cens_ok = float(np.mean([covered(r, r["true_lr50"]) for r in cens])) if cens else None
        errs = [abs(math.log(r["lr50"] / r["true_lr50"])) for r in rs if r["lr50"] is not None]
        err = float(np.median(errs)) if errs else None
        trials = float(np.mean([r["n_trials"] for r in rs]))
        # a family whose grid never reached the resolution counts at its largest k: a lower bound of
        # the grid's trials, so the ratio is an upper bound ("<=")
        gt = [41 * (need[r["family"]] or args.max_grid_seeds) for r in rs]
        bound = any(need[r["family"]] is None for r in rs)
        grid_trials = float(np.mean(gt))
        ratio = trials / grid_trials
        if len(members) == 1:
            k_text = f"{need[name]}, {grid_trials:.0f}" if need[name] else f"> {args.max_grid_seeds}, > {grid_trials:.0f}"
        else:
            k_text = ("> " if bound else "") + f"{grid_trials:.0f}"
        summary[name] = dict(n=len(rs), coverage=cov, coverage_interval=cov_iv, n_interval=len(iv),
                             censored=len(cens), censored_true=cens_ok, median_abs_log_err=err, trials=trials,
                             grid_seeds=need.get(name), grid_trials=grid_trials, ratio=ratio, ratio_is_bound=bound)
        lines.append(f"| {name} | {len(rs)} | {pct(cov)} | {pct(cov_iv)} ({len(iv)}) | "
                     f"{len(cens)} ({pct(cens_ok)}) | {'-' if err is None else f'{err:.3f}'} | {trials:.1f} | "
                     f"{k_text} | {'<= ' if bound else ''}{ratio:.2f} |")
    reasons = ["interval", "range_edge", "budget"]
    lines += ["", "By stop reason: cells: coverage (censored cells: their bound), median abs log error, mean trials:", "",
              "| family | " + " | ".join(reasons) + " |", "| --- |" + " --- |" * len(reasons)]
    for fam in fams:
        row = []
        for why in reasons:
            rs = [r for r in reps if r["family"] == fam and r["stop_reason"] == why]
            if not rs:
                row.append("-")
                continue
            cov = np.mean([covered(r, r["true_lr50"]) for r in rs])
            errs = [abs(math.log(r["lr50"] / r["true_lr50"])) for r in rs if r["lr50"] is not None]
            row.append(f"{len(rs)}: {pct(cov)}, {f'{np.median(errs):.3f}' if errs else '-'}, "
                       f"{np.mean([r['n_trials'] for r in rs]):.1f}")
        lines.append(f"| {fam} | " + " | ".join(row) + " |")
    lines += ["", "Dense grid, coverage of its fit per family at each k run (until its median interval reached "
              f"x{args.resolution:g}):", "", "| family | " + " | ".join(f"k={k}" for k in range(1, args.max_grid_seeds + 1))
              + " |", "| --- |" + " --- |" * args.max_grid_seeds]
    for fam in fams:
        lines.append(f"| {fam} | " + " | ".join(pct(grid_cov[fam].get(k)) if k in grid_cov[fam] else ""
                                                for k in range(1, args.max_grid_seeds + 1)) + " |")
    fine_summary = {}
    if fine:
        for key in ("low", "high", "width", "median"):
            v = np.array([f[key] for f in fine])
            fine_summary[key] = (float(np.exp(np.quantile(v, 0.95)) - 1), float(np.exp(v.max()) - 1))
        flips = sum(f["stop_flip"] for f in fine)
        fine_summary["stop_flips"] = flips
        lines += ["", f"Grid check, {len(fine)} searches' first 8 trials on the default grid "
                  f"(LR50 step {100 * (math.exp(psy.grid_for(LR_RANGE).step) - 1):.1f} %, {psy.N_S} widths) and a fine "
                  f"one (1 %, {FINE['n_s']} widths), relative difference, 95th percentile / largest: "
                  + ", ".join(f"{name} {100 * fine_summary[k][0]:.2f} % / {100 * fine_summary[k][1]:.2f} %"
                              for k, name in (("low", "interval's low end"), ("high", "high end"),
                                              ("width", "width"), ("median", "LR50")))
                  + f"; stop decisions (x{args.resolution:g}) that differ: {flips} (target: within 5 %)."]
    lines += ["", "Placement: " + ", ".join(f"{v:.0f} ms with {n} pending" for n, v in timing.items())
              + " per proposal (median; a 12-run posterior, one core)."]
    if replayed:
        lines += replay_table(replayed, [f for f in fams if f not in CENSORED_FAMILIES], args)
    bad = []
    for fam in fams:
        sm = summary[fam]
        for name, v in (("coverage", sm["coverage"]), ("coverage on interval", sm["coverage_interval"])):
            if v is not None and not 0.85 <= v <= 0.95:
                bad.append(f"{fam} {name} {100 * v:.1f} %")
        if sm["median_abs_log_err"] is not None and fam not in CENSORED_FAMILIES and sm["median_abs_log_err"] >= 0.1:
            bad.append(f"{fam} median abs log error {sm['median_abs_log_err']:.3f}")
    if summary["all"]["ratio"] > 0.3:
        bad.append(f"trials ratio {summary['all']['ratio']:.2f}")
    if fine_summary and max(fine_summary[k][1] for k in ("low", "high", "width")) > 0.05:
        bad.append("fine-grid check over 5 %")
    lines += ["", ("targets met" if not bad else "targets missed: " + "; ".join(bad)),
              f"(search {t_search:.0f} s for {sum(r['n_trials'] for r in reps)} trials, grid {t_grid:.0f} s, "
              f"{args.workers} workers)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    summary["_fine"] = fine_summary
    summary["_timing"] = timing
    summary["_missed"] = bad
    summary["_replay"] = replayed
    return summary


if __name__ == "__main__":
    main()
