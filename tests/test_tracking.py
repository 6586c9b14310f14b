"""MLflow records as a user meets them: the experiment's kind, honest non-finite results.
Real MLflow (SQLite in a temp dir); no Ray cluster (the Tune callback is driven by hand)."""

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from orchestrator.mlflow_store import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND, Tracker, json_dumps_finite
from orchestrator.recorder import TrialRecorder
from orchestrator.runs import fetch_runs, runs_table


def test_experiments_are_tagged_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert TAG_EXPERIMENT_KIND == "mlflow.experimentKind" and EXPERIMENT_KIND == "custom_model_development"
    tr = Tracker(uri, "fresh")
    assert client.get_experiment(tr.experiment_id).tags[TAG_EXPERIMENT_KIND] == "custom_model_development"
    assert tr.experiment_url() == f"http://127.0.0.1:5000/#/experiments/{tr.experiment_id}?workflowType=machine_learning"
    # an experiment made before ablate tagged them gets the tag; a kind someone chose is kept
    old = client.create_experiment("older")
    chosen = client.create_experiment("chosen", tags={TAG_EXPERIMENT_KIND: "genai_development"})
    Tracker(uri, "older")
    Tracker(uri, "chosen")
    assert client.get_experiment(old).tags[TAG_EXPERIMENT_KIND] == "custom_model_development"
    assert client.get_experiment(chosen).tags[TAG_EXPERIMENT_KIND] == "genai_development"


def _finish(tmp_path, summaries: dict[str, dict]):
    """Record finished trials through the recorder the Tune callback drives. The recorder prefers
    $ABLATE_TRACKING_URI, which an earlier sweep in this process may have left set: the caller
    removes it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, "exp")
    parent = tr.sweep_run("sw", {"name": "sw"}, "name: sw\n")
    rec = TrialRecorder(uri, "exp", "sw", parent)
    for tid, summary in summaries.items():
        cfg = {"workload": "gpt", "lr": 0.1, "stabilizers": ["none"], "stabilizer": "none"}
        rec.start(tid, tid, cfg)
        rec.finish(tid, summary)
    return uri, tr


def test_nonfinite_results_are_tags_not_max_float_metrics_and_json_is_standard(tmp_path, monkeypatch):
    monkeypatch.delenv("ABLATE_TRACKING_URI", raising=False)
    base = {"initial_loss": 5.5, "final_train_loss": 2.1, "steps_run": 40, "wall_time": 3.0, "throughput": 900.0,
            "device": "cpu", "num_params": 10, "ended_at": 1.7e9, "events": []}
    ev = {"kind": "nonfinite", "step": 3, "value": "nan"}
    uri, tr = _finish(tmp_path, {
        "ok": {**base, "final_loss": 2.0, "best_loss": 1.9, "diverged": False, "first_event": None},
        "inf": {**base, "final_loss": math.inf, "best_loss": 4.0, "diverged": True, "first_event": ev,
                "new_field": -math.inf},
        "nan": {**base, "final_loss": math.nan, "best_loss": math.nan, "diverged": True, "first_event": ev},
    })
    client = MlflowClient(uri)
    runs = {r.data.tags["ablate.trial_id"]: r for r in tr.trial_runs("sw")}
    ok, inf, nan = runs["ok"].data, runs["inf"].data, runs["nan"].data
    assert ok.metrics["result/final_loss"] == 2.0 and "result/final_loss" not in ok.tags
    assert "result/ended_at" not in ok.metrics and ok.metrics["result/throughput"] == 900.0
    # no metric for a value that does not exist; the tag says what it was
    assert "result/final_loss" not in inf.metrics and inf.tags["result/final_loss"] == "inf"
    assert "result/new_field" not in inf.metrics and inf.tags["result/new_field"] == "-inf"
    assert inf.metrics["result/best_loss"] == 4.0 and inf.metrics["result/initial_loss"] == 5.5
    assert nan.tags["result/final_loss"] == "nan" and nan.tags["result/best_loss"] == "nan"
    for data in (ok, inf, nan):
        assert all(math.isfinite(v) and abs(v) < 1e300 for v in data.metrics.values())
    # result.json: standard JSON (no Infinity / NaN tokens), non-finite floats as strings
    for tid, want in (("inf", "inf"), ("nan", "nan")):
        text = Path(client.download_artifacts(runs[tid].info.run_id, "result.json", str(tmp_path / tid))).read_text()
        assert "Infinity" not in text and "NaN" not in text
        doc = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        assert doc["final_loss"] == want and float(doc["final_loss"]) != 2.0
    assert json_dumps_finite({"a": [math.inf, 1.0]}) == '{\n "a": [\n  "inf",\n  1.0\n ]\n}'
    # export reads them back: +inf for a non-finite final loss (NaN included), the Parquet column too
    table = runs_table(fetch_runs(uri, "exp", "sw"), "exp")
    rows = {r["trial_id"]: r for r in table.to_pylist()}
    assert rows["ok"]["final_loss"] == 2.0
    assert rows["inf"]["final_loss"] == math.inf and rows["nan"]["final_loss"] == math.inf
    assert math.isnan(rows["nan"]["best_loss"]) and rows["inf"]["best_loss"] == 4.0
    pq.write_table(table, tmp_path / "t.parquet")
    back = {r["trial_id"]: r for r in pq.read_table(tmp_path / "t.parquet").to_pylist()}
    assert back["inf"]["final_loss"] == math.inf


def _history(client, run_id, keys):
    """(key, step, timestamp, value) of every stored value, NaN as the string "nan"."""
    return sorted((k, m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value)
                  for k in keys for m in client.get_metric_history(run_id, k))


def _latest(client, run_id):
    return {k: "nan" if math.isnan(v) else v for k, v in client.get_run(run_id).data.metrics.items()}


def test_sql_metric_writer_stores_what_log_batch_stores(tmp_path):
    """Tracker.log_metrics writes a SQL store's tables directly (sql_log_metrics): the same rows and
    latest values as MLflow's log_batch, for NaN, +-inf, a repeated value, steps out of order, a
    later batch, and a batch sent twice (nothing doubled)."""
    from mlflow.entities import Metric

    from orchestrator.mlflow_store import sql_log_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, "ingest")
    client = MlflowClient(uri)
    fast, ref = (client.create_run(tr.experiment_id).info.run_id for _ in range(2))
    first = [Metric("loss", 3.0, 1000, 0), Metric("loss", 2.5, 1000, 5), Metric("loss", 2.5, 1000, 5),
             Metric("loss", 9.0, 900, 2), Metric("loss", 2.4, 1001, 5), Metric("ent/l0", math.nan, 1000, 5),
             Metric("ent/l0", 1.0, 1000, 0), Metric("g", math.inf, 1000, 1), Metric("g", -math.inf, 1000, 0)]
    later = [Metric("loss", 2.0, 1100, 10), Metric("ent/l0", 0.5, 1100, 3), Metric("new", 7.0, 1100, 10)]
    keys = ("loss", "ent/l0", "g", "new")
    store = tr.sql_store()
    assert store is not None
    assert sql_log_metrics(store, fast, first)  # the direct path took it
    tr.log_metrics(fast, later)
    for batch in (first, later):
        client.log_batch(ref, metrics=batch)
    assert _history(client, fast, keys) == _history(client, ref, keys)
    assert len(_history(client, fast, keys)) == 11  # the repeated (loss, 2.5, step 5) once
    assert _latest(client, fast) == _latest(client, ref) == {"loss": 2.0, "ent/l0": "nan", "g": 1.7976931348623157e308,
                                                             "new": 7.0}
    # a batch sent again: the direct path declines without writing, log_batch skips the duplicates
    assert not sql_log_metrics(store, fast, later)
    tr.log_metrics(fast, later)
    assert _history(client, fast, keys) == _history(client, ref, keys)
    # a run that is not active: declined (Tracker.log_metrics then goes through log_batch, which raises)
    client.delete_run(ref)
    assert not sql_log_metrics(store, ref, [Metric("loss", 1.0, 1200, 11)])


def test_a_finished_trial_has_its_artifacts_and_results(tmp_path, monkeypatch):
    """The end of a trial in fewer writes: result metrics and tags, result.json and events.json."""
    monkeypatch.delenv("ABLATE_TRACKING_URI", raising=False)
    summary = {"initial_loss": 5.5, "final_loss": 2.0, "best_loss": 1.9, "steps_run": 40, "wall_time": 3.0,
               "diverged": False, "first_event": None, "device": "cpu", "ended_at": 1.7e9}
    uri, tr = _finish(tmp_path, {"t1": summary})
    run = tr.trial_runs("sw")[0]
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "stable"
    assert run.data.metrics["result/final_loss"] == 2.0 and run.data.tags["steps_run"] == "40"
    client = MlflowClient(uri)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["events.json", "result.json"]
    events = Path(client.download_artifacts(run.info.run_id, "events.json", str(tmp_path / "dl"))).read_text()
    assert json.loads(events) == []


def _artifact(client, run_id, name, dest):
    return Path(client.download_artifacts(run_id, name, str(dest))).read_text()


def test_the_recorder_mirrors_trials_without_tune(tmp_path, monkeypatch):
    """A trial's run from start to end through TrialRecorder's plain calls: metrics wait in the buffer
    until a flush (time, a full buffer, or the trial's end), placement is tagged once, events go to
    events.json, a finished and a failed trial end with their tags, artifacts and terminal state."""
    monkeypatch.delenv("ABLATE_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, "exp")
    client = MlflowClient(uri)
    parent = tr.sweep_run("sw", {"name": "sw"}, "name: sw\n")
    rec = TrialRecorder(uri, "exp", "sw", parent, flush_every=3600, crash=("diverged",),
                        crash_criterion="crash = diverged")
    run_id = rec.start("t1", "lr=0.1", {"lr": 0.1, "stabilizers": ["none"]})
    assert rec.has_run("t1") and not rec.has_run("t2")
    spike = {"kind": "spike", "step": 5}
    rec.add("t1", [[0, {"loss": 3.0, "lr": 0.1}, []], [5, {"loss": 2.5, "lr": 0.1}, [spike]]])
    rec.place("t1", {"node_id": "n1", "hostname": "h1", "gpu_ids": "", "started_at": "1.5"})
    rec.place("t1", {"node_id": "n2", "hostname": "h2"})  # tagged once per attempt
    rec.flush()  # less than flush_every since the last flush: nothing written yet
    assert client.get_metric_history(run_id, "loss") == [] and not rec.full("t1")
    rec.flush(force=True)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [3.0, 2.5]
    rec.add("t1", [[10, {"loss": 9.0}, []]])
    rec.finish("t1", {"initial_loss": 5.0, "final_loss": 9.0, "steps_run": 10, "diverged": True,
                      "first_event": spike, "device": "cpu", "ended_at": 1.7e9})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"
    tags = run.data.tags
    assert (tags["status"], tags["crashed"], tags["crash_criterion"]) == ("diverged", "True", "crash = diverged")
    assert (tags["node_id"], tags["hostname"], tags["started_at"]) == ("n1", "h1", "1.5")
    assert (tags["divergence_kind"], tags["divergence_step"], tags["steps_run"]) == ("spike", "5", "10")
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert loss == [(0, 3.0), (5, 2.5), (10, 9.0)]
    assert run.data.metrics["result/final_loss"] == 9.0 and "result/ended_at" not in run.data.metrics
    assert json.loads(_artifact(client, run_id, "events.json", tmp_path / "a")) == [spike]

    failed = rec.start("t2", "lr=1.0", {"lr": 1.0})
    rec.add("t2", [[0, {"loss": 3.0}, []]])
    rec.fail("t2", "Traceback (most recent call last):\n  ...\nValueError: boom\n", 2)
    run = client.get_run(failed)
    assert run.info.status == "FAILED" and client.get_metric_history(failed, "loss")[0].value == 3.0
    tags = run.data.tags
    assert (tags["status"], tags["error"], tags["num_failures"]) == ("failed", "ValueError: boom", "2")
    assert "ValueError: boom" in _artifact(client, failed, "traceback.txt", tmp_path / "b")
    assert rec.outcomes == {"t1": "diverged", "t2": "failed"} and rec.done == 2
    # a new attempt of a trial replaces its earlier run
    again = rec.start("t2", "lr=1.0", {"lr": 1.0})
    rec.fail("t2", "", 3)
    assert [r.info.run_id for r in tr.trial_runs("sw", "tags.`ablate.trial_id` = 't2'")] == [again]
    assert client.get_run(again).data.tags["error"] == "unknown error"
    assert _artifact(client, again, "traceback.txt", tmp_path / "c") == "no traceback was recorded"


def test_the_tune_callback_translates_trials_and_pickles_only_its_settings(tmp_path, monkeypatch):
    """TrackingCallback's hooks on stand-ins of Tune's trial objects (what they read: id, grid point,
    status, error file, failure count): the trial's run, params, placement, metrics and end."""
    import pickle
    from types import SimpleNamespace

    from orchestrator.tracking import TrackingCallback

    monkeypatch.delenv("ABLATE_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tr = Tracker(uri, "exp")
    client = MlflowClient(uri)
    parent = tr.sweep_run("sw", {"name": "sw"}, "name: sw\n")
    cb = TrackingCallback(uri, "exp", "sw", parent, 2, progress=False)
    point = {"trial": {"lr": 0.1, "stabilizers": ["weyl", "qk_norm"]}, "label": "lr=0.1 stabilizers=qk_norm+weyl"}
    ok = SimpleNamespace(trial_id="ok", config={"point": point}, status="RUNNING")
    cb.on_trial_start(0, [ok], ok)
    placed = {"node_id": "n1", "hostname": "h1", "gpu_ids": "0", "started_at": "1.5"}
    cb.on_trial_result(0, [ok], ok, {"training_iteration": 1, "batch": json.dumps([[0, {"loss": 3.0}, []]]), **placed})
    summary = {"initial_loss": 5.0, "final_loss": 2.0, "steps_run": 5, "diverged": False, "first_event": None}
    cb.on_trial_result(0, [ok], ok, {"training_iteration": 2, "batch": json.dumps([[5, {"loss": 2.0}, []]]),
                                     "summary": json.dumps(summary), **placed})
    cb.on_trial_complete(0, [ok], ok)
    runs = tr.trial_runs("sw")
    assert len(runs) == 1 and runs[0].info.run_name == point["label"]
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED" and run.data.params["stabilizer"] == "qk_norm+weyl"
    assert run.data.tags["gpu_ids"] == "0" and run.data.tags["status"] == "stable"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [0, 5]

    error = tmp_path / "error.txt"
    error.write_text("Traceback\nRuntimeError: out of memory\n")
    bad = SimpleNamespace(trial_id="bad", config={"point": {**point, "label": "bad"}}, status="ERROR",
                          error_file=str(error), num_failures=2)
    cb.on_trial_error(0, [ok, bad], bad)  # failed before its first report: the run is made then
    run = client.get_run(cb.recorder.runs["bad"])
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RuntimeError: out of memory"
    assert cb.recorder.outcomes == {"ok": "stable", "bad": "failed"}
    cb.on_experiment_end([ok, bad])

    back = pickle.loads(pickle.dumps(cb))
    assert back.settings == cb.settings and back.recorder.runs == {} and back.recorder.outcomes == {}
    # Tune pickles the callback with the experiment (Tuner.restore of a resumed or re-run sweep):
    # the name must stay where earlier versions of ablate put it
    assert b"orchestrator.tracking\nTrackingCallback" in pickle.dumps(cb, protocol=0)


def test_progress_line(capsys):
    from orchestrator.progress import Progress

    statuses = ["TERMINATED", "ERROR", "RUNNING", "PENDING"]
    line = Progress("sw", 4).line(statuses, ["diverged", "stable"], 2)
    assert line == "[sw] 2/4 done (1 diverged/collapsed, 1 failed), 1 running, elapsed 0:00:00, ETA 0:00:00"
    line = Progress("sw", 4).line(statuses, [], 0)  # no trial ended here yet: no ETA
    assert line == "[sw] 2/4 done (0 diverged/collapsed, 1 failed), 1 running, elapsed 0:00:00"
    assert Progress("sw", 10, total_is_budget=True).line(statuses, ["collapsed"], 2) == (
        "[sw] 2 trials done (budget 10; 1 diverged/collapsed, 1 failed), 1 running, elapsed 0:00:00")
    p = Progress("sw", 4)
    p.tick(statuses, [], 0)
    p.tick(statuses, [], 0)  # within `every` seconds of the last line: nothing
    assert capsys.readouterr().err.count("[sw]") == 1


def test_a_new_store_is_copied_from_the_empty_one_mlflow_made_first(tmp_path, monkeypatch):
    """A new SQLite store costs MLflow its whole chain of schema migrations (2 s of CPU on 2 cores,
    issue #32's start-up); the first one MLflow makes is kept as this machine's template and the next
    new store is a copy of it: the same schema and migration head, no run, the ``Default``
    experiment where MLflow puts it (relative to the folder the driver runs in, as MLflow would set
    it); a store that exists is never touched; ``ABLATE_STORE_TEMPLATES=off`` turns it off."""
    import sqlite3

    from orchestrator.mlflow_store import Tracker, store_template_path, seed_sqlite_store

    monkeypatch.setenv("ABLATE_STORE_TEMPLATES", str(tmp_path / "cache"))
    monkeypatch.delenv("ABLATE_TRACKING_URI", raising=False)
    template = store_template_path()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "off").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    made = Tracker(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "ablate-one")
    assert template.exists()
    monkeypatch.chdir(tmp_path / "b")
    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}") == "copied"
    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}") == ""  # exists: untouched
    copied = Tracker(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}", "ablate-two")
    run = copied.client.create_run(copied.experiment_id)
    copied.client.log_metric(run.info.run_id, "loss", 1.5, step=3)
    assert [m.value for m in copied.client.get_metric_history(run.info.run_id, "loss")] == [1.5]

    def clauses(sql):  # MLflow's migrations order a table's constraints differently from run to run
        return sorted(line.strip().rstrip(",") for line in (sql or "").splitlines() if line.strip())

    def schema(db):
        con = sqlite3.connect(db)
        try:
            tables = [(name, clauses(sql)) for name, sql in
                      con.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()]
            head = con.execute("SELECT version_num FROM alembic_version").fetchall()
            default = con.execute("SELECT name, artifact_location, lifecycle_stage FROM experiments "
                                  "WHERE experiment_id = 0").fetchall()
            return tables, head, default
        finally:
            con.close()

    # MLflow's own new store, made in folder b, against the copy made there
    monkeypatch.setenv("ABLATE_STORE_TEMPLATES", "off")
    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'off' / 'mlflow.db'}") == ""
    Tracker(f"sqlite:///{tmp_path / 'off' / 'mlflow.db'}", "ablate-three")
    own, copy = schema(tmp_path / "off" / "mlflow.db"), schema(tmp_path / "b" / "mlflow.db")
    assert own == copy
    assert own[2][0][1] == str(tmp_path / "b" / "mlruns" / "0")
    assert made.experiment_id == copied.experiment_id  # the same ids as in a store MLflow made

    # a template that is not an empty MLflow store (here: one with a run) is removed, not copied
    monkeypatch.setenv("ABLATE_STORE_TEMPLATES", str(tmp_path / "cache"))
    template.unlink()
    template.write_bytes((tmp_path / "b" / "mlflow.db").read_bytes())
    (tmp_path / "c").mkdir()
    assert seed_sqlite_store(f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}") == "made"
    assert not (tmp_path / "c" / "mlflow.db").exists() and not template.exists()
    Tracker(f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}", "ablate-four")  # MLflow makes it, and a new template
    assert template.exists() and schema(template) == own
    assert not [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no copy left behind
