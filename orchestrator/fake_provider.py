"""Ray's fake multi-node provider (its autoscaler test harness), with one change for
``orchestrator.localcluster.AutoscalingCluster``: each worker node unpacks jobs' working
directories into a folder of its own.

Ray's fake nodes are processes of one machine sharing one session folder, and every node's runtime
env agent unpacks a job's ``--working-dir`` package into ``<session>/runtime_resources`` with
``overwrite=True`` (remove, then unpack again). On real machines each node has its own disk; here a
worker node that starts mid-job removes the folder the job's driver runs in on the head, and the
driver's next ``os.getcwd()`` fails. Giving each worker node its own ``runtime_env_dir_name`` (a
``RayParams`` field) makes the fake nodes' disks as separate as real ones.

Used through the autoscaling config ``provider: {type: external, module:
orchestrator.fake_provider.SeparateDirsFakeProvider}``; imported only by the autoscaler's process.
"""

from __future__ import annotations

import ray._private.parameter as parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class SeparateDirsFakeProvider(FakeMultiNodeProvider):
    """:class:`FakeMultiNodeProvider` whose worker nodes keep jobs' working directories in
    ``<session>/runtime_resources_<node number>``."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:
            number = self._next_node_id + 1  # the id the parent's _next_hex_node_id gives this node
            original = parameter.RayParams

            def params(*args, **kwargs):
                kwargs.setdefault("runtime_env_dir_name", f"runtime_resources_{number:05d}")
                return original(*args, **kwargs)

            parameter.RayParams = params  # the parent builds the node's RayParams through this name
            try:
                return super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                parameter.RayParams = original
