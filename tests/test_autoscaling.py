"""The cluster path as users run it (issue 27): a cluster that starts with its head alone and GPU
workers at ``min_workers: 0``, on Ray's own autoscaler (its fake multi-node provider, Ray's test
harness: ``orchestrator.localcluster.AutoscalingCluster``, node types from cluster.yaml scaled to this
machine, token authentication, the job server and an MLflow server on 127.0.0.1), driven through
``ray job submit`` / ``ray job stop`` and ``ablate`` as the README's cluster section runs them.

The fast tests check the pieces without Ray: what the capacity refuses and prints, the device check
of a trial given GPUs, the progress line's note. The slow ones start the cluster once for the module
(about 40-60 s on 2 loaded cores) and run tiny trials (a GPT of width 32, a few dozen steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.capacity import Capacity, NodeType
from orchestrator.progress import Progress
from orchestrator.trainable import FAKE_GPUS_ON_CPU, NoCudaOnGpuNode, gpu_device_check

ROOT = Path(__file__).resolve().parent.parent
A10G = NodeType("gpu_a10g", {"CPU": 8, "GPU": 1}, 8)
A100 = NodeType("gpu_a100x8", {"CPU": 96, "GPU": 8}, 2)


# ----------------------------------------------------------------------------- fast: no Ray
def test_a_fresh_autoscaling_cluster_holds_what_its_node_types_hold():
    head_only = [{"CPU": 0.0, "memory": 1e9}]
    cap = Capacity(head_only, [A10G, A100], "autoscaler config", 10)
    assert cap.refusal(2, 0.25) is None and cap.refusal(8, 8) is None  # nothing there yet, types can
    msg = cap.refusal(1, 16)
    assert msg == ("resources.gpus: 16 per trial, but no node of the cluster can ever hold it (the largest has 8 GPU): "
                   "the cluster has 0 CPU / 0 GPU now; autoscaler: up to 8 x gpu_a10g (8 CPU, 1 GPU), "
                   "up to 2 x gpu_a100x8 (96 CPU, 8 GPU)")
    assert cap.refusal(128, 0).startswith("resources.cpus: 128 per trial, but no node of the cluster can ever hold it "
                                          "(the largest has 96 CPU)")
    # each fits some type, no type fits both
    assert Capacity(head_only, [A10G, NodeType("cpu", {"CPU": 64}, 4)]).refusal(16, 1).startswith(
        "resources: 16 CPU / 1 GPU per trial, but no node of the cluster can ever hold both")
    assert cap.lines() == ["cluster now: 1 node(s), 0 CPU, 0 GPU",
                           "autoscaler: up to 8 x gpu_a10g (8 CPU, 1 GPU), up to 2 x gpu_a100x8 (96 CPU, 8 GPU) "
                           "(at most 10 worker nodes in all)"]
    # no autoscaler: what is there is all there is
    static = Capacity([{"CPU": 4.0}])
    assert static.refusal(1, 0.5).endswith("and no autoscaler that could add nodes; set resources.gpus: 0 to run on CPUs")
    assert static.lines()[1] == "autoscaler: none found; the cluster is what is there now"


def test_slots_count_what_the_cluster_can_run_at_its_largest():
    head_only = [{"CPU": 0.0}]
    # gpus 0.25, cpus 2: an a10g holds 4 (8 CPU / 2, 1 GPU / 0.25), an a100x8 32 (96/2=48, 8/0.25=32)
    assert Capacity(head_only, [A10G, A100], max_workers=10).slots({"CPU": 2, "GPU": 0.25}) == 8 * 4 + 2 * 32
    # the cluster-wide cap: the biggest types first
    assert Capacity(head_only, [A10G, A100], max_workers=3).slots({"CPU": 2, "GPU": 0.25}) == 2 * 32 + 1 * 4
    assert Capacity([{"CPU": 2.0}]).slots({"CPU": 1, "GPU": 0}) == 2       # an embedded machine
    assert Capacity(head_only).slots({"CPU": 1, "GPU": 0}) == 1             # never 0


def test_a_trial_given_gpus_never_trains_on_the_cpu_silently(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check lets the trial train on it")
    monkeypatch.delenv(FAKE_GPUS_ON_CPU, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(NoCudaOnGpuNode) as e:
        gpu_device_check("auto", [0], "ab12", "host1")
    line = str(e.value)
    assert "\n" not in line and "node ab12 (host1)" in line and "CUDA_VISIBLE_DEVICES='0'" in line
    assert gpu_device_check("auto", [], "ab12", "host1") == ("auto", "")   # no GPU given: nothing to check
    assert gpu_device_check("cpu", [0], "ab12", "host1") == ("cpu", "")    # the spec asked for the CPU
    monkeypatch.setenv(FAKE_GPUS_ON_CPU, "1")                               # test clusters only
    device, note = gpu_device_check("auto", [0], "ab12", "host1")
    assert device == "cpu" and note.startswith(f"{FAKE_GPUS_ON_CPU}=1: ") and "test clusters only" in note


def test_the_progress_line_says_when_trials_wait_for_nodes():
    p = Progress("s", 8)
    line = p.line(["PENDING"] * 6 + ["RUNNING"] * 2, [], 0, note=lambda n: f"{n} waiting for nodes")
    assert "2 running, 6 waiting for nodes, elapsed" in line
    assert "waiting" not in p.line(["RUNNING"] * 2, [], 0, note=lambda n: "")


# ------------------------------------------------------------------- slow: Ray's autoscaler
TINY = {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "eval_batches": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("aiohttp_cors", reason="the job server needs ray[default] (the 'cluster' extra)")
    from orchestrator.localcluster import AutoscalingCluster, node_types_from

    head, types = node_types_from(max_workers=2)
    c = AutoscalingCluster(tmp_path_factory.mktemp("autoscaling"), worker_types={"gpu_a10g": types["gpu_a10g"]},
                           head_resources=head, max_workers=2, idle_timeout_s=8)
    c.start()
    yield c
    c.shutdown()


def write_spec(path: Path, **fields) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def ablate(cluster, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=cluster.client_env(), text=True,
                          capture_output=True, timeout=timeout, cwd=ROOT)


def submit(cluster, *cmd, wait=True, sid=None, timeout=600) -> subprocess.CompletedProcess:
    """The README's command: ``ray job submit --address <job server> --working-dir . -- ablate ...``."""
    args = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", "."]
    args += (["--submission-id", sid] if sid else []) + ([] if wait else ["--no-wait"])
    return subprocess.run([*args, "--", *cmd], env=cluster.client_env(), text=True, capture_output=True,
                          timeout=timeout, cwd=ROOT)


def trial_runs(uri: str, experiment: str, sweep: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`ablate.kind` = 'trial' and tags.`ablate.sweep` = '{sweep}'",
                              max_results=5000)


def wait_for(pred, timeout: float, what: str, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.slow
def test_gpu_sweep_scales_workers_from_zero_through_ray_job_submit(cluster, tmp_path):
    spec = write_spec(tmp_path / "gpu.yaml", name="as-gpu", workload="gpt", steps=40, fixed=TINY,
                      axes={"lr": [1e-3, 2e-3, 4e-3, 8e-3]}, probe_interval=10, resources={"cpus": 1, "gpus": 0.25})
    assert cluster.workers() == []  # the head alone, as `ray up` leaves it
    chk = ablate(cluster, "check", str(spec), "--address", cluster.address)
    assert chk.returncode == 0, chk.stderr
    assert "cluster now: 1 node(s), 0 CPU, 0 GPU" in chk.stdout
    assert "autoscaler: up to 2 x gpu_a10g (2 CPU, 1 GPU) (at most 2 worker nodes in all)" in chk.stdout
    big = write_spec(tmp_path / "big.yaml", **{**json.loads(json.dumps(_yaml(spec))), "resources": {"cpus": 1, "gpus": 2}})
    refused = ablate(cluster, "check", str(big), "--address", cluster.address)
    assert refused.returncode == 2 and "resources.gpus: 2 per trial, but no node of the cluster can ever hold it " \
                                       "(the largest has 1 GPU)" in refused.stderr and "gpu_a10g" in refused.stderr

    job = submit(cluster, "ablate", "sweep", str(spec))
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-4000:]
    assert "sweep as-gpu: 4 trials:" in out and " 0 failed" in out
    assert "waiting for nodes" in out  # the progress line, while the autoscaler added the first worker
    runs = trial_runs(cluster.mlflow.uri, "ablate-as-gpu", "as-gpu")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    heads = {n["node_id"] for n in cluster.nodes() if n["head"]}
    assert all(r.data.tags["node_id"] not in heads and r.data.tags["gpu_ids"] != "" for r in runs)
    assert all(r.data.tags["device"] == "cpu" and r.data.tags["device_override"].startswith(FAKE_GPUS_ON_CPU)
               for r in runs)
    log = cluster.autoscaler_log()
    assert "Adding 1 node(s) of type gpu_a10g" in log or "Adding 2 node(s) of type gpu_a10g" in log, log[-3000:]
    # idle workers go (idle_timeout 8 s)
    wait_for(lambda: cluster.workers() == [], 120, "the idle workers to be removed")
    # the autoscaler logs each idle node's termination at once ("... Terminating the node with id X and
    # ip Y. (idle)"); its summary line "Removing N nodes of type gpu_a10g (idle)." comes later, if at all
    wait_for(lambda: "(idle)" in cluster.autoscaler_log(), 30, "the autoscaler to log the idle nodes' removal")
    assert any("Terminating the node" in ln and ln.rstrip().endswith("(idle)")
               for ln in cluster.autoscaler_log().splitlines()), cluster.autoscaler_log()[-3000:]
    print("autoscaler:", *[ln for ln in cluster.autoscaler_log().splitlines() if "Adding" in ln or "Removing" in ln
                               or "Terminating the node" in ln],
          sep="\n  ")
    # the README's read-back: ablate export --tracking-uri
    exp = ablate(cluster, "export", str(spec), "--tracking-uri", cluster.mlflow.uri, "--out", str(tmp_path / "x"))
    assert exp.returncode == 0, exp.stderr
    assert f"4 trials from {cluster.mlflow.uri}" in exp.stdout


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _optuna_counts(workdir: Path, prefix: str) -> dict[str, tuple[int, int]]:
    """Per study of the search: (trials COMPLETE, highest trial number + 1)."""
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{workdir / 'optuna.db'}"
    out = {}
    for s in optuna.get_all_study_summaries(storage):
        if s.study_name.startswith(prefix + "::"):
            st = optuna.load_study(study_name=s.study_name, storage=storage)
            trials = st.get_trials(deepcopy=False)
            out[s.study_name] = (sum(t.state == TrialState.COMPLETE for t in trials), len(trials))
    return out


@pytest.mark.slow
def test_boundary_search_stopped_with_ray_job_stop_resumes_when_submitted_again(cluster, tmp_path):
    name = "as-bnd"
    # min_trials_per_cell = max_trials_per_cell: no cell stops early (neither on its interval nor on
    # the range's edge), each runs its 10 trials (the stop lands mid-search)
    spec = write_spec(tmp_path / "bnd.yaml", name=name, workload="gpt", steps=50,
                      fixed={**TINY, "warmup_steps": 0, "schedule": "constant", "eval_interval": 0},
                      axes={"stabilizers": ["none", "qk_norm"]}, probe_interval=10,
                      resources={"cpus": 1, "gpus": 0.25},
                      boundary={"lr_range": [1e-2, 3.0], "resolution": 1.01, "max_trials_per_cell": 10,
                                "min_trials_per_cell": 10, "max_in_flight_per_cell": 2})
    first = submit(cluster, "ablate", "boundary", str(spec), wait=False, sid="bnd-1")
    assert first.returncode == 0, first.stderr
    finished = lambda: [r for r in trial_runs(cluster.mlflow.uri, "ablate-as-bnd", name)  # noqa: E731
                        if r.data.tags.get("status") in ("stable", "diverged", "collapsed")]
    wait_for(lambda: len(finished()) >= 3, 400, "three finished trials of the first job", every=2)
    stop = subprocess.run(["ray", "job", "stop", "--address", cluster.dashboard_url, "bnd-1"],
                          env=cluster.client_env(), text=True, capture_output=True, timeout=180)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = wait_for(lambda: str(cluster.jobs().get_job_status("bnd-1")).split(".")[-1] in ("STOPPED", "FAILED")
                      and cluster.jobs().get_job_status("bnd-1"), 120, "the job to stop")
    assert str(status).endswith("STOPPED")
    logs1 = cluster.jobs().get_job_logs("bnd-1")
    assert "SIGTERM" in logs1, logs1[-3000:]          # ablate stopped cleanly (exit 143), its runs marked
    at_stop = _optuna_counts(cluster.workdir, name)
    done_at_stop = len(finished())
    assert sum(c for c, _ in at_stop.values()) == done_at_stop >= 3
    assert done_at_stop < 20, "the search had ended before the stop"

    second = submit(cluster, "ablate", "boundary", str(spec), sid="bnd-2")
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    after = _optuna_counts(cluster.workdir, name)
    runs = trial_runs(cluster.mlflow.uri, "ablate-as-bnd", name)
    done = [r for r in runs if r.data.tags.get("status") in ("stable", "diverged", "collapsed")]
    # the posterior continued: every study kept the first job's trials and added to them
    assert set(after) == set(at_stop) and all(after[k][0] >= at_stop[k][0] for k in after)
    assert sum(c for c, _ in after.values()) > done_at_stop
    # each cell completed its budget of 10 over the two jobs; trials cut off by the stop are pruned
    # and not counted (issue #31), so a study holds 10 complete trials and those pruned
    assert all(c == 10 and n >= 10 for c, n in after.values()), after
    # each trial recorded once: one finished MLflow run per completed Optuna trial, no (cell, lr, seed) twice
    assert len(done) == sum(c for c, _ in after.values())
    keys = [(r.data.params["stabilizers"], r.data.params["lr"], r.data.params["seed"]) for r in done]
    assert len(keys) == len(set(keys))
    assert not [r for r in runs if r.data.tags.get("status") == "running"]
    print(f"resume counts: at stop {done_at_stop} trials in MLflow, studies {at_stop}; after resume {len(done)}, "
          f"studies {after}")


@pytest.mark.slow
def test_a_worker_lost_mid_trial_has_its_trial_retried_and_recorded_once(cluster, tmp_path):
    name = "as-lost"
    spec = write_spec(tmp_path / "lost.yaml", name=name, workload="gpt", steps=400, fixed=TINY,
                      axes={"lr": [1e-3, 2e-3, 3e-3]}, probe_interval=20, resources={"cpus": 1, "gpus": 0.25},
                      max_failures=2)
    job = submit(cluster, "ablate", "sweep", str(spec), wait=False, sid="lost-1")
    assert job.returncode == 0, job.stderr

    def running_on_worker():
        heads = {n["node_id"] for n in cluster.nodes() if n["head"]}
        return next((r.data.tags["node_id"] for r in trial_runs(cluster.mlflow.uri, "ablate-as-lost", name)
                     if r.data.tags.get("status") == "running" and r.data.tags.get("node_id") not in (None, "", *heads)),
                    None)

    victim = wait_for(running_on_worker, 300, "a trial running on a worker node", every=0.5)
    assert cluster.kill_worker(victim) >= 1
    final = wait_for(lambda: (s := str(cluster.jobs().get_job_status("lost-1")).split(".")[-1]) in
                     ("SUCCEEDED", "FAILED", "STOPPED") and s, 600, "the sweep to end", every=2)
    logs = cluster.jobs().get_job_logs("lost-1")
    assert final == "SUCCEEDED", logs[-4000:]
    runs = trial_runs(cluster.mlflow.uri, "ablate-as-lost", name)
    ids = [r.data.tags["ablate.trial_id"] for r in runs]
    assert len(runs) == 3 and len(set(ids)) == 3, [(r.data.tags.get("status"), r.info.status) for r in runs]
    assert all(r.info.status == "FINISHED" and r.data.tags["status"] in ("stable", "diverged", "collapsed")
               for r in runs)
    assert all(r.data.tags["node_id"] != victim for r in runs)  # the lost node's trial ran again elsewhere
    print("autoscaler on the lost node:", [ln for ln in cluster.autoscaler_log().splitlines() if victim in ln][-5:])


def test_the_searcher_asks_a_waiting_cell_again_only_after_its_own_tell(monkeypatch):
    """Tune polls ``suggest`` on every step it has room; a cell waiting for its trials in flight is
    not asked again (no study read, no posterior fit) until one of its trials ends: a poll's cost
    does not grow with the cells that wait."""
    from orchestrator.boundary import BoundarySearcher, CellSearch, cells_of
    from orchestrator.boundary_config import boundary_config
    from orchestrator.spec import parse_spec

    raw = {"name": "poll", "workload": "gpt", "steps": 10, "fixed": TINY, "axes": {"warmup_steps": [0, 1, 2]},
           "boundary": {"lr_range": [1e-3, 1.0], "max_trials_per_cell": 10, "max_in_flight_per_cell": 2}}
    spec = parse_spec(raw)
    cfg = boundary_config(spec)
    searches = [CellSearch(c, cfg, None, "poll") for c in cells_of(spec, cfg)]
    asked = []
    real_ask = CellSearch.ask
    monkeypatch.setattr(CellSearch, "ask", lambda self: asked.append(self.cell.key) or real_ask(self))
    searcher = BoundarySearcher(searches)
    got = [searcher.suggest(f"t{i}") for i in range(6)]
    assert all(g is not None for g in got)                        # 3 cells x 2 in flight
    assert searcher.suggest("t6") is None
    n = len(asked)
    for i in range(7, 20):                                        # polls while every cell waits
        assert searcher.suggest(f"t{i}") is None
    assert len(asked) == n, "waiting cells were asked again"
    cell = got[0]["point"]["cell"]
    summary = {"final_loss": 2.0, "initial_loss": 5.5, "baseline_loss": 4.0, "stop_reason": None}
    searcher.on_trial_complete("t0", {"summary": json.dumps(summary)})
    nxt = searcher.suggest("t20")
    assert nxt is not None and nxt["point"]["cell"] == cell      # only the cell told is asked again
    assert asked[n:] == [cell]
