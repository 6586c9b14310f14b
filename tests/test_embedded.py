"""Embedded Ray kept private and tidy (issue #27 item 6, issue #32 items 4-5): every port it opens
listens on 127.0.0.1, authentication switched off is said in one line, a Ray without token
authentication is refused when it is asked for, the version floors are the releases the security
relies on, and what a SIGKILLed driver leaves running is stopped by the next driver of its workdir.
Real Ray, started the way a sweep starts it (``orchestrator.sweep.init_ray``)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import embedded
from orchestrator.faults import RayStartError, WorkdirLock

ROOT = Path(__file__).resolve().parent.parent


def _listening(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, name, address, port) of every listening TCP socket of these processes."""
    import psutil  # after ray: Ray's own copy

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            conns = p.net_connections(kind="tcp") if hasattr(p, "net_connections") else p.connections(kind="tcp")
            out += [(pid, p.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    """Every listening port of the driver and of every process of its Ray session (GCS, raylet,
    agents, workers, an actor) is on 127.0.0.1; before issue #27 the GCS, the raylet and the
    workers listened on every interface (``*:PORT``) and the runtime-env agent on the machine's
    address. The driver's own setting is restored (a later --address joins a cluster as usual)."""
    import ray
    import ray._private.ray_constants as ray_constants
    import psutil  # Ray's own copy: after ray

    from orchestrator.sweep import init_ray

    before = (os.environ.get(embedded.CLUSTER_MODE_ENV), ray_constants.ENABLE_RAY_CLUSTER)
    assert init_ray(None, tmp_path) is True
    try:
        @ray.remote
        class Probe:
            def pid(self):
                return os.getpid()

        @ray.remote
        def task():
            return os.getpid()

        probe = Probe.remote()
        ray.get([probe.pid.remote(), task.remote()])
        time.sleep(2)  # the agents' servers
        pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        ports = _listening(pids)
        names = {n for _, n, _, _ in ports}
        assert {"gcs_server", "raylet"} <= names, ports
        assert len({pid for pid, *_ in ports}) >= 4, ports  # the driver, GCS, raylet, workers
        open_ports = [p for p in ports if not _is_loopback(p[2])]
        assert open_ports == [], open_ports
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    finally:
        ray.shutdown()
    assert (os.environ.get(embedded.CLUSTER_MODE_ENV), ray_constants.ENABLE_RAY_CLUSTER) == before


_START = "from orchestrator.sweep import init_ray; import ray; init_ray(); ray.shutdown(); print('OK')"


@pytest.mark.parametrize("mode", ["disabled", None])
def test_authentication_switched_off_is_said_in_one_line(tmp_path, mode):
    """RAY_AUTH_MODE=disabled (Ray's own opt-out, silent in Ray) leaves the embedded Ray
    unauthenticated: one warning line names the setting and what to do; unset, ablate turns token
    authentication on and says nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["HOME"] = str(tmp_path)  # a token file of the test's own
    if mode is not None:
        env["RAY_AUTH_MODE"] = mode
    out = subprocess.run([sys.executable, "-c", _START], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("warning:")]
    if mode is None:
        assert warnings == [] and (tmp_path / ".ray" / "auth_token").is_file()
        assert "Token authentication is enabled" not in out.stderr  # Ray's own line on every start
    else:
        assert len(warnings) == 1, out.stderr
        assert warnings[0].startswith("warning: RAY_AUTH_MODE='disabled': the embedded Ray runs without "
                                      "authentication, on 127.0.0.1 only"), warnings
        assert "unset RAY_AUTH_MODE" in warnings[0]


def test_a_ray_without_token_authentication_is_refused_when_it_is_asked_for(monkeypatch, capsys):
    """A Ray older than the floor ignores RAY_AUTH_MODE silently: asked for, the start is refused;
    not asked for, one warning line. (A Ray without the feature, as ``ray_has_token_auth`` sees it.)"""
    monkeypatch.setattr(embedded, "ray_has_token_auth", lambda: False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(RayStartError, match=r"RAY_AUTH_MODE=token: Ray \S+ has no token authentication \(it came in "
                                            r"Ray 2.52\).*pip install 'ray\[tune\]>=2.52'"):
        embedded.token_auth()
    monkeypatch.delenv("RAY_AUTH_MODE")
    embedded.token_auth()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: Ray ") and "runs unauthenticated" in err[0]
    assert "RAY_AUTH_MODE" not in os.environ


def test_version_floors_are_the_releases_the_security_needs():
    """pyproject's floors: Ray with token authentication (2.52) and MLflow whose basic-auth app takes
    the configured admin password and ships none (3.16.1); the installed versions meet them."""
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    floors = {}
    for r in reqs:
        lows = [s.version for s in r.specifier if s.operator == ">="]
        floors.setdefault(r.name, set()).update(lows)
    assert floors["ray"] == {embedded.RAY_TOKEN_AUTH_SINCE}
    assert floors["mlflow"] == {embedded.MLFLOW_ADMIN_PASSWORD_SINCE}  # mlflow and mlflow[auth] alike
    assert Version(version("ray")) >= Version(embedded.RAY_TOKEN_AUTH_SINCE) and embedded.ray_has_token_auth()
    assert Version(version("mlflow")) >= Version(embedded.MLFLOW_ADMIN_PASSWORD_SINCE)
    from mlflow.environment_variables import MLFLOW_AUTH_ADMIN_PASSWORD  # what cluster.yaml's variant sets

    assert MLFLOW_AUTH_ADMIN_PASSWORD.name == "MLFLOW_AUTH_ADMIN_PASSWORD"


_DRIVER = """
import os, sys, time
from pathlib import Path
from orchestrator.faults import WorkdirLock
from orchestrator.sweep import init_ray
import ray
wd = Path(sys.argv[1])
WorkdirLock(wd).acquire("test driver")
init_ray(None, wd)
ray.get(ray.remote(lambda: os.getpid()).remote())
print("READY", flush=True)
if sys.argv[2] == "wait":
    time.sleep(600)
ray.shutdown()
"""


def test_what_a_killed_driver_left_running_is_stopped_by_the_next_driver(tmp_path):
    """SIGKILL to a driver (nothing of it can clean up): Ray's processes share its fate except the
    raylet's agents, which live on for minutes. The next driver of the same workdir stops them
    (matched by pid and start time from the workdir's record) and says so in one line."""
    import ray  # noqa: F401
    import psutil  # Ray's own copy: after ray

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path), "wait"], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert first.stdout.readline().strip() == "READY"
        record = json.loads((tmp_path / embedded.SESSION_FILE).read_text())
        assert record["driver"] == first.pid
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {
            p["name"] for p in record["processes"]}
        first.send_signal(signal.SIGKILL)  # the driver alone, as `kill -9 PID` does
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()

    def alive() -> list[str]:
        out = []
        for rec in record["processes"]:
            try:
                p = psutil.Process(rec["pid"])
                if abs(p.create_time() - rec["started"]) < 0.5 and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(rec["name"])
            except psutil.Error:
                pass
        return out

    time.sleep(3)
    survivors = alive()
    # Ray 2.60: the agents outlive the driver (for 1.5-4.5 min); the rest went with it
    assert survivors and set(survivors) <= {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}, survivors
    second = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path), "stop"], env=env, capture_output=True,
                            text=True, timeout=180)
    assert second.returncode == 0 and "READY" in second.stdout, second.stderr[-3000:]
    notes = [ln for ln in second.stderr.splitlines() if ln.startswith("note: stopped")]
    assert len(notes) == 1 and f"driver pid {first.pid}" in notes[0], second.stderr[-2000:]
    assert all(name in notes[0] for name in survivors), (survivors, notes)
    assert alive() == []
    assert json.loads((tmp_path / embedded.SESSION_FILE).read_text())["driver"] != first.pid  # the second's own


def test_trial_actors_run_on_the_workers_the_embedded_ray_prestarted(tmp_path):
    """Ray Tune gives every trial actor a runtime_env of environment variables (PL_DISABLE_FORK=1 in
    Ray 2.60), and an actor with a runtime_env never runs on the workers Ray prestarted with the
    trial's modules imported: each trial waited for a fresh process to import torch again. Inside
    ``plain_trial_actors`` Tune's actor class (built by Tune's own class cache) carries none of the
    variables the embedded Ray's workers inherited, and its actor runs in a process that existed
    before it was created, with the variable set; outside, Tune's tables are as Tune made them."""
    import ray
    from ray.tune.execution import class_cache

    import psutil  # Ray's own copy: after ray

    from orchestrator.sweep import init_ray

    tune_defaults = dict(class_cache.DEFAULT_ENV_VARS)
    assert tune_defaults == embedded.TUNE_ACTOR_ENV  # Ray's table as this module copies it

    class Probe:
        def where(self):
            return os.getpid(), os.environ.get("PL_DISABLE_FORK"), ray.get_runtime_context().runtime_env

    def idle_workers() -> set[int]:
        return {c.pid for c in psutil.Process().children(recursive=True) if c.name() == "ray::IDLE"}

    started = init_ray(None, tmp_path)
    try:
        deadline = time.monotonic() + 90  # one worker per CPU, each importing torch as it starts
        while len(idle_workers()) < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        workers = idle_workers()
        assert workers, "the embedded Ray prestarted no worker"
        assert started and embedded.connected_here()
        with embedded.plain_trial_actors():
            actor_cls = class_cache._ActorClassCache().get(Probe)
            pid, fork_var, env = ray.get(actor_cls.options(num_cpus=1).remote().where.remote(), timeout=120)
        assert fork_var == "1"
        assert not env.get("env_vars")
        assert pid in workers, "the trial actor started a fresh worker process"
        assert dict(class_cache.DEFAULT_ENV_VARS) == tune_defaults  # restored
    finally:
        ray.shutdown()
    # not connected to the embedded Ray this process started (a cluster, or none): Tune's tables untouched
    assert not embedded.connected_here()
    with embedded.plain_trial_actors():
        assert dict(class_cache.DEFAULT_ENV_VARS) == tune_defaults


def test_the_embedded_node_runs_lean_and_keeps_its_prestarted_workers_while_trials_are_placed(tmp_path):
    """Issue #32 (the first trial within 8 s): the embedded Ray runs no autoscaler monitor, no log
    monitor and no dashboard API server, its dashboard agent is minimal, and Ray's functions are
    restored after the start. Its raylet prestarts one worker per CPU, and those workers outlive a
    placement group that takes every CPU for longer than Ray's 1 s idle limit (Tune reserves its
    trials' CPUs before it creates their actors): with Ray's defaults the raylet stopped them as idle
    workers beyond the available CPUs, and a trial waited for a fresh worker to import torch."""
    import ray
    import ray._private.node as ray_node
    from ray.tune.execution import class_cache
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    import psutil  # Ray's own copy: after ray

    from orchestrator.sweep import init_ray

    node_init = ray_node.Node.__init__

    class Probe:
        def pid(self):
            return os.getpid()

    def idle_workers() -> set[int]:
        return {c.pid for c in psutil.Process().children(recursive=True) if c.name() == "ray::IDLE"}

    assert init_ray(None, tmp_path) is True
    try:
        assert ray_node.Node.__init__ is node_init  # restored
        commands = [" ".join(c.cmdline()) for c in psutil.Process().children(recursive=True)]
        for extra in ("autoscaler/_private/monitor.py", "log_monitor.py", "dashboard/dashboard.py"):
            assert not any(extra in c for c in commands), (extra, commands)
        agents = [c for c in commands if "dashboard/agent.py" in c]
        assert len(agents) == 1 and " --minimal" in agents[0], agents
        cpus = int(ray.cluster_resources()["CPU"])
        deadline = time.monotonic() + 90  # one worker per CPU, each importing torch as it starts
        while len(idle_workers()) < cpus and time.monotonic() < deadline:
            time.sleep(0.5)
        workers = idle_workers()
        assert len(workers) == cpus, workers
        pg = placement_group([{"CPU": 1}] * cpus)
        ray.get(pg.ready(), timeout=60)
        time.sleep(3)  # Ray's default limit: 1 s idle, checked every 0.2 s
        assert idle_workers() == workers, "the raylet stopped prestarted workers while the CPUs were reserved"
        with embedded.plain_trial_actors():
            actor_cls = class_cache._ActorClassCache().get(Probe)
            actors = [actor_cls.options(num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                      for i in range(cpus)]
            pids = set(ray.get([a.pid.remote() for a in actors], timeout=120))
        assert pids == workers, (pids, workers)
        remove_placement_group(pg)
    finally:
        ray.shutdown()
