"""Every ablation figure, as PNG and PDF (``save``), from the trials table of ``orchestrator.runs``
and the tables of ``orchestrator.tables``.

``loss_figures`` draws loss vs LR (every run; one figure per depth, every warmup on one axes:
``loss_figure``); ``boundary_points`` (one-dimensional cells) and ``boundary_heatmap`` (when depth
varies) draw LR50 per cell with its interval (``boundary_grid`` lays the cells out);
``boundary_compare_figures`` draws LR50 by the comparison axis; ``boundary_fits`` draws, per cell,
the crash fraction per LR with the fitted curve and its band. Every figure's file name carries the
axes it is split by (``file_stem``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator import psychometric as psy
from orchestrator.runs import FINISHED, cell_fields_of
from orchestrator.tables import (Tables, boundary_text, comparison_layout, row_fields_of, row_key, row_labels,
                                 sorted_values, split_rows, stop_mark, value_order)
from orchestrator.writers import axis_name, file_stem, fmt


MARKERS = {"stable": dict(marker="o"), "degraded": dict(marker="o", mfc="none"),
           "collapsed": dict(marker="v", ls="none"), "diverged": dict(marker="x", ls="none", mew=2)}


def save(fig, out: Path, stem: str) -> list[Path]:
    """``fig`` as ``<stem>.png`` (150 dpi) and ``<stem>.pdf`` in ``out``."""
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])  # vector, for papers
    return paths


LINESTYLES = ("-", "--", ":", "-.")
CLIP = 1.25
"""The loss-vs-LR figure's y axis ends at CLIP x max(l_0, the largest final loss of a run that did
not diverge); a diverged run above that sits on the top edge with its value written beside it."""
DODGE = 0.05
"""Decades between the comparison's values (warmup 0, 50) at one LR on the loss-vs-LR figure."""


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def loss_figure(plt, rows: list[dict], cell_fields: list[str], crit: str, split: dict[str, Any] | None = None):
    """Final validation loss against the LR for every run of ``rows`` (the trials of one value of
    the layout's split fields, e.g. one depth; ``outcome`` filled), on one axes with one y scale: a
    colour per cell without the comparison axis (``none``, ``none, width=64``; the same colours in
    every figure of a report), a line style per value of the comparison axis (``comparison_layout``:
    warmup 0 solid, warmup 50 dashed), so that the comparison is drawn in one figure.

    Every run is drawn: stable and degraded seeds as faint points, collapsed and diverged runs with
    their class's marker; the line is the mean, at each LR, of the runs that did not diverge. A
    diverged run whose final loss fits under the axis's top (``CLIP``) is drawn where it is; one
    above it, or non-finite, sits on the top edge with its value written beside it. l_0 and the
    marginal baseline are reference lines; the legend gives each cell's number of runs. At each LR the
    comparison's values are drawn side by side (``DODGE`` decades apart, the first on the left) so
    that their markers do not hide each other. The
    artists carry ids (``gid``) for tests: ``mean|cell|column``, ``run|cell|column|class``,
    ``clipped|cell|column``."""
    from matplotlib.lines import Line2D

    layout = comparison_layout(cell_fields)
    row_fields = layout.rows
    labels = row_labels(rows, row_fields)
    cmap = plt.cm.tab10 if len(labels) <= 10 else plt.cm.tab20
    colors = {k: cmap(i % cmap.N) for i, k in enumerate(labels)}
    cols = sorted_values(r.get(layout.column) for r in rows) if layout.column else [None]
    styles = {c: LINESTYLES[i % len(LINESTYLES)] for i, c in enumerate(cols)}
    # the comparison's values side by side at each LR, left to right (DODGE decades apart)
    shift = {c: 10 ** (DODGE * (i - (len(cols) - 1) / 2)) for i, c in enumerate(cols)}
    l0s = [r["initial_loss"] for r in rows if _finite(r["initial_loss"])]
    bases = [r["baseline_loss"] for r in rows if _finite(r["baseline_loss"])]
    l0 = float(np.mean(l0s)) if l0s else None
    kept = [r["final_loss"] for r in rows if r["outcome"] != "diverged" and _finite(r["final_loss"])]
    top = CLIP * max([v for v in [l0, *kept] if v is not None] or [1.0])
    fig, ax = plt.subplots(figsize=(8.2, 4.6))
    stacked: dict[float, int] = defaultdict(int)  # clipped runs written at one LR so far
    counts = defaultdict(int)
    for k, name in labels.items():
        for c in cols:
            mine = [r for r in rows if row_key(r, row_fields) == k and (c is None or r.get(layout.column) == c)]
            if not mine:
                continue
            counts[k] += len(mine)
            tag = f"{name}|{'' if c is None else fmt(c)}"
            by_lr = defaultdict(list)
            for r in mine:
                if r["outcome"] != "diverged" and _finite(r["final_loss"]):
                    by_lr[r["lr"]].append(r["final_loss"])
            xs = sorted(by_lr)
            ax.plot([x * shift[c] for x in xs], [float(np.mean(by_lr[x])) for x in xs], color=colors[k],
                    ls=styles[c], lw=1.4, label="_mean", gid=f"mean|{tag}")
            for cls, style in MARKERS.items():
                runs = [r for r in mine if r["outcome"] == cls]
                fits = [r for r in runs if _finite(r["final_loss"]) and r["final_loss"] <= top]
                inside = [(r["lr"] * shift[c], r["final_loss"]) for r in fits]
                if inside:
                    faint = cls in ("stable", "degraded")
                    ax.plot(*zip(*inside), color=colors[k], ms=4 if faint else 6, alpha=0.35 if faint else 0.9,
                            label="_run", gid=f"run|{tag}|{cls}", **{**style, "ls": "none"})
                off = [r for r in runs if all(r is not f for f in fits)]
                if off:
                    ax.plot([r["lr"] * shift[c] for r in off], [top] * len(off), color=colors[k], ms=6, alpha=0.9,
                            clip_on=False, label="_clipped", gid=f"clipped|{tag}", **{**style, "ls": "none"})
                for r in off:
                    n = stacked[r["lr"]]
                    stacked[r["lr"]] += 1
                    value = fmt(r["final_loss"]) if r["final_loss"] is not None else "inf"
                    ax.annotate(value, (r["lr"] * shift[c], top), textcoords="offset points", xytext=(5, -9 - 7 * n),
                                fontsize=6, color=colors[k], gid=f"clipped|{tag}")
    if l0 is not None:
        ax.axhline(l0, color="0.3", lw=0.8, ls="--", label="_l0")
    if bases:
        ax.axhline(float(np.mean(bases)), color="0.3", lw=0.8, ls=":", label="_baseline")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_ylim(top=top)
    where = ", ".join(f"{axis_name(f)} {fmt(v)}" for f, v in (split or {}).items())
    ax.set_title("final loss vs learning rate" + (f", {where}" if where else ""), fontsize=9)
    handles = [Line2D([], [], color=colors[k], lw=1.4, label=f"{name} ({counts[k]} runs)")
               for k, name in labels.items() if counts[k]]
    if layout.column:
        handles += [Line2D([], [], color="k", lw=1.2, ls=styles[c], label=f"{axis_name(layout.column)} {fmt(c)}")
                    for c in cols]
    handles += [Line2D([], [], color="k", ls="none", ms=6, alpha=0.35 if c in ("stable", "degraded") else 0.9,
                       label={"stable": "stable (each seed)", "diverged": "diverged (above the axis: on its top "
                              "edge, value written)"}.get(c, c), **{k: v for k, v in MARKERS[c].items() if k != "ls"})
                for c in MARKERS]
    handles += [Line2D([], [], color="0.3", ls="--", lw=0.8, label="l_0 (before training)"),
                Line2D([], [], color="0.3", ls=":", lw=0.8, label="marginal baseline")]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    note = "line: mean over the runs that did not diverge"
    if len(cols) > 1:
        note += (f"; at each LR the points of {axis_name(layout.column)} "
                 f"{', '.join(fmt(c) for c in cols)} are drawn left to right")
    fig.text(0.01, 0.01, f"{note}; {crit}", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def loss_figures(table: pa.Table, out: Path, crit: str) -> list[Path]:
    """The loss-vs-LR figures of a trials table with outcomes (``with_outcomes``; also a
    ``trials.parquet`` that export wrote): one per value of the split fields (depth), every warmup on
    its one axes (``loss_figure``), as PNG and PDF named ``loss_vs_lr[_depthD]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = cell_fields_of(table)
    rows = [r for r in table.to_pylist() if r["status"] in FINISHED]
    files: list[Path] = []
    for split, sub in split_rows(rows, comparison_layout(fields).split):
        fig = loss_figure(plt, sub, fields, crit, split)
        files += save(fig, Path(out), file_stem("loss_vs_lr", split))
        plt.close(fig)
    return files


@dataclasses.dataclass
class BoundaryGrid:
    """What the crash-boundary figure of one warmup draws: ``rows`` (labels, in order), ``depths``
    (the columns; ``[None]`` when depth does not vary) and ``cells[(row, depth)]``, a
    ``max_stable_lr`` row."""

    rows: list[str]
    depths: list
    cells: dict[tuple[str, Any], dict]


def boundary_grid(msl: list[dict], cell_fields: list[str]) -> BoundaryGrid:
    """The ``max_stable_lr`` rows of one warmup, a row per cell without its depth: the stabilizer
    and every other field that varies (``none, width=64``), so that cells differing only in e.g.
    width stay apart; depth as the columns."""
    row_fields = row_fields_of(cell_fields)
    keyed = {(row_key(c, row_fields), c.get("depth")): c for c in msl}
    labels = row_labels(msl, row_fields)
    depths = sorted({d for _, d in keyed}, key=lambda d: (d is None, d))
    return BoundaryGrid(list(labels.values()), depths, {(labels[k], d): c for (k, d), c in keyed.items()})


def _log_lr_axis(ax) -> None:
    """A learning-rate y axis: log scale, plain numbers (minor ticks at 2 and 5), a light grid."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.grid(True, which="both", axis="y", lw=0.3, alpha=0.5)


def boundary_points(plt, grid: BoundaryGrid, warmup, crit: str):
    """One-dimensional cells: LR50 per cell with its 90 % interval as an error bar (a censored cell,
    LR50 outside the LR range: a triangle at its one-sided bound), the band lr10-lr90 as a faint
    bar, the stop mark of a cell that did not converge, and its trial count."""
    rows = grid.rows
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 0.9 * len(rows)), 3.8))
    for i, s in enumerate(rows):
        c = grid.cells.get((s, None))  # depth does not vary: not part of the cell
        if not c:
            continue
        if c.get("censored"):  # no LR50: its one-sided bound, a triangle pointing where LR50 lies
            up = c["censored"] == "above"
            y = c["lr50_bound"]
            ax.plot([i], [y], "^" if up else "v", color="C2" if up else "C3", ms=8)
            ax.annotate(("> " if up else "< ") + f"{fmt(y)}: {c['censored']} the range", (i, y),
                        textcoords="offset points", xytext=(0, -16), ha="center", fontsize=7)
        else:
            ax.plot([i, i], [c["lr10"], c["lr90"]], color="C0", lw=6, alpha=0.18, solid_capstyle="butt")
            ax.errorbar([i], [c["lr50"]], yerr=[[c["lr50"] - c["lr50_low"]], [c["lr50_high"] - c["lr50"]]],
                        fmt="o", color="C0", capsize=4)
            y = c["lr50_high"]
        ax.annotate(f"{c['n_trials']}{stop_mark(c)}", (i, y), textcoords="offset points", xytext=(0, 5), ha="center",
                    fontsize=7)
    _log_lr_axis(ax)
    ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("LR50 (bar: 90 % interval;\nshade: lr10-lr90)")
    ax.set_title(f"crash boundary, warmup {warmup} (number: trials; † budget spent)", fontsize=9)
    fig.text(0.01, 0.01, crit, fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def boundary_compare_figures(plt, brows: list[dict], cell_fields: list[str], out: Path, crit: str) -> list[Path]:
    """LR50 of every cell on one shared log axis, one figure per value of the split fields (depth):
    a group of points per cell without the comparison axis (``comparison_layout``: warmup, else
    schedule, else depth), a point per value of that axis side by side within the group, each with
    its 90 % interval as an error bar and its trial count (and the stop mark of a search that did not
    converge); a censored cell (LR50 outside the LR range) as a triangle at its one-sided bound,
    pointing where LR50 lies. Named ``lr50_by_<axis>[_depthD]``;
    nothing when only the stabilizer varies (``boundary_points`` is that figure)."""
    from matplotlib.lines import Line2D

    layout = comparison_layout(cell_fields)
    if layout.column is None:
        return []
    files: list[Path] = []
    for split, sub in split_rows(brows, layout.split):
        keys = sorted({tuple(r.get(f) for f in layout.rows) for r in sub},
                      key=lambda k: tuple(value_order(v) for v in k))
        cols = sorted_values(r.get(layout.column) for r in sub)
        width = 0.8 / len(cols)
        fig, ax = plt.subplots(figsize=(max(4.5, 1.4 + 1.0 * len(keys)), 3.9))
        for r in sub:
            i = keys.index(tuple(r.get(f) for f in layout.rows))
            j = cols.index(r.get(layout.column))
            x, color = i - 0.4 + width * (j + 0.5), f"C{j % 10}"
            if r.get("censored"):  # its one-sided bound
                y = r["lr50_bound"]
                ax.plot([x], [y], "^" if r["censored"] == "above" else "v", color=color, ms=7, gid=f"edge|{i}|{j}")
            else:
                y = r["lr50_high"]
                ax.errorbar([x], [r["lr50"]], yerr=[[r["lr50"] - r["lr50_low"]], [r["lr50_high"] - r["lr50"]]],
                            fmt="o", color=color, capsize=3, ms=4, gid=f"lr50|{i}|{j}")
            ax.annotate(f"{r['n_trials']}{stop_mark(r)}", (x, y), textcoords="offset points", xytext=(0, 4), ha="center",
                        fontsize=6)
        _log_lr_axis(ax)
        labels = [", ".join(fmt(v) if f == "stabilizer" else f"{axis_name(f)}={fmt(v)}"
                            for f, v in zip(layout.rows, k)) for k in keys]
        ax.set_xticks(range(len(keys)), labels, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(keys) - 0.4)
        ax.set_ylabel("LR50 (bar: 90 % interval)")
        where = ", ".join(f"{axis_name(f)} {fmt(v)}" for f, v in split.items())
        ax.set_title("crash boundary by " + axis_name(layout.column) + (f", {where}" if where else "")
                     + " (number: trials; † budget spent)", fontsize=9)
        ax.legend(handles=[Line2D([], [], color=f"C{j % 10}", marker="o", ls="none",
                                  label=f"{axis_name(layout.column)} {fmt(c)}") for j, c in enumerate(cols)],
                  fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        fig.text(0.01, 0.01, crit, fontsize=6, wrap=True)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        files += save(fig, out, file_stem(f"lr50_by_{axis_name(layout.column)}", split))
        plt.close(fig)
    return files


def boundary_fits(plt, tabs: Tables, warmup, crit: str):
    """A panel per cell: the fraction of runs that crashed at each LR (marker area ~ runs), the
    fitted P(crash) (posterior median) with its 90 % band, LR50's interval shaded."""
    rows = tabs.max_stable_lr.get(warmup, [])
    n = len(rows)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol) if n else 1
    fig, axes = plt.subplots(nrow, max(ncol, 1), figsize=(3.3 * max(ncol, 1), 2.6 * nrow + 0.4), squeeze=False,
                             sharey=True)
    cf = tabs.cell_fields
    for ax, r in zip(axes.ravel(), rows):
        lrs, crashed, frange = tabs.fit_data[(warmup, tuple(r[f] for f in cf))]
        grid = psy.grid_for(frange)
        xs = np.geomspace(frange[0] / 1.5, frange[1] * 1.5, 120)
        q = psy.curve(grid, psy.posterior(grid, lrs, crashed), xs)
        ax.fill_between(xs, q[:, 0], q[:, 2], color="C0", alpha=0.2, lw=0)
        ax.plot(xs, q[:, 1], color="C0", lw=1.2)
        if not r.get("censored"):
            ax.axvspan(r["lr50_low"], r["lr50_high"], color="C1", alpha=0.15, lw=0)
        by: dict[float, list[bool]] = defaultdict(list)
        for lr, c in zip(lrs, crashed):
            by[lr].append(c)
        ux = sorted(by)
        ax.scatter(ux, [np.mean(by[x]) for x in ux], s=[12 * len(by[x]) for x in ux], color="k", zorder=3)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        label = ", ".join(fmt(r[f]) for f in cf if f not in ("warmup_steps",))
        ax.set_title(f"{label}: LR50 {boundary_text(r)}", fontsize=7)  # (the stop mark included)
        ax.set_xlabel("learning rate", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("P(crash)", fontsize=7)
    fig.text(0.01, 0.01, f"dots: fraction of runs crashed per LR (area ~ runs); line and blue band: fitted "
             f"P(crash), median and 90 %; orange: LR50's 90 % interval; warmup {warmup}; {crit}",
             fontsize=5.5, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def boundary_heatmap(plt, grid: BoundaryGrid, warmup, crit: str):
    """Two axes (cell without its depth x depth): a heatmap of LR50 on a log colour scale, each cell
    with its interval and stop mark written in."""
    from matplotlib.colors import LogNorm

    rows, depths = grid.rows, grid.depths
    lrs = np.full((len(rows), len(depths)), np.nan)
    for i, s in enumerate(rows):
        for j, d in enumerate(depths):
            c = grid.cells.get((s, d))
            if c and not c.get("censored"):
                lrs[i, j] = c["lr50"]
    fig, ax = plt.subplots(figsize=(3.4 + 1.3 * len(depths), 1.4 + 0.5 * len(rows)))
    finite = lrs[np.isfinite(lrs)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size and finite.min() < finite.max() else None
    im = ax.imshow(lrs, cmap="viridis", aspect="auto", norm=norm)
    ax.set_xticks(range(len(depths)), [f"depth {d}" for d in depths])
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(depths)):
            c = grid.cells.get((rows[i], depths[j]))
            if not c:
                continue
            txt = boundary_text(c).replace(" [", "\n[")
            rgba = im.cmap(im.norm(lrs[i, j])) if np.isfinite(lrs[i, j]) else (1, 1, 1, 1)
            lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="k" if lum > 0.5 else "w")
    fig.colorbar(im, ax=ax, label="LR50")
    ax.set_title(f"crash boundary LR50 [90 % interval], warmup {warmup}", fontsize=9)
    fig.text(0.01, 0.01, crit, fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
