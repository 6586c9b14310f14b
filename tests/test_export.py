"""The report's figures on a synthetic trials table (no Ray, no MLflow): every cell keeps its own
point on the crash-boundary figure and its own curve on the loss-vs-LR figure, also where cells
differ in a field other than the stabilizer and depth."""

import math
from pathlib import Path

import pyarrow as pa

import pytest

from orchestrator.figures import CLIP, DODGE, boundary_grid, boundary_heatmap, boundary_points, loss_figure
from orchestrator.runs import SCHEMA, with_outcomes
from orchestrator.tables import Layout, ablation_tables, compare_pivot, comparison_layout
from orchestrator.writers import axis_token, file_stem

L0, BASE = 5.0, 3.0


LRS = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)


def table(cells: dict[tuple, float], warmup: int = 0, losses: dict[tuple, float] | None = None) -> pa.Table:
    """Trials of cells {(stabilizer, width, depth): boundary}: stable below the boundary (final loss
    ``losses[cell]``, 2.0 by default), diverged above."""
    rows = []
    for (stab, width, depth), boundary in cells.items():
        for lr in LRS:
            crashed = lr > boundary
            final = math.inf if crashed else (losses or {}).get((stab, width, depth), 2.0)
            rows.append({"status": "diverged" if crashed else "stable", "stabilizer": stab, "width": width,
                         "depth": depth, "warmup_steps": warmup, "lr": lr, "seed": 0, "initial_loss": L0,
                         "baseline_loss": BASE, "final_loss": final})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def figure_grid(cells):
    tabs = ablation_tables(table(cells))
    return tabs.cell_fields, boundary_grid(tabs.max_stable_lr[0], tabs.cell_fields)


def test_cells_of_one_stabilizer_that_differ_in_width_keep_their_own_points():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields, grid = figure_grid({("none", 64, 2): 2.5e-3, ("none", 128, 2): 5e-3, ("qk_norm", 64, 2): 1e-2})
    assert fields == ["stabilizer", "width"]
    assert grid.rows == ["none, width=64", "none, width=128", "qk_norm, width=64"] and grid.depths == [None]
    assert [grid.cells[(r, None)]["max_stable_lr"] for r in grid.rows] == [2e-3, 4e-3, 8e-3]
    lr50 = [grid.cells[(r, None)]["lr50"] for r in grid.rows]
    assert lr50[0] < lr50[1] < lr50[2]
    fig = boundary_points(plt, grid, 0, "crit")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == grid.rows
    drawn = {(float(x), float(y)) for line in ax.lines for x, y in zip(line.get_xdata(), line.get_ydata())}
    assert {(0.0, lr50[0]), (1.0, lr50[1]), (2.0, lr50[2])} <= drawn  # a point per cell (LR50), at its own x
    plt.close(fig)


def test_heatmap_rows_keep_width_apart_when_depth_varies_too():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields, grid = figure_grid({("none", 64, 1): 2.5e-3, ("none", 128, 1): 5e-3, ("none", 64, 2): 1e-2,
                                ("none", 128, 2): 1.5e-3})
    assert fields == ["stabilizer", "depth", "width"] and grid.depths == [1, 2]
    assert grid.rows == ["none, width=64", "none, width=128"]
    fig = boundary_heatmap(plt, grid, 0, "crit")
    image = fig.axes[0].get_images()[0].get_array()
    assert image.tolist() == [[grid.cells[(r, d)]["lr50"] for d in (1, 2)] for r in grid.rows]
    assert image[0][0] < image[0][1] and image[1][1] < image[1][0]  # each cell its own LR50
    plt.close(fig)


def test_a_fixed_warmup_names_its_table_and_figure():
    """warmup_steps fixed at 100 (not a cell field): the table is the one of warmup 100, which the
    report looks up for its figure (it was filed under warmup 0, and the figure came out empty)."""
    tabs = ablation_tables(table({("none", 64, 2): 2.5e-3, ("qk_norm", 64, 2): 5e-3}, warmup=100))
    assert tabs.cell_fields == ["stabilizer"] and list(tabs.max_stable_lr) == [100]
    assert boundary_grid(tabs.max_stable_lr[100], tabs.cell_fields).rows == ["none", "qk_norm"]


def drawn_loss_figure(cells, losses=None, extra=()):
    """The report's loss-vs-LR figure (one axes) and its mean lines by gid (``mean|cell|column``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = with_outcomes(pa.concat_tables([table(cells, losses=losses), *extra]))
    rows = [dict(r, depth=None) for r in t.to_pylist()]  # as report() does when depth is fixed
    fig = loss_figure(plt, rows, ablation_tables(t).cell_fields, "crit")
    ax = fig.axes[0]
    curves = {line.get_gid(): line for line in ax.lines if (line.get_gid() or "").startswith("mean|")}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    return plt, fig, ax, curves, legend


def points(ax, prefix) -> set[tuple[float, float]]:
    """The runs drawn by artists whose gid starts with ``prefix`` (``run|none|``, ``clipped|none|``)."""
    return {(float(x), float(y)) for line in ax.lines if (line.get_gid() or "").startswith(prefix)
            for x, y in zip(line.get_xdata(), line.get_ydata())}


def test_loss_curves_keep_cells_of_one_stabilizer_that_differ_in_width_apart():
    """Two cells of "none", widths 64 and 128: width is the comparison axis, so a curve each (not
    their mean at each LR) in the cell's colour, a line style per width, each with its own runs;
    diverged runs (inf) on the top edge with their value written; the legend counts the runs."""
    plt, fig, ax, curves, legend = drawn_loss_figure({("none", 64, 2): 2.5e-3, ("none", 128, 2): 5e-3},
                                                     losses={("none", 64, 2): 2.0, ("none", 128, 2): 1.5})
    assert sorted(curves) == ["mean|none|128", "mean|none|64"]
    narrow, wide = curves["mean|none|64"], curves["mean|none|128"]
    left, right = 10 ** (-DODGE / 2), 10 ** (DODGE / 2)  # width 64 drawn left of 128 at each LR
    assert list(narrow.get_xdata()) == pytest.approx([1e-3 * left, 2e-3 * left])
    assert list(narrow.get_ydata()) == [2.0, 2.0]
    assert list(wide.get_xdata()) == pytest.approx([1e-3 * right, 2e-3 * right, 4e-3 * right])
    assert list(wide.get_ydata()) == [1.5, 1.5, 1.5]
    assert narrow.get_color() == wide.get_color() and narrow.get_linestyle() != wide.get_linestyle()
    top = CLIP * L0

    def at(prefix, scale):
        return {(round(x / scale, 12), y) for x, y in points(ax, prefix)}

    assert at("run|none|64|", left) == {(1e-3, 2.0), (2e-3, 2.0)}
    assert at("clipped|none|64", left) == {(4e-3, top), (8e-3, top), (1.6e-2, top)}
    assert at("run|none|128|", right) == {(1e-3, 1.5), (2e-3, 1.5), (4e-3, 1.5)}
    assert at("clipped|none|128", right) == {(8e-3, top), (1.6e-2, top)}
    assert [t.get_text() for t in ax.texts] == ["inf"] * 5 and ax.get_ylim()[1] == top
    assert legend[:3] == ["none (10 runs)", "width 64", "width 128"]
    assert legend[3:] == ["stable (each seed)", "degraded", "collapsed",
                          "diverged (above the axis: on its top edge, value written)", "l_0 (before training)",
                          "marginal baseline"]
    assert sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() in ("--", ":")
                  and not (line.get_gid() or "").startswith("mean|")) == [BASE, L0]
    plt.close(fig)


def test_loss_curves_are_one_per_stabilizer_when_only_stabilizer_and_lr_vary():
    plt, fig, ax, curves, legend = drawn_loss_figure({("none", 64, 2): 2.5e-3, ("qk_norm", 64, 2): 5e-3})
    assert sorted(curves) == ["mean|none|", "mean|qk_norm|"] and legend[:2] == ["none (5 runs)", "qk_norm (5 runs)"]
    assert list(curves["mean|none|"].get_xdata()) == [1e-3, 2e-3]
    assert list(curves["mean|qk_norm|"].get_xdata()) == [1e-3, 2e-3, 4e-3]
    plt.close(fig)


def test_boundary_rows_say_how_each_search_ended_in_the_table_and_the_rows():
    """Issue 21, nothing hidden: every row carries ``converged`` and ``stop_reason``; a cell that did
    not converge is marked in the Markdown and LaTeX table with a footnote; bisect is labelled."""
    from orchestrator.tables import boundary_caption, pivot_max_stable
    from orchestrator.writers import to_latex, to_markdown

    t = table({("none", 64, 2): 2.5e-3, ("qk_norm", 64, 2): 5e-3, ("weyl", 64, 2): 9e-3})
    records = [  # what ablate boundary logged for two of the cells (the third came from a grid sweep)
        {"values": {"stabilizers": "none"}, "method": "psi", "stop_reason": "budget", "converged": False,
         "resolution": 1.5, "lr_range": [1e-3, 1.6e-2], "sweep": None},
        {"values": {"stabilizers": "qk_norm"}, "method": "bisect", "stop_reason": "interval", "converged": True,
         "resolution": 2.5, "lr_range": [1e-3, 1.6e-2], "sweep": None},
    ]
    tabs = ablation_tables(t, searches=records)
    rows = {r["stabilizer"]: r for r in tabs.max_stable_lr[0]}
    assert (rows["none"]["stop_reason"], rows["none"]["converged"], rows["none"]["method"]) == ("budget", False, "psi")
    assert (rows["qk_norm"]["stop_reason"], rows["qk_norm"]["method"]) == ("interval", "bisect")
    assert rows["qk_norm"]["converged"] == (rows["qk_norm"]["crash_lr"] / rows["qk_norm"]["max_stable_lr"] <= 2.5)
    assert (rows["weyl"]["stop_reason"], rows["weyl"]["method"]) == ("grid", "grid")
    for r in rows.values():
        assert r["lr50_low"] <= r["lr50"] <= r["lr50_high"] and r["n_trials"] == 5 and r["n_seeds"] == 1
    h, body = pivot_max_stable(tabs.max_stable_lr[0], tabs.cell_fields)
    cap = boundary_caption("t", 0, tabs.max_stable_lr[0], "crit")
    lines = {row[0]: row for row in body}
    assert lines["none"][1].endswith("†") and lines["none"][4] == "psi: budget"
    assert "†" not in lines["qk_norm"][1] and lines["qk_norm"][4] == "bisect (one-seed look): interval"
    assert "† = not converged: the cell's trial budget was spent first" in cap and "one-seed look" in cap
    assert "| none | " in to_markdown(h, body, cap)
    assert r"$^\dagger$" in to_latex(h, body, cap) and "†" not in to_latex(h, body, cap)
def test_diverged_runs_that_fit_are_drawn_where_they_are_and_seeds_are_points_around_their_mean():
    """The smoke sweep's lr-1 case: a diverged final loss of 6.19 (l_0 5) fits under the top (1.25 l_0)
    and is drawn at 6.19; 27.9 does not and sits on the top edge, "27.9" written beside it. Two seeds
    at one LR: two faint points, the line through their mean."""
    extra = pa.Table.from_pylist([
        {"status": "stable", "stabilizer": "none", "width": 64, "depth": 2, "warmup_steps": 0, "lr": 1e-3, "seed": 1,
         "initial_loss": L0, "baseline_loss": BASE, "final_loss": 2.4},
        {"status": "diverged", "stabilizer": "qk_norm", "width": 64, "depth": 2, "warmup_steps": 0, "lr": 1.6e-2,
         "seed": 1, "initial_loss": L0, "baseline_loss": BASE, "final_loss": 27.9}], schema=SCHEMA)
    plt, fig, ax, curves, legend = drawn_loss_figure({("none", 64, 2): 2.5e-3, ("qk_norm", 64, 2): 5e-3},
                                                     losses={("none", 64, 2): 2.0}, extra=[extra])
    assert (1e-3, 2.0) in points(ax, "run|none|") and (1e-3, 2.4) in points(ax, "run|none|")
    assert list(curves["mean|none|"].get_ydata())[0] == pytest.approx(2.2)
    faint = [line for line in ax.lines if line.get_gid() == "run|none||stable"]
    assert faint and all(line.get_alpha() < 0.5 for line in faint)
    plt.close(fig)
    six = pa.Table.from_pylist([
        {"status": "diverged", "stabilizer": "none", "width": 64, "depth": 2, "warmup_steps": 0, "lr": 3.2e-2,
         "seed": 0, "initial_loss": L0, "baseline_loss": BASE, "final_loss": 6.19}], schema=SCHEMA)
    plt, fig, ax, curves, legend = drawn_loss_figure({("none", 64, 2): 2.5e-3, ("qk_norm", 64, 2): 5e-3},
                                                     extra=[extra, six])
    assert (3.2e-2, 6.19) in points(ax, "run|none||diverged")  # fits: where it is
    assert (1.6e-2, CLIP * L0) in points(ax, "clipped|qk_norm|")
    assert "27.9" in [t.get_text() for t in ax.texts] and "6.19" not in [t.get_text() for t in ax.texts]
    plt.close(fig)


def test_warmups_share_one_axes_with_a_line_style_each():
    """warmup 0 and 50 of the same cells on one axes: a curve per cell and warmup, the same colour
    for a cell, a line style per warmup, the points of each warmup side by side at each LR."""
    t = pa.concat_tables([table({("none", 64, 2): 2.5e-3}, warmup=0),
                          table({("none", 64, 2): 5e-3}, warmup=50, losses={("none", 64, 2): 1.8})])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = with_outcomes(t)
    fields = ablation_tables(t).cell_fields
    assert fields == ["stabilizer", "warmup_steps"]
    assert comparison_layout(fields) == Layout(["stabilizer"], "warmup_steps", [])
    fig = loss_figure(plt, [dict(r, depth=None) for r in t.to_pylist()], fields, "crit")
    ax = fig.axes[0]
    w0 = next(line for line in ax.lines if line.get_gid() == "mean|none|0")
    w50 = next(line for line in ax.lines if line.get_gid() == "mean|none|50")
    assert w0.get_color() == w50.get_color() and w0.get_linestyle() != w50.get_linestyle()
    assert list(w0.get_ydata()) == [2.0, 2.0] and list(w50.get_ydata()) == [1.8, 1.8, 1.8]
    assert all(a < b for a, b in zip(w0.get_xdata(), w50.get_xdata()))  # warmup 0 left of 50 at each LR
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["none (10 runs)", "warmup 0", "warmup 50"]
    plt.close(fig)


def test_compare_pivot_takes_any_cell_text_and_splits_by_depth():
    rows = [{"stabilizer": s, "warmup_steps": w, "depth": d, "v": f"{s}/{w}/{d}"}
            for s in ("none", "weyl") for w in (0, 50) for d in (2, 4) if (s, w, d) != ("weyl", 50, 4)]
    fields = ["stabilizer", "depth", "warmup_steps"]
    assert comparison_layout(fields) == Layout(["stabilizer"], "warmup_steps", ["depth"])
    pivots = compare_pivot(rows, fields, lambda r: r["v"])
    assert [p.split for p in pivots] == [{"depth": 2}, {"depth": 4}]
    assert pivots[1].header == ["stabilizer", "warmup 0", "warmup 50"]
    assert pivots[1].body == [["none", "none/0/4", "none/50/4"], ["weyl", "weyl/0/4", "–"]]
    # depth alone beside the stabilizer: depth is the comparison axis, no split
    assert comparison_layout(["stabilizer", "depth"]) == Layout(["stabilizer"], "depth", [])
    assert comparison_layout(["stabilizer"]).column is None
    assert file_stem("loss_vs_lr", {"depth": 4, "warmup_steps": 50}) == "loss_vs_lr_depth4_warmup50"
    assert axis_token("stabilizer", "weyl+qk_norm") == "weyl-qk_norm" and axis_token("lr", 0.1) == "lr0.1"


def test_boundary_of_every_cell_on_one_axis_grouped_by_warmup_per_depth(tmp_path):
    """Issue 21: 'does warmup raise the baseline's LR50 at depth 4?' is one figure: per depth, every
    cell's LR50 with its interval, warmup 0 and 50 side by side within the cell's group; a cell whose
    LR50 lies above the range is a triangle; file names carry the split axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.figures import boundary_compare_figures

    def row(stab, w, d, lr50, above=False):
        if above:  # censored: no LR50, its one-sided bound
            return {"stabilizer": stab, "warmup_steps": w, "depth": d, "lr50": None, "lr50_low": None,
                    "lr50_high": None, "censored": "above", "lr50_bound": lr50, "converged": False,
                    "stop_reason": "range_edge", "n_trials": 12}
        return {"stabilizer": stab, "warmup_steps": w, "depth": d, "lr50": lr50, "lr50_low": lr50 / 1.3,
                "lr50_high": lr50 * 1.3, "censored": None, "lr50_bound": None, "converged": True,
                "stop_reason": "interval", "n_trials": 12}
    rows = [row(s, w, d, 0.1 * (1 + w / 50) * (2 if s == "qk_norm" else 1), above=(s, w, d) == ("qk_norm", 50, 4))
            for s in ("none", "qk_norm") for w in (0, 50) for d in (2, 4)]
    captured = []
    real_save = plt.Figure.savefig

    def spy(fig, path, *a, **k):
        captured.append((Path(path).name, [line.get_gid() for line in fig.axes[0].lines if line.get_gid()]))
        return real_save(fig, path, *a, **k)

    plt.Figure.savefig = spy
    try:
        files = boundary_compare_figures(plt, rows, ["stabilizer", "depth", "warmup_steps"], tmp_path, "crit")
    finally:
        plt.Figure.savefig = real_save
    assert [f.name for f in files] == ["lr50_by_warmup_depth2.png", "lr50_by_warmup_depth2.pdf",
                                       "lr50_by_warmup_depth4.png", "lr50_by_warmup_depth4.pdf"]
    gids = dict(captured)
    assert sorted({g for g in gids["lr50_by_warmup_depth2.png"] if g.startswith("lr50")}) == \
        ["lr50|0|0", "lr50|0|1", "lr50|1|0", "lr50|1|1"]
    assert "edge|1|1" in gids["lr50_by_warmup_depth4.png"]  # qk_norm, warmup 50: above the range
    assert boundary_compare_figures(plt, rows[:1], ["stabilizer"], tmp_path, "crit") == []
