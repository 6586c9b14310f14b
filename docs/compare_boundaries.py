"""Two boundary searches of the same cells side by side (e.g. seed offsets 0 and 100), from the
``max_stable_lr.json`` files ``ablate export`` wrote: per cell LR50 with its 90 % interval, the band
lr10-lr90, trials and stop reason of each, and whether the two intervals overlap; then, for every
pair of cells of the first search, whether their intervals are disjoint (a difference the data
resolve) or not ("not distinguishable").

    python docs/compare_boundaries.py A/max_stable_lr.json B/max_stable_lr.json --labels "offset 0" "offset 100" \\
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
    mark = "" if r["converged"] else " †" if r["stop_reason"] == "budget" else f" ({r['stop_reason']})"
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


def compare(a: dict[str, dict], b: dict[str, dict], labels: tuple[str, str]) -> str:
    la, lb = labels
    lines = [f"**LR50 [90 % interval] of two searches of the same cells, {la} and {lb} (no run shared); "
             "band = lr10-lr90 (x its width); † = budget spent before the interval reached the resolution**", "",
             f"| cell | {la} | trials | band | {lb} | trials | band | intervals overlap |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cell in sorted(set(a) & set(b), key=lambda c: position(a[c])):
        ra, rb = a[cell], b[cell]
        lines.append(f"| {cell} | {cell_text(ra)} | {ra['n_trials']} | {band_text(ra)} | {cell_text(rb)} | "
                     f"{rb['n_trials']} | {band_text(rb)} | {'yes' if overlap(ra, rb) else 'NO'} |")
    cells = sorted(a, key=lambda c: position(a[c]))
    lines += ["", f"**Pairs of cells ({la}): LR50 ratio and whether their 90 % intervals are disjoint in both "
              "searches (signal) or not (not distinguishable)**", "",
              "| cells | LR50 ratio | " + la + " | " + lb + " |", "| --- | --- | --- | --- |"]
    for x, y in itertools.combinations(cells, 2):
        verdict = [("disjoint" if not overlap(s[x], s[y]) else "overlap") for s in (a, b) if x in s and y in s]
        ratio = f"{a[y]['lr50'] / a[x]['lr50']:.2g}" if not (a[x].get("censored") or a[y].get("censored")) else "–"
        lines.append(f"| {y} / {x} | {ratio} | " + " | ".join(verdict) + " |")
    return "\n".join(lines) + "\n"


def figure(a: dict[str, dict], b: dict[str, dict], labels: tuple[str, str], path: Path) -> None:
    """LR50 with its 90 % interval per cell, the two searches side by side, the band lr10-lr90 shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    cells = sorted(set(a) & set(b), key=lambda c: position(a[c]))
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(cells), 3.8))
    for j, (rows, label, color) in enumerate(((a, labels[0], "C0"), (b, labels[1], "C1"))):
        for i, c in enumerate(cells):
            r, x = rows[c], i + (j - 0.5) * 0.3
            if r.get("censored"):  # a triangle at the one-sided bound, pointing where LR50 lies
                ax.plot([x], [r["lr50_bound"]], "^" if r["censored"] == "above" else "v", color=color, ms=7,
                        label=label if i == 0 else None)
                continue
            ax.plot([x, x], [r["lr10"], r["lr90"]], color=color, lw=6, alpha=0.18, solid_capstyle="butt")
            ax.errorbar([x], [r["lr50"]], yerr=[[r["lr50"] - r["lr50_low"]], [r["lr50_high"] - r["lr50"]]],
                        fmt="o" if r["converged"] else "s", color=color, capsize=3, mfc=color if r["converged"] else "w",
                        label=label if i == 0 else None)
            ax.annotate(str(r["n_trials"]), (x, r["lr50_high"]), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=6, color=color)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(True, which="both", axis="y", lw=0.3, alpha=0.5)
    ax.set_xticks(range(len(cells)), cells, rotation=30, ha="right")
    ax.set_ylabel("LR50 (bar: 90 % interval;\nshade: lr10-lr90)")
    ax.set_title("two searches, no run shared (number: trials; open square: budget spent)", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    fig.savefig(path.with_suffix(".pdf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--labels", nargs=2, default=("A", "B"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--figure", type=Path, help="also draw the two searches side by side (PNG; a PDF beside it)")
    args = ap.parse_args()
    text = compare(rows_of(args.a), rows_of(args.b), tuple(args.labels))
    if args.figure:
        figure(rows_of(args.a), rows_of(args.b), tuple(args.labels), args.figure)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
