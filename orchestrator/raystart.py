"""Starting Ray: embedded on this machine (loopback only, token authentication, the workers
pre-importing what a trial needs: ``orchestrator.embedded``) or joining a cluster, retried, with a
one-line error; and, for the command line, Ray's start overlapped with the driver's own set-up
(:func:`prestart`). Imports neither MLflow nor Ray Tune (nor torch): the command line starts Ray
with it while another thread imports those."""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from pathlib import Path

from orchestrator import embedded
from orchestrator.faults import RayStartError
from orchestrator.spec import SpecError
from orchestrator.trainable import PRELOAD

log = logging.getLogger("ablate")

_PRESTARTED: dict[str, bool] = {}  # "started": prestart started Ray; the next init_ray hands it on

# Ray's start on a loaded machine can time out (Ray waits 30 s for its node, a limit inside Ray):
# the start is retried, ABLATE_RAY_START_ATTEMPTS times in all, waiting ABLATE_RAY_START_BACKOFF
# seconds before the second attempt and twice as long before each next one.
RAY_START_ATTEMPTS = "ABLATE_RAY_START_ATTEMPTS"
RAY_START_BACKOFF = "ABLATE_RAY_START_BACKOFF"


def _env_number(name: str, default: float, cast=float):
    try:
        v = cast(os.environ.get(name, default))
    except ValueError:
        raise SpecError(f"{name}: {os.environ[name]!r} is not a number") from None
    if v < (1 if cast is int else 0):
        raise SpecError(f"{name}: {v} is too small")
    return v


def init_ray(address: str | None = None, workdir: Path | None = None, attempts: int | None = None,
             backoff: float | None = None, preload: bool = True) -> bool:
    """Connect to a cluster (``address``/``RAY_ADDRESS``) or start Ray embedded on this machine.
    True when this call started Ray (the caller then shuts it down).

    Embedded Ray is always a new instance of its own (``address="local"``): ``ray.init()`` without
    an address would attach to the cluster last started on this machine (``ray start --head``, a
    ``ray.cluster_utils.Cluster``, found through ``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``)
    and run the sweep's trials there, beside whatever else uses it.

    A start (or join) that fails is retried ``attempts`` times in all (default
    $ABLATE_RAY_START_ATTEMPTS, else 3) with a doubling wait from ``backoff`` seconds (default
    $ABLATE_RAY_START_BACKOFF, else 5); then :class:`RayStartError` names Ray, the cause and its log.
    An authentication error or a malformed address is not retried.

    ``preload``: the embedded Ray's worker processes import what a trial needs
    (``orchestrator.trainable.PRELOAD``: Ray Tune's trainable, torch, the trial's code) as they
    start, before any trial is given to them, the imports overlapping the driver's own set-up. Tune's
    trial actors run on them only without a ``runtime_env`` of their own
    (``embedded.plain_trial_actors``, around ``tuner.fit()``); before that was in place each trial
    waited for a fresh worker to import torch again (``benchmarks/orchestration_overhead.py``)."""
    import ray

    if ray.is_initialized():  # by prestart (the command line), for the session that calls this: its own
        return _PRESTARTED.pop("started", False)
    address = address or os.environ.get("RAY_ADDRESS")
    attempts = attempts if attempts is not None else _env_number(RAY_START_ATTEMPTS, 3, int)
    backoff = backoff if backoff is not None else _env_number(RAY_START_BACKOFF, 5.0)
    kwargs = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if not address:
        embedded.token_auth()  # on, or one warning line when switched off
        embedded.reap_leftovers(workdir)  # what a killed driver of this workdir left running
    for attempt in range(1, attempts + 1):
        before = _children()
        try:
            if address:
                ray.init(address=address, **kwargs)  # the cluster's own authentication applies, untouched
            else:
                system = dict(embedded.SYSTEM_CONFIG, **({"preload_python_modules": list(PRELOAD)} if preload else {}))
                embedded.inherit_worker_env()  # Tune's actor variables: trials run on the prestarted workers
                with embedded.loopback() as ip, embedded.lean_head():  # 127.0.0.1 only; no monitors, no API server
                    ray.init(address="local", include_dashboard=False, _node_ip_address=ip, _system_config=system,
                             **kwargs)
                embedded.started_here()
            break
        except Exception as e:  # noqa: BLE001 - Ray raises Exception, RuntimeError, ConnectionError, ...
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
            _kill_new_children(before)  # a half-started node's GCS / raylet, which ray.shutdown does not know
            if attempt >= attempts or not _retryable(e):
                raise RayStartError(_ray_start_message(e, address, attempt, attempts)) from e
            delay = backoff * 2 ** (attempt - 1)
            log.warning("Ray did not start (%s); attempt %d of %d in %.0f s", _first_line(e), attempt + 1,
                        attempts, delay)
            time.sleep(delay)
    if not address:
        embedded.record_session(workdir)  # for the next driver, should this one be killed
    if workdir is not None:  # Ray's own logs, reachable from the workdir
        try:
            session = Path(ray._private.worker._global_node.get_session_dir_path())
            link = workdir / "ray_logs"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(session / "logs")
        except (AttributeError, OSError):
            pass
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # A failed trial's traceback (every attempt) goes to its MLflow run (traceback.txt) and its last
    # line to the summary; Tune's own copy on the terminal is hundreds of lines per trial.
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    return True


def _children() -> set[int]:
    import psutil

    return {c.pid for c in psutil.Process().children(recursive=True)}


def _kill_new_children(before: set[int]) -> None:
    """Kill this process's children that a failed ``ray.init`` started (those not in ``before``)."""
    import psutil

    new = [c for c in psutil.Process().children(recursive=True) if c.pid not in before]
    for c in new:
        try:
            c.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(new, timeout=5)


def _first_line(e: BaseException) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return text[:300] + ("..." if len(text) > 300 else "")


def _retryable(e: BaseException) -> bool:
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # pragma: no cover - older Ray
        AuthenticationError = ()  # noqa: N806
    return not isinstance(e, (ValueError, TypeError, AuthenticationError))


def _ray_start_message(e: BaseException, address: str | None, attempt: int, attempts: int) -> str:
    import re
    import tempfile

    tries = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
    if address:
        return (f"Ray: could not join the cluster at {address} {tries}: {_first_line(e)}; Ray's log is on the "
                "cluster's head node (/tmp/ray/session_latest/logs); check the address and that the cluster is up "
                "(ray status)")
    m = re.search(r"(\S*/session_[0-9][^/\s]*)", str(e))
    logs = (f"{m.group(1)}/logs" if m else
            str(Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "session_latest" / "logs"))
    hint = ("a loaded machine can take longer: wait and re-run, or set "
            f"{RAY_START_ATTEMPTS} / {RAY_START_BACKOFF} (now {attempts} attempts)")
    return f"Ray did not start on this machine {tries}: {_first_line(e)}; Ray's log: {logs}; {hint}"



def prestart(modules: list[str], experiment: str, workdir: str | Path, tracking_uri: str | None,
             address: str | None) -> None:
    """Start the embedded Ray now, in this thread (``ray.init`` must run in the main one), while
    another thread imports ``modules`` (the driver's: MLflow, Ray Tune, Optuna, about 2.5 s on 2
    cores) and makes the MLflow store and the experiment (MLflow's schema: about 2 s for a new
    SQLite store); ``ray.init`` mostly waits for Ray's processes meanwhile. The session that calls
    :func:`init_ray` next takes Ray over as its own. First what needs no Ray: the workdir, its lock,
    the store (a refusal starts nothing). On a cluster (``address`` or ``$RAY_ADDRESS``): only the
    imports. Issue #32: the first trial within 8 s of the command."""
    if address or os.environ.get("RAY_ADDRESS"):
        for m in modules:
            importlib.import_module(m)
        return
    from orchestrator.faults import WorkdirLock, prepare_workdir
    from orchestrator.mlflow_store import check_store, default_tracking_uri

    wd = prepare_workdir(workdir)
    WorkdirLock(wd).acquire()
    uri = tracking_uri or default_tracking_uri(wd)
    check_store(uri, write=True)
    import ray  # before the other thread imports Ray Tune: the two threads share no module being imported

    failed: list[BaseException] = []

    def background() -> None:
        try:
            for m in modules:
                importlib.import_module(m)
            from orchestrator.mlflow_store import Tracker

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # (as init_ray sets it) no "Creating tables"
            Tracker(uri, experiment)
        except BaseException as e:  # noqa: BLE001 - told in the main thread
            failed.append(e)

    thread = threading.Thread(target=background, name="ablate-prestart", daemon=True)
    thread.start()
    try:
        _PRESTARTED["started"] = init_ray(None, wd)
    finally:
        thread.join()
    if failed:
        try:  # an import that failed beside ray.init's own (a race of two threads' imports): once more, here
            for m in modules:
                importlib.import_module(m)
        except BaseException:
            if _PRESTARTED.pop("started", False):
                ray.shutdown()
                embedded.forget_session(wd)
            raise
        if not isinstance(failed[0], ImportError):  # the store's own error (e.g. it stopped answering)
            if _PRESTARTED.pop("started", False):
                ray.shutdown()
                embedded.forget_session(wd)
            raise failed[0]


def discard_prestarted(workdir: str | Path) -> None:
    """Shut down a Ray that :func:`prestart` started and no session took over (the command was
    refused, or failed, before its session started)."""
    if _PRESTARTED.pop("started", False):
        import ray

        ray.shutdown()
        from orchestrator.faults import prepare_workdir

        embedded.forget_session(prepare_workdir(workdir))
