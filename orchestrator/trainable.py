"""The Ray Tune trainable. Kept apart from the driver-side modules so that a worker process imports
only Ray and ``workloads`` (not MLflow, pydantic or the CLI): workers start faster."""

from __future__ import annotations

import json
import logging
import os
import socket
import time

PRELOAD = ("ray.tune.trainable.function_trainable", "orchestrator.trainable", "workloads.trial")
"""What a trial's worker process imports before its trial can start (Tune's function-trainable actor,
this module, the trial's code and torch): the embedded Ray has its workers import these as they
start (Ray's ``preload_python_modules``), while the driver is still setting up, so that the first
trial starts without waiting for them (``orchestrator.sweep.init_ray``)."""

# Test only: Ray's fake multi-node clusters (orchestrator.localcluster) advertise GPUs that the
# machine does not have. With this set to 1 in a node's environment, a trial to which Ray gave such
# a GPU trains on the CPU (and its run is tagged so) instead of failing. Never set it on a real cluster.
FAKE_GPUS_ON_CPU = "ABLATE_TEST_ONLY_FAKE_GPUS_TRAIN_ON_CPU"


class NoCudaOnGpuNode(RuntimeError):
    """Ray assigned GPUs to the trial, but CUDA is unavailable where it runs."""


def gpu_device_check(device: str, gpu_ids: list, node: str, host: str) -> tuple[str, str]:
    """A trial never trains on the wrong device silently. When Ray assigned GPUs (``gpu_ids``) to a
    trial whose ``device`` is not an explicit ``cpu`` and torch sees no CUDA device on this node:
    :class:`NoCudaOnGpuNode`, one line naming the node and ``CUDA_VISIBLE_DEVICES`` (Tune retries
    the trial, then records it failed with that line); or, with :data:`FAKE_GPUS_ON_CPU` set (test
    clusters with fake GPUs), the device ``cpu`` and a note for the run's ``device_override`` tag.
    Returns (device, note); the note is "" when nothing was overridden."""
    if not gpu_ids or device == "cpu":
        return device, ""
    import torch

    if torch.cuda.is_available():
        return device, ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if os.environ.get(FAKE_GPUS_ON_CPU) == "1":
        note = (f"{FAKE_GPUS_ON_CPU}=1: Ray's GPU(s) {gpu_ids} on node {node} have no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={visible!r}); trained on the CPU (test clusters only)")
        logging.getLogger("ablate").warning(note)
        return "cpu", note
    raise NoCudaOnGpuNode(
        f"Ray assigned GPU(s) {gpu_ids} to this trial on node {node} ({host}), but torch sees no CUDA device "
        f"there (CUDA_VISIBLE_DEVICES={visible!r}): not training on the CPU instead; check the node's NVIDIA "
        f"driver and its torch build (python -c 'import torch; print(torch.cuda.is_available())')")


def train_trial(config: dict, report_every_s: float = 1.0) -> None:
    """Tune function trainable: one ``workloads.trial.run``, its reporter forwarded to ``tune.report``.

    ``config["point"]`` holds ``{"trial": TrialConfig fields, "label": str}``. Each report carries
    ``batch``, the JSON list of ``[step, metrics, events]`` of the probe steps since the last report
    (the latest step's metrics are also top-level keys, for Tune's own view), the node id and host
    on the first report, and on the last a ``summary`` (the ``TrialResult`` as JSON, with the
    ``config`` the trial ran: what ``ablate trial --from-run`` re-runs). The trial's ``threads``
    (from the spec's ``resources.cpus``) reach ``torch.set_num_threads`` in the worker through the
    trainer; the summary records torch's actual count. A trial given GPUs by Ray on a node without
    CUDA fails before it builds anything (:func:`gpu_device_check`).
    """
    import ray
    from ray import tune

    from workloads.trial import TrialConfig, run

    started_at = time.time()
    node = ray.get_runtime_context().get_node_id()
    gpu_ids = ray.get_gpu_ids()
    fields = dict(config["point"]["trial"])
    fields["device"], override = gpu_device_check(fields.get("device", "auto"), gpu_ids, node, socket.gethostname())
    cfg = TrialConfig(**fields)
    pending: list[list] = []  # [step, metrics, events] not yet sent
    last_sent = [0.0, True]   # time of the last report; whether the next is the first

    def send(final: dict | None = None) -> None:
        step, metrics, _ = pending[-1] if pending else (final["step"], {}, [])
        out = {**metrics, "step": step, "batch": json.dumps(pending)}
        if last_sent[1]:
            out.update(node_id=node, hostname=socket.gethostname(), started_at=started_at,
                       gpu_ids=",".join(str(g) for g in gpu_ids))
            if override:
                out["device_override"] = override
            last_sent[1] = False
        if final:
            out.update(final)
        tune.report(out)
        pending.clear()
        last_sent[0] = time.monotonic()

    def reporter(step, metrics, events):
        # Each tune.report is a round trip to the driver: probe steps are sent in batches, at most
        # every `report_every_s` seconds, and at once when something diverged.
        pending.append([step, metrics, [e.to_dict() for e in events]])
        if events or time.monotonic() - last_sent[0] >= report_every_s:
            send()

    res = run(cfg, reporter)
    summary = res.to_dict()
    summary["config"] = cfg.to_dict()
    summary.pop("final_metrics", None)
    summary["ended_at"] = time.time()
    send({"step": res.steps_run, "summary": json.dumps(summary, default=str),
          "final_loss": res.final_loss, "diverged": int(res.diverged)})


def is_recorded(recorded: dict[str, str] | None, trial_id: str, config: dict) -> bool:
    """Whether a trial is one MLflow already holds as ended: ``recorded`` (trial id -> its run's
    label) has its id *and* its grid point's label. The one test :func:`unless_recorded` (in the
    trial's worker) and the sweep's tracking callback (in the driver) both apply."""
    label = (recorded or {}).get(trial_id)
    return label is not None and label == config["point"]["label"]


def unless_recorded(fn, recorded: dict[str, str]):
    """``fn`` as a Tune function trainable, except for a trial that MLflow already holds as ended:
    ``recorded`` maps trial ids to their runs' labels, and a trial with one of those ids *and* that
    label (the same grid point) returns at once, reporting nothing, so that it is not trained again.
    A sweep resumed after SIGKILL needs it for the trials Tune created after it last saved its
    state: Tune does not know they ended and creates them again, with the same ids
    (``orchestrator.sweep.reconcile_tune_state``)."""
    def trial(config: dict) -> None:
        from ray import tune

        if is_recorded(recorded, tune.get_context().get_trial_id(), config):
            return None
        return fn(config)

    trial.__name__ = getattr(fn, "__name__", "trial")
    trial.__qualname__ = trial.__name__
    return trial
