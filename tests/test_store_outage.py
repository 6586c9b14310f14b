"""A tracking server gone for good (issue #32 item 3), with a real ``mlflow server``
(``orchestrator.localcluster.MlflowServer``) stopped under a sweep: while it is away, one short line
per retry says so (not MLflow's own retry chatter, nor its "View run" lines); then the sweep stops
with one error line that says what was saved, what was not, and that the same command resumes; the
same command then resumes, and the runs of the trials it cut off end KILLED, not RUNNING. (An outage
the sweep survives: ``tests/test_cluster.py::test_mlflow_server_outage_loses_no_metrics``.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from orchestrator.localcluster import MlflowServer

SPEC = {"name": "t-lost", "workload": "gpt", "steps": 200,
        "fixed": {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "eval_batches": 1,
                  "schedule": "constant"},
        "axes": {"lr": [1e-3, 2e-3, 3e-3]}, "probe_interval": 10, "resources": {"cpus": 1, "gpus": 0},
        "concurrency": 2}


def _trial_runs(uri: str, view=ViewType.ACTIVE_ONLY) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ablate-t-lost")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'", run_view_type=view)


@pytest.mark.slow
def test_a_tracking_server_gone_for_good_stops_the_sweep_saying_what_was_saved(tmp_path):
    server = MlflowServer(tmp_path / "mlflow").start()
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(spec_path), "--workdir", str(tmp_path / "wd"),
           "--tracking-uri", server.uri]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, env=dict(env, ABLATE_TRACKING_PATIENCE="6"), start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        finished = []
        while time.time() < deadline and not finished:
            time.sleep(0.3)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                finished = [r for r in _trial_runs(server.uri) if r.info.status == "FINISHED"]
            except Exception:  # noqa: BLE001 - the experiment may be mid-creation
                continue
        assert finished, "no trial finished in time"
        server.stop()  # for good
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in out + err and "View run" not in out + err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    line = errors[0]
    assert line.startswith(f"error: the MLflow tracking store {server.uri} did not answer for "), line
    assert "retries; last: connection refused" in line and "saved: the " in line and "trial(s) that ended" in line
    assert "not saved: the results of the " in line and "Re-run the same command to resume" in line
    waiting = [ln for ln in err.splitlines() if "waiting for the tracking store" in ln]
    assert waiting and all(ln.startswith("[t-lost] waiting for the tracking store ") and len(ln) < 160
                           for ln in waiting), waiting
    assert len(waiting) <= 5, waiting  # one line per retry, within 6 s: 0.5 + 1 + 2 s of backoff (and the calls')
    saved = int(line.split("saved: the ")[1].split(" ")[0])
    assert saved >= len(finished)

    server.start()  # the same store, back
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout and "run(s) an earlier driver left RUNNING closed (KILLED)" in done.stdout
    try:
        active = _trial_runs(server.uri)
        every = _trial_runs(server.uri, ViewType.ALL)
    finally:
        server.stop()
    assert len(active) == 3 and len({r.data.tags["ablate.trial_id"] for r in active}) == 3
    assert all(r.info.status == "FINISHED" for r in active)
    assert all(r.info.status != "RUNNING" for r in every), [(r.info.run_name, r.info.status) for r in every]


def test_a_missing_artifact_is_said_at_once_not_waited_for_as_an_outage(tmp_path, capsys):
    """A grid sweep's parent run has no ``boundary/cells.json``: MLflow's error for it is a generic
    MlflowException, which the store's retry took for an outage (a minute of "waiting for the
    tracking store" lines in every export and report of a grid sweep)."""
    from orchestrator.mlflow_store import Tracker
    from orchestrator.runs import search_records

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tr = Tracker(uri, "e")
    grid = tr.sweep_run("grid", {"name": "grid"}, "name: grid\n")
    search = tr.sweep_run("search", {"name": "search"}, "name: search\n")
    tr.log_text(search, '[{"stabilizers": "none", "converged": true}]', "boundary/cells.json")
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):
        tr.download_artifact(grid, "boundary/cells.json", str(tmp_path))
    assert search_records(uri, "e", None) == [{"stabilizers": "none", "converged": True, "sweep": "search"}]
    assert time.monotonic() - t0 < 10 and tr.down is None
    assert "waiting for the tracking store" not in capsys.readouterr().err


def test_mlflow_errors_are_classed_by_their_code_not_only_their_message():
    """MLflow's message for a missing resource need not name its code; the code decides."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    from orchestrator.mlflow_store import permanent_error

    assert permanent_error(MlflowException("Failed to download artifacts from path 'x'",
                                           error_code=RESOURCE_DOES_NOT_EXIST))
    assert not permanent_error(MlflowException("Failed to download artifacts from path 'x'",
                                               error_code=INTERNAL_ERROR))
    assert not permanent_error(ConnectionError("connection refused"))


def test_a_store_error_is_said_in_a_few_words_whatever_its_shape():
    """The retry line names the cause in at most 60 characters: from the exception, or from the one
    it was raised from (a server stopped mid-request); a port's digits are not an HTTP status; an
    error no rule knows is cut, not printed whole (a 180-character retry line in the slow outage
    test: MLflow's 'API request to <url> failed with exception ...')."""
    import http.client

    from mlflow.exceptions import MlflowException

    from orchestrator.mlflow_store import short_reason

    api = "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception "

    def raised_from(outer, inner):
        try:
            try:
                raise inner
            except Exception as e:  # noqa: BLE001
                raise outer from e
        except Exception as e:  # noqa: BLE001
            return e

    pool = "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: /x (Caused by "
    assert short_reason(MlflowException(api + pool + "NewConnectionError('[Errno 111] Connection refused'))")) \
        == "connection refused"
    assert short_reason(MlflowException(api + pool + "ResponseError('too many 503 error responses'))")) == "HTTP 503"
    assert short_reason(MlflowException(api.replace("exception ", "error code 500 != 200"))) == "HTTP 500"
    assert short_reason(MlflowException(api + pool + "SSLError('bad handshake'))")) == "no answer"  # not HTTP 500
    assert short_reason(raised_from(MlflowException(api + "an odd one"),
                                    http.client.RemoteDisconnected("Remote end closed connection"))) == "connection closed"
    odd = short_reason(MlflowException(api + "a failure no rule knows, " * 8))
    assert odd.startswith("MlflowException: a failure no rule knows") and len(odd) <= 60 and "http" not in odd


def test_two_trackers_racing_to_create_one_experiment_both_use_it(tmp_path):
    """Two drivers start on a new store at once: both look the experiment up (none yet), one creates
    it, the other's create is refused (RESOURCE_ALREADY_EXISTS) and reads the winner's back, instead
    of failing. The interleaving is forced: the second lookup answers "none" after the first tracker
    made the experiment, as it would have a moment before."""
    from mlflow.tracking import MlflowClient

    from orchestrator.mlflow_store import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lookup = MlflowClient.get_experiment_by_name
    made: list[str] = []
    first = [True]

    def late_lookup(client, name):
        if first.pop() if first else False:  # the other driver creates it between this lookup and our create
            made.append(Tracker(uri, name).experiment_id)
            return None
        return lookup(client, name)

    MlflowClient.get_experiment_by_name = late_lookup
    try:
        second = Tracker(uri, "ablate-race")
    finally:
        MlflowClient.get_experiment_by_name = lookup
    assert second.experiment_id == made[0]
    assert [e.name for e in MlflowClient(uri).search_experiments() if e.name == "ablate-race"] == ["ablate-race"]


@pytest.mark.slow
def test_a_missing_artifact_through_the_servers_artifact_proxy_is_said_at_once(tmp_path):
    """Through a tracking server that serves the artifacts (``--serve-artifacts``, as cluster.yaml runs
    it), a run without the artifact asked for raises FileNotFoundError at once: MLflow's error there
    carries RESOURCE_DOES_NOT_EXIST too (checked before only on the local SQLite store), so it is not
    retried as an outage for the tracker's whole patience."""
    from orchestrator.mlflow_store import Tracker

    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        tr = Tracker(server.uri, "ablate-missing", patience=60)
        run = tr.client.create_run(tr.experiment_id).info.run_id
        t0 = time.monotonic()
        with pytest.raises(FileNotFoundError, match="has no artifact 'nothing/here.txt'"):
            tr.download_artifact(run, "nothing/here.txt", str(tmp_path))
        assert time.monotonic() - t0 < 30  # not the 60 s patience of an outage
    finally:
        server.stop()
