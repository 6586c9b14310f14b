"""Embedded Ray: the instance a sweep or a boundary search starts on this machine when it is given no
cluster address (``orchestrator.sweep.init_ray``). What keeps it private, and tidy.

- **Loopback only** (:func:`loopback`). Ray 2.60 binds its servers (GCS, raylet, workers' gRPC
  servers, the runtime-env agent) to the node's IP address, and its gRPC servers listen on
  ``0.0.0.0`` unless that address is ``127.0.0.1`` (``GrpcServer``'s ``listen_to_localhost_only``).
  ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do it: ``services.resolve_ip_for_localhost``
  turns a loopback address into the machine's own unless Ray's multi-node mode is off
  (``ray_constants.ENABLE_RAY_CLUSTER``, read from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``; off by
  default only on macOS and Windows). While the embedded Ray starts, it is off: the node's address is
  127.0.0.1, every port Ray opens listens on loopback (``tests/test_embedded.py`` lists them), and
  the raylet and its workers inherit the setting. The driver's own setting is restored afterwards,
  so that a later ``--address`` joins a cluster as usual.
- **Token authentication** (:func:`token_auth`). Ray >= 2.52 has it; ablate turns it on for the
  embedded Ray (``RAY_AUTH_MODE=token``, its token file 0600: :func:`private_token_file`). A
  ``RAY_AUTH_MODE`` set to anything else (``disabled``), or a Ray without token authentication,
  leaves the embedded Ray open to every user of this machine: one ``warning:`` line says so.
  ``RAY_AUTH_MODE=token`` on a Ray without it is refused (:class:`~orchestrator.faults.RayStartError`).
- **What a killed driver leaves behind** (:func:`record_session`, :func:`reap_leftovers`). Ray's
  processes share the driver's fate, except the raylet's two agents (``ray::DashboardAgent``,
  ``ray::RuntimeEnvAgent``): after a SIGKILL they notice their raylet is gone within seconds, then
  try to tell the dead GCS and live on for 1.5-4.5 minutes (the runtime-env agent listening). A
  driver that holds a workdir's lock records its Ray processes there (``.ray_session.json``: pid and
  start time of each); the next driver of the same workdir, once it holds the lock (so the recorder
  is dead), stops those that still run, matched by pid *and* start time. A clean stop removes the
  record.

- **Trials on the workers Ray prestarted** (:func:`inherit_worker_env`, :func:`plain_trial_actors`).
  The embedded Ray prestarts one worker per CPU, each importing what a trial needs
  (``orchestrator.trainable.PRELOAD``) as it starts. Ray Tune gives every trial actor a
  ``runtime_env`` of environment variables (``PL_DISABLE_FORK=1`` and the driver's AWS and Ray Train
  variables: ``ray.tune.execution.class_cache``), and an actor with a ``runtime_env`` never runs on
  those workers: each trial started a fresh Python process that imported torch again (2 actors
  ready in 5.4 s against 0.65 s on 2 cores). The workers of the embedded Ray inherit the driver's
  environment, so ablate sets Tune's variables there before Ray starts and, around ``tuner.fit()``,
  leaves out of the actors' ``runtime_env`` every variable the workers already hold with the same
  value; one they do not (set after Ray started, or a value Tune adds in a later release) stays.

- **A lean node, its workers started at once** (:func:`lean_head`, :data:`SYSTEM_CONFIG`). On 2 cores
  the first trial waited for CPU that Ray's own processes took and for workers started late (issue
  #32: the first trial within 8 s of the command). The embedded Ray is one private node that nobody
  else reaches, so it runs without what only a cluster, or a person watching one, uses: the
  autoscaler monitor (nothing to scale), the log monitor (``log_to_driver=False``: nobody reads its
  stream), the dashboard's API server (``include_dashboard=False`` still started one, for jobs and
  the state API; ``ray.init`` waited for it, ~1.8 s here) and the dashboard agent's own gRPC,
  metrics and HTTP servers (the agent runs ``--minimal``: 0.9 CPU-s to start instead of 1.5-1.9).
  3-4 CPU-s fewer before the first trial, and the monitors' polling gone during the sweep. Its raylet starts one worker per CPU as it
  starts (``enable_worker_prestart``) instead of when the driver registers, 1-2 s later; and those
  workers are not killed as idle while Tune places its trials: Ray keeps idle workers up to the
  *available* CPUs, Tune's placement groups take every CPU before the trial actors are leased, and
  after 1 s (``idle_worker_killing_time_threshold_ms``) the raylet stopped a prestarted worker still
  importing torch, so that a trial waited for a new one (in 4 of 9 traced start-ups).

The version floors in ``pyproject.toml`` are the releases that carry what this relies on
(``RAY_TOKEN_AUTH_SINCE``, ``MLFLOW_ADMIN_PASSWORD_SINCE``; ``tests/test_embedded.py`` checks them).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from orchestrator.faults import RayStartError, WorkdirLock

log = logging.getLogger("ablate")

RAY_TOKEN_AUTH_SINCE = "2.52"
"""The first Ray with token authentication (``RAY_AUTH_MODE=token``); older ones ignore the setting."""
MLFLOW_ADMIN_PASSWORD_SINCE = "3.16.1"
"""The first MLflow whose basic-auth app starts with the admin password it is given
(``MLFLOW_AUTH_ADMIN_PASSWORD``) and ships none of its own: before it, ``basic_auth.ini`` created
``admin`` / ``password1234`` (GHSA-gq3w-7jj3-x7gr; fixed by mlflow/mlflow#25751, released in 3.16.1).
cluster.yaml's basic-auth variant relies on it."""

CLUSTER_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SESSION_FILE = ".ray_session.json"


def warn(text: str) -> None:
    """One ``warning:`` line on stderr (as the command line writes its own)."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


@contextmanager
def loopback():
    """While inside: Ray started on this machine takes 127.0.0.1 as its node's address, so that its
    servers listen on loopback only (see the module's docstring); the driver's setting is restored
    on exit (Ray's processes started inside keep theirs)."""
    import ray._private.ray_constants as ray_constants

    old_env, old = os.environ.get(CLUSTER_MODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_MODE_ENV] = "0"  # inherited by the GCS, the raylet and the workers it starts
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield "127.0.0.1"
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old
        if old_env is None:
            os.environ.pop(CLUSTER_MODE_ENV, None)
        else:
            os.environ[CLUSTER_MODE_ENV] = old_env


_WORKER_ENV: dict[str, str] = {}  # the environment the embedded Ray's processes inherited at its start
_STARTED: dict[str, str] = {}  # "gcs": the GCS address of the embedded Ray this process started

TUNE_ACTOR_ENV = {"PL_DISABLE_FORK": "1"}
"""What Ray Tune puts in every trial actor's ``runtime_env`` (``class_cache.DEFAULT_ENV_VARS`` in Ray
2.60), set in the environment the embedded Ray inherits instead (:func:`plain_trial_actors`)."""


def inherit_worker_env() -> None:
    """Just before the embedded Ray starts: Tune's actor variables into this process's environment
    (a value the user set wins), and a record of the environment Ray's processes inherit."""
    for k, v in TUNE_ACTOR_ENV.items():
        os.environ.setdefault(k, v)
    _WORKER_ENV.clear()
    _WORKER_ENV.update(os.environ)
    _STARTED.clear()


def started_here() -> None:
    """Just after the embedded Ray started: remember it (its GCS address), for :func:`connected_here`."""
    import ray

    _STARTED["gcs"] = ray.get_runtime_context().gcs_address


def connected_here() -> bool:
    """True while this process is connected to the embedded Ray it started (a later session in the
    same process, e.g. a second sweep after ``init_ray``, included); False on a cluster."""
    import ray

    if not _STARTED or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().gcs_address == _STARTED["gcs"]
    except Exception:  # noqa: BLE001 - not connected after all
        return False


@contextmanager
def plain_trial_actors():
    """While inside (around ``tuner.fit()``, connected to the embedded Ray this process started),
    Tune's trial actors carry in their ``runtime_env`` only the variables the embedded Ray's workers
    do not already hold with the same value: none, normally, so that a trial runs on a worker Ray
    prestarted with the trial's modules imported (see the module's docstring). Tune's own tables are
    restored on exit. On a cluster nothing changes."""
    if not connected_here():  # true only once inherit_worker_env has recorded the workers' environment
        yield
        return
    try:  # Ray Tune's tables (Ray 2.60); another layout: Tune's runtime_env as it is (slower, not wrong)
        from ray.tune.execution import class_cache

        defaults, propagated = dict(class_cache.DEFAULT_ENV_VARS), set(class_cache.ENV_VARS_TO_PROPAGATE)
    except (ImportError, AttributeError, TypeError):
        yield
        return
    held = lambda k, v: _WORKER_ENV.get(k) == v  # noqa: E731
    for k, v in defaults.items():
        if held(k, v):
            del class_cache.DEFAULT_ENV_VARS[k]
    for k in propagated:
        if k not in os.environ or held(k, os.environ[k]):
            class_cache.ENV_VARS_TO_PROPAGATE.discard(k)
    try:
        yield
    finally:
        class_cache.DEFAULT_ENV_VARS.clear()
        class_cache.DEFAULT_ENV_VARS.update(defaults)
        class_cache.ENV_VARS_TO_PROPAGATE.clear()
        class_cache.ENV_VARS_TO_PROPAGATE.update(propagated)


SYSTEM_CONFIG = {
    "enable_worker_prestart": True,  # one worker per CPU as the raylet starts ...
    "prestart_worker_first_driver": False,  # ... not (again) when the driver registers
    "idle_worker_killing_time_threshold_ms": 30_000,  # Ray's default 1000: see the module's docstring
}
"""Ray's system config for the embedded Ray (``ray.init(_system_config=...)``), beside the workers'
preloaded modules (``orchestrator.raystart.init_ray``). Names from Ray's ``ray_config_def.h`` (all three
in Ray 2.x); a name Ray does not know stops its GCS from starting (a 30 s time-out), so a Ray release
that drops one fails every embedded start, tests included, instead of running on slowly."""


@contextmanager
def lean_head():
    """While inside (around the ``ray.init`` that starts the embedded Ray): the head node Ray starts
    runs no autoscaler monitor, no log monitor, no dashboard API server, and its dashboard agent
    runs ``--minimal``, as with Ray's minimal install (see the module's docstring). Ray's own functions are
    restored on exit. A Ray whose private layout differs (``ray._private.node.Node``,
    ``RayParams.no_monitor`` / ``include_log_monitor``, ``ray._private.utils.get_dashboard_dependency_error``)
    starts as usual: slower, nothing wrong."""
    try:
        import ray._private.node as ray_node
        import ray._private.parameter as ray_parameter
        import ray._private.utils as ray_utils

        params = ray_parameter.RayParams()
        ok = (hasattr(params, "no_monitor") and hasattr(params, "include_log_monitor")
              and callable(getattr(ray_node.Node, "start_api_server", None))
              and callable(getattr(ray_utils, "get_dashboard_dependency_error", None)))
    except (ImportError, AttributeError, TypeError):
        ok = False
    if not ok:
        log.debug("embedded Ray: this Ray's layout is not the one lean_head knows; its node starts as usual")
        yield
        return
    init, api_server, dependency_error = (ray_node.Node.__init__, ray_node.Node.start_api_server,
                                          ray_utils.get_dashboard_dependency_error)

    def node_init(self, ray_params, head=False, *args, **kwargs):
        if head:
            ray_params.no_monitor = True
            ray_params.include_log_monitor = False
        return init(self, ray_params, head, *args, **kwargs)

    def no_api_server(self, *args, **kwargs):
        return None

    ray_node.Node.__init__ = node_init
    ray_node.Node.start_api_server = no_api_server
    # services.start_raylet gives the agent --minimal when this names a missing dependency
    ray_utils.get_dashboard_dependency_error = lambda: "ablate's embedded Ray runs a minimal dashboard agent"
    try:
        yield
    finally:
        ray_node.Node.__init__ = init
        ray_node.Node.start_api_server = api_server
        ray_utils.get_dashboard_dependency_error = dependency_error


def _ray_version() -> str:
    import ray

    return getattr(ray, "__version__", "?")


def ray_has_token_auth() -> bool:
    try:
        from ray._private.authentication import authentication_token_setup  # noqa: F401
        from ray._raylet import Config  # noqa: F401
    except ImportError:
        return False
    return True


def token_auth() -> None:
    """Token authentication on, explicitly, for the Ray that ``init_ray`` starts on this machine,
    and Ray's token file readable by this user only; or one warning line when it stays off.

    Ray (2.60 here) turns token authentication on by default for a new local cluster and then logs
    "Token authentication is enabled for this Ray cluster" on every start; it logs nothing when
    ``RAY_AUTH_MODE`` is set, nor when it is set to ``disabled``. Authentication stays on, and
    ablate says so once, here, instead of Ray on every command. A ``RAY_AUTH_MODE`` set by the user
    wins, with a warning when it is not ``token``. On a cluster (``--address``) nothing is changed:
    the cluster's own setting applies. Ray writes a missing token file (``~/.ray/auth_token``, or
    $RAY_AUTH_TOKEN_PATH) with the default umask (0644 here): ablate creates it first, 0600."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if not ray_has_token_auth():
        if mode is not None and mode.strip().lower() == "token":
            raise RayStartError(f"RAY_AUTH_MODE=token: Ray {_ray_version()} has no token authentication (it came "
                                f"in Ray {RAY_TOKEN_AUTH_SINCE}), so the embedded Ray would run without it; "
                                f"upgrade Ray (pip install 'ray[tune]>={RAY_TOKEN_AUTH_SINCE}'), or unset RAY_AUTH_MODE")
        warn(f"Ray {_ray_version()} has no token authentication (it came in Ray {RAY_TOKEN_AUTH_SINCE}): the "
             "embedded Ray runs unauthenticated, on 127.0.0.1 only: any process of any user of this machine can "
             f"connect to it and run code as you; upgrade Ray (pip install 'ray[tune]>={RAY_TOKEN_AUTH_SINCE}')")
        return
    if mode is None:
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = mode = "token"  # inherited by the raylet, GCS and workers
        Config.initialize("")  # the driver's cached Ray config re-reads it (what Ray does when it enables it)
    if mode.strip().lower() == "token":
        private_token_file()
    else:
        warn(f"RAY_AUTH_MODE={mode!r}: the embedded Ray runs without authentication, on 127.0.0.1 only: any "
             "process of any user of this machine can connect to it and run code as you; unset RAY_AUTH_MODE "
             "(ablate then turns Ray's token authentication on) or set RAY_AUTH_MODE=token")


def private_token_file() -> Path | None:
    """Ray's token file for this user (``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``) made
    mode 0600: created with Ray's own generator when missing, its group/other bits removed when this
    user owns it. None when the token comes from ``$RAY_AUTH_TOKEN`` (no file)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
        from ray._raylet import AuthenticationTokenLoader

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile
            return private_token_file()
        with os.fdopen(fd, "w") as f:
            f.write(generate_new_authentication_token())
        AuthenticationTokenLoader.instance().reset_cache()
        return path
    if st.st_mode & 0o077 and st.st_uid == os.getuid():
        os.chmod(path, 0o600)
        log.info("Ray's token file %s: made readable by its owner only (0600)", path)
    return path


# ------------------------------------------------------------------ what a killed driver leaves
def _holds_lock(workdir: Path | None) -> bool:
    return workdir is not None and WorkdirLock(workdir).held


def session_processes() -> list:
    """This process's descendants: the embedded Ray's GCS, raylet, agents, workers, monitors."""
    import psutil

    return psutil.Process().children(recursive=True)


def record_session(workdir: Path | None) -> None:
    """Write ``<workdir>/.ray_session.json``: pid, start time and name of each of the embedded Ray's
    processes, and the session's folder. Only by a driver that holds the workdir's lock."""
    if not _holds_lock(workdir):
        return
    import psutil
    import ray

    procs = []
    for p in session_processes():
        try:
            procs.append({"pid": p.pid, "started": p.create_time(), "name": p.name()})
        except psutil.Error:
            continue
    try:
        session = ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:
        session = ""
    data = {"driver": os.getpid(), "session": session, "recorded": time.time(), "processes": procs}
    tmp = workdir / (SESSION_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(data))
        tmp.replace(workdir / SESSION_FILE)
    except OSError:
        pass


def forget_session(workdir: Path | None) -> None:
    """A clean stop: nothing is left behind, the record goes."""
    if _holds_lock(workdir):
        try:
            (workdir / SESSION_FILE).unlink()
        except OSError:
            pass


def reap_leftovers(workdir: Path | None, timeout: float = 5.0) -> list[int]:
    """Stop what an earlier driver of this workdir, killed without a chance to clean up, left
    running: the processes of its record still alive with the same pid and start time. Only with
    the workdir's lock held (its recorder is then dead). Returns the pids stopped; one note line
    names them."""
    if not _holds_lock(workdir):
        return []
    path = workdir / SESSION_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    import psutil

    mine = {p.pid for p in session_processes()} | {os.getpid()}
    left = []
    for rec in data.get("processes", []):
        try:
            p = psutil.Process(int(rec["pid"]))
            if p.pid not in mine and abs(p.create_time() - float(rec["started"])) < 0.5:
                left.append(p)
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue
    names = ", ".join(f"{_name(p)} (pid {p.pid})" for p in left)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=timeout)
    try:
        path.unlink()
    except OSError:
        pass
    if left:
        print(f"note: stopped {len(left)} Ray process(es) left behind by an earlier driver of this workdir that "
              f"was killed (driver pid {data.get('driver', '?')}): {names}", file=sys.stderr, flush=True)
    return [p.pid for p in left]


def _name(p) -> str:
    try:
        return p.name()
    except Exception:  # noqa: BLE001 - it may be gone by now
        return "?"
