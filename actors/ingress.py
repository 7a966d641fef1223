"""The OpenAI-compatible HTTP ingress: a Ray Serve deployment (FastAPI through `@serve.ingress`)
in front of a named fabric, reached with `fabric.connect(name)` inside the replica.

Every request is one `Fabric.stream(output="events")`, run in a worker thread (the fabric's
calls are synchronous Ray calls) and bridged to the event loop through an asyncio queue; a
non-streaming answer is that stream gathered. A client that goes away (the handler or the
streaming body is cancelled) sets the request's stop flag and cancels it in the fabric
(`Fabric.cancel`), so the instance aborts it and frees its blocks, borrowed ones included.
The protocol itself (parsing, bodies, chunks, errors) is `fabric/openai_api.py`; the metrics
page is `fabric/serving_metrics.py`. Started by `python -m fabric serve --http-port`.
"""

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from fabric import openai_api as oa
from fabric.errors import FabricError
from fabric.serving_metrics import CONTENT_TYPE, ServingMetrics

MAX_ONGOING_REQUESTS = 512          # per replica; the fabric's own queues bound the rest
STATS_TTL_S = 1.0                   # /metrics and /health reuse a Fabric.stats() this long
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

app = FastAPI(title="kv-fabric", docs_url=None, redoc_url=None, openapi_url=None)
_METRICS: dict = {"m": None}        # the replica's ServingMetrics (one replica per process)


def _json_error(e: oa.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        return _json_error(oa.not_found(request.url.path))
    if exc.status_code == 405:
        return _json_error(oa.APIError(405, f"method {request.method} is not allowed on "
                                            f"{request.url.path}"))
    return _json_error(oa.APIError(exc.status_code, str(exc.detail)))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    return _json_error(oa.from_fabric_error(exc))


class _CountRequests:
    """ASGI middleware: every HTTP answer counted by route, method and status."""

    def __init__(self, asgi):
        self.asgi = asgi

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES or path.startswith("/v1/models/") else "other"
        if route.startswith("/v1/models/"):
            route = "/v1/models/{model}"
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.asgi(scope, receive, counting_send)
        finally:
            m = _METRICS["m"]
            if m is not None:
                m.http_request(route, scope.get("method", ""), status["code"])


app.add_middleware(_CountRequests)

_END = object()
logger = logging.getLogger("ray.serve")


class OpenAIIngress:
    """The replica: one fabric handle, the served model's name, the key's digest, the metrics.
    (A plain module-level class, wrapped into `IngressDeployment` below, so that Ray pickles it
    by reference and its methods share this module's globals.)"""

    def __init__(self, fabric_name: str, served_model: str | None = None,
                 api_key_digest: str | None = None):
        import fabric

        self.fab = fabric.connect(fabric_name)
        self.served = served_model or oa.served_model_name(self.fab.cfg.model)
        self.key_digest = api_key_digest
        self.created = int(time.time())
        self.metrics = _METRICS["m"] = ServingMetrics(self.served)
        self.pool = ThreadPoolExecutor(MAX_ONGOING_REQUESTS + 8, thread_name_prefix="kvf-req")
        self.control = ThreadPoolExecutor(4, thread_name_prefix="kvf-ctl")
        self._stats, self._stats_at, self._stats_lock = None, 0.0, threading.Lock()
        self._tok_lock = threading.Lock()

    # ---- routes --------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, oa.parse_chat)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, oa.parse_completion)

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._auth(request)
        except oa.APIError as e:
            return _json_error(e)
        return JSONResponse(oa.models_body(self.served, self.created))

    @app.get("/v1/models/{model:path}")
    async def model(self, model: str, request: Request):
        try:
            self._auth(request)
            if model != self.served:
                raise oa.APIError(404, f"the model {model!r} does not exist: this server serves "
                                       f"{self.served!r}", param="model", code="model_not_found")
        except oa.APIError as e:
            return _json_error(e)
        return JSONResponse(oa.model_card(self.served, self.created))

    @app.get("/health")
    async def health(self):
        stats = await self._cached_stats()
        if stats is None:
            return _json_error(oa.APIError(503, f"the fabric {self.fab.name!r} does not answer",
                                           "internal_error", None, "unavailable"))
        return JSONResponse({"status": "ok", "fabric": self.fab.name,
                             "instances": len(stats["instances"])})

    @app.get("/metrics")
    async def metrics_page(self):
        stats = await self._cached_stats()
        return PlainTextResponse(self.metrics.render(stats), media_type=CONTENT_TYPE)

    # ---- generation ----------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        oa.check_api_key(request.headers.get("authorization"), self.key_digest)

    async def _generate(self, request: Request, parse) -> Response:
        arrival = time.perf_counter()
        try:
            self._auth(request)
            req = parse(oa.parse_body(await request.body()), self.served)
        except oa.APIError as e:
            return _json_error(e)
        call = _Call(self, req, arrival)
        try:
            asyncio.get_running_loop().run_in_executor(self.pool, self._pump, call)
            first = await call.next()             # a bad request fails before any token
            if isinstance(first, oa.APIError):
                call.close()
                return _json_error(first)
            if req.stream:
                return _SSEResponse(self._sse(call, first), call.close,
                                    media_type="text/event-stream", headers=SSE_HEADERS)
            final = first
            while "finish_reason" not in final:
                final = await call.next()
                if isinstance(final, oa.APIError):
                    call.close()
                    return _json_error(final)
            call.close()
            return JSONResponse(oa.response(req, final["text"], final["finish_reason"],
                                            int(final["num_prompt_tokens"]),
                                            len(final["tokens"]), _cached_tokens(final)))
        except BaseException:                    # the client went away (cancelled): abort
            call.close()
            raise

    async def _sse(self, call: "_Call", first: dict):
        writer = oa.ChunkWriter(call.req)
        try:
            if start := writer.start():
                yield start
            item = first
            while True:
                if isinstance(item, oa.APIError):
                    yield writer.error(item)
                    break
                if "finish_reason" in item:
                    yield writer.final(item)
                    break
                chunk = writer.token(item)
                if chunk:
                    yield chunk
                item = await call.next()
            call.finished = True
            yield writer.done()
        finally:
            call.close()

    def _request_kwargs(self, req: oa.Request) -> dict:
        """`Fabric.stream` arguments of a checked request (runs in the worker thread). A chat is
        rendered here (`Fabric.render_chat`) and, asking for no limit, gets as many tokens as
        fit; a text prompt is encoded here as `Fabric.submit` would. One thread at a time uses
        the tokenizer."""
        kw = dict(req.settings, request_id=req.id, output="events")
        prompt = req.prompt
        with self._tok_lock:
            if req.kind == "chat":
                prompt = self.fab.render_chat(req.messages)
            elif isinstance(prompt, str) and self.fab.tokenizer is not None:
                prompt = list(self.fab.tokenizer.encode(prompt))
        kw["prompt"] = prompt
        kw["max_new_tokens"] = req.max_tokens if req.max_tokens is not None else \
            oa.default_chat_max_tokens(len(prompt), self.fab.max_positions,
                                       self.fab.max_request_blocks, self.fab.block_size)
        return kw

    def _pump(self, call: "_Call") -> None:
        """Worker thread: the fabric's events into the call's queue until the end, or its stop
        flag (then closing the stream aborts the request in the fabric)."""
        gen = None
        try:
            kwargs = self._request_kwargs(call.req)
            if call.stop.is_set():               # the client left while it was rendered
                return
            gen = self.fab.stream(**kwargs)
            for event in gen:
                call.put(event)
                if call.stop.is_set():
                    break
        except BaseException as e:               # noqa: BLE001 - every failure is answered
            if not isinstance(e, FabricError):
                logger.exception("request %s failed", call.req.id)
            call.put(oa.from_fabric_error(e))
        finally:
            if gen is not None:
                gen.close()                      # not finished: the fabric aborts it
            call.put(_END)

    def _cancel(self, req: oa.Request, stop: threading.Event) -> None:
        """Stop the worker at its next event and abort the request in the fabric now."""
        stop.set()
        try:
            self.control.submit(self.fab.cancel, req.id)
        except RuntimeError:                     # the pool is shut down
            pass

    # ---- stats for /metrics and /health ----------------------------------------------------------
    async def _cached_stats(self) -> dict | None:
        return await asyncio.get_running_loop().run_in_executor(self.control, self._stats_now)

    def _stats_now(self) -> dict | None:
        with self._stats_lock:
            if time.monotonic() - self._stats_at > STATS_TTL_S:
                try:
                    self._stats = self.fab.stats()
                except Exception:                # noqa: BLE001 - reported as stats_up 0 / 503
                    self._stats = None
                self._stats_at = time.monotonic()
            return self._stats


IngressDeployment = serve.deployment(
    max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 0},
    num_replicas=1)(serve.ingress(app)(OpenAIIngress))


class _Call:
    """One generation request between the event loop and its worker thread: the event queue,
    the stop flag, timing, and `close()` (once: cancels the request in the fabric unless its
    answer was complete, and counts it out of the in-flight requests)."""

    def __init__(self, ingress: "OpenAIIngress", req: oa.Request, arrival: float):
        self.ingress, self.req = ingress, req
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()
        self.timing = _Timing(ingress.metrics, arrival)
        self.finished = self.closed = False
        ingress.metrics.started()

    def put(self, item) -> None:
        """From the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:                     # the loop is gone (replica shutting down)
            pass

    async def next(self):
        """The next event, or an `APIError` (the request failed, or ended without an answer)."""
        item = await self.queue.get()
        if item is _END:
            self.finished = True                 # the worker is done: nothing to cancel
            return oa.APIError(500, "the request ended without an answer", "internal_error")
        if isinstance(item, oa.APIError):
            self.finished = True
            return item
        self.timing.event(item)
        if "finish_reason" in item:
            self.finished = True
        return item

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ingress.metrics.ended()
        if not self.finished:
            logger.info("request %s: the client went away, cancelling it", self.req.id)
            self.ingress.metrics.request_cancelled()
            self.ingress._cancel(self.req, self.stop)


class _SSEResponse(StreamingResponse):
    """A streaming answer whose `on_close` runs however the response ends: finished, the
    client gone before or while the body streams, or the request cancelled by Serve."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Timing:
    """TTFT, inter-token latency and end-to-end latency of one request, as its events come."""
    __slots__ = ("metrics", "arrival", "last")

    def __init__(self, metrics: ServingMetrics, arrival: float):
        self.metrics, self.arrival, self.last = metrics, arrival, None

    def event(self, item) -> None:
        if not isinstance(item, dict):
            return
        now = time.perf_counter()
        if "finish_reason" in item:
            self.metrics.request_finished(item["finish_reason"], int(item["num_prompt_tokens"]),
                                          len(item["tokens"]), now - self.arrival,
                                          _cached_tokens(item))
            return
        if self.last is None:
            self.metrics.first_token(now - self.arrival)
        else:
            self.metrics.inter_token(now - self.last)
        self.last = now


def build_app(fabric_name: str, served_model: str | None = None, api_key: str | None = None):
    """The Serve application of `python -m fabric serve --http-port`; the API key is kept only
    as its SHA-256."""
    return IngressDeployment.bind(fabric_name, served_model, oa.key_digest(api_key))


# ---- the Serve application's life (used by `python -m fabric serve / stop`) --------------------
def _serve_client():
    """The running Serve controller's client, None when Serve does not run on the cluster."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def check_http(name: str, host: str, port: int) -> None:
    """FabricError unless the app `name` can take route / on http://host:port: a cluster has one
    Serve HTTP address (set by whoever started Serve first) and one app per route prefix."""
    client = _serve_client()
    if client is None:
        return
    cfg = client.http_config
    if (cfg.host, cfg.port) != (host, port):
        raise FabricError(f"Ray Serve already runs on this cluster with HTTP on {cfg.host}:"
                          f"{cfg.port} (one HTTP address per cluster): use --http-host {cfg.host} "
                          f"--http-port {cfg.port}, or stop its applications first")
    apps = client.get_serve_details().get("applications", {})
    for other, details in apps.items():
        if other != name and details.get("route_prefix") == "/":
            raise FabricError(f"the Serve application {other!r} already serves route / on "
                              f"{host}:{port}")


def deploy(name: str, host: str, port: int, served_model: str | None = None,
           api_key: str | None = None) -> None:
    """Start Serve (HTTP on host:port) if it does not run, then the ingress app `name` at route
    /, in front of the running fabric `name`; returns once its replica is up."""
    check_http(name, host, port)
    serve.start(http_options={"host": host, "port": port})
    check_http(name, host, port)            # another driver may have started Serve meanwhile
    serve.run(build_app(name, served_model, api_key), name=name, route_prefix="/")


def undeploy(name: str) -> bool:
    """Delete the ingress app `name` (True if there was one); Serve itself stops with its last
    application, which frees the HTTP port."""
    client = _serve_client()
    if client is None or name not in serve.status().applications:
        return False
    serve.delete(name)
    if not serve.status().applications:
        serve.shutdown()
    return True


def _cached_tokens(event: dict) -> int:
    """Prompt tokens of a finished request served from a prefix cache."""
    return int((event.get("metrics") or {}).get("cached_tokens", 0))
