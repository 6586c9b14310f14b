"""`ablate boundary` and `ablate export` end to end: real Ray, MLflow, Optuna, torch on CPU."""

import math
import subprocess
import sys

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator.boundary import dense_grid_size, boundary_config
from orchestrator.export import SCHEMA, export
from orchestrator.spec import parse_spec
from orchestrator.sweep import run_sweep
from workloads.trial import run

TINY = {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "warmup_steps": 0,
        "schedule": "constant", "eval_interval": 0, "eval_batches": 2}

# the smoke size: big enough that a good LR learns past the unigram baseline in 150 steps
SMOKE = {"depth": 2, "width": 64, "heads": 2, "seq_len": 64, "batch_size": 16, "warmup_steps": 0,
         "schedule": "constant", "eval_interval": 0, "eval_batches": 2}
BOUNDARY = {
    "name": "t-boundary", "workload": "gpt", "steps": 150, "fixed": SMOKE,
    "axes": {"stabilizers": ["none", "mlra"]}, "probe_interval": 20,
    "resources": {"cpus": 1, "gpus": 0}, "concurrency": 2,
    "boundary": {"lr_range": [1e-3, 3.0], "resolution": 2 ** 0.25, "max_trials_per_cell": 14},
}


def test_ablate_boundary_brackets_every_cell_with_few_trials(ray_local, tmp_path):
    spec_path = tmp_path / "boundary.yaml"
    spec_path.write_text(yaml.safe_dump(BOUNDARY))
    spec = parse_spec(BOUNDARY)
    cfg = boundary_config(spec)
    from orchestrator.boundary import run_boundary

    out = run_boundary(spec, BOUNDARY, workdir=tmp_path, progress=False)
    assert len(out.cells) == 2
    dense = dense_grid_size(cfg)
    assert dense == math.ceil(math.log(3.0 / 1e-3) / math.log(2 ** 0.25)) + 1 == 48
    from mlflow.tracking import MlflowClient

    client = MlflowClient(out.tracking_uri)
    exp = client.get_experiment_by_name(out.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'", max_results=1000)
    for cell in out.cells:
        assert cell["converged"], cell
        assert cell["crash_lr"] / cell["stable_lr"] <= cfg.resolution
        # the boundary lies inside [stable, crashed] of trials that were actually run
        mine = [r for r in runs if r.data.params["stabilizer"] == cell["stabilizers"]]
        stable = [float(r.data.params["lr"]) for r in mine if r.data.tags["status"] == "stable"]
        crashed = [float(r.data.params["lr"]) for r in mine if r.data.tags["status"] in ("diverged", "collapsed")]
        assert cell["stable_lr"] in stable
        assert cell["crash_lr"] in crashed
        assert cell["stable_lr"] <= cell["boundary_lr"] <= cell["crash_lr"]
        assert not any(lr > cell["stable_lr"] for lr in stable)  # the largest stable LR run
        assert len(mine) == cell["trials"] <= dense / 4
        assert cell["crash_criterion"] == ["diverged", "collapsed"]
    # the CLI prints the same map
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "boundary", str(spec_path),
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "stabilizers=none" in res.stdout and f"{dense} trials a cell" in res.stdout
    # resumed from the Optuna store: converged cells ran nothing more
    assert len(client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'", max_results=1000)) == len(runs)


SWEEP = {
    "name": "t-export", "workload": "gpt", "steps": 120, "fixed": SMOKE,
    "axes": {"lr": [3e-3, 2e-2, 2.0], "stabilizers": ["none", "qk_norm"]}, "probe_interval": 20,
    "resources": {"cpus": 1, "gpus": 0}, "concurrency": 2,
}


def test_export_reproduces_the_trials_own_results_in_every_format(ray_local, tmp_path):
    spec = parse_spec(SWEEP)
    out = run_sweep(spec, SWEEP, workdir=tmp_path, progress=False)
    # the trials' own results, recomputed here without Ray or MLflow (CPU runs are deterministic)
    own = {(c.stabilizer_label, c.lr): run(c) for c in spec.trials()}
    res = export(out.tracking_uri, out.experiment, spec.name, tmp_path / "export")

    table = pq.read_table(tmp_path / "export" / "trials.parquet")
    assert table.schema.equals(SCHEMA) and table.num_rows == 6
    csv = pacsv.read_csv(tmp_path / "export" / "trials.csv")
    assert csv.num_rows == 6
    for row in table.to_pylist():
        r = own[(row["stabilizer"], row["lr"])]
        assert row["status"] == r.outcome and row["stop_reason"] == r.stop_reason
        assert row["final_loss"] == pytest.approx(r.final_loss, rel=1e-6) or (
            math.isinf(row["final_loss"]) and math.isinf(r.final_loss))
        assert row["initial_loss"] == pytest.approx(r.initial_loss, rel=1e-6)
        assert row["baseline_loss"] == pytest.approx(r.baseline_loss, rel=1e-9)
        assert row["steps_run"] == r.steps_run and row["workload"] == "gpt" and row["depth"] == 2
        assert row["crashed"] == (row["outcome"] in ("diverged", "collapsed"))
        assert row["crash_criterion"].startswith("crash = diverged")
        if r.first_event:
            assert row["divergence_kind"] == r.first_event.kind and row["divergence_step"] == r.first_event.step

    # (a) max stable LR per stabilizer, from the trials' own results
    rows = {r["stabilizer"]: r for r in res.tables.max_stable_lr[0]}
    for stab in ("none", "qk_norm"):
        crashed = {lr: own[(stab, lr)].outcome in ("diverged", "collapsed") for lr in (3e-3, 2e-2, 2.0)}
        stable = [lr for lr, c in crashed.items() if not c]
        above = [lr for lr, c in crashed.items() if c and (not stable or lr > max(stable))]
        assert rows[stab]["max_stable_lr"] == (max(stable) if stable else None)
        assert rows[stab]["crash_lr"] == (min(above) if above else None)
    # (c) best loss per cell
    best = {r["stabilizer"]: r for r in res.tables.best_loss}
    for stab in ("none", "qk_norm"):
        finite = [r.final_loss for (s, _), r in own.items() if s == stab and r.outcome == "stable"]
        assert finite and best[stab]["best_final_loss"] == pytest.approx(min(finite), rel=1e-6)
    # the numbers appear in the Markdown and LaTeX tables too
    md = (tmp_path / "export" / "best_loss.md").read_text()
    tex = (tmp_path / "export" / "best_loss.tex").read_text()
    for stab in ("none", "qk_norm"):
        shown = f"{best[stab]['best_final_loss']:.4g}"
        assert shown in md and shown in tex
    assert r"\toprule" in tex and r"\bottomrule" in tex and "qk\\_norm" in tex
    sens = (tmp_path / "export" / "lr_sensitivity.md").read_text()
    assert "| none |" in sens
    # and as artifacts of the sweep's parent run
    from mlflow.tracking import MlflowClient

    arts = [a.path for a in MlflowClient(out.tracking_uri).list_artifacts(out.parent_run_id, "tables")]
    assert "tables/trials.parquet" in arts and "tables/max_stable_lr_warmup0.md" in arts


def test_report_writes_plots(ray_local, tmp_path):
    spec = parse_spec(SWEEP)
    out = run_sweep(spec, SWEEP, workdir=tmp_path, progress=False)
    from orchestrator.export import report

    files = report(out.tracking_uri, out.experiment, spec.name, tmp_path / "rep")
    names = sorted(f.name for f in files if f.parent.name == "rep")
    assert names == ["forensics_auc.pdf", "forensics_auc.png", "loss_vs_lr.pdf", "loss_vs_lr.png",
                     "max_stable_lr_warmup0.pdf", "max_stable_lr_warmup0.png"]
    crashed = [r for r in pq.read_table(tmp_path / "rep" / "trials.parquet").to_pylist() if r["crashed"]]
    per_run = [f for f in files if f.parent.name == "forensics_runs"]
    assert len(per_run) == len(crashed)  # one forensic figure per crashed run
    for f in files:
        head = b"\x89PNG\r\n\x1a\n" if f.suffix == ".png" else b"%PDF"
        assert f.read_bytes()[:len(head)] == head and f.stat().st_size > 5000
