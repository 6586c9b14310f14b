"""Divergence forensics on synthetic MLflow histories with a known answer (a real SQLite store, the
real Tracker, the real export path), one store per rule of issue 19: a warning counts only before
the crash, the time points read exist, splits and pairs go by (stabilizer, LR) group; the real
calibration sweep goes through forensics in tests/test_ablation_e2e.py."""

import dataclasses
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
    optionally steps, steps_run, config (other TrialConfig fields), results (result/* metrics) and
    status. By default crashed runs end diverged (final loss 6 >= l_0 5), stable ones at 2
    (baseline 3)."""
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, name)
    parent = tr.sweep_run(name, {"name": name}, f"name: {name}\n")
    for i, r in enumerate(runs):
        steps = r.get("steps", STEPS)
        cfg = TrialConfig(steps=steps, lr=r["lr"], seed=r["seed"], depth=1, width=32, heads=2,
                          **r.get("config", {})).to_dict()
        rid = tr.trial_run(name, parent, f"t{i}", f"lr={r['lr']:g} seed={r['seed']}",
                           {**cfg, "stabilizer": r["stabilizer"]}, replace=False)
        tr.log_metrics(rid, [Metric(k, v, 0, s) for k, vals in r["series"].items() for s, v in vals])
        results = {"final_loss": 6.0 if r["crashed"] else 2.0, "initial_loss": 5.0, "baseline_loss": 3.0,
                   **r.get("results", {})}
        tr.log_metrics(rid, [Metric(f"result/{k}", v, 0, steps) for k, v in results.items()])
        status = r.get("status", "diverged" if r["crashed"] else "stable")
        tr.set_tags(rid, {"status": status, "steps_run": r.get("steps_run", steps)})
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
    loss at step 8 has no step at or after 10: it has crashed by then, so it is not scored (no
    prediction left to make) but counted apart."""
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
    assert row["auc@0.05"] == 1.0  # step 20 separates the 4 crashed from the 4 stable runs
    assert row["ended_by@0.05"] == 1 and row["crashed_by@0.05"] == 0  # the stopped run, apart
    assert row["crashed_by@0.25"] == 0  # the others' loss settles at step 100, after step 60
    md = (tmp_path / "out" / "forensics_auc.md").read_text()
    assert "AUC at 5% (step 20) [95% CI]" in md and "AUC at 25% (step 60) [95% CI]" in md
    assert "of 200 steps" in md
    assert "| 5 / 4 | 0 + 1 / 0 + 1 / 0 + 1 |" in md  # crashed / stable; not scored: 0 crashed + 1 ended


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


def test_runs_that_differ_in_warmup_are_never_replicates(tmp_path):
    """none x warmup {0, 50} x LR {0.01, 0.1} x 3 seeds. Every warmup-0 run crashes with a high max
    logit, every warmup-50 run is stable with a low one, except seed 0 of (warmup 50, LR 0.1), which
    crashes with the lowest max logit of its group. Grouped by (stabilizer, LR) alone, the seeds of
    one group would mix warmups, and the warmup effect would win 15 of its 17 pairs (within-group
    AUC 0.88); grouped by every axis but the seed, the one group with both classes is (warmup 50,
    LR 0.1), whose 2 pairs the probe loses: 0.0."""
    steps = list(range(0, STEPS, 5)) + [STEPS - 1]
    runs = []
    for warmup in (0, 50):
        for lr in (0.01, 0.1):
            for seed in range(3):
                crashed = warmup == 0 or (lr == 0.1 and seed == 0)
                logit = 100.0 + seed if warmup == 0 else 0.5 if crashed else 1.0 + seed
                runs.append({"stabilizer": "none", "lr": lr, "seed": seed, "crashed": crashed,
                             "config": {"warmup_steps": warmup}, "series": {
                                 "loss": [(s, 6.0 if crashed and s >= SETTLE else 4.0) for s in steps],
                                 "max_logit": [(s, logit) for s in steps]}})
    uri = write_store(tmp_path, runs)
    fx, _ = forensics(uri, "syn", "syn", tmp_path / "out", log_to_mlflow=False)
    warmups: dict = {}
    sides: dict = {}
    for r in fx.runs:
        warmups.setdefault(r.group, set()).add(r.axes["warmup_steps"])
        sides.setdefault(r.group, set()).add(r.split)
    assert len(warmups) == 4 and all(len(w) == 1 for w in warmups.values())  # no group mixes two warmups
    assert all(len(s) == 1 for s in sides.values())
    assert sorted(s.pop() for s in sides.values()) == ["test"] * 2 + ["train"] * 2
    row = {r["probe"]: r for r in fx.auc_rows}["max_logit"]
    assert row["groups"] == 4 and row["within_group_pairs"] == 2 and row["groups_with_pairs"] == 1
    assert row["auc_within_group"] == 0.0
    # what the old (workload, stabilizer, LR) groups would have given: the warmup effect
    by_lr: dict = {}
    for r in fx.runs:
        by_lr.setdefault(r.lr, []).append(r)
    from orchestrator.forensics import auc_within_group
    assert auc_within_group(list(by_lr.values()), "max_logit", 0.1) == (pytest.approx(15 / 17), 17)


PROBE_STEPS = list(range(0, STEPS, 10)) + [STEPS - 1]


def _flat(value, steps=PROBE_STEPS):
    return [(s, value) for s in steps]


def crash_step_runs():
    """One stabilizer, a distinct LR per run, so the groups alternate train, test in LR order. Stable
    runs end at 2 (gain 1 over the baseline 3 of their eval windows, standard error 0.01: the
    collapse margin is a tenth of the cell's reference gain, S1's at its lowest LR, 0.1). Test runs:
    A diverged, its loss reaching l_0 (5) at step 40, back below at 50, above from 60 on; B stopped at step 30 on a NaN loss; C
    collapsed (final gain 0.05), its training batches' baselines 3 +- 0.2 by turns and its loss
    0.05 below each from step 50 on; D collapsed, recorded before loss_baseline existed, its loss
    2.97 (gain 0.03 over its eval windows' 3) from step 70 on; E diverged by its final validation
    loss only, its training loss never above 4; S6 stable. Train: S1-S5 stable, F diverged from step
    50 on. max_logit goes to 100 at a step per run (else 10)."""
    stable = {"results": {"eval_baseline": 3.0, "final_loss_se": 0.01}}
    base = [(s, 3.0 + (0.2 if i % 2 else -0.2)) for i, s in enumerate(PROBE_STEPS)]
    runs = {
        "S1": {**stable, "crashed": False, "loss": _flat(2.5), "logit_from": None},
        "A": {"crashed": True, "loss": [(s, 5.5 if s in (40,) or s >= 60 else 4.0) for s in PROBE_STEPS],
              "logit_from": 30},
        "S2": {**stable, "crashed": False, "loss": _flat(2.5), "logit_from": None},
        "B": {"crashed": True, "loss": [(0, 4.5), (10, 4.0), (20, 4.0), (30, math.nan)], "logit_from": 10,
              "steps_run": 31},
        "S3": {**stable, "crashed": False, "loss": _flat(2.5), "logit_from": None},
        "C": {"crashed": True, "status": "stable", "loss": [(s, b - (1.0 if s < 50 else 0.05)) for s, b in base],
              "loss_baseline": base, "logit_from": 20,
              "results": {"final_loss": 2.95, "eval_baseline": 3.0, "final_loss_se": 0.01}},
        "S4": {**stable, "crashed": False, "loss": _flat(2.5), "logit_from": None},
        "D": {"crashed": True, "status": "stable", "loss": [(s, 2.0 if s < 70 else 2.97) for s in PROBE_STEPS],
              "logit_from": 80, "results": {"final_loss": 2.95}},
        "S5": {**stable, "crashed": False, "loss": _flat(2.5), "logit_from": None},
        "E": {"crashed": True, "loss": _flat(4.0), "logit_from": 20},
        "F": {"crashed": True, "loss": [(s, 6.0 if s >= 50 else 4.0) for s in PROBE_STEPS], "logit_from": 20},
        "S6": {**stable, "crashed": False, "loss": _flat(2.5), "logit_from": None},
    }
    out = []
    for i, (name, r) in enumerate(runs.items()):
        steps = [s for s, _ in r["loss"]]
        series = {"loss": r["loss"], "max_logit": [(s, 100.0 if r["logit_from"] is not None and s >= r["logit_from"]
                                                   else 10.0) for s in steps]}
        if "loss_baseline" in r:
            series["loss_baseline"] = r["loss_baseline"]
        out.append({"stabilizer": "none", "lr": 1e-3 * (i + 1), "seed": 0, "crashed": r["crashed"], "series": series,
                    **{k: r[k] for k in ("status", "results", "steps_run") if k in r}, "name": name})
    return out


def test_every_crash_step_comes_from_the_runs_own_trace_by_its_class(tmp_path):
    runs = crash_step_runs()
    uri = write_store(tmp_path, runs)
    fx, files = forensics(uri, "syn", "syn", tmp_path / "out", log_to_mlflow=False, with_figures=True)
    by = {r.lr: r for r in fx.runs}
    named = {r["name"]: by[r["lr"]] for r in runs}
    assert [named[n].outcome for n in "ABCDEF"] == ["diverged", "diverged", "collapsed", "collapsed", "diverged",
                                                    "diverged"]
    assert [named[n].split for n in ("S1", "A", "S2", "B", "S3", "C", "S4", "D", "S5", "E", "F", "S6")] == \
        ["train", "test"] * 6
    assert named["C"].collapse_margin == pytest.approx(0.1) and named["D"].collapse_margin == pytest.approx(0.1)
    # diverged: at or above l_0 from step 60 on (step 40 touched it and came back); NaN at step 30
    assert named["A"].crash_step() == 60 and named["B"].crash_step() == 30 and named["F"].crash_step() == 50
    # collapsed: its gain over each batch's own baseline is 0.05 from step 50 on, within the margin
    assert named["C"].crash_step() == 50
    # against one fixed baseline the batches' +-0.2 would decide instead: the gain 0.25 at odd steps
    unpaired = dataclasses.replace(named["C"], series={k: v for k, v in named["C"].series.items()
                                                       if k != "loss_baseline"}, scores={})
    assert unpaired.crash_step() != 50
    # recorded without loss_baseline: its eval windows' baseline at every step
    assert named["D"].crash_step() == 70
    # E's training loss never settles at l_0: its class came from its end; no crash step, counted apart
    assert named["E"].crash_step() is None and named["E"].end_only and not named["A"].end_only
    assert all(r.crash_step() is None and not r.end_only for r in fx.runs if not r.crashed)
    warn = {r["probe"]: r for r in fx.warning_rows}["max_logit"]
    # test crashed with a crash step: A (warned 30 ahead), B (20), C (30), D (late: 80 >= 70); E apart
    assert warn["test_crashed_warned"] == "3/4" and warn["test_crashed_late"] == "1/4"
    assert warn["test_crashed_no_crash_step"] == 1
    assert (warn["lead_steps_median"], warn["lead_steps_min"], warn["lead_steps_max"]) == (30, 20, 30)
    md = (tmp_path / "out" / "forensics_warnings.md").read_text()
    assert "| gpt | max_logit | 10 | 3/4 " in md and "| 1/4 | 1 | 0/1 " in md and "no crash step" in md
    assert len([f for f in files if f.parent.name == "forensics_runs"]) == 6  # E drawn too, without a crash line


def test_collapse_margin_is_the_margin_the_class_was_decided_with(tmp_path):
    """Random cells of finished runs: a run that is not diverged is collapsed exactly when its gain
    over its eval windows' baseline is at most ``collapse_margin`` (the column forensics reads)."""
    import pyarrow as pa

    from orchestrator.runs import SCHEMA, run_point, with_outcomes

    rng = np.random.default_rng(3)
    rows = []
    for stab in ("none", "qk_norm", "weyl"):
        best = rng.uniform(0.3, 1.5)
        for i in range(12):
            gain = best * rng.uniform(-0.2, 1.0) if i else best
            se = float(rng.uniform(0.0, 0.08)) if i % 5 else None
            rows.append({"status": "stable", "stabilizer": stab, "lr": 1e-3 * (i + 1), "seed": 0, "workload": "gpt",
                         "initial_loss": 5.0, "baseline_loss": 3.3, "eval_baseline": 3.2, "final_loss_se": se,
                         "final_loss": 3.2 - gain})
    table = with_outcomes(pa.Table.from_pylist(rows, schema=SCHEMA))
    checked = {"collapsed": 0, "other": 0}
    for r in table.to_pylist():
        gain = run_point(r).gain
        assert r["collapse_margin"] >= 0
        if r["outcome"] != "diverged":
            assert (r["outcome"] == "collapsed") == (gain <= r["collapse_margin"]), r
            checked["collapsed" if r["outcome"] == "collapsed" else "other"] += 1
    assert checked["collapsed"] >= 3 and checked["other"] >= 10


def test_warning_intervals_choose_the_threshold_again_in_every_resample(tmp_path):
    """16 groups of one run, train and test by turns. Train: 6 stable runs with max logit 1, one
    stable outlier at 20 and one crashed run at 50. Test: 6 crashed runs at 10 from step 10 (crash
    step 40) and 2 stable at 5. On the whole train half the threshold is just above 20: no test run
    crosses it (0/6 warned, 0/2 false alarms), and a bootstrap over the test groups with that
    threshold held fixed says [0, 0]. Resampled train halves that miss the outlier but hold the
    crashed run (a quarter of them) put the threshold just above 1: every test run crosses."""
    train = [1.0] * 6 + [20.0, "crash"]
    test = ["crash"] * 6 + [5.0, 5.0]
    runs = []
    for i in range(16):
        kind = (train if i % 2 == 0 else test)[i // 2]
        crashed = kind == "crash"
        logit = (50.0 if i % 2 == 0 else 10.0) if crashed else kind
        runs.append({"stabilizer": "none", "lr": 1e-3 * (i + 1), "seed": 0, "crashed": crashed, "series": {
            "loss": [(s, 6.0 if crashed and s >= 40 else 4.0) for s in PROBE_STEPS],
            "max_logit": [(s, logit if s >= 10 else 1.0) for s in PROBE_STEPS]}})
    uri = write_store(tmp_path, runs)
    fx, _ = forensics(uri, "syn", "syn", tmp_path / "out", log_to_mlflow=False)
    warn = {r["probe"]: r for r in fx.warning_rows}["max_logit"]
    assert warn["threshold"] == pytest.approx(20.0) and warn["train_test_groups"] == "8 / 8"
    assert warn["test_crashed_warned"] == "0/6" and warn["test_false_alarms"] == "0/2"
    assert warn["ci_warned"] == "[0.00, 1.00]" and warn["ci_false_alarms"] == "[0.00, 1.00]"
    # the interval the threshold held fixed would give
    from orchestrator.forensics import first_crossing, threshold
    groups = by_group(fx.runs)
    thr = threshold([r for r in fx.runs if r.split == "train"], "max_logit")
    test_groups = [g for g in groups if g[0].split == "test"]
    fixed = bootstrap_groups(test_groups, lambda gs: np.mean([first_crossing(r, "max_logit", thr) is not None
                                                              for g in gs for r in g if r.crashed]))
    assert fixed == (0.0, 0.0)


def test_runs_already_crashed_at_a_fraction_are_not_scored_there_and_the_auc_is_sklearns(tmp_path):
    """30 runs, probes every 5 of 100 steps, grad_norm random (with ties). 6 crashed runs are at l_0
    from step 5 on (crash step 5), 8 from step 60 on, 16 are stable. At 5 % and 10 % (steps 5, 10)
    the 6 early crashes are visible already: not scored, counted apart, and the AUC is sklearn's over
    the other 24 runs; at 25 % too. The LR's row scores the same runs."""
    rng = np.random.default_rng(7)
    steps = list(range(0, STEPS, 5)) + [STEPS - 1]
    kinds = ["early"] * 6 + ["late"] * 8 + ["stable"] * 16
    runs = []
    for i, kind in enumerate(kinds):
        settle = {"early": 5, "late": 60}.get(kind)
        runs.append({"stabilizer": "none", "lr": float(rng.choice([0.01, 0.1, 1.0])), "seed": i,
                     "crashed": kind != "stable", "series": {
                         "loss": [(s, 6.0 if settle is not None and s >= settle else 4.0) for s in steps],
                         "grad_norm": [(s, float(rng.integers(0, 6))) for s in steps]}})
    uri = write_store(tmp_path, runs)
    fx, _ = forensics(uri, "syn", "syn", tmp_path / "out", log_to_mlflow=False)
    rows = {r["probe"]: r for r in fx.auc_rows}
    early = {r.run_id for r in fx.runs if r.crash_step() == 5}
    assert len(early) == 6 and sorted({r.crash_step() for r in fx.runs if r.crashed}) == [5, 60]
    for m in ("grad_norm", "learning rate"):
        for f, step in ((0.05, 5), (0.1, 10), (0.25, 25)):
            assert rows[m][f"crashed_by@{f:g}"] == 6 and rows[m][f"ended_by@{f:g}"] == 0
            scored = [r for r in fx.runs if r.run_id not in early]
            value = (lambda r: r.lr) if m == "learning rate" else (lambda r, step=step: r.value_at(m, step))
            want = roc_auc_score([r.crashed for r in scored], [value(r) for r in scored])
            assert rows[m][f"auc@{f:g}"] == pytest.approx(want, abs=1e-12), (m, f)
    md = (tmp_path / "out" / "forensics_auc.md").read_text()
    assert "not scored at 5% / 10% / 25%: crashed already (+ ended)" in md and "| 14 / 16 | 6 / 6 / 6 |" in md


def test_infinities_stored_as_max_float_read_back_as_infinities(tmp_path):
    """MLflow's SQL stores keep +-inf as +-1.8e308, through ablate's batched writer and through
    MLflow's own log_batch alike; histories read them back as +-inf. A crashed train run whose max
    logit went beyond the stable runs' only by overflowing to inf reached no finite value above
    them: the threshold is "none" (read as 1.8e308, it was a number that made a usable threshold)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    steps = list(range(0, STEPS, 10))
    runs = []
    for i in range(6):
        crashed = i % 2 == 1
        logit = [(s, (math.inf if s >= 50 else 1.0) if crashed else 5.0 + i) for s in steps]
        runs.append({"stabilizer": "none", "lr": 1e-3 * (i + 1), "seed": 0, "crashed": crashed, "series": {
            "loss": [(s, 6.0 if crashed and s >= 60 else 4.0) for s in steps], "max_logit": logit,
            "attn_entropy/min": [(s, -math.inf if crashed and s >= 50 else 1.0) for s in steps]}})
    uri = write_store(tmp_path, runs)
    tr = Tracker(uri, "syn")
    rid = tr.trial_runs("syn")[0].info.run_id
    MlflowClient(uri).log_batch(rid, metrics=[Metric("probe_x", math.inf, 0, 1), Metric("probe_x", -math.inf, 0, 2),
                                              Metric("probe_x", 2.5, 0, 3)])
    assert [m.value for m in tr.metric_history(rid, "probe_x")] == [math.inf, -math.inf, 2.5]
    raw = MlflowClient(uri).get_metric_history(rid, "probe_x")
    assert raw[0].value == 1.7976931348623157e308  # what the store holds
    fx, _ = forensics(uri, "syn", "syn", tmp_path / "out", log_to_mlflow=False)
    crashed = [r for r in fx.runs if r.crashed]
    assert all(r.value_at("max_logit", 50) == math.inf and r.value_at("attn_entropy/min", 50) == -math.inf
               for r in crashed)
    warn = {r["probe"]: r for r in fx.warning_rows}
    assert warn["max_logit"]["threshold"] is None and warn["attn_entropy/min"]["threshold"] is None
