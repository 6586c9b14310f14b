"""Real Ray (local, 2 CPUs), real MLflow (SQLite in a temp dir), real torch."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.spec import parse_spec
from orchestrator.sweep import run_sweep
from workloads.outcome import trial_class

SPEC = {
    "name": "t-smoke",
    "workload": "gpt",
    "steps": 40,
    "fixed": {"depth": 1, "width": 32, "heads": 2, "seq_len": 32, "batch_size": 8, "warmup_steps": 0,
              "schedule": "constant", "eval_interval": 20, "eval_batches": 1},
    "axes": {"lr": [1e-3, 5e-1], "stabilizers": ["none", "weyl", "qk_norm"]},
    "probe_interval": 10,
    "resources": {"cpus": 1, "gpus": 0},
    "concurrency": 2,
    "max_failures": 1,
}


def _trial_runs(client, exp_name, sweep):
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id],
                              f"tags.`ablate.sweep` = '{sweep}' and tags.`ablate.kind` = 'trial'",
                              max_results=1000)


def test_smoke_sweep_records_every_trial_in_mlflow(ray_local, tmp_path):
    spec = parse_spec(SPEC)
    out = run_sweep(spec, SPEC, workdir=tmp_path, progress=False)
    assert out.trials == 6 and sum(out.counts.values()) == 6
    client = MlflowClient(out.tracking_uri)
    runs = _trial_runs(client, out.experiment, spec.name)
    assert len(runs) == 6 and len({r.data.tags["ablate.trial_id"] for r in runs}) == 6
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {out.parent_run_id}
    parent = client.get_run(out.parent_run_id)
    assert parent.data.tags["ablate.kind"] == "sweep" and parent.info.status == "FINISHED"
    assert parent.data.params["workload"] == "gpt" and "spec.yaml" in [a.path for a in client.list_artifacts(out.parent_run_id)]
    statuses = {r.data.tags["status"] for r in runs}
    assert statuses <= {"stable", "collapsed", "diverged"}  # 40 steps: most end at the unigram baseline
    for r in runs:
        assert r.data.params["lr"] in ("0.001", "0.5") and r.data.params["workload"] == "gpt"
        hist = client.get_metric_history(r.info.run_id, "loss")
        steps = [m.step for m in hist]
        assert len(steps) == len(set(steps))  # each probe step once
        m, tags = r.data.metrics, r.data.tags
        # l_0, the baseline and the class are recorded, with the criterion
        assert m["result/initial_loss"] > m["result/baseline_loss"] > 0
        assert tags["crash_criterion"].startswith("crash = diverged") and "crashed" in tags
        if not tags["stop_reason"]:  # ran to the end: classed by its final loss
            assert {0, 10, 20, 30, 39} <= set(steps) and steps[-1] == 39  # probe steps (and event steps)
            assert tags["status"] == trial_class(m["result/final_loss"], m["result/initial_loss"],
                                                 m["result/baseline_loss"])
            for key in ("attn_entropy/min", "spectral_conc/max", "grad_norm", "val_loss"):
                assert key in m, key
            if r.data.params["stabilizers"] == '["weyl"]':
                assert "weyl/fire_rate" in m
        else:
            assert tags["status"] == "diverged" and tags["divergence_kind"] == tags["stop_reason"]
            events = json.loads(Path(client.download_artifacts(r.info.run_id, "events.json", str(tmp_path))).read_text())
            assert any(e["kind"] == tags["stop_reason"] and e["step"] == int(tags["divergence_step"]) for e in events)
            if tags["stop_reason"] == "nonfinite":
                # no 1.8e308 stand-in for an infinite loss: no metric, a tag saying what it was
                assert "result/final_loss" not in m and tags["result/final_loss"] == "inf"
        assert tags["node_id"] and r.info.status == "FINISHED"

    # Re-running the finished sweep continues it: nothing runs again, nothing is duplicated.
    again = run_sweep(spec, SPEC, workdir=tmp_path, progress=False)
    assert again.resumed and again.counts == out.counts
    assert len(_trial_runs(client, out.experiment, spec.name)) == 6


def test_a_trial_that_raises_is_retried_then_recorded_failed(ray_local, tmp_path):
    shards = tmp_path / "empty-shards"
    shards.mkdir()
    (shards / "train.bin").touch()
    (shards / "val.bin").touch()
    raw = dict(SPEC, name="t-fail", steps=20,
               axes={"lr": [1e-3], "data": ["stdlib", "bin"]},
               fixed=dict(SPEC["fixed"], data_path=str(shards)))
    # data=stdlib ignores data_path; data=bin finds the shards (so the driver's check passes) but
    # cannot map empty files: ValueError in the worker
    out = run_sweep(parse_spec(raw), raw, workdir=tmp_path, progress=False)
    assert out.counts["failed"] == 1 and sum(out.counts.values()) == 2
    client = MlflowClient(out.tracking_uri)
    runs = {r.data.params["data"]: r for r in _trial_runs(client, out.experiment, "t-fail")}
    failed = runs["bin"]
    assert failed.data.tags["status"] == "failed" and failed.info.status == "FAILED"
    assert int(failed.data.tags["num_failures"]) == 2  # first attempt + one retry
    assert "ValueError" in failed.data.tags["error"]
    tb = Path(client.download_artifacts(failed.info.run_id, "traceback.txt", str(tmp_path))).read_text()
    # Ray's record of both attempts, each with the frames down to where it raised
    assert "Failure # 1" in tb and "Failure # 2" in tb and tb.count("cannot mmap an empty file") >= 2
    assert "in train_trial" in tb and 'workloads/data.py", line' in tb
    assert runs["stdlib"].data.tags["status"] in ("stable", "collapsed")  # 20 steps: near the baseline


def test_gpus_on_a_cluster_without_gpus_fail_before_anything_runs(ray_local, tmp_path):
    from orchestrator.spec import SpecError

    raw = dict(SPEC, name="t-gpu", resources={"cpus": 1, "gpus": 0.5})
    # embedded: refused from torch's device count, before the workdir is touched (issue 18)
    with pytest.raises(SpecError, match=r"resources.gpus: 0.5 asked per trial, but this machine has no GPU"):
        run_sweep(parse_spec(raw), raw, workdir=tmp_path / "wd", progress=False)
    assert not (tmp_path / "wd").exists()
    # a cluster (an address): its own resources, checked once the driver has joined it
    import ray

    # (no autoscaler: what is there is all there is; tests/test_autoscaling.py has one that adds nodes)
    with pytest.raises(SpecError, match=r"resources.gpus: 0.5 per trial, but no node of the cluster can ever hold it "
                                        r"\(the largest has 0 GPU\): the cluster has 2 CPU / 0 GPU now, and no "
                                        r"autoscaler that could add nodes; set resources.gpus: 0 to run on CPUs"):
        run_sweep(parse_spec(raw), raw, workdir=tmp_path, progress=False,
                  address=ray.get_runtime_context().gcs_address)
    assert not (tmp_path / "ray_results" / "t-gpu").exists()
