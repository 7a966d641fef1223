"""Creating instance actors: used by the elastic manager for the first replicas, for scale-up,
for replacing a dead replica and for the warm standbys that scale-up adopts."""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.instance import CONTROL_GROUP, LIFELINE_GROUP, InstanceActor
from actors.transport import transport_actor_options
from fabric.config import FabricConfig


def _instance_class():
    """Control calls (`lend`, `abort`, `info`, `stats`, ...) have their own threads, so that
    long `generate` and `stream` calls never starve them."""
    options = transport_actor_options(max_concurrency=64, transport_threads=16)
    options["concurrency_groups"] |= {CONTROL_GROUP: 8, LIFELINE_GROUP: 4}
    return ray.remote(**options)(InstanceActor)


def new_instance(cfg: FabricConfig, index: int, actor_name: str, controller_name: str,
                 namespace: str, fabric_name: str, detached: bool,
                 manager_name: str | None = None):
    """An instance actor (one GPU each on CUDA), spread over the cluster's nodes."""
    return _instance_class().options(
        name=actor_name, namespace=namespace, lifetime="detached" if detached else None,
        num_cpus=cfg.instances.num_cpus, num_gpus=1 if cfg.instances.device == "cuda" else 0,
        scheduling_strategy="SPREAD",
    ).remote(index, cfg.to_dict(), controller_name, namespace, fabric_name, manager_name,
             actor_name)


def new_standby(cfg: FabricConfig, node_id: str, actor_name: str, controller_name: str,
                namespace: str, fabric_name: str, detached: bool, manager_name: str):
    """A warm standby on node `node_id`: an instance process that imports torch and the model
    code, then waits for `take_rank`. Waiting takes no Ray resources (it runs nothing); the manager
    reserves an instance's CPUs on the node before it adopts one."""
    return _instance_class().options(
        name=actor_name, namespace=namespace, lifetime="detached" if detached else None,
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(-1, cfg.to_dict(), controller_name, namespace, fabric_name, manager_name,
             actor_name, standby=True)


def backend_of(cfg: FabricConfig) -> str:
    return {"auto": "torch"}.get(cfg.transport.backend, cfg.transport.backend)
