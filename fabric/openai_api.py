"""The OpenAI HTTP protocol of the serving ingress (`actors/ingress.py`), without Ray or HTTP:
request bodies parsed and checked into `Fabric.stream` settings, response bodies, server-sent
event chunks, OpenAI-style error bodies, the served model's name and the API-key check.

Client data is JSON parsed with `json.loads` and then only read as plain values; nothing here
evaluates or unpickles it. Every bad field raises `APIError` with the HTTP status and the body
OpenAI's API would answer (`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass, field

from fabric.errors import CapacityError, FabricError, RequestError
from fabric.engine import MAX_SESSION_ID_CHARS, MAX_TTL_S

COMPLETIONS_DEFAULT_MAX_TOKENS = 16     # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0               # OpenAI's default (the fabric's own default is greedy)
MAX_BODY_BYTES = 16 * 1024 * 1024       # a bigger request body: 413
SSE_DONE = b"data: [DONE]\n\n"
FINISH_REASONS = ("stop", "length", "abort")


class APIError(Exception):
    """An error answered to the client: HTTP `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_fabric_error(e: BaseException) -> APIError:
    """The HTTP answer to an error of the fabric: 400 for a bad request or one that cannot fit
    (the numbers are in the message), 500 for any other fabric error."""
    message = str(e).removeprefix("prompt 0: ")     # one request per HTTP call: no index
    if isinstance(e, CapacityError):
        return APIError(400, message, "invalid_request_error", None, "context_length_exceeded")
    if isinstance(e, RequestError):
        return APIError(400, message, "invalid_request_error")
    if isinstance(e, FabricError):
        return APIError(500, f"{type(e).__name__}: {e}", "internal_error", None, "fabric_error")
    return APIError(500, "internal server error", "internal_error")


def not_found(path: str) -> APIError:
    return APIError(404, f"no route {path!r} (routes: POST /v1/chat/completions, "
                         f"POST /v1/completions, GET /v1/models, GET /health, GET /metrics)",
                    "invalid_request_error", None, "not_found")


# ---- names, keys -------------------------------------------------------------------------------
def served_model_name(model_cfg) -> str:
    """The name `/v1/models` serves by default: the preset, else the checkpoint's directory or
    file name. `model_cfg`: a `ModelConfig` or its dict."""
    get = model_cfg.get if isinstance(model_cfg, dict) else \
        (lambda k: getattr(model_cfg, k, None))
    from fabric.model.args import FILE_PRESETS

    preset, path = get("preset"), get("path")
    if preset and (path is None or preset in FILE_PRESETS):   # a file preset fills in path
        return str(preset)
    if path:
        return os.path.basename(os.path.normpath(os.fspath(path)))
    return "kv-fabric"


def key_digest(api_key: str | None) -> str | None:
    """What the ingress keeps of an API key: its SHA-256, never the key itself."""
    return None if api_key is None else hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def check_api_key(authorization: str | None, digest: str | None) -> None:
    """401 unless `Authorization: Bearer K` carries the key whose digest is `digest` (no check
    when the server has no key)."""
    if digest is None:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       "invalid_request_error", None, "invalid_api_key")
    if not hmac.compare_digest(key_digest(token.strip()), digest):
        raise APIError(401, "incorrect API key provided", "invalid_request_error", None,
                       "invalid_api_key")


# ---- request parsing ---------------------------------------------------------------------------
def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; 400 for anything else, 413 past MAX_BODY_BYTES."""
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body of {len(raw)} bytes is larger than {MAX_BODY_BYTES}")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "invalid JSON body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


@dataclass
class Request:
    """One checked request: what to give `Fabric.stream` (`messages` or `prompt`, `settings`)
    and how to answer (`kind`, `stream`, `include_usage`). `max_tokens` None: the default of
    the route (completions 16; chat: as many as fit, once the prompt's length is known)."""
    kind: str                                   # "chat" | "completion"
    model: str
    messages: list | None = None
    prompt: object = None                       # str or list[int]
    max_tokens: int | None = None
    settings: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = 0


# Fields OpenAI defines that this server cannot honour: refused rather than silently ignored
# when they ask for something (their default values pass).
UNSUPPORTED = {
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "echo": lambda v: v not in (None, False),
    "best_of": lambda v: v not in (None, 1),
    "suffix": lambda v: v not in (None, ""),
    "tools": lambda v: v not in (None, []),
    "functions": lambda v: v not in (None, []),
    "response_format": lambda v: v is not None and not (isinstance(v, dict)
                                                        and v.get("type") == "text"),
}


def parse_chat(body: dict, served: str) -> Request:
    """A `POST /v1/chat/completions` body."""
    req = _common(body, served, "chat", "chatcmpl")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {'role', 'content'} messages",
                       param="messages")
    req.messages = messages
    max_tokens = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = body.get("max_tokens"), "max_tokens"
    req.max_tokens = _max_tokens(max_tokens, name)
    return req


def parse_completion(body: dict, served: str) -> Request:
    """A `POST /v1/completions` body: `prompt` a string or a list of token ids (a list holding
    one of those is taken as that one prompt)."""
    req = _common(body, served, "completion", "cmpl")
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "prompt is required: a string or a list of token ids", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if all(isinstance(p, (str, list)) for p in prompt):
            raise APIError(400, f"one prompt per request: got a batch of {len(prompt)} prompts",
                           param="prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise APIError(400, "prompt must be a string or a list of integer token ids",
                           param="prompt")
    elif not isinstance(prompt, str):
        raise APIError(400, f"prompt must be a string or a list of integer token ids, got "
                            f"{type(prompt).__name__}", param="prompt")
    req.prompt = prompt
    n = _max_tokens(body.get("max_tokens"), "max_tokens")
    req.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if n is None else n
    return req


def _common(body: dict, served: str, kind: str, id_prefix: str) -> Request:
    model = body.get("model")
    if model is None:
        raise APIError(400, "model is required", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise APIError(400, f"model must be a string, got {type(model).__name__}", param="model")
    if model != served:
        raise APIError(404, f"the model {model!r} does not exist: this server serves "
                            f"{served!r}", param="model", code="model_not_found")
    for name, asks in UNSUPPORTED.items():
        if name in body and asks(body[name]):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise APIError(400, f"n must be 1: this server returns one choice per request, got {n!r}",
                       param="n")
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")
        if not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object", param="stream_options")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise APIError(400, "stream_options.include_usage must be true or false",
                           param="stream_options")
    settings = {"temperature": _temperature(body.get("temperature"))}
    top_p = body.get("top_p")
    if top_p is not None:
        if not _number(top_p) or not 0 < top_p <= 1:
            raise APIError(400, f"top_p must be a number in (0, 1], got {top_p!r}", param="top_p")
        settings["top_p"] = float(top_p)
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
            raise APIError(400, f"top_k must be an integer >= -1 (0 or -1: off), got {top_k!r}",
                           param="top_k")
        settings["top_k"] = max(top_k, 0)
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed")
        settings["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise APIError(400, "stop must be a string or a list of strings", param="stop")
        if stops:
            settings["stop"] = stops
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                for t in ids):
            raise APIError(400, "stop_token_ids must be a list of integer token ids",
                           param="stop_token_ids")
        if ids:
            settings["stop_token_ids"] = ids
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None:
        if not isinstance(ignore_eos, bool):
            raise APIError(400, f"ignore_eos must be true or false, got {ignore_eos!r}",
                           param="ignore_eos")
        settings["ignore_eos"] = ignore_eos
    session, ttl = body.get("session_id"), body.get("ttl_s")
    if session is not None:         # a turn of a session: its KV is kept ttl_s for the next
        if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_ID_CHARS:
            raise APIError(400, f"session_id must be a non-empty string of at most "
                           f"{MAX_SESSION_ID_CHARS} characters", param="session_id")
        settings["session_id"] = session
    if ttl is not None:
        if session is None:
            raise APIError(400, "ttl_s needs a session_id", param="ttl_s")
        if not _number(ttl) or not 0 <= ttl <= MAX_TTL_S:
            raise APIError(400, f"ttl_s must be a number of seconds in [0, {MAX_TTL_S:g}], got "
                           f"{ttl!r}", param="ttl_s")
        settings["ttl_s"] = float(ttl)
    return Request(kind, model, settings=settings, stream=stream, include_usage=include_usage,
                   id=f"{id_prefix}-{uuid.uuid4().hex}", created=int(time.time()))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _temperature(t) -> float:
    if t is None:
        return DEFAULT_TEMPERATURE
    if not _number(t) or not 0 <= t <= 2:
        raise APIError(400, f"temperature must be a number in [0, 2], got {t!r}",
                       param="temperature")
    return float(t)


def _max_tokens(n, name: str) -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise APIError(400, f"{name} must be an integer >= 1, got {n!r}", param=name)
    return n


def default_chat_max_tokens(num_prompt_tokens: int, max_positions: int, max_request_blocks: int,
                            block_size: int) -> int:
    """A chat request without max_tokens gets as many tokens as fit (OpenAI's meaning): within
    the model's positions and the largest request the fabric holds. None fit: CapacityError."""
    room = min(max_positions, max_request_blocks * block_size) - num_prompt_tokens
    if room < 1:
        raise CapacityError(f"the prompt has {num_prompt_tokens} tokens but at most "
                            f"{min(max_positions, max_request_blocks * block_size) - 1} fit "
                            f"with at least one generated token ({max_request_blocks} blocks of "
                            f"{block_size} tokens, {max_positions} positions)")
    return room


# ---- responses ---------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from a prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason(reason: str) -> str:
    """The fabric's "stop" | "length" | "abort" (cancelled) as OpenAI's finish_reason."""
    return reason if reason in FINISH_REASONS else "stop"


def response(req: Request, text: str, reason: str, prompt_tokens: int,
             completion_tokens: int, cached_tokens: int = 0) -> dict:
    """The body of a non-streaming answer."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish_reason(reason)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None,
                  "finish_reason": finish_reason(reason)}
        obj = "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model,
            "choices": [choice], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def sse(obj: dict) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n\n"


class ChunkWriter:
    """The server-sent events of one streamed answer, from the fabric's events
    (`Fabric.stream(output="events")`): `start()` (chat: the assistant role), `token(event)`
    per token (nothing while the text is held back), `final(event)` (any text not yet sent,
    the finish_reason, then the usage chunk when asked), `error(e)`, and `done()`."""

    def __init__(self, req: Request):
        self.req = req
        self.sent = ""                         # text already streamed

    def _chunk(self, choice: dict | None) -> dict:
        obj = "chat.completion.chunk" if self.req.kind == "chat" else "text_completion"
        c = {"id": self.req.id, "object": obj, "created": self.req.created,
             "model": self.req.model, "choices": [] if choice is None else [choice]}
        if self.req.include_usage:
            c["usage"] = None
        return c

    def _delta(self, text: str | None, reason: str | None = None, role: bool = False) -> bytes:
        if self.req.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else \
                ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return sse(self._chunk(choice))

    def start(self) -> bytes:
        return self._delta(None, role=True) if self.req.kind == "chat" else b""

    def token(self, event: dict) -> bytes:
        text = event.get("text") or ""
        if not text:
            return b""
        self.sent += text
        return self._delta(text)

    def final(self, event: dict) -> bytes:
        text = event.get("text") or ""
        out = b""
        rest = text[len(self.sent):] if text.startswith(self.sent) else ""
        if rest:                               # text the instance held back to the end
            self.sent += rest
            out += self._delta(rest)
        out += self._delta(None, finish_reason(event.get("finish_reason", "stop")))
        if self.req.include_usage:
            c = self._chunk(None)
            c["usage"] = usage(int(event.get("num_prompt_tokens", 0)),
                               len(event.get("tokens") or []),
                               int((event.get("metrics") or {}).get("cached_tokens", 0)))
            out += sse(c)
        return out

    @staticmethod
    def error(e: APIError) -> bytes:
        return sse(e.body())

    @staticmethod
    def done() -> bytes:
        return SSE_DONE


def models_body(name: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(name, created)]}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "kv-fabric"}
