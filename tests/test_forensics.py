"""Divergence forensics on synthetic MLflow histories with a known answer (a real SQLite store, the
real Tracker, the real export path), one store per rule of issue 19: a warning counts only before
the crash, the time points read exist, splits and pairs go by (stabilizer, LR) group; the real
calibration sweep goes through forensics in tests/test_ablation_e2e.py."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from orchestrator.forensics import RunHistory, auc, bootstrap_groups, by_group, forensics, pooled_auc
from orchestrator.mlflow_store import Tracker
from workloads.trial import TrialConfig

STEPS, LEAD, SETTLE = 100, 20, 40


def write_store(tmp_path, runs, name="syn"):
    """``runs``: dicts with stabilizer, lr, seed, crashed, series ({metric: [(step, value)]}), and
    optionally steps and steps_run. Crashed runs end diverged (final loss 6 >= l_0 5), stable ones at
    2 (baseline 3)."""
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, name)
    parent = tr.sweep_run(name, {"name": name}, f"name: {name}\n")
    for i, r in enumerate(runs):
        steps = r.get("steps", STEPS)
        cfg = TrialConfig(steps=steps, lr=r["lr"], seed=r["seed"], depth=1, width=32, heads=2).to_dict()
        rid = tr.trial_run(name, parent, f"t{i}", f"lr={r['lr']:g} seed={r['seed']}",
                           {**cfg, "stabilizer": r["stabilizer"]}, replace=False)
        tr.log_metrics(rid, [Metric(k, v, 0, s) for k, vals in r["series"].items() for s, v in vals])
        tr.log_metrics(rid, [Metric("result/final_loss", 6.0 if r["crashed"] else 2.0, 0, steps),
                             Metric("result/initial_loss", 5.0, 0, steps), Metric("result/baseline_loss", 3.0, 0, steps)])
        tr.set_tags(rid, {"status": "diverged" if r["crashed"] else "stable", "steps_run": r.get("steps_run", steps)})
        tr.finish(rid)
    return uri


def make_store(tmp_path):
    """16 runs, one seed each, LR 1e-3..1.6e-2; the 8 largest LRs crash, their loss settled from
    step SETTLE on."""
    runs = []
    for i in range(16):
        crashed = i >= 8
        steps = list(range(0, STEPS, 5)) + [STEPS - 1]
        runs.append({"stabilizer": "none", "lr": 1e-3 * (i + 1), "seed": 0, "crashed": crashed, "series": {
            "loss": [(s, 6.0 if crashed and s >= SETTLE else 5.0 - 0.03 * s) for s in steps],
            # leads the loss by exactly LEAD steps in every crashed run; flat in stable runs
            "max_logit": [(s, 100.0 if crashed and s >= SETTLE - LEAD else 10.0) for s in steps],
            # the same in every run: no crashed run goes beyond what stable runs reach
            "spectral_conc/max": [(s, 0.5) for s in steps],
            # grows with the LR in stable runs: the test half's largest stable run exceeds the train half
            "grad_norm": [(s, 1.0 + i if not crashed else 100.0) for s in steps],
            # moves only after the crash: crosses 10 steps after the loss settled, in every crashed run
            "qk_sigma1/max": [(s, 50.0 if crashed and s >= SETTLE + 10 else 1.0) for s in steps],
            # a stable run's heads collapse to 0 nats: no entropy can be lower, no usable threshold
            "attn_entropy/min": [(s, 0.0 if i == 0 else 1.0 if not crashed else 0.5) for s in steps],
        }})
    return write_store(tmp_path, runs)


def test_known_answers(tmp_path):
    uri = make_store(tmp_path)
    fx, files = forensics(uri, "syn", "syn", tmp_path / "out", with_figures=True)
    assert len(fx.runs) == 16 and sum(r.crashed for r in fx.runs) == 8
    assert {r.split for r in fx.runs} == {"train", "test"} and sum(r.split == "test" for r in fx.runs) == 8
    aucs = {r["probe"]: r for r in fx.auc_rows}
    assert aucs["max_logit"]["auc@0.05"] == 0.5 and aucs["max_logit"]["auc@0.25"] == 1.0  # warned by step 20
    assert aucs["max_logit"]["steps@0.05"] == [5] and aucs["max_logit"]["steps@0.25"] == [25]
    assert aucs["spectral_conc/max"]["auc@0.25"] == 0.5
    assert aucs["learning rate"]["auc@0.05"] == 1.0  # here the crashed runs have the 8 largest LRs
    assert aucs["max_logit"]["within_group_pairs"] == 0  # one seed per group: no pair
    assert aucs["loss"]["auc@0.25"] == 0.5  # before step 40 the loss is the same in every run
    warn = {r["probe"]: r for r in fx.warning_rows}
    assert warn["max_logit"]["test_crashed_warned"] == "4/4" and warn["max_logit"]["test_false_alarms"] == "0/4"
    assert warn["max_logit"]["test_crashed_late"] == "0/4"
    assert warn["max_logit"]["lead_steps_median"] == LEAD == warn["max_logit"]["lead_steps_min"] == warn["max_logit"]["lead_steps_max"]
    assert warn["max_logit"]["lead_fraction_median"] == pytest.approx(LEAD / STEPS)
    # no crashed train run goes beyond the stable runs: "none", not a number one ulp above 0.5
    assert warn["spectral_conc/max"]["threshold"] is None and warn["spectral_conc/max"]["test_crashed_warned"] == "0/4"
    assert warn["spectral_conc/max"]["lead_steps_median"] is None
    assert warn["grad_norm"]["test_false_alarms"] == "1/4"  # warns on a stable held-out run
    # a probe that moves only after the crash warns of nothing: every crossing is late
    assert warn["qk_sigma1/max"]["threshold"] is not None
    assert warn["qk_sigma1/max"]["test_crashed_warned"] == "0/4" and warn["qk_sigma1/max"]["test_crashed_late"] == "4/4"
    assert warn["qk_sigma1/max"]["lead_steps_median"] is None
    # the loss crosses at the crash step itself: late, not a warning with lead 0
    assert warn["loss"]["test_crashed_warned"] == "0/4" and warn["loss"]["test_crashed_late"] == "4/4"
    # a stable train run at 0 nats: the threshold would be -5e-324 nats; the table says none
    assert warn["attn_entropy/min"]["threshold"] is None and warn["attn_entropy/min"]["test_crashed_warned"] == "0/4"
    md = (tmp_path / "out" / "forensics_warnings.md").read_text()
    assert "| gpt | attn_entropy/min | none | 0/4" in md and "e-324" not in md
    assert "| gpt | qk_sigma1/max | 1 | 0/4 [0.00, 0.00] | 4/4 |" in md
    names = {f.name for f in files}
    assert {"forensics_auc.md", "forensics_auc.tex", "forensics_auc.parquet", "forensics_warnings.md",
            "forensics_auc.png", "forensics_auc.pdf"} <= names
    assert len([f for f in files if f.parent.name == "forensics_runs"]) == 8
    table = pq.read_table(tmp_path / "out" / "forensics_warnings.parquet").to_pylist()
    assert {r["probe"] for r in table} == {"learning rate", "loss", "max_logit", "spectral_conc/max", "grad_norm",
                                          "qk_sigma1/max", "attn_entropy/min"}
    md = (tmp_path / "out" / "forensics_auc.md").read_text()
    assert "| gpt | max_logit | high |" in md and "crash = diverged" in md
    assert "AUC at 5% (step 5) [95% CI]" in md
    # logged to the sweep's parent run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = Tracker(uri, "syn").sweep_runs("syn")[0].info.run_id
    assert "forensics/forensics_auc.md" in [a.path for a in client.list_artifacts(parent, "forensics")]


def test_replicates_stay_on_one_side_and_pairs_stay_within_a_stabilizer_and_lr(tmp_path):
    """2 stabilizers x 4 LRs x 3 seeds. At each LR, within each stabilizer, the probe ranks the
    crashed seed above the stable ones; across stabilizers it ranks every qk_norm run above every
    `none` run, crashed or not. Pairs that mixed stabilizers at one LR would score 0.5 (4 of 8 pairs
    won); pairs within a group score 1."""
    runs = []
    steps = list(range(0, STEPS, 5)) + [STEPS - 1]
    for stab, offset in (("none", 0.0), ("qk_norm", 100.0)):
        for lr in (1e-3, 1e-2, 1e-1, 1.0):
            for seed in range(3):
                crashed = seed == 0
                runs.append({"stabilizer": stab, "lr": lr, "seed": seed, "crashed": crashed, "series": {
                    "loss": [(s, 6.0 if crashed and s >= SETTLE else 4.0) for s in steps],
                    "max_logit": [(s, offset + (10.0 if crashed else 1.0 + seed)) for s in steps]}})
    uri = write_store(tmp_path, runs)
    fx, _ = forensics(uri, "syn", "syn", tmp_path / "out", log_to_mlflow=False)
    sides: dict = {}
    for r in fx.runs:
        sides.setdefault(r.group, set()).add(r.split)
    assert len(sides) == 8 and all(len(s) == 1 for s in sides.values())  # no replicate crosses the split
    assert sorted(s.pop() for s in sides.values()) == ["test"] * 4 + ["train"] * 4
    row = {r["probe"]: r for r in fx.auc_rows}["max_logit"]
    assert row["within_group_pairs"] == 16 and row["groups_with_pairs"] == 8  # 8 groups x 1 crashed x 2 stable
    assert row["auc_within_group"] == 1.0 and row["ci_within_group"] == "[1.00, 1.00]"
    # pooled over groups the stabilizer's offset dominates: 8 crashed vs 16 stable runs
    pooled = auc([10.0] * 4 + [110.0] * 4, [2.0, 3.0] * 4 + [102.0, 103.0] * 4)
    assert row["auc@0.1"] == pytest.approx(pooled) and pooled == pytest.approx(0.75)
    assert row["groups"] == 8 and row["crashed_runs"] == 8 and row["stable_runs"] == 16
    warn = {r["probe"]: r for r in fx.warning_rows}["max_logit"]
    assert warn["train_test_groups"] == "4 / 4"


def test_bootstrap_resamples_groups_not_runs():
    """Five groups alike: in each, the crashed seed scores 2 and the stable seeds 1 and 3. Every
    resample of whole groups has AUC 0.5, so the interval is [0.5, 0.5]; resampling runs instead
    would draw unequal numbers of 1s and 3s and give a wide interval."""
    def run(group, seed, crashed, v):
        return RunHistory(f"{group}-{seed}", "", "gpt", "none", float(group), seed, 100,
                          "diverged" if crashed else "stable", crashed, 5.0, 3.0, {"max_logit": [(0, 0.0), (10, v)]})
    groups = by_group([run(g, s, s == 0, (2.0, 1.0, 3.0)[s]) for g in range(5) for s in range(3)])
    assert [len(g) for g in groups] == [3] * 5
    assert pooled_auc(groups, "max_logit", 0.1) == 0.5
    assert bootstrap_groups(groups, lambda gs: pooled_auc(gs, "max_logit", 0.1)) == (0.5, 0.5)
    runs = [[r] for g in groups for r in g]  # the same runs, each its own "group"
    lo, hi = bootstrap_groups(runs, lambda gs: pooled_auc(gs, "max_logit", 0.1))
    assert lo < 0.3 and hi > 0.7


def test_a_probe_spacing_that_misses_5_percent_reads_the_next_probe_step(tmp_path):
    """Probes every 20 of 200 steps: 5 % is step 10, which no run recorded. Step 0 (the same value in
    every run: before training) would give 0.5; the first probe step at or after 5 % is step 20,
    where the probe separates the classes, and the header says so. A run stopped on a non-finite
    loss at step 8 has no step at or after 10: it scores as the most dangerous value (it has crashed
    by then)."""
    steps = list(range(0, 200, 20)) + [199]
    runs = []
    for i in range(8):
        crashed = i >= 4
        series = {"loss": [(s, 9.0 if crashed and s >= 100 else 4.0) for s in steps],
                  "grad_norm": [(s, 1.0 if s == 0 else (5.0 if crashed else 2.0)) for s in steps]}
        runs.append({"stabilizer": "none", "lr": 0.1, "seed": i, "crashed": crashed, "steps": 200, "series": series})
    # stopped at step 8 on a non-finite loss, with lower probe values than every other run so far
    runs.append({"stabilizer": "none", "lr": 0.1, "seed": 8, "crashed": True, "steps": 200, "steps_run": 9,
                 "series": {"loss": [(0, 4.0), (8, math.nan)], "grad_norm": [(0, 0.5), (8, 0.5)]}})
    uri = write_store(tmp_path, runs)
    fx, _ = forensics(uri, "syn", "syn", tmp_path / "out", log_to_mlflow=False)
    row = {r["probe"]: r for r in fx.auc_rows}["grad_norm"]
    assert row["steps@0.05"] == [20] and row["steps@0.1"] == [20] and row["steps@0.25"] == [60]
    assert row["auc@0.05"] == 1.0  # step 20 separates; the stopped run counts as the highest score
    md = (tmp_path / "out" / "forensics_auc.md").read_text()
    assert "AUC at 5% (step 20) [95% CI]" in md and "AUC at 25% (step 60) [95% CI]" in md
    assert "of 200 steps" in md


def test_auc_matches_sklearn():
    rng = np.random.default_rng(1)
    pos, neg = list(rng.normal(1, 1, 30)), list(rng.normal(0, 1, 40)) + [1.0, 1.0]
    pos += [1.0]  # a tie
    want = roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)
    assert auc(pos, neg) == pytest.approx(want, abs=1e-12)
    assert auc([], neg) is None


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
