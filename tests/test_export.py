"""The report's crash-boundary figure on a synthetic trials table (no Ray, no MLflow): every cell
keeps its own point, also where cells differ in a field other than the stabilizer and depth."""

import math

import pyarrow as pa

from orchestrator.export import (SCHEMA, _boundary_heatmap, _boundary_points, ablation_tables, boundary_grid)

L0, BASE = 5.0, 3.0


def table(cells: dict[tuple, float], warmup: int = 0) -> pa.Table:
    """Trials of cells {(stabilizer, width, depth): boundary}: stable below the boundary, diverged above."""
    rows = []
    for (stab, width, depth), boundary in cells.items():
        for lr in (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2):
            crashed = lr > boundary
            rows.append({"status": "diverged" if crashed else "stable", "stabilizer": stab, "width": width,
                         "depth": depth, "warmup_steps": warmup, "lr": lr, "seed": 0, "initial_loss": L0,
                         "baseline_loss": BASE, "final_loss": math.inf if crashed else 2.0})
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
    fig = _boundary_points(plt, grid, 0, "crit")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == grid.rows
    drawn = {(float(x), float(y)) for line in ax.lines for x, y in zip(line.get_xdata(), line.get_ydata())}
    assert {(0.0, 2e-3), (1.0, 4e-3), (2.0, 8e-3)} <= drawn  # a point per cell, at its own x
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
    assert image.tolist() == [[2e-3, 8e-3], [4e-3, 1e-3]]
    plt.close(fig)


def test_a_fixed_warmup_names_its_table_and_figure():
    """warmup_steps fixed at 100 (not a cell field): the table is the one of warmup 100, which the
    report looks up for its figure (it was filed under warmup 0, and the figure came out empty)."""
    tabs = ablation_tables(table({("none", 64, 2): 2.5e-3, ("qk_norm", 64, 2): 5e-3}, warmup=100))
    assert tabs.cell_fields == ["stabilizer"] and list(tabs.max_stable_lr) == [100]
    assert boundary_grid(tabs.max_stable_lr[100], tabs.cell_fields).rows == ["none", "qk_norm"]
