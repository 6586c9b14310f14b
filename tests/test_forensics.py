"""Divergence forensics on synthetic MLflow histories with a known answer (a real SQLite store, the
real Tracker, the real export path); the real small runs go through `ablate report` in
tests/test_ablation_e2e.py."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from orchestrator.forensics import auc, bootstrap_auc, forensics
from orchestrator.tracking import Tracker
from workloads.trial import TrialConfig

STEPS, LEAD, SETTLE = 100, 20, 40


def make_store(tmp_path):
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, "syn")
    parent = tr.sweep_run("syn", {"name": "syn"}, "name: syn\n")
    for i in range(16):
        crashed = i >= 8
        lr = 1e-3 * (i + 1)
        cfg = TrialConfig(steps=STEPS, lr=lr, depth=1, width=32, heads=2).to_dict()
        rid = tr.trial_run("syn", parent, f"t{i}", f"lr={lr:g}", {**cfg, "stabilizer": "none"}, replace=False)
        steps = list(range(0, STEPS, 5)) + [STEPS - 1]
        series = {
            "loss": [(s, 6.0 if crashed and s >= SETTLE else 5.0 - 0.03 * s) for s in steps],
            # leads the loss by exactly LEAD steps in every crashed run; flat in stable runs
            "max_logit": [(s, 100.0 if crashed and s >= SETTLE - LEAD else 10.0) for s in steps],
            # the same in every run: never warns
            "spectral_conc/max": [(s, 0.5) for s in steps],
            # grows with the LR in stable runs: the test half's largest stable run exceeds the train half
            "grad_norm": [(s, 1.0 + i if not crashed else 3.0) for s in steps],
        }
        ts = 0
        tr.log_metrics(rid, [Metric(k, v, ts, s) for k, vals in series.items() for s, v in vals])
        final = 6.0 if crashed else 2.0
        tr.log_metrics(rid, [Metric("result/final_loss", final, ts, STEPS), Metric("result/initial_loss", 5.0, ts, STEPS),
                             Metric("result/baseline_loss", 3.0, ts, STEPS)])
        tr.set_tags(rid, {"status": "diverged" if crashed else "stable", "steps_run": STEPS})
        tr.finish(rid)
    return uri


def test_known_answers(tmp_path):
    uri = make_store(tmp_path)
    fx, files = forensics(uri, "syn", "syn", tmp_path / "out", with_figures=True)
    assert len(fx.runs) == 16 and sum(r.crashed for r in fx.runs) == 8
    assert {r.split for r in fx.runs} == {"train", "test"} and sum(r.split == "test" for r in fx.runs) == 8
    aucs = {r["probe"]: r for r in fx.auc_rows}
    assert aucs["max_logit"]["auc@0.05"] == 0.5 and aucs["max_logit"]["auc@0.25"] == 1.0  # warned by step 20
    assert aucs["spectral_conc/max"]["auc@0.25"] == 0.5
    assert aucs["learning rate"]["auc@0.05"] == 1.0  # here the crashed runs have the 8 largest LRs
    assert aucs["max_logit"]["within_lr_pairs"] == 0  # no LR ran both a crashed and a stable run
    assert aucs["loss"]["auc@0.25"] == 0.5  # before step 40 the loss is the same in every run
    warn = {r["probe"]: r for r in fx.warning_rows}
    assert warn["max_logit"]["test_crashed_warned"] == "4/4" and warn["max_logit"]["test_false_alarms"] == "0/4"
    assert warn["max_logit"]["lead_steps_median"] == LEAD == warn["max_logit"]["lead_steps_min"] == warn["max_logit"]["lead_steps_max"]
    assert warn["max_logit"]["lead_fraction_median"] == pytest.approx(LEAD / STEPS)
    assert warn["spectral_conc/max"]["test_crashed_warned"] == "0/4" and warn["spectral_conc/max"]["lead_steps_median"] is None
    assert warn["grad_norm"]["test_false_alarms"] == "1/4"  # warns on a stable held-out run
    assert warn["loss"]["lead_steps_median"] == 0  # the loss's own warning is the crash step
    names = {f.name for f in files}
    assert {"forensics_auc.md", "forensics_auc.tex", "forensics_auc.parquet", "forensics_warnings.md",
            "forensics_auc.png", "forensics_auc.pdf"} <= names
    assert len([f for f in files if f.parent.name == "forensics_runs"]) == 8
    table = pq.read_table(tmp_path / "out" / "forensics_warnings.parquet").to_pylist()
    assert {r["probe"] for r in table} == {"learning rate", "loss", "max_logit", "spectral_conc/max", "grad_norm"}
    md = (tmp_path / "out" / "forensics_auc.md").read_text()
    assert "| gpt | max_logit | high |" in md and "crash = diverged" in md
    # logged to the sweep's parent run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = Tracker(uri, "syn").sweep_runs("syn")[0].info.run_id
    assert "forensics/forensics_auc.md" in [a.path for a in client.list_artifacts(parent, "forensics")]


def test_auc_matches_sklearn_and_bootstrap_brackets_it():
    rng = np.random.default_rng(1)
    pos, neg = list(rng.normal(1, 1, 30)), list(rng.normal(0, 1, 40)) + [1.0, 1.0]
    pos += [1.0]  # a tie
    want = roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)
    assert auc(pos, neg) == pytest.approx(want, abs=1e-12)
    lo, hi = bootstrap_auc(pos, neg)
    assert lo < want < hi and hi - lo < 0.5
    assert auc([], neg) is None and math.isnan(float("nan"))


def test_cli_refuses_an_incomplete_sweep_unless_allowed(tmp_path):
    """`ablate forensics` guards like `ablate export`: one line and exit 1 for an interrupted sweep,
    its tables with a warning under --allow-incomplete."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    uri = make_store(tmp_path)
    tr = Tracker(uri, "syn")
    parent = tr.sweep_runs("syn")[0].info.run_id
    tr.set_tags(parent, {"interrupted": "SIGTERM at 2025-01-01 00:00:00"})  # as Session.mark_interrupted
    tr.finish(parent, "KILLED")
    out = tmp_path / "fx"
    args = ["--experiment", "syn", "--sweep", "syn", "--tracking-uri", uri, "--out", str(out)]

    def errors(r):
        return [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]

    refused = CliRunner().invoke(app, ["forensics", *args])
    assert refused.exit_code == 1 and "Traceback" not in refused.stderr, refused.stderr
    (line,) = errors(refused)
    assert "sweep 'syn' was interrupted (SIGTERM" in line and "--allow-incomplete" in line
    assert errors(CliRunner().invoke(app, ["export", *args])) == [line]  # the same words as export's
    assert not out.exists()
    allowed = CliRunner().invoke(app, ["forensics", *args, "--allow-incomplete"])
    assert allowed.exit_code == 0, allowed.stderr
    assert "warning: sweep 'syn' was interrupted" in allowed.stderr and not errors(allowed)
    assert "16 finished runs" in allowed.stdout and (out / "forensics_auc.md").exists()
