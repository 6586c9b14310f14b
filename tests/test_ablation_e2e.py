"""`ablate boundary` and `ablate export` end to end: real Ray, MLflow, Optuna, torch on CPU."""

import json
import math
import subprocess
import sys

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator.boundary import dense_grid_size
from orchestrator.boundary_config import boundary_config
from orchestrator.report import export
from orchestrator.runs import SCHEMA
from orchestrator.spec import parse_spec
from orchestrator.sweep import run_sweep
from workloads.trial import run

TINY = {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "warmup_steps": 0,
        "schedule": "constant", "eval_interval": 0, "eval_batches": 2}

# the smoke size: big enough that a good LR learns past the unigram baseline in 150 steps
SMOKE = {"depth": 2, "width": 64, "heads": 2, "seq_len": 64, "batch_size": 16, "warmup_steps": 0,
         "schedule": "constant", "eval_interval": 0, "eval_batches": 2}
BOUNDARY = {
    "name": "t-boundary", "workload": "gpt", "steps": 150, "fixed": {**SMOKE, "seed": 50},
    "axes": {"stabilizers": ["none", "mlra"]}, "probe_interval": 20,
    "resources": {"cpus": 1, "gpus": 0}, "concurrency": 2,
    "boundary": {"lr_range": [1e-3, 3.0], "resolution": 1.5, "max_trials_per_cell": 9, "min_trials_per_cell": 6,
                 "max_in_flight_per_cell": 2},
}


@pytest.mark.slow
def test_ablate_boundary_fits_every_cell_and_export_shows_how_each_search_ended(ray_local, tmp_path):
    spec_path = tmp_path / "boundary.yaml"
    spec_path.write_text(yaml.safe_dump(BOUNDARY))
    spec = parse_spec(BOUNDARY)
    cfg = boundary_config(spec)
    assert cfg.method == "psi" and cfg.seed_offset == 50
    from orchestrator.boundary import run_boundary

    out = run_boundary(spec, BOUNDARY, workdir=tmp_path, progress=False)
    assert len(out.cells) == 2
    assert dense_grid_size(cfg) == math.ceil(math.log(3.0 / 1e-3) / math.log(2 ** 0.25)) + 1 == 48
    from mlflow.tracking import MlflowClient

    client = MlflowClient(out.tracking_uri)
    exp = client.get_experiment_by_name(out.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'", max_results=1000)
    for cell in out.cells:
        mine = [r for r in runs if r.data.params["stabilizer"] == cell["stabilizers"]]
        seeds = sorted(int(r.data.params["seed"]) for r in mine)
        assert seeds == list(range(50, 50 + len(mine)))  # a fresh seed per trial, offset by fixed.seed
        # the cell's reference: 3 trials at the bottom of the range, seeds 50-52, tagged in MLflow
        refs = [r for r in mine if r.data.tags.get("ablate.reference") == "true"]
        assert sorted((float(r.data.params["lr"]), int(r.data.params["seed"])) for r in refs) == [
            (1e-3, 50), (1e-3, 51), (1e-3, 52)]
        assert cell["reference_runs"] == 3 and cell["reference_lr"] == 1e-3
        assert "(reference)" in refs[0].data.tags["mlflow.runName"]
        # every trial records the threads it trained with (resources.cpus: 1) and where
        assert {r.data.tags["torch_threads"] for r in mine} == {"1"} and {r.data.tags["device"] for r in mine} == {"cpu"}
        assert len(mine) == cell["n_trials"] == cell["n_seeds"] <= cfg.max_trials_per_cell
        assert cell["stop_reason"] in ("interval", "budget", "range_edge")
        assert cell["converged"] == (cell["stop_reason"] == "interval")
        if cell["stop_reason"] == "budget":
            assert cell["n_trials"] == cfg.max_trials_per_cell
        if cell["censored"]:  # LR50 outside the range: no LR50, its one-sided bound
            assert cell["lr50"] is None and cell["lr50_bound"] is not None
        else:
            assert cell["lr50_low"] <= cell["lr50"] <= cell["lr50_high"] and cell["lr10"] <= cell["lr90"]
        assert cell["crash_criterion"] == ["diverged", "collapsed"]
    # export recomputes every fit from MLflow's runs alone and carries how each search ended
    res = export(out.tracking_uri, out.experiment, spec.name, tmp_path / "export")
    rows = {r["stabilizer"]: r for r in res.tables.max_stable_lr[0]}
    trials = res.table.to_pylist()
    for cell in out.cells:
        row = rows[cell["stabilizers"]]
        for k in ("lr50", "lr50_low", "lr50_high", "lr10", "lr90", "n_trials", "converged", "stop_reason"):
            assert row[k] == (pytest.approx(cell[k], rel=1e-9) if isinstance(cell[k], float) else cell[k]), k
        assert row["method"] == "psi" and row["resolution"] == 1.5
        # the same classes, run by run, against the same reference (found by its MLflow tag)
        mine = [t for t in trials if t["stabilizer"] == cell["stabilizers"]]
        by_lr: dict = {}
        for t in mine:
            by_lr.setdefault(f"{t['lr']:.6g}", []).append(t["outcome"])
        assert {k: sorted(v) for k, v in by_lr.items()} == {k: sorted(v) for k, v in cell["outcomes"].items()}
        assert sum(t["reference_run"] for t in mine) == 3 and row["reference_gain"] == cell["reference_gain"]
        assert all(t["reference_gain"] == cell["reference_gain"] and t["collapse_margin"] >= 0 for t in mine)
        assert {t["torch_threads"] for t in mine} == {1}
    saved = json.loads((tmp_path / "export" / "max_stable_lr.json").read_text())["tables"]["0"]
    assert {r["stabilizer"]: (r["converged"], r["stop_reason"]) for r in saved} == {
        c["stabilizers"]: (c["converged"], c["stop_reason"]) for c in out.cells}
    parquet = pq.read_table(tmp_path / "export" / "boundary.parquet").to_pylist()
    assert {r["stabilizer"]: r["lr50"] for r in parquet} == {r: rows[r]["lr50"] for r in rows}
    md = (tmp_path / "export" / "max_stable_lr_warmup0.md").read_text()
    assert "LR50 [90 % interval]" in md and "band lr10–lr90" in md
    for cell in out.cells:
        line = next(x for x in md.splitlines() if x.startswith(f"| {cell['stabilizers']} |"))
        assert f"psi: {cell['stop_reason']}" in line
        assert ("†" in line) == (cell["stop_reason"] == "budget")
    # the CLI prints the same map; resumed from the Optuna store, the finished cells run nothing more
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "boundary", str(spec_path),
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "stabilizers=none" in res.stdout and "LR50 [90 % interval]" in res.stdout
    assert "each cell's reference: 3 trials at lr 0.001" in res.stdout and "classes: crash = diverged" in res.stdout
    # the same searches with another lr_range are refused before anything is written, naming it
    changed = {**BOUNDARY, "boundary": {**BOUNDARY["boundary"], "lr_range": [2e-3, 3.0]}}
    spec_path.write_text(yaml.safe_dump(changed))
    parents = len(client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'sweep'", max_results=100))
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "boundary", str(spec_path),
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "boundary.lr_range: [0.001, 3.0] in the study, [0.002, 3.0] in the spec" in res.stderr
    assert len(client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'sweep'", max_results=100)) == parents
    assert len(client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'", max_results=1000)) == len(runs)


SWEEP = {
    "name": "t-export", "workload": "gpt", "steps": 120, "fixed": SMOKE,
    "axes": {"lr": [3e-3, 2e-2, 2.0], "stabilizers": ["none", "qk_norm"]}, "probe_interval": 20,
    "resources": {"cpus": 1, "gpus": 0}, "concurrency": 2,
}


@pytest.mark.slow
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


@pytest.mark.slow
def test_report_writes_plots(ray_local, tmp_path):
    spec = parse_spec(SWEEP)
    out = run_sweep(spec, SWEEP, workdir=tmp_path, progress=False)
    from orchestrator.report import report

    files = report(out.tracking_uri, out.experiment, spec.name, tmp_path / "rep")
    names = sorted(f.name for f in files if f.parent.name == "rep")
    assert names == ["boundary_fit_warmup0.pdf", "boundary_fit_warmup0.png", "forensics_auc.pdf",
                     "forensics_auc.png", "loss_vs_lr.pdf", "loss_vs_lr.png",
                     "max_stable_lr_warmup0.pdf", "max_stable_lr_warmup0.png"]
    crashed = [r for r in pq.read_table(tmp_path / "rep" / "trials.parquet").to_pylist() if r["crashed"]]
    per_run = [f for f in files if f.parent.name == "forensics_runs"]
    assert len(per_run) == len(crashed)  # one forensic figure per crashed run
    for f in files:
        head = b"\x89PNG\r\n\x1a\n" if f.suffix == ".png" else b"%PDF"
        assert f.read_bytes()[:len(head)] == head and f.stat().st_size > 5000


@pytest.mark.slow
def test_calibration_sweep_through_forensics(ray_local, tmp_path):
    """The real calibration spec (search_spaces/calibration_gpt.yaml: its model, 200 steps, probes
    every 5 steps, non-finite stopping only), on fewer LRs and 2 seeds, run on Ray, recorded in
    MLflow and read back by forensics: every seed of a (stabilizer, LR) group on one side of the
    split, "5 %" read at step 10 (a real probe step, not step 0), a warning only before the crash,
    a crash step from each crashed run's own trace (or none, counted apart), classes from
    workloads.outcome (the trials table's) and no denormal threshold."""
    from pathlib import Path

    from orchestrator.report import export
    from orchestrator.forensics import forensics

    raw = yaml.safe_load((Path(__file__).parent.parent / "search_spaces" / "calibration_gpt.yaml").read_text())
    assert raw["steps"] == 200 and raw["probe_interval"] == 5 and raw["seeds"] == 3
    raw.update(name="t-calibration", experiment="t-calibration", seeds=2,
               axes={"lr": [1.0e-2, 1.0], "stabilizers": ["none", "qk_norm"]})
    spec = parse_spec(raw)
    out = run_sweep(spec, raw, workdir=tmp_path, progress=False)
    res = export(out.tracking_uri, out.experiment, spec.name, tmp_path / "export")
    trials = {r["run_id"]: r for r in res.table.to_pylist()}
    fx, _ = forensics(out.tracking_uri, out.experiment, spec.name, tmp_path / "fx", log_to_mlflow=False)
    assert len(fx.runs) == 8 and {r.run_id for r in fx.runs} == set(trials)
    for r in fx.runs:  # the class is workloads.outcome's, as export decided it
        assert r.crashed == trials[r.run_id]["crashed"] and r.outcome == trials[r.run_id]["outcome"]
    sides: dict = {}
    for r in fx.runs:
        sides.setdefault(r.group, set()).add(r.split)
    assert len(sides) == 4 and all(len(s) == 1 for s in sides.values())
    for row in fx.auc_rows:
        if row["probe"] != "learning rate":
            assert row["steps@0.05"] == [10] and row["steps@0.1"] == [20] and row["steps@0.25"] == [50]
        assert row["crashed_runs"] == sum(r.crashed for r in fx.runs if r.series.get(row["probe"]))
    md = (tmp_path / "fx" / "forensics_auc.md").read_text()
    assert "AUC at 5% (step 10)" in md
    warned_rows = {r["probe"]: r for r in fx.warning_rows}
    for r in fx.runs:  # every crash has a step from its own trace, or is counted apart; never its last step
        assert r.crashed == (r.crash_step() is not None or r.end_only)
        assert r.crash_step() is None or any(s == r.crash_step() for s, _ in r.series["loss"])
        assert r.series.get("loss_baseline")  # the batches' own baselines, recorded at the probe steps
    test_crashed = [r for r in fx.runs if r.split == "test" and r.crashed and not r.end_only]
    for m, row in warned_rows.items():
        warned = sum(fx.warnings[(r.run_id, m)] is not None and fx.warnings[(r.run_id, m)] < r.crash_step()
                     for r in test_crashed)
        assert row["test_crashed_warned"] == f"{warned}/{len(test_crashed)}"
        assert row["test_crashed_no_crash_step"] == sum(r.split == "test" and r.end_only for r in fx.runs)
        assert row["lead_steps_min"] is None or row["lead_steps_min"] > 0
        assert row["threshold"] is None or row["threshold"] == 0 or abs(row["threshold"]) > 1e-300
    assert "e-324" not in (tmp_path / "fx" / "forensics_warnings.md").read_text()


@pytest.mark.slow
def test_a_recorded_trial_re_runs_bit_for_bit_from_its_mlflow_record(ray_local, tmp_path):
    """Issue 31, exact re-runs: a trial recorded by a real sweep under Ray (1 CPU a trial: it trains
    with 1 thread, torch's default here being 2) is re-run by ``ablate trial --from-run`` in a fresh
    process and ends at the same final loss, compared as floats, not approximately."""
    raw = {"name": "t-rerun", "workload": "gpt", "steps": 60, "fixed": {**TINY, "seed": 3},
           "axes": {"lr": [3e-3, 0.3]}, "probe_interval": 20, "resources": {"cpus": 1, "gpus": 0}, "concurrency": 2}
    spec = parse_spec(raw)
    out = run_sweep(spec, raw, workdir=tmp_path, progress=False)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(out.tracking_uri)
    exp = client.get_experiment_by_name(out.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'", max_results=10)
    assert len(runs) == 2
    for r in runs:
        assert r.data.params["threads"] == "1" and r.data.tags["torch_threads"] == "1"  # reached torch in the worker
        res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "trial", "--from-run", r.info.run_id,
                              "--tracking-uri", out.tracking_uri, "--quiet"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        again = json.loads(res.stdout)
        assert again["final_loss"] == r.data.metrics["result/final_loss"]  # bit for bit
        assert again["threads"] == 1 and "reproduced" in res.stderr and "config from its result.json" in res.stderr
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "trial", "--from-run", "0123abc",
                          "--tracking-uri", out.tracking_uri], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--from-run: no run '0123abc' in the MLflow store" in bad.stderr
    assert "Traceback" not in bad.stderr
    parent = subprocess.run([sys.executable, "-m", "orchestrator.cli", "trial", "--from-run", out.parent_run_id,
                             "--tracking-uri", out.tracking_uri], capture_output=True, text=True, timeout=120)
    assert parent.returncode == 2 and "is not a trial run of ablate" in parent.stderr
