"""A multi-node Ray cluster and an MLflow tracking server on this machine, for proving cluster
behaviour without a cloud: a head node (no CPUs, like cluster.yaml's), worker nodes that may
advertise fake GPUs (Ray allows ``num_gpus`` on a CPU machine), and ``mlflow server`` on loopback.
With ``auth_token`` every node runs with Ray token authentication, as cluster.yaml starts them
(``RAY_AUTH_MODE=token``, the token in a file of mode 0600); with ``admin_password`` the MLflow
server is MLflow's basic-auth app, cluster.yaml's variant for opening MLflow beyond the head.

    python -m orchestrator.localcluster --workers 2 --gpus-per-worker 1   # prints RAY_ADDRESS, URI

Used by tests/test_cluster.py and benchmarks/cluster_scaling.py.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
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


def main() -> None:  # pragma: no cover - manual use
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=int, default=1)
    ap.add_argument("--gpus-per-worker", type=float, default=1)
    ap.add_argument("--root", default="ablate_runs/local_cluster")
    args = ap.parse_args()
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
