"""Boundary searches of the same cells side by side (e.g. seed offsets 0, 100 and 200), from the
``max_stable_lr.json`` files ``ablate export`` wrote: per cell LR50 with its 90 % interval, the band
lr10-lr90, trials and stop reason of each, and whether every pair of the intervals overlaps; with
``--check``, a dense multi-seed grid's LR50 of some of the cells and whether it lies inside every
search's interval; then, for every pair of cells, whether their intervals are disjoint in every
search (a difference the data resolve: signal) or not ("not distinguishable").

    python docs/compare_boundaries.py docs/results/boundary_smoke{,_seed100,_seed200}/max_stable_lr.json \\
        --labels "offset 0" "offset 100" "offset 200" --check docs/calibration/dense_grid_smoke/max_stable_lr.json \\
        --out docs/results/boundary_smoke_offsets.md --figure docs/figures/boundary_smoke_offsets.png
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path


def _f(v: float) -> str:
    return f"{v:.3g}"


def rows_of(path: Path) -> dict[str, dict]:
    tables = json.loads(path.read_text())["tables"]
    return {f"{r['stabilizer']}" + (f" (warmup {w})" if len(tables) > 1 else ""): r
            for w, rs in tables.items() for r in rs}


def cell_text(r: dict) -> str:
    mark = "" if r["converged"] or r["stop_reason"] == "grid" else " †" if r["stop_reason"] == "budget" else f" ({r['stop_reason']})"
    if r.get("censored"):  # no LR50: the one-sided bound
        return ("> " if r["censored"] == "above" else "< ") + f"{_f(r['lr50_bound'])} ({r['censored']} range){mark}"
    return f"{_f(r['lr50'])} [{_f(r['lr50_low'])}, {_f(r['lr50_high'])}]{mark}"


def band_text(r: dict) -> str:
    return "–" if r.get("censored") else f"{_f(r['lr10'])}-{_f(r['lr90'])} (x{r['band']:.2g})"


def interval(r: dict) -> tuple[float, float]:
    """LR50's interval; a censored cell's: from its bound to the end of the axis."""
    if r.get("censored") == "above":
        return r["lr50_bound"], float("inf")
    if r.get("censored") == "below":
        return 0.0, r["lr50_bound"]
    return r["lr50_low"], r["lr50_high"]


def position(r: dict) -> float:
    """Where a cell sorts: its LR50, a censored cell its bound."""
    return r["lr50"] if not r.get("censored") else r["lr50_bound"]


def overlap(a: dict, b: dict) -> bool:
    (alo, ahi), (blo, bhi) = interval(a), interval(b)
    return alo <= bhi and blo <= ahi


def compare(searches: list[dict[str, dict]], labels: list[str], check: dict[str, dict] | None = None,
            check_label: str = "dense grid") -> str:
    """The cells of ``searches`` side by side, and every pair of cells of the first; ``check`` (a
    dense grid's fit of some of the cells) adds a column: its LR50 and whether it lies inside every
    search's interval."""
    a = searches[0]
    cells = [c for c in sorted(a, key=lambda c: position(a[c])) if all(c in s for s in searches)]
    n = len(searches)
    head = ["cell"] + [x for lab in labels for x in (lab, "trials", "band")] + ["intervals overlap"]
    if check:
        head += [f"{check_label} LR50 [interval] (runs)", "inside every search's interval"]
    lines = [f"**LR50 [90 % interval] of {n} searches of the same cells, {', '.join(labels)} (no run shared); "
             "band = lr10-lr90 (x its width); † = budget spent before the interval reached the resolution; "
             "intervals overlap: every pair of the searches' intervals**", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for cell in cells:
        rs = [s[cell] for s in searches]
        row = [cell] + [x for r in rs for x in (cell_text(r), str(r["n_trials"]), band_text(r))]
        row.append("yes" if all(overlap(x, y) for x, y in itertools.combinations(rs, 2)) else "NO")
        if check:
            g = check.get(cell)
            if g is None:
                row += ["", ""]
            else:
                inside = not g.get("censored") and all(lo <= g["lr50"] <= hi for lo, hi in map(interval, rs))
                row += [f"{cell_text(g)} ({g['n_trials']})", "yes" if inside else "NO"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"**Pairs of cells: LR50 ratio ({labels[0]}) and whether their 90 % intervals are disjoint in each "
              "search; signal only where disjoint in every search, else not distinguishable**", "",
              "| cells | LR50 ratio | " + " | ".join(labels) + " | verdict |", "|" + " --- |" * (n + 3)]
    for x, y in itertools.combinations(cells, 2):
        verdict = [("disjoint" if not overlap(s[x], s[y]) else "overlap") for s in searches]
        ratio = f"{a[y]['lr50'] / a[x]['lr50']:.2g}" if not (a[x].get("censored") or a[y].get("censored")) else "–"
        word = "signal" if all(v == "disjoint" for v in verdict) else "not distinguishable"
        lines.append(f"| {y} / {x} | {ratio} | " + " | ".join(verdict) + f" | {word} |")
    return "\n".join(lines) + "\n"


def figure(searches: list[dict[str, dict]], labels: list[str], path: Path, check: dict[str, dict] | None = None,
           check_label: str = "dense grid") -> None:
    """LR50 with its 90 % interval per cell, the searches side by side (and the dense grid's fit),
    the band lr10-lr90 shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    a = searches[0]
    cells = [c for c in sorted(a, key=lambda c: position(a[c])) if all(c in s for s in searches)]
    series = [(s, lab, f"C{j}") for j, (s, lab) in enumerate(zip(searches, labels))]
    if check:
        series.append((check, check_label, "k"))
    k = len(series)
    fig, ax = plt.subplots(figsize=(1.4 + 0.45 * k * len(cells), 3.8))
    for j, (rows, label, color) in enumerate(series):
        first = next((c for c in cells if c in rows), None)  # the series is labelled at its first cell
        for i, c in enumerate(cells):
            if c not in rows:
                continue
            r, x = rows[c], i + (j - (k - 1) / 2) * (0.75 / k)
            if r.get("censored"):  # a triangle at the one-sided bound, pointing where LR50 lies
                ax.plot([x], [r["lr50_bound"]], "^" if r["censored"] == "above" else "v", color=color, ms=7,
                        label=label if c == first else None)
                continue
            ax.plot([x, x], [r["lr10"], r["lr90"]], color=color, lw=6, alpha=0.18, solid_capstyle="butt")
            ax.errorbar([x], [r["lr50"]], yerr=[[r["lr50"] - r["lr50_low"]], [r["lr50_high"] - r["lr50"]]],
                        fmt="o" if r["converged"] or r["stop_reason"] == "grid" else "s", color=color, capsize=3,
                        mfc=color if r["converged"] or r["stop_reason"] == "grid" else "w",
                        label=label if c == first else None)
            ax.annotate(str(r["n_trials"]), (x, r["lr50_high"]), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=6, color=color)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(True, which="both", axis="y", lw=0.3, alpha=0.5)
    ax.set_xticks(range(len(cells)), cells, rotation=30, ha="right")
    ax.set_ylabel("LR50 (bar: 90 % interval;\nshade: lr10-lr90)")
    ax.set_title(f"{len(searches)} searches" + (f" and the {check_label}" if check else "")
                 + ", no run shared (number: trials; open square: budget spent)", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    fig.savefig(path.with_suffix(".pdf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("searches", type=Path, nargs="+", help="max_stable_lr.json of each search")
    ap.add_argument("--labels", nargs="+")
    ap.add_argument("--check", type=Path, help="max_stable_lr.json of a dense grid of some of the cells")
    ap.add_argument("--check-label", default="dense grid")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--figure", type=Path, help="also draw the searches side by side (PNG; a PDF beside it)")
    args = ap.parse_args()
    labels = args.labels or [chr(ord("A") + i) for i in range(len(args.searches))]
    if len(labels) != len(args.searches):
        ap.error(f"--labels: {len(labels)} given for {len(args.searches)} searches")
    searches = [rows_of(p) for p in args.searches]
    check = rows_of(args.check) if args.check else None
    text = compare(searches, labels, check, args.check_label)
    if args.figure:
        figure(searches, labels, args.figure, check, args.check_label)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
