"""A multi-node Ray cluster and an MLflow tracking server on this machine, for proving cluster
behaviour without a cloud: a head node (no CPUs, like cluster.yaml's), worker nodes that may
advertise fake GPUs (Ray allows ``num_gpus`` on a CPU machine), and ``mlflow server`` on loopback.

    python -m orchestrator.localcluster --workers 2 --gpus-per-worker 1   # prints RAY_ADDRESS, URI

Used by tests/test_cluster.py and benchmarks/cluster_scaling.py.
"""

from __future__ import annotations

import argparse
import os
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


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and served artifacts under ``root``."""

    def __init__(self, root: str | Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts", "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
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
    """Head + ``workers`` worker nodes of ``cpus_per_worker`` CPUs and ``gpus_per_worker`` (fake) GPUs."""

    def __init__(self, workers: int = 2, cpus_per_worker: int = 1, gpus_per_worker: float = 0):
        from ray.cluster_utils import Cluster

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

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()


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
