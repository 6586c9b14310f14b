import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest runs alongside Ray workers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for one test module. Ray is imported here, not at the top: the
    workload tests also run on a GPU image that has no Ray (``benchmarks/gpu_session.sh``)."""
    import ray

    # a new instance of the tests' own: without an address ray.init() attaches to a cluster already
    # running on this machine (RAY_ADDRESS, <RAY_TMPDIR or /tmp>/ray/ray_current_cluster)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def benchmark_module():
    """Load a script of ``benchmarks/`` (not a package) as a module: ``benchmark_module("class_stability")``."""
    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
