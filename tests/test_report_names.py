"""`ablate report` on a sweep that varies warmup and depth (as gpt_warmup_ablation.yaml does): every
figure's file name carries every axis that varies, so no figure is written over another; the
comparison tables put warmup side by side, one table per depth. Synthetic runs recorded through
the real Tracker into a real MLflow SQLite store, read back by the real report."""

from collections import Counter

import pytest

from orchestrator.mlflow_store import Tracker
from orchestrator.report import report
from workloads.trial import TrialConfig

STEPS = 40
STABS, WARMUPS, DEPTHS, LRS = ("none", "qk_norm"), (0, 50), (1, 2), (1e-2, 1.0)


def record(tr, parent, i, stab, warmup, depth, lr, crashed):
    from mlflow.entities import Metric

    cfg = TrialConfig(steps=STEPS, lr=lr, depth=depth, width=16, heads=2, warmup_steps=warmup,
                      stabilizers=() if stab == "none" else (stab,)).to_dict()
    rid = tr.trial_run("syn", parent, f"t{i}", f"{stab} w{warmup} d{depth} lr={lr:g}", {**cfg, "stabilizer": stab},
                       replace=False)
    steps = list(range(0, STEPS, 5)) + [STEPS - 1]
    series = {"loss": [(s, 6.0 if crashed and s >= 20 else 5.0 - 0.05 * s) for s in steps],
              "max_logit": [(s, 100.0 if crashed and s >= 10 else 10.0) for s in steps]}
    tr.log_metrics(rid, [Metric(k, v, 0, s) for k, vals in series.items() for s, v in vals])
    final = 6.0 + 0.01 * i if crashed else 2.0 + 0.01 * i
    tr.log_metrics(rid, [Metric("result/final_loss", final, 0, STEPS), Metric("result/initial_loss", 5.0, 0, STEPS),
                         Metric("result/baseline_loss", 3.0, 0, STEPS), Metric("result/best_loss", final, 0, STEPS)])
    tr.set_tags(rid, {"status": "diverged" if crashed else "stable", "steps_run": STEPS})
    tr.finish(rid)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """stabilizer x warmup x depth x LR, one seed; every run at lr 1 diverged, and one of them
    recorded twice (a trial run again after a driver was killed): 9 crashed runs."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    tr = Tracker(uri, "syn")
    parent = tr.sweep_run("syn", {"name": "syn"}, "name: syn\n")
    i = 0
    for stab in STABS:
        for warmup in WARMUPS:
            for depth in DEPTHS:
                for lr in LRS:
                    record(tr, parent, i, stab, warmup, depth, lr, crashed=lr == 1.0)
                    i += 1
    record(tr, parent, i, "none", 50, 2, 1.0, crashed=True)  # the same trial, recorded twice
    tr.finish(parent)
    return uri


@pytest.mark.slow
def test_no_figure_is_written_twice_and_names_carry_warmup_and_depth(store, tmp_path):
    out = tmp_path / "rep"
    files = report(store, "syn", "syn", out, log_to_mlflow=False)
    dup = [f for f, n in Counter(files).items() if n > 1]
    assert not dup, dup
    on_disk = sorted(p for p in out.rglob("*") if p.suffix in (".png", ".pdf"))
    assert on_disk == sorted(files)  # every figure named is there, and nothing else was drawn
    per_run = sorted(p.name for p in (out / "forensics_runs").iterdir())
    assert len(per_run) == 9  # one per crashed run: 8 configs, one of them recorded twice
    assert "gpt_none_depth2_warmup50_lr1_seed0.png" in per_run and "gpt_qk_norm_depth1_warmup0_lr1_seed0.png" in per_run
    twice = [n for n in per_run if n.startswith("gpt_none_depth2_warmup50_lr1_seed0")]
    assert len(twice) == 2  # the second recording got its run id appended
    for w in WARMUPS:
        for d in DEPTHS:
            assert sum(f"_depth{d}_warmup{w}_" in n for n in per_run) == (3 if (w, d) == (50, 2) else 2)
    # loss vs LR: one figure per depth, both warmups on its axes
    assert {f.name for f in files if f.name.startswith("loss_vs_lr")} == {
        f"loss_vs_lr_depth{d}.{ext}" for d in DEPTHS for ext in ("png", "pdf")}


@pytest.mark.slow
def test_comparison_tables_put_warmups_side_by_side_per_depth(store, tmp_path):
    from orchestrator.report import export

    res = export(store, "syn", "syn", tmp_path / "exp", log_to_mlflow=False)
    names = {f.name for f in res.files}
    for d in DEPTHS:
        assert {f"best_loss_by_warmup_depth{d}.md", f"lr_sensitivity_by_warmup_depth{d}.md"} <= names
    md = (tmp_path / "exp" / "best_loss_by_warmup_depth2.md").read_text()
    assert "| stabilizer | warmup 0 | warmup 50 |" in md and "depth 2" in md.splitlines()[0]
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in md.splitlines() if ln.startswith("| none") or
            ln.startswith("| qk_norm")}
    assert set(rows) == {"none", "qk_norm"}
    # none, depth 2, lr 0.01: warmup 0 is run 2 (final 2.02), warmup 50 run 6 (2.06); 1 of 2 runs learned,
    # and warmup 50 has the lr-1 run recorded twice: 1 of 3
    assert rows["none"] == "| none | 2.02 at 0.01 (1/2) | 2.06 at 0.01 (1/3) |"
