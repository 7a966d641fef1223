"""Creating instance actors: used by the elastic manager for the first replicas, for scale-up
and for replacing a dead replica."""

from __future__ import annotations

import ray

from actors.instance import CONTROL_GROUP, LIFELINE_GROUP, InstanceActor
from actors.transport import transport_actor_options
from fabric.config import FabricConfig


def new_instance(cfg: FabricConfig, index: int, actor_name: str, controller_name: str,
                 namespace: str, fabric_name: str, detached: bool,
                 manager_name: str | None = None):
    """An instance actor (one GPU each on CUDA), spread over the cluster's nodes. Control calls
    (`lend`, `abort`, `info`, `stats`, ...) have their own threads, so that long `generate` and
    `stream` calls never starve them."""
    options = transport_actor_options(max_concurrency=64, transport_threads=16)
    options["concurrency_groups"] |= {CONTROL_GROUP: 8, LIFELINE_GROUP: 4}
    actor_cls = ray.remote(**options)(InstanceActor)
    return actor_cls.options(
        name=actor_name, namespace=namespace, lifetime="detached" if detached else None,
        num_cpus=cfg.instances.num_cpus, num_gpus=1 if cfg.instances.device == "cuda" else 0,
        scheduling_strategy="SPREAD",
    ).remote(index, cfg.to_dict(), controller_name, namespace, fabric_name, manager_name,
             actor_name)


def backend_of(cfg: FabricConfig) -> str:
    return {"auto": "torch"}.get(cfg.transport.backend, cfg.transport.backend)
