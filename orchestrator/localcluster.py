"""Ray clusters and an MLflow tracking server on this machine, for proving cluster behaviour without
a cloud. Two kinds of cluster:

* :class:`LocalCluster`: a head node (no CPUs, like cluster.yaml's) and worker nodes that exist
  from the start, from ``ray.cluster_utils`` (they may advertise fake GPUs: Ray allows
  ``num_gpus`` on a CPU machine).
* :class:`AutoscalingCluster`: the cluster as ``ray up cluster.yaml`` makes it, on Ray's own
  autoscaler with its fake multi-node provider (Ray's test harness: ``RAY_FAKE_CLUSTER=1 ray start
  --head --autoscaling-config=...`` with ``provider: {type: fake_multinode}``; worker nodes are
  local processes with the declared resources). Its node types are cluster.yaml's
  ``available_node_types``, their resources scaled to this machine (:func:`node_types_from`); it
  starts with the head alone, and the autoscaler adds workers when trials ask for them and removes
  them when idle. Token authentication, the dashboard and job server (``ray job submit``) on
  127.0.0.1, and the environment cluster.yaml gives the head (``MLFLOW_TRACKING_URI``,
  ``ABLATE_WORKDIR``, ``RAY_JOB_STOP_WAIT_TIME_S``). Its fake GPUs have no CUDA device: its
  nodes run with ``ABLATE_TEST_ONLY_FAKE_GPUS_TRAIN_ON_CPU=1`` (``orchestrator.trainable``), so
  that GPU trials train on the CPU there, tagged so. Everything it starts lives in a private
  ``RAY_TMPDIR`` (no other ``ray.init()`` on this machine finds it) and is stopped by
  :meth:`AutoscalingCluster.shutdown`, process by process (never ``ray stop``, which would stop
  every Ray on the machine).

With ``auth_token`` every node runs with Ray token authentication, as cluster.yaml starts them
(``RAY_AUTH_MODE=token``, the token in a file of mode 0600); with ``admin_password`` the MLflow
server is MLflow's basic-auth app, cluster.yaml's variant for opening MLflow beyond the head.

    python -m orchestrator.localcluster --workers 2 --gpus-per-worker 1   # prints RAY_ADDRESS, URI
    python -m orchestrator.localcluster --autoscaling                      # prints the job server's address too

Ray's nodes take this machine's network address (Ray resolves 127.0.0.1 to it); the dashboard,
the job server and MLflow listen on 127.0.0.1 only. Used by tests/test_cluster.py,
tests/test_autoscaling.py and benchmarks/cluster_scaling.py.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_token(path: str | Path) -> Path:
    """A new Ray authentication token (Ray's own generator) in ``path``, created with mode 0600."""
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_new_authentication_token())
    return path


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and served artifacts under ``root``; with
    ``admin_password``, MLflow's basic-auth app (user ``admin``), as cluster.yaml's variant runs it;
    with ``allowed_hosts``, the Host names it answers to (``--allowed-hosts``)."""

    def __init__(self, root: str | Path, port: int | None = None, admin_password: str | None = None,
                 allowed_hosts: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.admin_password = admin_password
        self.allowed_hosts = allowed_hosts  # --allowed-hosts (orchestrator.mlflow_hosts), as cluster.yaml's variant
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts", "--workers", "1"]
        env = dict(os.environ)
        if self.allowed_hosts is not None:
            cmd += ["--allowed-hosts", self.allowed_hosts]
        if self.admin_password:
            cmd[4:4] = ["--app-name", "basic-auth"]
            env.update(MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password,
                       MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(32))
        # cwd: the basic-auth app keeps its users in ./basic_auth.db
        self.proc = subprocess.Popen(cmd, stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env, cwd=self.root)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.uri} did not answer in {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None


class LocalCluster:
    """Head + ``workers`` worker nodes of ``cpus_per_worker`` CPUs and ``gpus_per_worker`` (fake) GPUs.

    ``auth_token``: a token file (mode 0600, :func:`write_token`); every node then starts the way
    cluster.yaml starts them, with ``RAY_AUTH_MODE=token`` and that token (``RAY_AUTH_TOKEN_PATH``),
    and so does this process's driver. ``shutdown`` restores the environment."""

    def __init__(self, workers: int = 2, cpus_per_worker: int = 1, gpus_per_worker: float = 0,
                 auth_token: str | Path | None = None):
        from ray.cluster_utils import Cluster

        self._env: dict[str, str | None] = {}
        if auth_token is not None:
            self._set_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(auth_token), RAY_AUTH_TOKEN=None)
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        self.workers = [self.add_worker(cpus_per_worker, gpus_per_worker) for _ in range(workers)]
        self.cluster.wait_for_nodes()

    def add_worker(self, cpus: int, gpus: float):
        return self.cluster.add_node(num_cpus=cpus, num_gpus=gpus)

    def remove_worker(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    @property
    def address(self) -> str:
        return self.cluster.address

    def _set_env(self, **values: str | None) -> None:
        from ray._raylet import AuthenticationTokenLoader, Config

        for k, v in values.items():
            self._env.setdefault(k, os.environ.get(k))
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Config.initialize("")  # Ray's cached config and token re-read the environment
        AuthenticationTokenLoader.instance().reset_cache()

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()
        if self._env:
            env, self._env = self._env, {}
            self._set_env(**env)
            self._env = {}


# The resources Ray's AWS provider fills in on the head for cluster.yaml's instance types (their
# `resources: {}`): vCPUs and NVIDIA GPUs of each type.
INSTANCE_RESOURCES = {"g5.2xlarge": {"CPU": 8, "GPU": 1}, "p4d.24xlarge": {"CPU": 96, "GPU": 8},
                      "m6i.2xlarge": {"CPU": 8}}
CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
FAKE_HEAD_TYPE = "ray.head.default"  # the name Ray's fake provider gives its head node


def node_types_from(cluster_yaml: str | Path = CLUSTER_YAML, cpus: int | None = None,
                    max_workers: int | None = None,
                    object_store_bytes: int = 100 * 2**20) -> tuple[dict[str, float], dict[str, dict]]:
    """cluster.yaml's ``available_node_types`` for Ray's fake provider: the head's resources, and
    each worker type's resources (its ``resources``, else its instance type's from
    :data:`INSTANCE_RESOURCES`) scaled to this machine: CPUs capped at ``cpus`` (default: this
    machine's cores), GPUs kept (fake), a small object store; ``max_workers`` capped at
    ``max_workers`` when given. Returns (head resources, worker types)."""
    import yaml

    cfg = yaml.safe_load(Path(cluster_yaml).read_text())
    cpus = cpus or os.cpu_count() or 1
    head_name = cfg["head_node_type"]
    types = cfg["available_node_types"]
    head = {k: float(v) for k, v in (types[head_name].get("resources") or {}).items()}
    workers = {}
    for name, t in types.items():
        if name == head_name:
            continue
        res = dict(t.get("resources") or {}) or dict(INSTANCE_RESOURCES[t["node_config"]["InstanceType"]])
        res["CPU"] = min(res.get("CPU", 1), cpus)
        res["object_store_memory"] = object_store_bytes
        mx = t.get("max_workers", cfg.get("max_workers", 0))
        workers[name] = {"resources": res, "node_config": {}, "min_workers": t.get("min_workers", 0),
                         "max_workers": min(mx, max_workers) if max_workers is not None else mx}
    return head, workers


class AutoscalingCluster:
    """A Ray cluster on Ray's own autoscaler (fake multi-node provider), as ``ray up cluster.yaml``
    starts it, and an MLflow server on 127.0.0.1 (see the module's docstring).

    ``worker_types``: the autoscaler's worker node types (default :func:`node_types_from` of
    cluster.yaml); ``max_workers``: the cluster-wide cap; ``idle_timeout_s``: how long an idle
    worker lives; ``head_env``: more environment for the head (and so for jobs and the workers it
    starts). While it runs, this process has the cluster's token authentication in its environment
    (for ``ray.init``, the job client); :meth:`shutdown` restores it."""

    def __init__(self, root: str | Path | None = None, worker_types: dict[str, dict] | None = None,
                 head_resources: dict[str, float] | None = None, max_workers: int = 4, idle_timeout_s: float = 10,
                 head_env: dict[str, str] | None = None, mlflow: bool = True, fake_gpus_on_cpu: bool = True):
        from orchestrator.trainable import FAKE_GPUS_ON_CPU

        if worker_types is None or head_resources is None:
            head, workers = node_types_from(max_workers=max_workers)
            worker_types = worker_types if worker_types is not None else workers
            head_resources = head_resources if head_resources is not None else head
        self.worker_types, self.head_resources = worker_types, head_resources
        self.max_workers, self.idle_timeout_s = max_workers, idle_timeout_s
        # short: Ray's Unix socket paths under it are limited to ~107 characters
        self.tmp = Path(tempfile.mkdtemp(prefix="abl-", dir="/tmp"))
        self.root = Path(root) if root else self.tmp / "state"
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = write_token(self.tmp / "auth_token")
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.mlflow = MlflowServer(self.root / "mlflow") if mlflow else None
        self.workdir = self.root / "ablate_runs"   # the head's fixed workdir (ABLATE_WORKDIR), as cluster.yaml's
        self.head_env = {"RAY_JOB_STOP_WAIT_TIME_S": "60", "ABLATE_WORKDIR": str(self.workdir),
                         **({FAKE_GPUS_ON_CPU: "1"} if fake_gpus_on_cpu else {}), **(head_env or {})}
        self.proc: subprocess.Popen | None = None
        self._env: dict[str, str | None] = {}

    # ---- the environment of clients (this process, `ray job submit`)
    def client_env(self) -> dict[str, str]:
        """The environment of a client of the cluster (``ray job submit``, ``ablate``): token
        authentication with the cluster's token; no RAY_ADDRESS, no RAY_TMPDIR of another cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token))
        return env

    def _set_env(self, **values: str | None) -> None:
        from ray._raylet import AuthenticationTokenLoader, Config

        for k, v in values.items():
            self._env.setdefault(k, os.environ.get(k))
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Config.initialize("")  # Ray's cached config and token re-read the environment
        AuthenticationTokenLoader.instance().reset_cache()

    # ---- start, stop
    def config(self) -> dict:
        """The autoscaling config the head's autoscaler runs with."""
        return {
            "cluster_name": "ablate-local", "max_workers": self.max_workers, "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_s / 60,
            # Ray's fake_multinode provider, each worker node's job folders its own (orchestrator.fake_provider)
            "provider": {"type": "external", "module": "orchestrator.fake_provider.SeparateDirsFakeProvider",
                         "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {FAKE_HEAD_TYPE: {"resources": self.head_resources, "node_config": {},
                                                      "max_workers": 0}, **self.worker_types},
            "head_node_type": FAKE_HEAD_TYPE, "auth": {}, "docker": {}, "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
            "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    def start(self, timeout: float = 180) -> AutoscalingCluster:
        if self.mlflow is not None:
            self.mlflow.start()
            self.head_env.setdefault("MLFLOW_TRACKING_URI", self.mlflow.uri)
        cfg_path = self.tmp / "autoscaling.yaml"
        cfg_path.write_text(json.dumps(self.config(), indent=1))
        env = {**self.client_env(), "RAY_TMPDIR": str(self.tmp), "RAY_FAKE_CLUSTER": "1",
               "AUTOSCALER_UPDATE_INTERVAL_S": "1", **self.head_env}
        head = dict(self.head_resources)
        cmd = ["ray", "start", "--head", "--block", "--port", str(self.port), "--disable-usage-stats",
               f"--autoscaling-config={cfg_path}", "--num-cpus", f"{int(head.pop('CPU', 0))}",
               "--num-gpus", f"{int(head.pop('GPU', 0))}", "--object-store-memory", str(100 * 2**20),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
               "--metrics-export-port", str(free_port())]
        if head:
            cmd += ["--resources", json.dumps(head)]
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd[0] = ray_bin if Path(ray_bin).exists() else "ray"
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.tmp / "head.log", "a"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.tmp)
        self._set_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), RAY_AUTH_TOKEN=None)
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                log = (self.tmp / "head.log").read_text()[-3000:]
                self.shutdown()
                raise RuntimeError(f"ray start --head exited: {log}")
            try:
                self.jobs().list_jobs()
                if any(n["alive"] and n["head"] for n in self.nodes()):  # the head's raylet registered too
                    return self
                time.sleep(1)
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(1)
        log = (self.tmp / "head.log").read_text()[-3000:]
        self.shutdown()
        raise TimeoutError(f"the autoscaling cluster's job server on {self.dashboard_url} did not answer in "
                           f"{timeout}s ({type(last).__name__}: {last}); head: {log}")

    def jobs(self):
        """Ray's job client of this cluster (token authentication from this process's environment)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url)

    def _processes(self) -> list:
        """Every process of this cluster: the head's ``ray start`` and its descendants (GCS, raylets,
        the autoscaler and the worker nodes it started, jobs' drivers), and any process left over
        whose command line names the cluster's temp dir (a worker whose raylet was killed)."""
        import psutil

        procs = {}
        if self.proc is not None:
            try:
                root = psutil.Process(self.proc.pid)
                procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
            except psutil.Error:
                pass
        for p in psutil.process_iter(["cmdline"]):
            if p.pid not in procs and any(str(self.tmp) in a for a in (p.info["cmdline"] or [])):
                procs[p.pid] = p
        return list(procs.values())

    def shutdown(self) -> None:
        """Stop every process of the cluster (by process id, SIGTERM then SIGKILL), the MLflow
        server, restore this process's environment, remove the temp dir (the state under ``root``
        stays when ``root`` was given)."""
        import psutil
        import ray

        if ray.is_initialized():
            ray.shutdown()
        procs = self._processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive + [p for p in self._processes() if p not in procs]:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self.proc = None
        if self.mlflow is not None:
            self.mlflow.stop()
        if self._env:
            env, self._env = self._env, {}
            self._set_env(**env)
            self._env = {}
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- what a test looks at
    def nodes(self) -> list[dict]:
        """The cluster's nodes from the GCS: ``node_id``, ``alive``, ``head``, ``resources``
        (their totals), ``node_manager_port``."""
        from ray._raylet import GcsClient

        out = []
        for nid, info in GcsClient(address=self.address).get_all_node_info().items():
            out.append({"node_id": nid.hex(), "alive": info.state == 0, "head": bool(info.is_head_node),
                        "resources": dict(info.resources_total), "node_manager_port": info.node_manager_port})
        return out

    def workers(self) -> list[dict]:
        """The alive worker nodes."""
        return [n for n in self.nodes() if n["alive"] and not n["head"]]

    def autoscaler_log(self) -> str:
        """The autoscaler's log (``monitor.log``): its "Adding N node(s) of type ..." and
        "Removing N nodes of type ... (idle)" lines."""
        logs = sorted(self.tmp.glob("ray/session_*/logs/monitor.log"))
        return logs[-1].read_text(errors="replace") if logs else ""

    def kill_worker(self, node_id: str) -> int:
        """The worker node's instance lost (as a cloud takes back a spot instance): its raylet and
        every process under it killed at once; the autoscaler then finds the node dead and its
        provider terminates it. Returns how many processes were killed."""
        import psutil

        victims = []
        for p in self._processes():
            try:
                args = p.cmdline()
            except psutil.Error:
                continue
            if args and args[0].endswith("raylet") and f"--node_id={node_id}" in args:
                victims = [p, *p.children(recursive=True)]
                break
        if not victims:
            raise RuntimeError(f"no raylet of node {node_id} found")
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(victims, timeout=10)
        return len(victims)

    def __enter__(self) -> AutoscalingCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def main() -> None:  # pragma: no cover - manual use
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--autoscaling", action="store_true",
                    help="Ray's autoscaler with cluster.yaml's node types (scaled to this machine), the job "
                         "server and MLflow; workers come when trials ask for them")
    ap.add_argument("--max-workers", type=int, default=4, help="--autoscaling: at most this many worker nodes")
    ap.add_argument("--idle-timeout", type=float, default=60, help="--autoscaling: seconds before an idle worker goes")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--gpus-per-worker", type=float, default=1)
    ap.add_argument("--root", default="ablate_runs/local_cluster")
    args = ap.parse_args()
    if args.autoscaling:
        cluster = AutoscalingCluster(Path(args.root).resolve(), max_workers=args.max_workers,
                                     idle_timeout_s=args.idle_timeout).start()
        types = ", ".join(f"up to {t['max_workers']} x {n} ({t['resources'].get('CPU', 0):g} CPU, "
                          f"{t['resources'].get('GPU', 0):g} fake GPU)" for n, t in cluster.worker_types.items())
        print(f"RAY_ADDRESS={cluster.address}\nRAY_API_SERVER_ADDRESS={cluster.dashboard_url}  (ray job submit)\n"
              f"MLFLOW_TRACKING_URI={cluster.mlflow.uri}\nRAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.token}\n"
              f"node types: {types}\nthe head's workdir: {cluster.workdir}\n"
              "test only: its nodes run GPU trials on the CPU (ABLATE_TEST_ONLY_FAKE_GPUS_TRAIN_ON_CPU=1)\n"
              "(Ctrl-C stops it all)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            cluster.shutdown()
        return
    server = MlflowServer(args.root).start()
    cluster = LocalCluster(args.workers, args.cpus_per_worker, args.gpus_per_worker)
    print(f"RAY_ADDRESS={cluster.address}\nMLFLOW_TRACKING_URI={server.uri}\n(Ctrl-C stops both)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.shutdown()
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
