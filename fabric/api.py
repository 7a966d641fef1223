"""The public handle: `start`, `connect`, and `Fabric.generate / stats / scale / shutdown`.

Imports `ray` lazily: only this module touches it, and only when a fabric starts.
"""

from __future__ import annotations

import os
import sys
import uuid

from fabric.config import FabricConfig, load_config
from fabric.engine import check_capacity, check_request
from fabric.errors import FabricError, RequestError
from fabric.result import Result
from fabric.rmanager import max_request_blocks
from fabric.sequence import SamplingParams
from fabric.tokenizer import ByteTokenizer

NAMESPACE = "kv-fabric"
REQUEST_KEYS = {"id", "prompt", "max_new_tokens", "temperature", "seed", "ignore_eos"}


def _request_id(req) -> str:
    rid = req.get("id") if isinstance(req, dict) else None
    return str(rid) if rid is not None else uuid.uuid4().hex


def _error_class(name: str | None) -> type:
    from fabric import errors

    cls = getattr(errors, name or "", None)
    return cls if isinstance(cls, type) and issubclass(cls, FabricError) else FabricError


def _actor_names(name: str, count: int) -> tuple[str, list[str]]:
    return f"kvfabric-{name}-controller", [f"kvfabric-{name}-instance-{i}" for i in range(count)]


def _manager_name(name: str) -> str:
    return f"kvfabric-{name}-elastic"


def _init_ray(address: str | None, cfg: FabricConfig | None) -> bool:
    """Connect or start Ray; True when this call started an embedded cluster."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        num_cpus = max(os.cpu_count() or 1, int(cfg.instances.count * cfg.instances.num_cpus) + 2)
        # address="local": a private cluster, never a `ray start` one that happens to run here
        ray.init(address="local", num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        return True
    _use_token_auth()
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    except Exception as e:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE") != "token":
            hint = (" (a cluster started with `ray start` uses token authentication: run with "
                    "RAY_AUTH_MODE=token and the token in ~/.ray/auth_token)")
        raise FabricError(f"could not connect to Ray at {address!r}: {e}{hint}") from None
    return False


def _use_token_auth() -> None:
    """Ray 2.60's `ray start` turns token authentication on; a driver must say so to connect.
    When a token is present and the user chose nothing, use it (and say so)."""
    token = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if not os.environ.get("RAY_AUTH_MODE") and (os.path.isfile(token) or os.environ.get("RAY_AUTH_TOKEN")):
        os.environ["RAY_AUTH_MODE"] = "token"
        print("kv-fabric: using Ray token authentication (RAY_AUTH_MODE=token)", file=sys.stderr)


def start(config=None, *, address: str | None = None, name: str | None = None,
          detached: bool = False) -> "Fabric":
    if address is not None:
        _use_token_auth()          # before Ray is imported: it reads the mode once
    import ray

    from actors.controller import ControllerActor
    from actors.elastic import ElasticManager

    cfg = load_config(config)
    if cfg.model.path is not None:
        from fabric.model.checkpoint import check_checkpoint

        check_checkpoint(cfg.model.path)     # a broken checkpoint fails here, before any actor
    owns_ray = _init_ray(address, cfg)
    name = name or uuid.uuid4().hex[:8]
    ctrl_name, inst_names = _actor_names(name, cfg.initial_replicas)
    lifetime = "detached" if detached else None
    controller = ray.remote(ControllerActor).options(
        name=ctrl_name, namespace=NAMESPACE, lifetime=lifetime, num_cpus=0, max_concurrency=16,
        max_restarts=-1, max_task_retries=-1,       # restarts rebuild the ledger from heartbeats
    ).remote(cfg.to_dict(), inst_names, NAMESPACE, name, detached)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    manager = ray.remote(ElasticManager).options(
        name=_manager_name(name), namespace=NAMESPACE, lifetime=lifetime, num_cpus=0,
        max_concurrency=64, max_restarts=-1, max_task_retries=-1,   # restarts recover the set
        scheduling_strategy=NodeAffinitySchedulingStrategy(      # beside the driver (fate-shared)
            ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(cfg.to_dict(), name, NAMESPACE, ctrl_name, detached)
    try:
        members = ray.get(manager.start.remote(cfg.initial_replicas))
    except Exception:
        for actor in (manager, controller):
            ray.kill(actor, no_restart=True)
        if owns_ray:
            ray.shutdown()
        raise
    instances = [ray.get_actor(n, namespace=NAMESPACE) for n in members["names"]]
    fab = Fabric(name, cfg, controller, instances, owns_ray, manager, members)
    return fab


def connect(name: str, *, address: str | None = None) -> "Fabric":
    _use_token_auth()
    import ray

    if not ray.is_initialized():
        _init_ray(address or "auto", None)
    ctrl_name, _ = _actor_names(name, 0)
    try:       # a fabric being stopped may still show some of its actors: all must answer
        controller = ray.get_actor(ctrl_name, namespace=NAMESPACE)
        cfg = load_config(ray.get(controller.config.remote(), timeout=60))
        manager = ray.get_actor(_manager_name(name), namespace=NAMESPACE)
        members = ray.get(manager.members.remote(), timeout=60)
        instances = [ray.get_actor(n, namespace=NAMESPACE) for n in members["names"]]
    except (ValueError, ray.exceptions.RayActorError):
        raise FabricError(f"no fabric named {name!r} is running") from None
    return Fabric(name, cfg, controller, instances, False, manager, members)


class Fabric:
    """A running fabric: a controller, an elastic manager and the instance (replica) actors."""

    def __init__(self, name: str, cfg: FabricConfig, controller, instances: list, owns_ray: bool,
                 manager, members: dict):
        import ray

        self.name, self.cfg, self.controller, self.instances = name, cfg, controller, instances
        self.manager = manager
        self.names: list[str] = list(members["names"])
        self.epoch = members["epoch"]
        self._owns_ray = owns_ray
        self.infos = ray.get([a.info.remote() for a in instances])
        info = self.infos[0]
        self.vocab_size, self.max_positions = info["vocab_size"], info["max_position_embeddings"]
        self.block_size = info["block_size"]
        self.tokenizer = self._tokenizer()
        self._next_home = 0
        self._homes: dict[str, object] = {}   # streamed request id -> home instance actor
        self.dead: set[int] = set()           # instances found dead

    @property
    def max_request_blocks(self) -> int:
        """The largest request the live instances can hold (admission control)."""
        c = self.cfg
        return max_request_blocks(len(self.instances) - len(self.dead), c.instances.kv_blocks,
                                  c.lending.enabled, c.lending.max_lend_fraction,
                                  c.lending.min_free_fraction)

    def _tokenizer(self):
        path = self.cfg.model.path
        if path is None:
            return ByteTokenizer(self.vocab_size)
        if os.path.isfile(os.path.join(path, "tokenizer.json")) or \
                os.path.isfile(os.path.join(path, "tokenizer.model")):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
        return None

    def _sync_members(self) -> None:
        """Follow the elastic manager's replica set (one control call; nothing per token)."""
        import ray

        members = ray.get(self.manager.members.remote())
        if members["epoch"] == self.epoch:
            return
        known = dict(zip(self.names, self.instances))
        names = members["names"]
        self.instances = [known.get(n) or ray.get_actor(n, namespace=NAMESPACE) for n in names]
        self.dead = {i for i in self.dead if i < len(names) and i < len(self.names)
                     and names[i] == self.names[i]}
        self.names, self.epoch = list(names), members["epoch"]

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompts, *, max_new_tokens: int = 16, temperature: float = 0.0,
                 seed: int | None = None, ignore_eos: bool = False,
                 errors: str = "raise") -> list[Result]:
        """Generate for each prompt (token ids or text). Greedy when temperature is 0.

        errors="raise": every request is checked before any work starts; a bad one raises
        `RequestError` (`CapacityError` if it cannot fit in the whole fabric) and nothing runs.
        errors="return": a bad request comes back as a `Result` with `error` set; the rest run."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise RequestError("prompts must be a list of prompts (token-id lists or strings)")
        return self.submit([{"prompt": p, "max_new_tokens": max_new_tokens,
                             "temperature": temperature, "seed": seed, "ignore_eos": ignore_eos}
                            for p in prompts], errors=errors)

    def submit(self, requests: list[dict], *, errors: str = "raise") -> list[Result]:
        """Run requests with their own settings: each a dict with `prompt` and optionally `id`,
        `max_new_tokens` (16), `temperature` (0.0), `seed`, `ignore_eos` (False)."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        if not isinstance(requests, (list, tuple)):
            raise RequestError(f"requests must be a list of request mappings, got "
                               f"{type(requests).__name__}")
        self._sync_members()              # admission against the current replica set
        checked: list[dict | Result] = []
        seen: set[str] = set()
        for i, r in enumerate(requests):
            try:
                req = self._request(i, r)
                if req["id"] in seen:
                    raise RequestError(f"request {i}: id {req['id']!r} appears twice in this call")
                seen.add(req["id"])
                checked.append(req)
            except FabricError as e:
                if errors == "raise":
                    raise
                checked.append(Result([], finish_reason="error", request_id=_request_id(r),
                                      error=str(e), error_type=type(e).__name__))
        done = self._run([r for r in checked if isinstance(r, dict)])
        results = [r if isinstance(r, Result) else self._result(done[r["id"]]) for r in checked]
        if errors == "raise":
            for r in results:
                if r.error is not None:
                    raise _error_class(r.error_type)(r.error)
        return results

    def _request(self, index: int, req) -> dict:
        if not isinstance(req, dict):
            raise RequestError(f"request {index} must be a mapping, got {type(req).__name__}")
        unknown = sorted(set(req) - REQUEST_KEYS)
        if unknown:
            raise RequestError(f"request {index}: unknown field {unknown[0]!r}")
        prompt = req.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"prompt {index} is text but the checkpoint has no tokenizer")
            prompt = list(self.tokenizer.encode(prompt))
        params = SamplingParams(req.get("max_new_tokens", 16), req.get("temperature", 0.0),
                                req.get("seed"), req.get("ignore_eos", False))
        seed = params.seed
        try:
            if prompt is None:
                raise RequestError("prompt is missing")
            check_request(prompt, params, self.vocab_size, self.max_positions)
            check_capacity(len(prompt) + params.max_new_tokens, self.block_size, self.max_request_blocks)
        except FabricError as e:
            raise type(e)(f"prompt {index}: {e}") from None
        return {"id": _request_id(req), "prompt": list(prompt), "max_new_tokens": params.max_new_tokens,
                "temperature": float(params.temperature), "seed": seed,
                "ignore_eos": params.ignore_eos}

    def _run(self, reqs: list[dict]) -> dict[str, dict]:
        """Spread `reqs` over live instances and wait. A request whose home dies is resubmitted
        elsewhere and recomputed from its prompt (greedy and seeded sampling give the same)."""
        import ray
        from ray.exceptions import RayActorError

        done: dict[str, dict] = {}
        todo = reqs                                # members synced by `submit`
        while todo:
            instances = self.instances             # one snapshot: scaling may swap the list
            groups: dict[int, list[dict]] = {}
            for r in todo:
                groups.setdefault(self._pick_home(instances), []).append(r)
            refs = {h: instances[h].generate.remote(rs) for h, rs in groups.items()}
            todo = []
            for h, ref in refs.items():
                try:
                    done.update((d["id"], d) for d in ray.get(ref))
                except RayActorError:
                    self._sync_members()
                    now = [i for i, a in enumerate(self.instances)
                           if a._actor_id == instances[h]._actor_id]
                    if now:                        # a member died (else: it had left)
                        self._mark_dead(now[0])
                    todo += groups[h]
            if todo:
                self._refresh_instances()
        return done

    def _swap_in_replacement(self, i: int) -> bool:
        import ray

        try:
            named = ray.get_actor(self.names[i], namespace=NAMESPACE)
            if named._actor_id == self.instances[i]._actor_id:
                return False
            ray.get(named.info.remote(), timeout=10)
        except Exception:
            return False
        self.instances[i] = named
        return True

    def _refresh_instances(self) -> None:
        """Pick up instances the controller has replaced since they were found dead."""
        import ray

        ctrl_dead = set(ray.get(self.controller.stats.remote())["dead"])
        for i in sorted(self.dead - ctrl_dead):
            if self._swap_in_replacement(i):
                self.dead.discard(i)

    def _mark_dead(self, home: int) -> None:
        """Forget a dead instance: no more requests go there; the others take back what they
        lent it, and the controller drops it from the ledger. If the controller has already
        put a replacement under its name, use that instead."""
        if home in self.dead or self._swap_in_replacement(home):
            return
        self.dead.add(home)
        if len(self.dead) == len(self.instances):
            raise FabricError("every instance of the fabric has died")
        for i, a in enumerate(self.instances):
            if i not in self.dead:
                a.drop_debtor.remote(home)
        try:
            self.controller.remove_instance.remote(home)
        except Exception:
            pass

    def stream(self, prompt, *, max_new_tokens: int = 16, temperature: float = 0.0,
               seed: int | None = None, ignore_eos: bool = False, request_id: str | None = None):
        """Yield generated token ids one by one as the fabric makes them. Leaving the loop early
        (break, exception, garbage collection) cancels the request and frees its blocks."""
        import ray

        self._sync_members()
        req = self._request(0, {"prompt": prompt, "max_new_tokens": max_new_tokens,
                                "temperature": temperature, "seed": seed,
                                "ignore_eos": ignore_eos, "id": request_id})
        instances = self.instances
        instance = instances[self._pick_home(instances)]
        self._homes[req["id"]] = instance
        gen = instance.stream.options(num_returns="streaming").remote(req)
        finished = False
        try:
            for ref in gen:
                item = ray.get(ref)
                if isinstance(item, dict):
                    finished = True
                    if "error" in item:
                        raise _error_class(item["error_type"])(item["error"])
                    return
                yield item
        finally:
            self._homes.pop(req["id"], None)
            if not finished:
                instance.abort.remote(req["id"])

    def cancel(self, request_id: str) -> bool:
        """Cancel a streamed request by id (see `stream(request_id=...)`); True if it was live."""
        import ray

        instance = self._homes.get(request_id)
        if instance is None:
            return False
        return ray.get(instance.abort.remote(request_id))

    def _pick_home(self, instances: list | None = None) -> int:
        """Round robin over the live instances of `instances` (default: the current list)."""
        n = len(self.instances if instances is None else instances)
        for _ in range(n):
            home = self._next_home % n
            self._next_home = (home + 1) % n
            if home not in self.dead:
                return home
        raise FabricError("every instance of the fabric has died")

    def _result(self, d: dict) -> Result:
        if "error" in d:
            return Result([], finish_reason="error", request_id=d["id"], error=d["error"],
                          error_type=d["error_type"])
        text = self.tokenizer.decode(d["tokens"]) if self.tokenizer is not None else ""
        return Result(tokens=d["tokens"], text=text, finish_reason=d["finish_reason"],
                      metrics=d["metrics"], request_id=d["id"], home=d["home"])

    # ---- observation and control -----------------------------------------------------------
    def stats(self) -> dict:
        import ray

        from ray.exceptions import RayActorError

        self._sync_members()
        if self.dead:
            self._refresh_instances()
        inst = []
        for i, a in enumerate(self.instances):
            if i in self.dead:
                continue
            try:
                inst.append(ray.get(a.stats.remote()))
            except RayActorError:
                self._mark_dead(i)
                if i not in self.dead:                   # replaced meanwhile
                    inst.append(ray.get(self.instances[i].stats.remote()))
        ctrl = ray.get(self.controller.stats.remote())
        keys = ("id", "node", "blocks_total", "blocks_free", "blocks_lent", "blocks_borrowed")
        # the instances own the borrow counters (they survive a controller restart)
        lending = {"borrow_events": sum(s["borrow_events"] for s in inst),
                   "blocks_borrowed_total": sum(s["blocks_borrowed_total"] for s in inst)}
        elastic = ray.get(self.manager.stats.remote())
        return {"instances": [{k: s[k] for k in keys} | {"detail": s} for s in inst],
                "lending": lending, "elastic": elastic,
                "controller": {"calls": ctrl["calls"]}}

    def scale(self, replicas: int) -> dict:
        """Run `replicas` instances: new ones map the weights already published on their node
        (no disk read while a live copy exists) and join while the others serve; leaving ones
        hand their requests' KV to the rest first. Returns the scale event (see `stats()`)."""
        import ray

        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise RequestError(f"replicas must be an integer >= 1, got {replicas!r}")
        try:
            event = ray.get(self.manager.scale.remote(replicas))
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            raise (cause if isinstance(cause, FabricError) else FabricError(str(e))) from None
        self._sync_members()
        return event

    def disconnect(self) -> None:
        """Let go of this handle; the fabric keeps running (for a named, detached fabric)."""
        self.instances = []

    def shutdown(self) -> None:
        import ray

        try:
            ray.get(self.manager.shutdown.remote(), timeout=30)
        except Exception:
            pass
        for a in self.instances:
            try:
                ray.get(a.shutdown.remote(), timeout=10)
            except Exception:
                pass
            try:
                ray.kill(a)
            except Exception:
                pass
        ray.kill(self.controller, no_restart=True)
        ray.kill(self.manager, no_restart=True)
        self.instances = []
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
