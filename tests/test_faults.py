"""Faults and bad input (issue 11): a signal stops a sweep resumably and never looks like success,
one driver per workdir, refusals that leave the store untouched, one-line errors. Real Ray, MLflow
(SQLite) and torch at small sizes, drivers run as subprocesses the way a user or a scheduler runs them."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.faults import WorkdirBusy, WorkdirLock
from orchestrator.spec import SpecError, load_spec, parse_spec
from orchestrator.sweep import run_sweep

SPEC = {
    "name": "t-sig",
    "workload": "gpt",
    "steps": 400,  # a warm trial of 120 steps ended, and the 4 with it, before the signal landed
    "fixed": {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "eval_batches": 1,
              "schedule": "constant"},
    "axes": {"lr": [1e-3, 2e-3, 3e-3, 4e-3]},
    "probe_interval": 20,
    "resources": {"cpus": 1, "gpus": 0},
    "concurrency": 2,
}


def ablate(*args, timeout=300, **kw):
    """The CLI in a subprocess (for what needs its own process: Ray, signals, a lock)."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


class _Result:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


def ablate_here(*args):
    """The CLI in this process (Typer's runner): for commands that fail before Ray starts."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    return _Result(CliRunner().invoke(app, list(args)))


def _one_error_line(out):
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-2000:]
    return errors[0]


def _runs(client, exp_name, kind):
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id], f"tags.`ablate.kind` = '{kind}'", max_results=1000)


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,args="], capture_output=True, text=True).stdout
    # zombies (<defunct>) are dead: a container without an init process may never reap them
    return [ln for ln in out.splitlines() if ln.split()[1] == str(sid) and "<defunct>" not in ln]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_sweep_resumably_and_never_looks_finished(tmp_path, sig):
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    wd = tmp_path / "wd"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(spec_path), "--workdir", str(wd)]
    log = tmp_path / "first.log"
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # until the first trial runs are open in MLflow
            time.sleep(0.25)
            assert proc.poll() is None, log.read_text()[-3000:]
            if "4 trials" in log.read_text() and _trial_count(uri) >= 1:
                break
        else:
            raise AssertionError("no trial started in time: " + log.read_text()[-2000:])
        proc.send_signal(sig)  # to the driver only, as `kill` or a scheduler would
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert rc == (143 if sig == signal.SIGTERM else 130), text[-3000:]
    assert "interrupted: re-run the same command to resume" in text
    assert "Traceback" not in text and "sweep t-sig: 4 trials" not in text  # no summary, no crash dump
    client = MlflowClient(uri)
    (parent,) = _runs(client, "ablate-t-sig", "sweep")
    assert parent.info.status == "KILLED" and parent.data.tags["interrupted"].startswith(sig.name)
    trials = _runs(client, "ablate-t-sig", "trial")
    assert trials and all(r.info.status != "RUNNING" for r in trials)
    assert len(trials) < 4 or any(r.data.tags["status"] == "running" for r in trials)
    # embedded Ray went down with the driver: nothing left in its session (raylet, GCS, agents, workers)
    time.sleep(2)
    assert _session_processes(proc.pid) == []

    if sig == signal.SIGINT:
        return
    # export and report refuse the unfinished sweep, or flag it when told to go on
    refused = ablate_here("export", str(spec_path), "--workdir", str(wd))
    assert refused.returncode == 1
    line = _one_error_line(refused)
    assert "sweep 't-sig' was interrupted" in line and "--allow-incomplete" in line
    flagged = ablate_here("export", str(spec_path), "--workdir", str(wd), "--allow-incomplete")
    assert flagged.returncode == 0, flagged.stderr[-2000:]
    assert "warning: sweep 't-sig' was interrupted" in flagged.stderr

    # the same command resumes and finishes it; the parent run is FINISHED, its tag gone
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout and "sweep t-sig: 4 trials" in done.stdout
    (parent,) = _runs(client, "ablate-t-sig", "sweep")
    assert parent.info.status == "FINISHED" and "interrupted" not in parent.data.tags
    trials = _runs(client, "ablate-t-sig", "trial")
    assert len(trials) == 4 and {r.data.tags["ablate.trial_id"] for r in trials}.__len__() == 4
    assert all(r.info.status == "FINISHED" for r in trials)

    # a refused --no-resume does not touch the store: the parent stays FINISHED, no new run
    before = {r.info.run_id: r.info.status for r in client.search_runs([parent.info.experiment_id])}
    refused = ablate_here("sweep", str(spec_path), "--workdir", str(wd), "--no-resume")
    assert refused.returncode == 2 and "already exists" in _one_error_line(refused)
    after = {r.info.run_id: r.info.status for r in client.search_runs([parent.info.experiment_id])}
    assert after == before

    # export into a path where a file stands: one line naming it
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    bad = ablate_here("export", str(spec_path), "--workdir", str(wd), "--out", str(blocker / "x"))
    assert bad.returncode == 1 and str(blocker) in _one_error_line(bad)


def _trial_count(uri: str) -> int:
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name("ablate-t-sig")
    except Exception:  # noqa: BLE001 - the store may be mid-creation
        return 0
    if exp is None:
        return 0
    return len(client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'"))


def test_a_second_driver_on_the_same_workdir_fails_at_once_naming_the_holder(tmp_path):
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    lock = WorkdirLock(tmp_path).acquire("ablate sweep first.yaml")
    try:
        t0 = time.monotonic()
        out = ablate("sweep", str(spec_path), "--workdir", str(tmp_path))
        assert out.returncode == 1 and time.monotonic() - t0 < 60
        line = _one_error_line(out)
        assert f"in use by another ablate driver (pid {os.getpid()} on host" in line
        assert "ablate sweep first.yaml" in line
        assert not (tmp_path / "mlflow.db").exists()
        # another process cannot take it either; released, it can
        probe = [sys.executable, "-c", "import sys; from orchestrator.faults import WorkdirLock; "
                 f"WorkdirLock({str(tmp_path)!r}).acquire(); print('locked')"]
        assert "WorkdirBusy" in subprocess.run(probe, capture_output=True, text=True).stderr
    finally:
        lock.release()
    assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "locked"
    WorkdirLock(tmp_path).acquire().release()  # re-entrant in one process, released cleanly
    with pytest.raises(WorkdirBusy):
        holder = subprocess.Popen([sys.executable, "-c", "import time; from orchestrator.faults import WorkdirLock; "
                                   f"WorkdirLock({str(tmp_path)!r}).acquire(); print('ok', flush=True); "
                                   "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "ok"
            WorkdirLock(tmp_path).acquire()
        finally:
            holder.kill()
            holder.wait()


def test_refused_resume_and_bad_input_leave_no_store_and_start_nothing(tmp_path):
    raw = dict(SPEC, name="t-refuse")
    with pytest.raises(SpecError, match="--resume: no sweep 't-refuse' to continue"):
        run_sweep(parse_spec(raw), raw, workdir=tmp_path, resume=True, progress=False)
    for fixed, message in [
        ({"data": "text", "data_path": str(tmp_path / "missing.txt")}, r"fixed.data_path: .*missing.txt'?: no such file"),
        ({"data": "bin", "data_path": str(tmp_path)}, r"expected nanoGPT shards .* missing train.bin, val.bin"),
    ]:
        bad = dict(raw, fixed=dict(SPEC["fixed"], **fixed))
        with pytest.raises(SpecError, match=message):
            run_sweep(parse_spec(bad), bad, workdir=tmp_path, progress=False)
    vit = dict(raw, workload="vit", fixed={"depth": 1, "width": 32, "heads": 2, "img_size": 8, "patch_size": 4,
                                           "data": "cifar10", "data_path": str(tmp_path)})
    with pytest.raises(SpecError, match=r"no CIFAR-10 there .*cifar-10-batches-py"):
        run_sweep(parse_spec(vit), vit, workdir=tmp_path, progress=False)
    with pytest.raises(SpecError, match=r"precision: 'bf16' autocast needs a GPU, but resources.gpus is 0"):
        parse_spec(dict(raw, fixed=dict(SPEC["fixed"], precision="bf16")))
    with pytest.raises(SpecError, match=r"device: 'cuda' needs a GPU, but resources.gpus is 0"):
        parse_spec(dict(raw, fixed=dict(SPEC["fixed"], device="cuda")))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_a_huge_grid_is_counted_and_refused_before_anything_is_built(tmp_path):
    raw = dict(SPEC, name="t-huge", axes={"lr": {"log_range": [1e-4, 1.0], "num": 100}, "eval_interval": list(range(1, 11)),
                                         "warmup_steps": list(range(10))}, seeds=100)
    t0 = time.monotonic()
    with pytest.raises(SpecError, match=r"the grid has 1,000,000 trials \(lr: 100 x eval_interval: 10 x warmup_steps: 10 "
                                        r"x seeds: 100\), above max_trials 10,000.*--max-trials"):
        parse_spec(raw)
    assert time.monotonic() - t0 < 2
    small = dict(SPEC, name="t-limit")
    with pytest.raises(SpecError, match="the grid has 4 trials .* above max_trials 3"):
        parse_spec(dict(small, max_trials=3))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small))
    with pytest.raises(SpecError, match="above max_trials 2"):
        load_spec(path, max_trials=2)
    assert load_spec(path, max_trials=4).grid_size() == 4
    out = ablate_here("sweep", str(path), "--max-trials", "2", "--workdir", str(tmp_path / "wd"))
    assert out.returncode == 2 and "4 trials (lr: 4), above max_trials 2" in _one_error_line(out)


def test_yaml_numbers_and_malformed_blocks(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: n\nworkload: gpt\nsteps: 5\nfixed: {weight_decay: 1e-2}\naxes: {lr: [1e-3, 2.0e-3]}\n")
    assert yaml.safe_load(path.read_text())["axes"]["lr"][0] == "1e-3"  # YAML 1.1: a string
    s = load_spec(path)
    assert [t.lr for t in s.trials()] == [1e-3, 2e-3] and s.trials()[0].weight_decay == 1e-2
    with pytest.raises(SpecError, match=r"axes.lr: 'fast' is not a number \(write numbers unquoted, e.g. 1.0e-3\)"):
        parse_spec(dict(SPEC, axes={"lr": ["fast"]}))
    with pytest.raises(SpecError, match=r"fixed: \[1, 2\] must be a mapping of trial field: value"):
        parse_spec(dict(SPEC, fixed=[1, 2]))
    with pytest.raises(SpecError, match=r"axes: 'lr' must be a mapping"):
        parse_spec(dict(SPEC, axes="lr"))


def test_simple_mistakes_end_in_one_line(tmp_path):
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    a_file = tmp_path / "afile"
    a_file.write_text("")
    out = ablate_here("sweep", str(spec_path), "--workdir", str(a_file))
    assert out.returncode == 1 and f"--workdir {a_file} is a file, not a folder" in _one_error_line(out)
    spec_path.write_text("name: n\nworkload: gpt\nsteps: 5\nfixed: [1, 2]\n")
    out = ablate_here("sweep", str(spec_path), "--workdir", str(tmp_path / "wd"))
    assert out.returncode == 2 and "fixed: [1, 2] must be a mapping" in _one_error_line(out)
    import torch

    if not torch.cuda.is_available():
        for flags, msg in ([("--device", "cuda"), "device: 'cuda' asked for but torch sees no CUDA device"],
                           [("--precision", "bf16"), "precision: 'bf16' autocast needs a CUDA device"]):
            out = ablate("trial", "--", *flags, "--steps", "2", "--quiet")
            assert out.returncode == 2 and msg in _one_error_line(out)
    out = ablate("trial", "--", "--data", "text", "--data-path", str(tmp_path / "none.txt"), "--quiet")
    assert out.returncode == 1 and "none.txt" in _one_error_line(out)


def test_read_only_commands_fail_fast_and_create_nothing(tmp_path):
    from orchestrator.localcluster import free_port

    t0 = time.monotonic()
    out = ablate_here("export", "--experiment", "e", "--workdir", str(tmp_path),
                      "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1 and time.monotonic() - t0 < 60
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:" in _one_error_line(out)
    out = ablate_here("report", "--experiment", "e", "--workdir", str(tmp_path))
    assert out.returncode == 1 and f"no MLflow store at {tmp_path / 'mlflow.db'}" in _one_error_line(out)
    assert not (tmp_path / "mlflow.db").exists()
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("other")
    out = ablate_here("export", "--experiment", "e", "--workdir", str(tmp_path))
    assert out.returncode == 1 and "no experiment 'e' in the MLflow store" in _one_error_line(out)
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("e") is None


def test_permanent_store_errors_are_not_retried(tmp_path):
    from orchestrator.mlflow_store import StoreUnavailable, Tracker, permanent_error

    tr = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", retries=3)
    calls = []

    def fails(exc):
        calls.append(exc)
        raise exc

    for exc in (PermissionError(13, "Permission denied", str(tmp_path)), OSError(28, "No space left on device"),
                RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database")):
        calls.clear()
        t0 = time.monotonic()
        with pytest.raises(type(exc)):
            tr._call(fails, exc)
        assert len(calls) == 1 and time.monotonic() - t0 < 0.5 and permanent_error(exc)
    calls.clear()
    with pytest.raises(StoreUnavailable) as lost:
        tr._call(fails, ConnectionError("Connection refused"))
    assert len(calls) == 4 and isinstance(lost.value.__cause__, ConnectionError)  # a transient error is retried
    assert lost.value.retries == 3 and lost.value.reason == "connection refused"
    calls.clear()
    with pytest.raises(StoreUnavailable):  # once given up on, a store is tried once, without waiting
        tr._call(fails, ConnectionError("Connection refused"))
    assert len(calls) == 1


def test_doctor_leaves_no_data_in_the_store(tmp_path):
    # (on a fresh workdir it creates no store at all: tests/test_cli.py)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("mine")
    before = [(e.name, e.experiment_id) for e in MlflowClient(uri).search_experiments()]
    out = ablate("doctor", "--workdir", str(tmp_path))
    assert out.returncode == 0 and "store reachable (2 experiments)" in out.stdout, out.stdout
    assert [(e.name, e.experiment_id) for e in MlflowClient(uri).search_experiments()] == before


def test_help_reads_normally():
    top = ablate_here("--help")
    assert top.returncode == 0 and "<bool>" not in top.stdout and "--help  Show this message and exit." in top.stdout
    sw = ablate_here("sweep", "--help")
    assert "Usage: root sweep [OPTIONS] SPEC\n" in sw.stdout and "{" not in sw.stdout  # root: the runner's name
    assert "--resume / --no-resume" in sw.stdout and "--max-trials N" in sw.stdout and "<bool>" not in sw.stdout
    ex = ablate_here("export", "--help")
    assert "export [OPTIONS] [SPEC]" in ex.stdout and "--allow-incomplete" in ex.stdout
    trial = subprocess.run([sys.executable, "-m", "workloads.trial", "--help"], capture_output=True, text=True)
    text = " ".join(trial.stdout.split())
    for choices in ("--workload {gpt,vit,swin}", "--schedule {constant,cosine,linear}", "--precision {fp32,bf16}",
                    "--device {auto,cpu,cuda,cuda:N}", "--data {auto,stdlib,text,bin,digits,imagefolder,cifar10,synthetic}"):
        assert choices in text, choices
    from workloads.cli import parser

    undocumented = [a.dest for a in parser()._actions if not a.help or a.help == a.dest.replace("_", " ")]
    assert undocumented == []


def test_a_sweep_where_every_trial_failed_exits_non_zero(tmp_path):
    shards = tmp_path / "shards"  # present (the driver's check passes), empty (the trial fails)
    shards.mkdir()
    (shards / "train.bin").touch()
    (shards / "val.bin").touch()
    raw = dict(SPEC, name="t-allfail", steps=5, axes={"lr": [1e-3]}, max_failures=0,
               fixed=dict(SPEC["fixed"], data="bin", data_path=str(shards)))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = ablate_here("sweep", str(path), "--workdir", str(tmp_path / "wd"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "failed: ValueError: cannot mmap an empty file" in out.stdout
    # the end-of-sweep hint opens the experiment's own page, on MLflow's model-training view
    exp = MlflowClient(f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}").get_experiment_by_name("ablate-t-allfail")
    assert (f"then open:    http://127.0.0.1:5000/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
            in out.stdout), out.stdout
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: every trial failed (1); the first error: ValueError: cannot mmap an empty file "
                      "(tracebacks: each trial run's traceback.txt in MLflow)"]


@pytest.mark.slow
def test_a_rerun_after_sigkill_trains_only_what_mlflow_does_not_hold_finished(tmp_path):
    """SIGKILL leaves Tune's saved state behind MLflow's record (it is saved every few seconds; here
    never after the start, TUNE_GLOBAL_CHECKPOINT_S=3600): the re-run does not train again the trials
    MLflow holds as finished (before issue #32 it did), closes the runs the killed attempt left
    RUNNING before replacing them (a soft-deleted run stayed RUNNING), and stops the Ray agents the
    killed driver left running."""
    from mlflow.entities import ViewType

    raw = dict(SPEC, name="t-kill9", steps=150)
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    wd = tmp_path / "wd"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(spec_path), "--workdir", str(wd)]
    log = tmp_path / "first.log"
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1", TUNE_GLOBAL_CHECKPOINT_S="3600"),
                            start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    uri = f"sqlite:///{wd / 'mlflow.db'}"
    client = MlflowClient(uri)
    try:
        deadline = time.time() + 240
        finished, stale = {}, set()
        while time.time() < deadline and not (len(finished) >= 2 and stale):
            time.sleep(0.25)
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                finished = _finished(client, "ablate-t-kill9")
            except Exception:  # noqa: BLE001 - the store may be mid-creation
                continue
            stale = set(finished) - _tune_ended(wd / "ray_results" / "t-kill9")  # ended in MLflow, not in Tune's state
        assert len(finished) >= 2 and stale, log.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)  # the driver alone, as `kill -9 PID` does
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # what MLflow held when the kill landed (a trial may have ended since the last look)
    finished = _finished(client, "ablate-t-kill9")
    assert len(finished) < 4, "the kill must land mid-sweep"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    import re

    marked = re.search(r"(\d+) trial\(s\) MLflow holds as ended not run again", done.stdout)
    assert marked and len(stale) <= int(marked.group(1)) <= len(finished), done.stdout
    trials = _runs(client, "ablate-t-kill9", "trial")
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    by_trial = {r.data.tags["ablate.trial_id"]: r.info.run_id for r in trials}
    assert len(by_trial) == 4 and all(by_trial[t] == rid for t, rid in finished.items())  # not trained again
    exp = client.get_experiment_by_name("ablate-t-kill9")
    every = client.search_runs([exp.experiment_id], "tags.`ablate.kind` = 'trial'", run_view_type=ViewType.ALL)
    deleted = [r for r in every if r.info.lifecycle_stage == "deleted"]
    assert all(r.info.status == "KILLED" for r in deleted), [(r.info.run_name, r.info.status) for r in deleted]
    assert [ln for ln in done.stderr.splitlines() if ln.startswith("note: stopped")], done.stderr[-2000:]


def _finished(client, exp_name) -> dict[str, str]:
    """Trial id -> run id of the trial runs MLflow holds as FINISHED."""
    return {r.data.tags["ablate.trial_id"]: r.info.run_id for r in _runs(client, exp_name, "trial")
            if r.info.status == "FINISHED"}


def _tune_ended(exp_dir) -> set:
    """The trials Tune's newest saved state holds as ended (what Tuner.restore would skip)."""
    import json

    files = sorted(exp_dir.glob("experiment_state-*.json"))
    if not files:
        return set()
    try:
        data = json.loads(files[-1].read_text())
    except ValueError:  # being written
        return set()
    return {t["trial_id"] for t in (json.loads(e[0]) for e in data["trial_data"]) if t["status"] in ("TERMINATED", "ERROR")}


_KILL9_DRIVER = r'''
import os, sys, time
from orchestrator.spec import load_spec
from orchestrator.sweep import run_sweep

HANG = float(os.environ.get("HANG_LR", "0"))


def trial(config):  # pickled by value (defined in __main__); the real trial, except one that hangs
    import time

    from orchestrator.trainable import train_trial

    if config["point"]["trial"]["lr"] == HANG:
        time.sleep(600)
    return train_trial(config)


run_sweep(load_spec(sys.argv[1]), workdir=sys.argv[2], trial_fn=trial)
'''


@pytest.mark.slow
def test_a_rerun_after_sigkill_leaves_alone_a_trial_ended_after_tunes_last_save(tmp_path):
    """A trial that Tune created *and* that ended after Tune last saved its state is not in that
    state at all: the resumed Tune creates it again, with the same id. Before, it trained again and
    its recorded run was replaced (seen when the start-up got faster: the test above then raced);
    now MLflow's record stands and the trial returns at once. Deterministic: of 3 trials at
    concurrency 2, the second hangs, so the third is created and ends while Tune's saved state
    (written at the start only, TUNE_GLOBAL_CHECKPOINT_S=3600) holds the first two."""
    import json

    raw = dict(SPEC, name="t-unsaved", steps=30, probe_interval=10, axes={"lr": [1e-3, 2e-3, 3e-3]})
    spec_path, wd, drv = tmp_path / "s.yaml", tmp_path / "wd", tmp_path / "drv.py"
    spec_path.write_text(yaml.safe_dump(raw))
    drv.write_text(_KILL9_DRIVER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TUNE_GLOBAL_CHECKPOINT_S="3600")
    log = tmp_path / "first.log"
    proc = subprocess.Popen([sys.executable, str(drv), str(spec_path), str(wd)], env=dict(env, HANG_LR="0.002"),
                            start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    client = MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")
    exp_dir = wd / "ray_results" / "t-unsaved"
    try:
        deadline, finished = time.time() + 240, {}
        while time.time() < deadline and len(finished) < 2:
            time.sleep(0.25)
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                finished = _finished(client, "ablate-t-unsaved")
            except Exception:  # noqa: BLE001 - the store may be mid-creation
                continue
        assert len(finished) == 2, log.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    state = json.loads(sorted(exp_dir.glob("experiment_state-*.json"))[-1].read_text())
    saved = {json.loads(e[0])["trial_id"] for e in state["trial_data"]}
    unsaved = set(finished) - saved
    assert unsaved, (finished, saved)  # the case this test is for: ended, and not in Tune's state
    done = subprocess.run([sys.executable, str(drv), str(spec_path), str(wd)], env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 trial(s) MLflow holds as ended not run again" in done.stdout, done.stdout
    trials = _runs(client, "ablate-t-unsaved", "trial")
    by_trial = {r.data.tags["ablate.trial_id"]: r for r in trials}
    assert len(trials) == 3 and len(by_trial) == 3 and all(r.info.status == "FINISHED" for r in trials)
    assert all(by_trial[t].info.run_id == rid for t, rid in finished.items())  # not trained again
    assert all(by_trial[t].data.tags["status"] != "running" for t in by_trial)
