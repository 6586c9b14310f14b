"""The report's figures on a synthetic trials table (no Ray, no MLflow): every cell keeps its own
point on the crash-boundary figure and its own curve on the loss-vs-LR figure, also where cells
differ in a field other than the stabilizer and depth."""

import math

import pyarrow as pa

from orchestrator.export import (SCHEMA, _boundary_heatmap, _boundary_points, _loss_panels, ablation_tables,
                                 boundary_grid, with_outcomes)

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
    fig = _boundary_points(plt, grid, 0, "crit")
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
    fig = _boundary_heatmap(plt, grid, 0, "crit")
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


def loss_figure(cells, losses=None):
    """The report's loss-vs-LR figure (depth does not vary: one panel) and its curves by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = with_outcomes(table(cells, losses=losses))
    rows = [dict(r, depth=None) for r in t.to_pylist()]  # as report() does when depth is fixed
    fig = _loss_panels(plt, rows, 0, [None], ablation_tables(t).cell_fields, "crit")
    ax = fig.axes[0]
    curves = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    return plt, fig, ax, curves, legend


def points(ax, color) -> set[tuple[float, float]]:
    """The class markers drawn in one colour (the lines without a legend label)."""
    return {(float(x), float(y)) for line in ax.lines if line.get_label().startswith("_")
            and line.get_color() == color and line.get_marker() not in (None, "None", "")
            for x, y in zip(line.get_xdata(), line.get_ydata())}


def test_loss_curves_keep_cells_of_one_stabilizer_that_differ_in_width_apart():
    """Two cells of "none", widths 64 and 128: a curve each (not their mean at each LR), labelled
    apart in the legend, in colours of their own, each with its own runs' markers."""
    plt, fig, ax, curves, legend = loss_figure({("none", 64, 2): 2.5e-3, ("none", 128, 2): 5e-3},
                                               losses={("none", 64, 2): 2.0, ("none", 128, 2): 1.5})
    assert sorted(curves) == ["none, width=128", "none, width=64"]
    narrow, wide = curves["none, width=64"], curves["none, width=128"]
    assert list(narrow.get_xdata()) == [1e-3, 2e-3] and list(narrow.get_ydata()) == [2.0, 2.0]
    assert list(wide.get_xdata()) == [1e-3, 2e-3, 4e-3] and list(wide.get_ydata()) == [1.5, 1.5, 1.5]
    assert narrow.get_color() != wide.get_color()
    off_scale = 1.08 * L0  # diverged runs sit on the top edge
    assert points(ax, narrow.get_color()) == {(1e-3, 2.0), (2e-3, 2.0), (4e-3, off_scale), (8e-3, off_scale),
                                              (1.6e-2, off_scale)}
    assert points(ax, wide.get_color()) == {(1e-3, 1.5), (2e-3, 1.5), (4e-3, 1.5), (8e-3, off_scale),
                                            (1.6e-2, off_scale)}
    assert legend[:2] == ["none, width=64", "none, width=128"]
    assert legend[2:] == ["stable", "degraded", "collapsed", "diverged (off scale)", "l_0 (before training)",
                          "marginal baseline"]
    assert sorted(line.get_ydata()[0] for line in ax.lines if line.get_linestyle() in ("--", ":")) == [BASE, L0]
    plt.close(fig)


def test_loss_curves_are_one_per_stabilizer_when_only_stabilizer_and_lr_vary():
    plt, fig, ax, curves, legend = loss_figure({("none", 64, 2): 2.5e-3, ("qk_norm", 64, 2): 5e-3})
    assert sorted(curves) == ["none", "qk_norm"] and legend[:2] == ["none", "qk_norm"]
    assert list(curves["none"].get_xdata()) == [1e-3, 2e-3]
    assert list(curves["qk_norm"].get_xdata()) == [1e-3, 2e-3, 4e-3]
    plt.close(fig)


def test_boundary_rows_say_how_each_search_ended_in_the_table_and_the_rows():
    """Issue 21, nothing hidden: every row carries ``converged`` and ``stop_reason``; a cell that did
    not converge is marked in the Markdown and LaTeX table with a footnote; bisect is labelled."""
    from orchestrator.export import boundary_caption, pivot_max_stable, to_latex, to_markdown

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
