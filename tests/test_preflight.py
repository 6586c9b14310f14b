"""Issue 18: refusals in a fraction of a second that leave nothing behind (``ablate check`` and the
same checks first in ``sweep`` / ``boundary``), a Ray start that says what failed and is retried,
every trial visible in MLflow from its start. Real Ray, MLflow (SQLite) and torch at small sizes."""

import os
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

SPEC = {
    "name": "t-pre",
    "workload": "gpt",
    "steps": 60,
    "fixed": {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "eval_batches": 1},
    "axes": {"lr": [1e-3, 2e-3]},
    "probe_interval": 20,
    "resources": {"cpus": 1, "gpus": 0},
    "concurrency": 1,
}


def ablate(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_error_line(out):
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-2000:]
    return errors[0]


def _write(tmp_path, raw, name="s.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def test_check_prints_what_would_run_and_writes_nothing(tmp_path):
    path = _write(tmp_path, dict(SPEC, axes={"lr": [1e-3, 2e-3], "stabilizers": ["none", "qk_norm"]}, seeds=2))
    out = ablate("check", str(path), "--time-steps", "1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "grid: 8 trials (lr: 2 x stabilizers: 2 x seeds: 2)" in lines
    assert "resources: 1 CPU / 0 GPU a trial, at most 1 at once, on this machine (embedded Ray)" in lines
    timed = [ln for ln in lines if ln.startswith("timed: ")]
    assert [t.split(":")[1].strip() for t in timed] == ["stabilizers=none", "stabilizers=qk_norm"]
    est = next(ln for ln in lines if ln.startswith("estimate: "))
    step_s = [float(t.rsplit(":", 1)[1].split()[0]) / 1000 for t in timed]
    # 4 trials a shape of 60 steps; the timings are printed to 0.1 ms, hence the tolerance
    assert float(est.split()[1]) == pytest.approx(4 * 60 * sum(step_s) / 3600, rel=0.1)
    assert lines[-1] == "ok: nothing was run or written"
    assert sorted(os.listdir(tmp_path)) == ["s.yaml"]
    boundary = _write(tmp_path, dict(SPEC, axes={"stabilizers": ["none", "qk_norm", "weyl"]},
                                     boundary={"lr_range": [1e-3, 1.0], "max_trials_per_cell": 6}), "b.yaml")
    out = ablate("check", str(boundary))
    assert out.returncode == 0, out.stderr
    assert "boundary search: 3 cells, at most 6 trials a cell (at most 18 trials)" in out.stdout


def test_a_bad_spec_is_refused_in_a_fraction_of_a_start_up_without_ray_mlflow_or_torch(tmp_path):
    """`ablate check` on a bad spec against a bare `python -c pass`, as a ratio of medians (the
    machine's load cancels): the CLI must not import Ray, MLflow or torch to refuse it."""
    bad = _write(tmp_path, dict(SPEC, bogus=1))
    huge = _write(tmp_path, dict(SPEC, axes={"lr": {"log_range": [1e-4, 1.0], "num": 10 ** 8}}), "huge.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)) * 4)

    def run(*cmd):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120)
        return time.perf_counter() - t0, r

    base, check = [], []
    for _ in range(5):
        base.append(run("-c", "pass")[0])
        dt, r = run("-m", "orchestrator.cli", "check", str(bad))
        check.append(dt)
        assert r.returncode == 2 and _one_error_line(r).startswith("error: bogus: unknown key")
    ratio = statistics.median(check) / statistics.median(base)
    # measured here: ~10x (0.25 s against 0.026 s); importing torch alone is ~60x, the old CLI ~500x
    assert ratio < 40, (ratio, check, base)
    for path, msg in ((huge, "the grid has 100,000,000 trials"), (binary, "is not a text file")):
        r = ablate("check", str(path))
        assert r.returncode == 2 and msg in _one_error_line(r)
    probe = ("import sys; from typer.testing import CliRunner; from orchestrator.cli import app; "
             f"r = CliRunner().invoke(app, ['check', {str(bad)!r}]); "
             "print(r.exit_code, sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr


def test_refused_sweeps_leave_no_workdir(tmp_path):
    """The data and GPU checks come before the workdir, its lock and Ray: nothing is left behind."""
    import torch

    wd = tmp_path / "wd"
    missing = dict(SPEC, fixed=dict(SPEC["fixed"], data="text", data_path=str(tmp_path / "none.txt")))
    cases = [("sweep", missing, "error: fixed.data_path: data_path "),
             ("boundary", dict(missing, axes={}, boundary={"lr_range": [1e-3, 1.0]}), "error: fixed.data_path: data_path "),
             ("boundary", dict(SPEC, boundary={"resolution": 1.2}),
              "error: boundary.lr_range: missing; a boundary search needs boundary: {lr_range: [low, high]}")]
    if not torch.cuda.is_available():
        cases += [(cmd, dict(SPEC, axes={}, resources={"cpus": 1, "gpus": 1}, boundary={"lr_range": [1e-3, 1.0]}),
                   "error: resources.gpus: 1 asked per trial, but this machine has no GPU") for cmd in ("sweep", "boundary")]
    for cmd, raw, msg in cases:
        out = ablate(cmd, str(_write(tmp_path, raw)), "--workdir", str(wd))
        assert out.returncode == 2 and _one_error_line(out).startswith(msg), (cmd, out.stderr)
        assert not wd.exists()


def test_a_ray_start_timeout_is_named_retried_and_leaves_nothing(tmp_path):
    """Ray's GCS given no time to start (RAY_gcs_server_port_wait_time_s=0: Ray's own start timeout,
    hit at once): two attempts, then one line naming Ray, the cause and its log, not the tracking
    server; no Ray process outlives the driver's failed starts."""
    path = _write(tmp_path, SPEC)
    rtmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Unix socket paths are limited
    env = dict(os.environ, RAY_gcs_server_port_wait_time_s="0", ABLATE_RAY_START_ATTEMPTS="2",
               ABLATE_RAY_START_BACKOFF="0.2", RAY_TMPDIR=str(rtmp))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(path), "--workdir",
                             str(tmp_path / "wd")], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    stdout, stderr = proc.communicate(timeout=180)

    class R:
        returncode = proc.returncode

    R.stdout, R.stderr = stdout, stderr
    line = _one_error_line(R)
    assert proc.returncode == 1, stderr
    assert line.startswith("error: Ray did not start on this machine after 2 attempts: Timed out waiting for file "
                           f"{rtmp}/ray/session_"), line
    assert "; Ray's log: " + str(rtmp) + "/ray/session_" in line and "/logs; " in line
    assert "ABLATE_RAY_START_ATTEMPTS" in line and "tracking server" not in line
    assert "attempt 2 of 2" in stderr  # the retry was announced
    time.sleep(1)
    ps = subprocess.run(["ps", "-e", "-o", "pid=,args="], capture_output=True, text=True).stdout
    assert str(rtmp) not in ps  # no GCS / raylet of the failed starts left
    shutil.rmtree(rtmp, ignore_errors=True)


_RETRY = """
import logging, os, stat, sys
from orchestrator.sweep import init_ray

class Unblock(logging.Handler):  # the first failure's warning lets the next attempt succeed
    def emit(self, record):
        self.messages = getattr(self, "messages", []) + [record.getMessage()]
        os.environ.pop("RAY_gcs_server_port_wait_time_s", None)

h = Unblock()
logging.getLogger("ablate").addHandler(h)
assert init_ray(attempts=3, backoff=0.1) is True
import ray
token = os.path.join(os.environ["HOME"], ".ray", "auth_token")
print("MESSAGES", h.messages)
print("MODE", oct(stat.S_IMODE(os.stat(token).st_mode)), len(open(token).read().strip()))
print("NODES", len(ray.nodes()))
ray.shutdown()
"""


def test_a_failed_ray_start_is_retried_and_the_token_file_it_makes_is_private(tmp_path):
    """The first start times out, the retry starts Ray; the token file ablate has Ray use (a fresh
    HOME: none yet) is created 0600 (Ray's own would be 0644), and an existing one is made 0600."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    rtmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Unix socket paths are limited
    env.update(HOME=str(home), RAY_gcs_server_port_wait_time_s="0", RAY_TMPDIR=rtmp)
    out = subprocess.run([sys.executable, "-c", _RETRY], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in out.stdout.splitlines() if ln.split(" ", 1)[0] in ("MESSAGES", "MODE", "NODES"))
    assert "Ray did not start (Timed out waiting for file" in lines["MESSAGES"] and "attempt 2 of 3" in lines["MESSAGES"]
    assert lines["MODE"] == "0o600 64" and lines["NODES"] == "1"
    token = home / ".ray" / "auth_token"
    token.chmod(0o644)  # as Ray writes it; ablate's next embedded start tightens it
    env.pop("RAY_gcs_server_port_wait_time_s")
    out = subprocess.run([sys.executable, "-c", "from orchestrator.sweep import init_ray; import ray; "
                          "init_ray(); ray.shutdown()"], env=env, capture_output=True, text=True, timeout=180)
    shutil.rmtree(rtmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_one_line_names_the_tracking_server_only_for_its_own_errors(tmp_path, monkeypatch):
    from orchestrator.cli import one_line
    from orchestrator.localcluster import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    try:
        MlflowClient(uri).search_experiments()
    except Exception as e:  # noqa: BLE001 - what MLflow raises for a server that is not there
        refused = e
    assert "the tracking server did not answer" in one_line(refused, uri)
    try:
        raise RuntimeError("The current node timed out during startup.")
    except RuntimeError as e:
        assert one_line(e, uri) == "RuntimeError: The current node timed out during startup."
    from ray.exceptions import GetTimeoutError

    try:  # Ray's own "timed out" (ray.get's): the old one-liner blamed the tracking server
        raise GetTimeoutError("Get timed out: some object(s) not ready.")
    except GetTimeoutError as e:
        line = one_line(e, uri)
        assert line.startswith("Ray: GetTimeoutError: Get timed out") and "Ray's log" in line
        assert "tracking server" not in line and "MLflow store" not in line


def test_a_trial_cut_off_before_its_first_report_shows_killed_in_mlflow(tmp_path):
    """The trial's run is made when the trial starts (RUNNING, its config as params), before any
    metric: a sweep stopped then marks it KILLED. A trial that never started has no run."""
    # a long first evaluation (1000 batches) keeps the trial from reporting for a while
    raw = dict(SPEC, name="t-early", steps=400, fixed=dict(SPEC["fixed"], eval_batches=1000))
    path = _write(tmp_path, raw)
    wd = tmp_path / "wd"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(path), "--workdir", str(wd)],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    seen = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and seen is None:
            time.sleep(0.3)
            assert proc.poll() is None
            try:
                client = MlflowClient(uri)
                exp = client.get_experiment_by_name("ablate-t-early")
                runs = client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'") if exp else []
            except Exception:  # noqa: BLE001 - the store may be mid-creation
                continue
            # before its first report: no metric, and not yet the node tags the first report brings
            fresh = [r for r in runs if r.info.status == "RUNNING" and not r.data.metrics
                     and "node_id" not in r.data.tags]
            if fresh:
                seen = fresh[0]
        assert seen is not None, "no trial run appeared before its first report"
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out[-3000:]
    assert seen.data.tags["status"] == "running" and float(seen.data.params["lr"]) in (1e-3, 2e-3)
    assert seen.data.params["eval_batches"] == "1000" and seen.data.params["stabilizer"] == "none"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ablate-t-early")
    runs = client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'")
    assert len(runs) == 1  # concurrency 1: the second trial never started, and has no run
    (run,) = runs
    assert run.info.run_id == seen.info.run_id and run.info.status == "KILLED"
    assert run.data.tags["interrupted"] == "SIGINT"


def test_the_plan_of_a_run_on_a_cluster_says_so_for_a_sweep_and_a_search(monkeypatch):
    """With an address the plan is not embedded (a merge once passed it into another field, and
    ``check --address`` described the embedded Ray and never read the cluster's capacity)."""
    from orchestrator.preflight import plan

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = Path(__file__).resolve().parent.parent / "search_spaces"
    for spec, kind in (("smoke.yaml", "sweep"), ("boundary_smoke.yaml", "boundary")):
        here, there = plan(root / spec, kind), plan(root / spec, kind, address="127.0.0.1:6379")
        assert here.embedded and not there.embedded, spec
        assert "on this machine (embedded Ray)" in "\n".join(here.lines())
        assert "on the Ray cluster at the given --address" in "\n".join(there.lines())
        assert (there.reference is None) == (kind == "sweep")
