"""Multi-node behaviour proven locally: a head and worker nodes started by ray.cluster_utils with
fake GPUs, a real `mlflow server` on loopback, sweeps submitted through the orchestrator."""

import copy
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.localcluster import LocalCluster, MlflowServer
from orchestrator.runs import FINISHED
from orchestrator.spec import parse_spec
from orchestrator.sweep import init_ray, open_session, run_sweep

TINY = {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "eval_batches": 1,
        "device": "cpu"}


def spec(name, n=8, steps=150, gpus=0.5, max_failures=2):
    return {"name": name, "workload": "gpt", "steps": steps, "fixed": TINY,
            "axes": {"lr": [float(f"{1e-3 * 1.2 ** i:.5g}") for i in range(n)]}, "probe_interval": 25,
            "resources": {"cpus": 1, "gpus": gpus}, "max_failures": max_failures}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield s
    s.stop()


@pytest.fixture
def cluster():
    import ray

    c = LocalCluster(workers=2, cpus_per_worker=2, gpus_per_worker=1)
    yield c
    c.shutdown()
    assert not ray.is_initialized()


def _runs(uri, name):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"ablate-{name}")
    return client, client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'", max_results=1000)


@pytest.mark.slow
def test_fractional_gpu_trials_spread_over_nodes_and_reach_mlflow_over_http(cluster, server, tmp_path):
    raw = spec("t-cluster")
    out = run_sweep(parse_spec(raw), raw, workdir=tmp_path, tracking_uri=server.uri, address=cluster.address,
                    progress=False)
    assert out.tracking_uri.startswith("http://127.0.0.1") and out.counts["failed"] == 0
    assert sum(out.counts[c] for c in FINISHED) == 8
    client, runs = _runs(server.uri, "t-cluster")
    assert len(runs) == 8 and all(r.data.tags["status"] in FINISHED for r in runs)
    nodes = {r.data.tags["node_id"] for r in runs}
    assert len(nodes) == 2 and cluster.cluster.head_node.node_id not in nodes  # head runs no trials
    # fractional packing: two trials at once on the same (fake) GPU of one node
    spans = [(r.data.tags["node_id"], r.data.tags["gpu_ids"], float(r.data.tags["started_at"]),
              float(r.data.tags["ended_at"])) for r in runs]
    assert all(g != "" for _, g, _, _ in spans)
    overlaps = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]
                if a[0] == b[0] and a[1] == b[1] and a[2] < b[3] and b[2] < a[3]]
    assert overlaps, spans
    # metrics and artifacts went through the server
    r0 = runs[0]
    assert [m.step for m in client.get_metric_history(r0.info.run_id, "loss")] == [0, 25, 50, 75, 100, 125, 149]
    assert "events.json" in [a.path for a in client.list_artifacts(r0.info.run_id)]


@pytest.mark.slow
def test_killed_worker_node_trials_are_retried_elsewhere(cluster, server, tmp_path):
    raw = spec("t-nodekill", n=6, steps=400)
    victim = cluster.workers[1]

    def kill_when_busy():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                _, runs = _runs(server.uri, "t-nodekill")
            except Exception:
                runs = []
            mine = [r for r in runs if r.data.tags.get("node_id") == victim.node_id
                    and r.data.tags.get("status") == "running"]
            if mine:
                cluster.remove_worker(victim)
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    out = run_sweep(parse_spec(raw), raw, workdir=tmp_path, tracking_uri=server.uri, address=cluster.address,
                    progress=False)
    killer.join()
    assert len(cluster.workers) == 1, "the worker node was not killed mid-sweep"
    _, runs = _runs(server.uri, "t-nodekill")
    ids = [r.data.tags["ablate.trial_id"] for r in runs]
    assert len(runs) == 6 and len(set(ids)) == 6 and out.counts["failed"] == 0 and sum(out.counts[c] for c in FINISHED) == 6
    survivor = cluster.workers[0].node_id
    assert sum(r.data.tags["node_id"] == survivor for r in runs) >= 4


@pytest.mark.slow
def test_mlflow_server_outage_loses_no_metrics(cluster, server, tmp_path, capfd):
    raw = spec("t-outage", n=6, steps=300)

    finished_at_outage = []

    def outage():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                _, runs = _runs(server.uri, "t-outage")
                done = [r for r in runs if r.data.tags.get("status") in FINISHED]
                if done:
                    finished_at_outage.append(len(done))
                    break
            except Exception:
                pass
            time.sleep(0.5)
        server.stop()
        time.sleep(5)
        server.start()

    t = threading.Thread(target=outage)
    t.start()
    out = run_sweep(parse_spec(raw), raw, workdir=tmp_path, tracking_uri=server.uri, address=cluster.address,
                    progress=False)
    t.join()
    assert out.counts["failed"] == 0 and sum(out.counts[c] for c in FINISHED) == 6
    assert finished_at_outage and finished_at_outage[0] < 6, "the outage must land mid-sweep"
    client, runs = _runs(server.uri, "t-outage")
    assert len(runs) == 6
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert {0, 25, 50, 75, 100, 125, 150, 175, 200, 225, 250, 275, 299} <= set(steps), (r.info.run_name, steps)
        assert len(steps) == len(set(steps))  # each step once: nothing lost, nothing doubled
        assert "result/final_loss" in r.data.metrics
    # what the outage showed: one short line per retry, then that the store is back; no MLflow chatter
    out, err = capfd.readouterr()
    waiting = [ln for ln in err.splitlines() if "waiting for the tracking store" in ln]
    back = [ln for ln in err.splitlines() if "the tracking store answers again" in ln]
    assert waiting and back and all(ln.startswith("[t-outage] ") and len(ln) < 160 for ln in waiting + back), err[-3000:]
    assert "View run" not in out + err and "Traceback" not in err


def test_embedded_session_starts_its_own_ray_beside_a_running_cluster(monkeypatch, tmp_path):
    """A head started on this machine is where a bare ray.init() attaches (through
    <RAY_TMPDIR>/ray/ray_current_cluster): the embedded session must not, an explicit address must."""
    import ray
    from ray.cluster_utils import Cluster

    # a short temp dir of the test's own (Unix socket paths are limited to ~107 characters); Ray
    # reads it for ray_current_cluster, so nothing else on this machine sees the test's cluster
    rtmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", rtmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "")  # set, then removed: monkeypatch undoes what the session sets
    monkeypatch.delenv("RAY_AUTH_MODE")
    other = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ses = None
    try:
        assert ray._private.utils.read_ray_address() == other.address  # what ray.init() would attach to
        jobs_before = len(other.global_state.job_table())
        ses = open_session(parse_spec(spec("t-own-ray", n=1, gpus=0)), None, tmp_path / "wd", None, None)
        assert ses.started_ray
        mine = ray.get_runtime_context()
        assert mine.gcs_address != other.address
        assert other.head_node.node_id not in {n["NodeID"] for n in ray.nodes()}
        assert len(other.global_state.job_table()) == jobs_before  # no driver joined the other cluster
        ses.close()
        ses = None
        assert not ray.is_initialized()
        # an explicit address still connects to that cluster
        init_ray(other.address)
        assert ray.get_runtime_context().gcs_address == other.address
        assert [n["NodeID"] for n in ray.nodes()] == [other.head_node.node_id]
    finally:
        if ses is not None:
            ses.close()
        ray.shutdown()
        other.shutdown()
        shutil.rmtree(rtmp, ignore_errors=True)
    assert not ray.is_initialized()


def test_cluster_yaml_passes_rays_own_validator():
    import yaml
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((Path(__file__).parent.parent / "cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))  # what `ray up` does: merge the provider's defaults
    validate_config(cfg)
    assert cfg["head_node_type"] == "head" and {"gpu_a10g", "gpu_a100x8"} <= set(cfg["available_node_types"])
    assert any("mlflow server" in c for c in cfg["head_start_ray_commands"])
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_a10g"]["min_wokers"] = 0
    with pytest.raises(ValidationError, match="min_wokers"):
        validate_config(prepare_config(bad))


_CLIENT = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
except Exception as e:
    print("REFUSED", type(e).__name__, repr(e.__cause__))
    sys.exit(3)
print("NODES", len(ray.nodes()))
"""


def test_token_authenticated_cluster_refuses_a_client_without_the_token(tmp_path, monkeypatch):
    """cluster.yaml turns Ray token authentication on for every node and keeps MLflow and the
    dashboard on the head's loopback; the same start here (head and worker nodes with
    RAY_AUTH_MODE=token and a 0600 token file) refuses a driver without the token or with another."""
    import os
    import stat
    import subprocess
    import sys

    import yaml

    from orchestrator.localcluster import write_token

    cfg = yaml.safe_load((Path(__file__).parent.parent / "cluster.yaml").read_text())
    head, workers = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    assert "export RAY_AUTH_MODE=token; ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "export RAY_AUTH_MODE=token; ray start --address" in workers
    assert "mlflow server --host 127.0.0.1" in head and "0.0.0.0" not in head
    assert cfg["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in c for c in cfg["setup_commands"])

    rtmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Unix socket paths are limited
    monkeypatch.setenv("RAY_TMPDIR", rtmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    token = write_token(tmp_path / "auth_token")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    c = LocalCluster(workers=1, cpus_per_worker=1, auth_token=token)
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        (tmp_path / "home").mkdir()
        envs = {"no token": {**base, "HOME": str(tmp_path / "home")},  # no token anywhere, no mode set
                "another token": {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                "the token": {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}}
        procs = {k: subprocess.Popen([sys.executable, "-c", _CLIENT, c.address], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, env in envs.items()}
        out = {k: p.communicate(timeout=120) + (p.returncode,) for k, p in procs.items()}
        assert out["the token"][2] == 0 and "NODES 2" in out["the token"][0], out["the token"]
        for k in ("no token", "another token"):
            assert out[k][2] == 3 and "REFUSED ConnectionError" in out[k][0], (k, out[k])
    finally:
        c.shutdown()
        shutil.rmtree(rtmp, ignore_errors=True)
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ  # the environment is restored


def test_mlflow_basic_auth_variant_refuses_without_the_password(tmp_path, monkeypatch):
    """cluster.yaml's variant for opening MLflow beyond the head: the basic-auth app with a generated
    admin password. Without it a client is refused; with it (MLFLOW_TRACKING_USERNAME / _PASSWORD,
    as the head's driver gets them) the sweep's writes go through."""
    import secrets

    from mlflow.exceptions import MlflowException

    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth]")
    password = secrets.token_urlsafe(24)
    s = MlflowServer(tmp_path / "auth", admin_password=password).start()
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            MlflowClient(s.uri).create_experiment("nope")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "password1234")
        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            MlflowClient(s.uri).search_experiments()
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        exp = MlflowClient(s.uri).create_experiment("yes")
        assert MlflowClient(s.uri).get_experiment(exp).name == "yes"
    finally:
        s.stop()


def test_mlflow_basic_auth_variant_answers_to_the_heads_public_name(tmp_path):
    """cluster.yaml's variant opens MLflow beyond the head (``--host 0.0.0.0``). MLflow 3.17 answers 403
    "Invalid Host header" to a Host header it does not allow, by default anything but localhost and
    the private address ranges: a client naming the head by its public name was refused. The
    variant passes ``--allowed-hosts`` from ``orchestrator.mlflow_hosts`` (the head's host name and
    addresses, on EC2 its public name and IP, and ``$ABLATE_MLFLOW_HOSTS``): a request naming the
    head so reaches the password check (401 without it, 200 with it), any other name is refused, with
    the password or not (what a public name got before)."""
    import base64
    import http.client
    import os
    import secrets
    import socket
    import subprocess
    import sys

    from orchestrator.localcluster import free_port

    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth]")
    text = (Path(__file__).parent.parent / "cluster.yaml").read_text()
    variant = [ln for ln in text.splitlines() if "--allowed-hosts" in ln and "$(" in ln]
    assert variant == ['  #   --allowed-hosts "$(python3 -m orchestrator.mlflow_hosts --port 5000)"'], variant

    public = "mlflow.example.org"  # a public name of the head (on EC2 the metadata service gives it)
    password = secrets.token_urlsafe(24)
    auth = "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()

    def status(server, host, headers=()):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host, **dict(headers)})
        r = conn.getresponse()
        body = r.read().decode(errors="replace")
        conn.close()
        return r.status, body

    port = free_port()
    hosts = subprocess.run([sys.executable, "-m", "orchestrator.mlflow_hosts", "--port", str(port), "--no-metadata"],
                           env=dict(os.environ, ABLATE_MLFLOW_HOSTS=public), capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    assert f"{public}:{port}" in hosts.split(",") and f"127.0.0.1:{port}" in hosts.split(",")
    s = MlflowServer(tmp_path / "after", port=port, admin_password=password, allowed_hosts=hosts).start()
    try:
        assert status(s, f"{public}:{port}")[0] == 401  # allowed: asked for the password
        assert status(s, f"{socket.gethostname()}:{port}")[0] == 401
        assert status(s, f"{public}:{port}", {"Authorization": auth})[0] == 200
        code, body = status(s, f"attacker.example.com:{port}", {"Authorization": auth})  # as every
        assert code == 403 and "Invalid Host header" in body  # public name was without --allowed-hosts
        assert status(s, f"127.0.0.1:{port}", {"Authorization": auth})[0] == 200
    finally:
        s.stop()
