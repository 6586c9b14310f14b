"""What a Ray cluster can give a trial: the nodes it has now, and the node types its autoscaler may
add (``cluster.yaml``'s cluster starts with a head of no CPUs and GPU workers at ``min_workers: 0``,
so it has no GPU until the autoscaler adds one).

The node types are read from the cluster itself, never from a local copy of cluster.yaml (whose
GPU types say ``resources: {}``: the cloud provider fills them in on the head):

1. the cluster config the autoscaler reports to the GCS (autoscaler v2, KubeRay): the node groups
   with their resources and ``max_count`` (``ray._private.state.state.get_cluster_config``);
2. else the config the autoscaler (v1, what ``ray up`` starts) runs with: the GCS's autoscaler
   status names the monitor's process (``monitor_pid``); a task of no CPU pinned to the head node
   reads that process's ``--autoscaling-config`` file (``~/ray_bootstrap_config.yaml`` after
   ``ray up``, with the provider's resources filled in) and returns its ``available_node_types``;
3. else the cluster has no autoscaler: what is there now is all there is.

``ablate sweep`` / ``boundary`` / ``check --address`` refuse only a trial that no node present and
no node type can ever hold, naming the types (:meth:`Capacity.refusal`); ``check`` prints
:meth:`Capacity.lines`; the progress line says when trials wait for nodes (:func:`waiting_note`).
Needs a connected Ray (``ray.init``); imported only by the driver.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

log = logging.getLogger("ablate")

# Resources a node type or a trial is judged on (Ray's names); others (memory, node:...) are not asked.
KEYS = ("CPU", "GPU")


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int          # how many the autoscaler may run at once (-1: no limit)

    def holds(self, need: dict[str, float]) -> bool:
        return self.max_workers != 0 and all(self.resources.get(k, 0.0) >= v for k, v in need.items() if v > 0)

    def text(self) -> str:
        res = ", ".join(f"{self.resources.get(k, 0):g} {k}" for k in KEYS)
        n = "any number" if self.max_workers < 0 else f"up to {self.max_workers}"
        return f"{n} x {self.name} ({res})"


@dataclass
class Capacity:
    """The cluster's nodes now (their total resources, alive ones only) and the node types the
    autoscaler may launch (empty: no autoscaler, or none found). ``source`` says where the types
    were read."""

    nodes: list[dict[str, float]]
    types: list[NodeType] = field(default_factory=list)
    source: str = "none"
    max_workers: int | None = None    # the autoscaler's cluster-wide cap on worker nodes

    @property
    def now(self) -> dict[str, float]:
        return {k: sum(n.get(k, 0.0) for n in self.nodes) for k in KEYS}

    def holds(self, need: dict[str, float]) -> bool:
        """Whether a node present now, or one of a type the autoscaler may add, can hold ``need``."""
        if any(all(n.get(k, 0.0) >= v for k, v in need.items() if v > 0) for n in self.nodes):
            return True
        return any(t.holds(need) for t in self.types)

    def slots(self, need: dict[str, float]) -> int:
        """How many trials of ``need`` the cluster can run at once at its largest: its nodes now, or
        every type at its ``max_workers`` (under the cluster-wide cap, the types that hold the most
        first), whichever holds more: the concurrency a boundary search asks for when the spec sets
        none. At least 1."""
        def per_node(res: dict[str, float]) -> int:
            fits = [math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
            return min(fits) if fits else 0

        now = sum(per_node(n) for n in self.nodes)
        budget = self.max_workers if self.max_workers is not None and self.max_workers >= 0 else None
        largest = 0
        for t in sorted(self.types, key=lambda t: -per_node(t.resources)):
            n = t.max_workers if t.max_workers >= 0 else (budget if budget is not None else 1000)
            if budget is not None:
                n = min(n, budget)
                budget -= n
            largest += n * per_node(t.resources)
        # the nodes there now are (mostly) of those types: the larger of the two, not their sum
        return max(1, now, largest)

    def lines(self) -> list[str]:
        """What ``ablate check --address`` prints: what is there now, what can be added."""
        now = self.now
        out = [f"cluster now: {len(self.nodes)} node(s), {now['CPU']:g} CPU, {now['GPU']:g} GPU"]
        if self.types:
            cap = f" (at most {self.max_workers} worker nodes in all)" if self.max_workers is not None else ""
            out.append("autoscaler: " + ", ".join(t.text() for t in self.types) + cap)
        else:
            out.append("autoscaler: none found; the cluster is what is there now")
        return out

    def refusal(self, cpus: float, gpus: float) -> str | None:
        """One line naming the field, the value and what the cluster can hold, when no node present
        and no node type can ever hold a trial of ``cpus`` / ``gpus``; None when one can."""
        need = {"CPU": cpus, "GPU": gpus}
        if self.holds(need):
            return None
        pool = self.nodes + [t.resources for t in self.types if t.max_workers]
        short = [k for k in ("GPU", "CPU") if need[k] > 0 and not any(r.get(k, 0.0) >= need[k] for r in pool)]
        if len(short) == 1:
            k = short[0]
            what = (f"resources.{k.lower()}s: {need[k]:g} per trial, but no node of the cluster can ever hold it "
                    f"(the largest has {max((r.get(k, 0.0) for r in pool), default=0.0):g} {k})")
        else:  # both short, or each fits some node but no node fits both
            what = (f"resources: {cpus:g} CPU / {gpus:g} GPU per trial, but no node of the cluster can ever "
                    "hold both")
        now = self.now
        where = (f"the cluster has {now['CPU']:g} CPU / {now['GPU']:g} GPU now"
                 + ("; autoscaler: " + ", ".join(t.text() for t in self.types) if self.types
                    else ", and no autoscaler that could add nodes"))
        hint = ("; set resources.gpus: 0 to run on CPUs" if short == ["GPU"] and
                not any(r.get("GPU", 0.0) > 0 for r in pool) else "")
        return f"{what}: {where}{hint}"


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _types_from_gcs_config() -> tuple[list[NodeType], int | None] | None:
    """Autoscaler v2 / KubeRay: the cluster config reported to the GCS."""
    try:
        from ray._private import state

        cfg = state.state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - an older or newer Ray: fall back
        log.debug("no cluster config in the GCS: %s", e)
        return None
    if cfg is None or not cfg.node_group_configs:
        return None
    types = [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
             for g in cfg.node_group_configs if int(g.max_count) != 0]
    return types, None


def autoscaling_status() -> dict | None:
    """The v1 autoscaler's status in the GCS (what ``ray status`` shows), or None."""
    try:
        import ray._private.ray_constants as rc
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        if not _internal_kv_initialized():
            return None
        raw = _internal_kv_get(rc.DEBUG_AUTOSCALING_STATUS)
        return json.loads(raw) if raw else None
    except Exception as e:  # noqa: BLE001
        log.debug("no autoscaler status: %s", e)
        return None


def _read_monitor_config(pid: int) -> dict | None:
    """On the head node: the autoscaling config of the monitor process ``pid`` (its
    ``--autoscaling-config`` file), or None."""
    import yaml

    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
        path = next((a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")), None)
        if path is None:
            i = args.index("--autoscaling-config") if "--autoscaling-config" in args else -1
            path = args[i + 1] if 0 <= i < len(args) - 1 else None
        if not path:
            return None
        with open(os.path.expanduser(path)) as f:
            cfg = yaml.safe_load(f)
        return {"available_node_types": cfg.get("available_node_types") or {},
                "head_node_type": cfg.get("head_node_type"), "max_workers": cfg.get("max_workers")}
    except (OSError, ValueError, StopIteration, AttributeError):
        return None


def _types_from_monitor() -> tuple[list[NodeType], int | None] | None:
    """Autoscaler v1: its own config, read on the head node (here when the driver runs there, else by
    a task of no CPU)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    status = autoscaling_status()
    pid = (status or {}).get("monitor_pid")
    if not pid:
        return None
    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive")
                 and "node:__internal_head__" in n.get("Resources", {})), None)
    if head is None:
        return None
    # A driver on the head node (the embedded Ray, a job submitted to a cluster) reads it here: a task
    # would wait for a worker, 3 s on 2 cores while the prestarted ones import torch.
    if head == ray.get_runtime_context().get_node_id():
        cfg = _read_monitor_config(pid)
    else:
        task = ray.remote(num_cpus=0, max_retries=0)(_read_monitor_config).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False))
        try:
            cfg = ray.get(task.remote(pid), timeout=60)
        except Exception as e:  # noqa: BLE001 - a head that cannot run the task: no types known
            log.warning("could not read the autoscaler's config on the head node: %s", e)
            return None
    if not cfg:
        return None
    head_type = cfg.get("head_node_type")
    types = []
    for name, t in cfg["available_node_types"].items():
        if name == head_type:
            continue
        res = {k: float(v) for k, v in (t.get("resources") or {}).items() if isinstance(v, (int, float))}
        mx = int(t.get("max_workers", cfg.get("max_workers") or 0))
        if mx:
            types.append(NodeType(name, res, mx))
    mw = cfg.get("max_workers")
    return types, (int(mw) if mw is not None else None)


def read_capacity() -> Capacity:
    """The connected cluster's :class:`Capacity`."""
    nodes = _alive_nodes()
    for source, reader in (("gcs cluster config", _types_from_gcs_config), ("autoscaler config", _types_from_monitor)):
        found = reader()
        if found is not None:
            types, cap = found
            return Capacity(nodes, types, source, cap)
    return Capacity(nodes)


def waiting_note(need: dict[str, float], pending: int) -> str:
    """What the progress line adds while ``pending`` trials wait: when no node has room for one
    trial of ``need`` now, "N waiting for nodes", with the launches the autoscaler has under way
    (from its status in the GCS). Empty when nothing waits or a node has room (a trial about to
    start is not waiting for a node)."""
    if pending <= 0:
        return ""
    try:
        import ray

        free = ray.available_resources()
    except Exception:  # noqa: BLE001 - the progress line never fails a sweep
        return ""
    if all(free.get(k, 0.0) >= v for k, v in need.items() if v > 0):
        return ""
    note = f"{pending} waiting for nodes"
    report = (autoscaling_status() or {}).get("autoscaler_report") or {}
    launching: dict[str, int] = dict(report.get("pending_launches") or {})
    for _ip, node_type, _status in report.get("pending_nodes") or []:
        launching[node_type] = launching.get(node_type, 0) + 1
    if launching:
        note += " (autoscaler adding " + ", ".join(f"{n} x {t}" for t, n in sorted(launching.items())) + ")"
    return note
