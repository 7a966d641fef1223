"""The public handle: `start`, `connect`, and `Fabric.generate / stats / scale / shutdown`.

Imports `ray` lazily: only this module touches it, and only when a fabric starts.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid

from fabric.config import FabricConfig, load_config
from fabric.engine import check_capacity, check_request
from fabric.errors import FabricError, RequestError
from fabric.messages import CONTROL_TIMEOUT_S
from fabric.result import Result
from fabric.rmanager import max_request_blocks
from fabric.sequence import SamplingParams
from fabric.tiers import tier_totals

NAMESPACE = "kv-fabric"
SAMPLING_KEYS = {"max_new_tokens", "temperature", "seed", "ignore_eos", "top_p", "top_k", "stop",
                 "stop_token_ids", "session_id", "ttl_s"}
REQUEST_KEYS = {"id", "prompt", "messages"} | SAMPLING_KEYS
# The Ray client proxy starts one server process per driver; on busy machines that start fails
# now and then (the new process dies at once, or does not open its port in time), before the
# driver has reached anything: `ray://` connections are tried again, up to this many times.
CLIENT_CONNECT_ATTEMPTS = 3
CLIENT_START_FAILURES = ("Starting Ray client server failed", "Proxy failed to Connect to backend")
CHAT_ROLES = ("system", "user", "assistant", "tool")


def _text_content(index: int, content) -> str:
    """A message's content: a string, or OpenAI-style parts of type "text"."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"message {index}: content must be a string (or a list of text parts)")


def _request_id(req) -> str:
    rid = req.get("id") if isinstance(req, dict) else None
    return str(rid) if rid is not None else uuid.uuid4().hex


def _error_class(name: str | None) -> type:
    from fabric import errors

    cls = getattr(errors, name or "", None)
    return cls if isinstance(cls, type) and issubclass(cls, FabricError) else FabricError


def _controller_name(name: str) -> str:
    return f"kvfabric-{name}-controller"


def _manager_name(name: str) -> str:
    return f"kvfabric-{name}-elastic"


def _init_ray(address: str | None, cfg: FabricConfig | None) -> bool:
    """Connect or start Ray; True when this call started an embedded cluster."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        per_instance = cfg.instances.cpus([os.cpu_count() or 1], cfg.instances.count)
        num_cpus = max(os.cpu_count() or 1, int(cfg.instances.count * per_instance) + 2)
        # address="local": a private cluster, never a `ray start` one that happens to run here
        before = os.environ.get("RAY_AUTH_MODE")
        ray.init(address="local", num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        from fabric import auth

        auth.local_cluster_started(before)   # Ray sets RAY_AUTH_MODE=token here: not the user's
        return True
    with _use_token_auth(address):       # FabricError naming the cause when it fails
        for attempt in range(1, CLIENT_CONNECT_ATTEMPTS + 1):
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
                break
            except ConnectionAbortedError as e:      # what the client raises for both
                if not (address.startswith("ray://") and client_start_failed(e)) \
                        or attempt == CLIENT_CONNECT_ATTEMPTS:
                    raise
                print(f"kv-fabric: the Ray client server for this driver did not start at "
                      f"{address} (attempt {attempt} of {CLIENT_CONNECT_ATTEMPTS}): trying "
                      f"again", file=sys.stderr)
                time.sleep(attempt)
    return False


def client_start_failed(error: BaseException) -> bool:
    """True for the Ray client's answer when the proxy could not start this driver's server
    (nothing was reached: connecting again is safe)."""
    text = str(error)
    return "Initialization failure from server" in text and \
        any(marker in text for marker in CLIENT_START_FAILURES)


def _resolve_cpus(cfg: FabricConfig, embedded: bool) -> FabricConfig:
    """`instances.num_cpus` as a number (None: shared out of a node's CPUs: for an embedded
    cluster this machine's cores, as `_init_ray` sized it; else each node's Ray CPUs, this
    node's at most its cores: `ray.init(num_cpus=...)` may declare more, and a fabric taking
    them all would leave no room beside it)."""
    import dataclasses

    import ray

    cores = os.cpu_count() or 1
    here = None if ray.util.client.ray.is_connected() else \
        ray.get_runtime_context().get_node_id()
    nodes = [cores] if embedded else [
        min(n["Resources"].get("CPU", 0.0), cores) if n["NodeID"] == here
        else n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]
    inst = dataclasses.replace(cfg.instances,
                               num_cpus=cfg.instances.cpus(nodes, cfg.instances.count))
    return dataclasses.replace(cfg, instances=inst)


def _use_token_auth(address: str):
    """Around `ray.init(address)`: Ray's auth mode from the user's RAY_AUTH_MODE or from what
    the cluster requires, never from a token file merely existing (`fabric/auth.py`)."""
    from fabric import auth

    return auth.connecting(address)


def start(config=None, *, address: str | None = None, name: str | None = None,
          detached: bool = False) -> "Fabric":
    import ray                     # the auth mode is chosen in _init_ray, before ray.init

    from actors.controller import ControllerActor
    from actors.elastic import ElasticManager

    cfg = load_config(config)
    if cfg.model.path is not None:
        from fabric.model.checkpoint import check_checkpoint

        check_checkpoint(cfg.model.path)     # a broken checkpoint fails here, before any actor
    owns_ray = _init_ray(address, cfg)
    cfg = _resolve_cpus(cfg, owns_ray)
    name = name or uuid.uuid4().hex[:8]
    ctrl_name = _controller_name(name)
    lifetime = "detached" if detached else None
    controller = ray.remote(ControllerActor).options(
        name=ctrl_name, namespace=NAMESPACE, lifetime=lifetime, num_cpus=0, max_concurrency=16,
        max_restarts=-1, max_task_retries=-1,       # restarts rebuild the ledger from heartbeats
    ).remote(cfg.to_dict())
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    manager = ray.remote(ElasticManager).options(
        name=_manager_name(name), namespace=NAMESPACE, lifetime=lifetime, num_cpus=0,
        max_concurrency=64, max_restarts=-1, max_task_retries=-1,   # restarts recover the set
        scheduling_strategy=NodeAffinitySchedulingStrategy(      # beside the driver (fate-shared)
            ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(cfg.to_dict(), name, NAMESPACE, ctrl_name, detached)
    try:      # bounded by instances.startup_timeout_s and autoscale.scale_timeout_s
        members = ray.get(manager.start.remote(cfg.initial_replicas))
    except Exception as e:
        for actor in (manager, controller):
            ray.kill(actor, no_restart=True)
        if owns_ray:
            ray.shutdown()
        if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, FabricError):
            raise e.cause from None            # the manager's own message, no traceback
        raise
    return Fabric(name, cfg, controller, _handles(members), owns_ray, manager, members)


def _handles(members: dict) -> list:
    """Actor handles by rank; None for a dead rank whose actor is gone."""
    import ray

    handles = []
    for i, n in enumerate(members["names"]):
        try:
            handles.append(ray.get_actor(n, namespace=NAMESPACE))
        except ValueError:
            if i not in members["dead"]:
                raise
            handles.append(None)
    return handles


def connect(name: str, *, address: str | None = None) -> "Fabric":
    import ray                     # the auth mode is chosen in _init_ray, before ray.init

    if not ray.is_initialized():
        _init_ray(address or "auto", None)
    try:       # a fabric being stopped may still show some of its actors: all must answer
        controller = ray.get_actor(_controller_name(name), namespace=NAMESPACE)
        cfg = load_config(ray.get(controller.config.remote(), timeout=CONTROL_TIMEOUT_S))
        manager = ray.get_actor(_manager_name(name), namespace=NAMESPACE)
        members = ray.get(manager.members.remote(), timeout=CONTROL_TIMEOUT_S)
        instances = _handles(members)
    except (ValueError, ray.exceptions.RayActorError):
        raise FabricError(f"no fabric named {name!r} is running") from None
    return Fabric(name, cfg, controller, instances, False, manager, members)


def _prefix_totals(instances: list[dict], index_blocks: int) -> dict:
    """`stats()["prefix_cache"]`: fabric-wide sums of the instances' prefix-cache counters
    (tokens at first admission: a recompute is never a hit), and each instance's own."""
    per = {s["id"]: s["prefix_cache"] for s in instances if "prefix_cache" in s}
    total = {k: sum(p[k] for p in per.values())
             for k in ("queries", "hits", "leased_hits", "blocks_cached", "blocks_evictable",
                       "evictions", "sessions", "blocks_protected", "session_expiries",
                       "session_evictions_under_pressure")}
    remote = {k: sum(p["remote"][k] for p in per.values())
              for k in ("lease", "copy", "recompute", "blocks_copied", "blocks_leased")}
    return total | {"hit_rate": total["hits"] / total["queries"] if total["queries"] else 0.0,
                    "remote": remote, "index_blocks": index_blocks,
                    "enabled": any(p["enabled"] for p in per.values()), "instances": per}


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
        self._lock = threading.RLock()   # membership and round robin; calls may come from threads
        self.dead: set[int] = set(members["dead"])     # ranks found dead, not yet replaced
        self.info = info = ray.get(next(a for i, a in enumerate(instances) if i not in self.dead)
                                   .info.remote(), timeout=CONTROL_TIMEOUT_S)   # model facts
        self.vocab_size, self.max_positions = info["vocab_size"], info["max_position_embeddings"]
        self.block_size = info["block_size"]
        self.tokenizer = self._tokenizer()
        self._next_home = 0
        self._homes: dict[str, object] = {}   # streamed request id -> home instance actor
        from fabric.prefix_cache import model_salt

        self._salt = model_salt(cfg.model)    # names prefix blocks as the instances do

    @property
    def max_request_blocks(self) -> int:
        """The largest request the live instances can hold (admission control)."""
        c = self.cfg
        return max_request_blocks(len(self.instances) - len(self.dead), c.instances.kv_blocks,
                                  c.lending.enabled, c.lending.max_lend_fraction,
                                  c.lending.min_free_fraction)

    def _tokenizer(self):
        """The checkpoint's tokenizer (byte tokenizer for the random presets, the HF or GGUF
        one for a real checkpoint, None without one), loaded once per process."""
        from fabric.tokenizer import load_tokenizer

        return load_tokenizer(self.cfg.model)

    def _sync_members(self) -> None:
        """Follow the elastic manager's replica set (one control call; nothing per token). The
        manager owns membership: a replacement or a scale event changes its epoch."""
        import ray

        members = ray.get(self.manager.members.remote(), timeout=CONTROL_TIMEOUT_S)
        with self._lock:               # a handle may serve many threads (the HTTP ingress)
            if members["epoch"] == self.epoch:
                self.dead |= set(members["dead"])
                return
            known = dict(zip(self.names, self.instances))
            self.instances = [known.get(n) if known.get(n) is not None
                              else self._handle(n, i, members)
                              for i, n in enumerate(members["names"])]
            self.dead = set(members["dead"])
            self.names, self.epoch = list(members["names"]), members["epoch"]

    @staticmethod
    def _handle(name: str, rank: int, members: dict):
        import ray

        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            if rank in members["dead"]:
                return None
            raise

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompts, *, max_new_tokens: int = 16, temperature: float = 0.0,
                 seed: int | None = None, ignore_eos: bool = False, errors: str = "raise",
                 **sampling) -> list[Result]:
        """Generate for each prompt (token ids or text). Greedy when temperature is 0.
        `sampling`: top_p, top_k, stop (strings, cut from the text), stop_token_ids;
        session_id and ttl_s (seconds the session's KV stays in the pool after this turn).

        errors="raise": every request is checked before any work starts; a bad one raises
        `RequestError` (`CapacityError` if it cannot fit in the whole fabric) and nothing runs.
        errors="return": a bad request comes back as a `Result` with `error` set; the rest run."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise RequestError("prompts must be a list of prompts (token-id lists or strings)")
        settings = self._settings(max_new_tokens=max_new_tokens, temperature=temperature,
                                  seed=seed, ignore_eos=ignore_eos, **sampling)
        return self.submit([{"prompt": p, **settings} for p in prompts], errors=errors)

    def chat(self, conversations, *, max_new_tokens: int = 16, temperature: float = 0.0,
             errors: str = "raise", **sampling) -> list[Result]:
        """Answer each conversation (a list of {"role", "content"} messages, rendered with the
        checkpoint's chat template and its generation prompt). Settings as for `generate`."""
        if not isinstance(conversations, (list, tuple)) or (
                conversations and isinstance(conversations[0], dict)):
            raise RequestError("conversations must be a list of conversations, each a list of "
                               "{'role', 'content'} messages")
        settings = self._settings(max_new_tokens=max_new_tokens, temperature=temperature,
                                  **sampling)
        return self.submit([{"messages": c, **settings} for c in conversations], errors=errors)

    @staticmethod
    def _settings(**settings) -> dict:
        unknown = sorted(set(settings) - SAMPLING_KEYS)
        if unknown:
            raise RequestError(f"unknown setting {unknown[0]!r} (known: {sorted(SAMPLING_KEYS)})")
        return settings

    def render_chat(self, messages) -> list[int]:
        """The prompt token ids of a conversation, by the checkpoint's chat template."""
        from fabric.tokenizer import chat_template

        if chat_template(self.tokenizer) is None:
            raise RequestError("this checkpoint has no chat template: send a prompt instead")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise RequestError("messages must be a non-empty list of {'role', 'content'} messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RequestError(f"message {i} must be a mapping with 'role' and 'content'")
            if m["role"] not in CHAT_ROLES:
                raise RequestError(f"message {i}: unknown role {m['role']!r} (known: "
                                   f"{list(CHAT_ROLES)})")
            clean.append({"role": m["role"], "content": _text_content(i, m["content"])})
        text = self.tokenizer.apply_chat_template(clean, add_generation_prompt=True,
                                                  tokenize=False)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def submit(self, requests: list[dict], *, errors: str = "raise") -> list[Result]:
        """Run requests with their own settings: each a dict with `prompt` (token ids or text)
        or `messages` (a conversation), and optionally `id`, `max_new_tokens` (16),
        `temperature` (0.0), `seed`, `ignore_eos` (False), `top_p` (1.0), `top_k` (0: off),
        `stop` (strings), `stop_token_ids`, `session_id` and `ttl_s` (a turn of a session:
        its KV stays in the pool `ttl_s` seconds for the next turn)."""
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
        params = SamplingParams.from_request(req)
        try:
            if "messages" in req:
                if prompt is not None:
                    raise RequestError("give either prompt or messages, not both")
                prompt = self.render_chat(req["messages"])
            elif isinstance(prompt, str):
                if self.tokenizer is None:
                    raise RequestError("the prompt is text but the checkpoint has no tokenizer")
                prompt = list(self.tokenizer.encode(prompt))
            if prompt is None:
                raise RequestError("prompt is missing")
            check_request(prompt, params, self.vocab_size, self.max_positions)
            if params.stop and self.tokenizer is None:
                raise RequestError("stop strings need a tokenizer, and this checkpoint has none")
            check_capacity(len(prompt) + params.max_new_tokens, self.block_size, self.max_request_blocks)
        except FabricError as e:
            raise type(e)(f"prompt {index}: {e}") from None
        return {"id": _request_id(req), "prompt": list(prompt), **params.to_request(),
                "temperature": float(params.temperature)}

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
            for r, home in zip(todo, self._route(todo, instances)):
                groups.setdefault(home, []).append(r)
            refs = {h: instances[h].generate.remote(rs) for h, rs in groups.items()}
            todo = []
            for h, ref in refs.items():
                try:
                    done.update((d["id"], d) for d in ray.get(ref))
                except RayActorError:
                    self._mark_dead(instances[h])
                    todo += groups[h]
            if todo:
                self._sync_members()               # a replacement may have joined meanwhile
        return done

    def _mark_dead(self, actor) -> None:
        """`actor` died under a call: no more requests go to its rank. The elastic manager
        (the owner of membership) checks it, drops it from the ledger, has its lenders take
        their blocks back and replaces it; this driver follows its epoch."""
        import ray

        self._sync_members()
        ranks = [i for i, a in enumerate(self.instances)
                 if a is not None and a._actor_id == actor._actor_id]
        if not ranks:                              # it had left, or was replaced already
            return
        self.dead.add(ranks[0])
        try:
            ray.get(self.manager.report_dead.remote(ranks[0], actor._actor_id.hex()),
                    timeout=CONTROL_TIMEOUT_S)
        except Exception:
            pass
        if len(self.dead) == len(self.instances):
            raise FabricError("every instance of the fabric has died")

    def stream(self, prompt=None, *, messages=None, max_new_tokens: int = 16,
               temperature: float = 0.0, seed: int | None = None, ignore_eos: bool = False,
               request_id: str | None = None, output: str = "tokens", **sampling):
        """Yield the output as the fabric makes it: token ids (`output="tokens"`), text deltas
        (`"text"`: decoded incrementally on the instance, whole characters only, never text a
        stop string later cuts), or `"events"`: {"token", "text"} per token, then one final
        {"finish_reason", "tokens", "text", "metrics", "num_prompt_tokens"}. Give a `prompt`
        or a conversation (`messages`). Leaving the loop early (break, exception, garbage
        collection) cancels the request and frees its blocks."""
        import ray

        if output not in ("tokens", "text", "events"):
            raise ValueError(f"output must be 'tokens', 'text' or 'events', got {output!r}")
        self._sync_members()
        body = {"messages": messages} if messages is not None else {"prompt": prompt}
        req = self._request(0, body | self._settings(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
            ignore_eos=ignore_eos, **sampling) | {"id": request_id})
        instances = self.instances
        instance = instances[self._route([req], instances)[0]]
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
                    if output == "events":
                        res = self._result(item)
                        yield {"finish_reason": res.finish_reason, "tokens": res.tokens,
                               "text": res.text, "metrics": res.metrics,
                               "num_prompt_tokens": len(req["prompt"])}
                    return
                tok, delta = item
                if output == "tokens":
                    yield tok
                elif output == "events":
                    yield {"token": tok, "text": delta}
                elif delta:
                    yield delta
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
        return ray.get(instance.abort.remote(request_id), timeout=CONTROL_TIMEOUT_S)

    def _route(self, reqs: list[dict], instances: list) -> list[int]:
        """Homes for `reqs` by cached prefix and load (one controller call for them all, see
        fabric/routing.py); a request whose prefix is better cached on a busier instance
        carries `prefix_source` so its home can lease, copy or recompute it. Round robin when
        routing is off or the controller does not answer (a restart: misses, never wrong KV)."""
        import ray

        from fabric.prefix_cache import prompt_hashes

        pc = self.cfg.prefix_cache
        live = [i for i in range(len(instances)) if i not in self.dead and instances[i] is not None]
        for r in reqs:
            r.pop("prefix_source", None)
        if pc.routing and live:
            bs = self.block_size
            payload = [(prompt_hashes(r["prompt"], bs, self._salt) if pc.enabled else [],
                        -(-(len(r["prompt"]) + r["max_new_tokens"]) // bs)) for r in reqs]
            try:
                routes = ray.get(self.controller.route.remote(payload, live), timeout=CONTROL_TIMEOUT_S)
            except Exception:
                routes = None
            if routes is not None and all(h in live for h, _, _ in routes):
                for r, (_, _, source) in zip(reqs, routes):
                    if source is not None:
                        r["prefix_source"] = list(source)
                return [h for h, _, _ in routes]
        return [self._pick_home(instances) for _ in reqs]

    def _pick_home(self, instances: list | None = None) -> int:
        """Round robin over the live instances of `instances` (default: the current list)."""
        n = len(self.instances if instances is None else instances)
        with self._lock:
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
        text = d.get("text")                  # decoded on the instance (stop strings cut)
        if text is None:
            text = self.tokenizer.decode(d["tokens"], skip_special_tokens=True) \
                if self.tokenizer is not None else ""
        return Result(tokens=d["tokens"], text=text, finish_reason=d["finish_reason"],
                      metrics=d["metrics"], request_id=d["id"], home=d["home"])

    # ---- observation and control -----------------------------------------------------------
    def stats(self) -> dict:
        import ray

        from ray.exceptions import RayActorError

        self._sync_members()
        inst = []
        for i, a in enumerate(self.instances):
            if i in self.dead:
                continue
            try:
                inst.append(ray.get(a.stats.remote(), timeout=CONTROL_TIMEOUT_S))
            except RayActorError:
                self._mark_dead(a)
        ctrl = ray.get(self.controller.stats.remote(), timeout=CONTROL_TIMEOUT_S)
        keys = ("id", "node", "blocks_total", "blocks_free", "blocks_lent", "blocks_borrowed")
        # the instances own the borrow counters (they survive a controller restart)
        lending = {"borrow_events": sum(s["borrow_events"] for s in inst),
                   "blocks_borrowed_total": sum(s["blocks_borrowed_total"] for s in inst)}
        elastic = ray.get(self.manager.stats.remote(), timeout=CONTROL_TIMEOUT_S)
        from actors.tierstore import list_stores, store_stats

        nodes = store_stats(list_stores(_controller_name(self.name), NAMESPACE)) \
            if self.cfg.tiers.enabled else []
        return {"instances": [{k: s[k] for k in keys} | {"detail": s} for s in inst],
                "lending": lending, "elastic": elastic,
                "prefix_cache": _prefix_totals(inst, ctrl.get("prefix_index_blocks", 0)),
                "tiers": tier_totals(inst, nodes, ctrl.get("tier_index_blocks", {})),
                "controller": {"calls": ctrl["calls"]}}

    def reset_prefix_cache(self, tiers: bool = True) -> int:
        """Evict every cached prefix block no request uses, on every instance (as vLLM's
        `reset_prefix_cache`), and (`tiers`) every block of the nodes' host and disk tiers;
        returns how many blocks were dropped."""
        import ray

        self._sync_members()
        live = [a for i, a in enumerate(self.instances) if i not in self.dead and a is not None]
        n = sum(ray.get([a.reset_prefix_cache.remote() for a in live], timeout=CONTROL_TIMEOUT_S))
        if tiers and self.cfg.tiers.enabled:
            from actors.tierstore import list_stores

            stores = list_stores(_controller_name(self.name), NAMESPACE)
            n += sum(ray.get([s.clear.remote() for s in stores], timeout=CONTROL_TIMEOUT_S))
        return n

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
            raise (e.cause if isinstance(e.cause, FabricError) else FabricError(str(e))) from None
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
            if a is None:
                continue
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
        from actors.tierstore import kill_stores

        kill_stores(_controller_name(self.name), NAMESPACE)
        self.instances = []
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
