"""The OpenAI-compatible HTTP API (`python -m fabric serve --http-port`, Ray Serve): the protocol
module without Ray (parsing, errors, chunks, metrics page), then a real server started the way a
user starts one (`ray start --head`, then `python -m fabric serve ... --http-port P --api-key K`
as a subprocess) and used through the official `openai` client and raw HTTP: both routes,
streaming and not, stop strings, usage, cancel on disconnect, errors, /health, /metrics, stop.

The fabric's own view (`fab.stats()`, reference generations, rendered chat prompts) comes from a
helper driver process of the test that `fabric.connect`s to the served fabric, so this pytest
process never joins the head's Ray cluster. Chat needs a chat template: the
`smollm2-135m-instruct` preset (a real 30-layer model, so few tokens); the rest uses tiny-llama.
No test asserts how long anything took: deadlines only stop a broken run from hanging."""

import http.client
import json
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import pytest
import ray_head

from fabric import cli
from fabric import openai_api as oa
from fabric.errors import CapacityError, ConfigError, FabricError, RequestError
from fabric.serving_metrics import ServingMetrics

KEY = "sk-test-key"
TINY = {"model": {"preset": "tiny-llama"},
        "instances": {"count": 2, "kv_blocks": 32, "block_size": 16}}   # 512 tokens each
CHAT = {"model": {"preset": "smollm2-135m-instruct"},
        "instances": {"count": 1, "kv_blocks": 64, "block_size": 16}}
DEADLINE_S = 120.0
CLI_TIMEOUT_S = 420


# ---- the protocol, no Ray ----------------------------------------------------------------------
def test_completion_fields_map_to_fabric_settings():
    req = oa.parse_completion({"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0,
                               "top_p": 0.5, "top_k": -1, "seed": 3, "stop": "x", "user": "u",
                               "ignore_eos": True, "stop_token_ids": [7], "n": 1,
                               "frequency_penalty": 0, "whatever": {"a": 1}}, "m")
    assert (req.kind, req.prompt, req.max_tokens, req.stream) == ("completion", "hi", 5, False)
    assert req.settings == {"temperature": 0.0, "top_p": 0.5, "top_k": 0, "seed": 3,
                            "stop": ["x"], "stop_token_ids": [7], "ignore_eos": True}
    assert req.id.startswith("cmpl-")
    default = oa.parse_completion({"model": "m", "prompt": [[1, 2, 3]]}, "m")
    assert default.prompt == [1, 2, 3] and default.max_tokens == oa.COMPLETIONS_DEFAULT_MAX_TOKENS
    assert default.settings == {"temperature": oa.DEFAULT_TEMPERATURE}
    assert oa.parse_completion({"model": "m", "prompt": ["a b"]}, "m").prompt == "a b"


def test_chat_fields():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
            "max_completion_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    req = oa.parse_chat(body, "m")
    assert (req.kind, req.max_tokens, req.stream, req.include_usage) == ("chat", 4, True, True)
    assert req.id.startswith("chatcmpl-") and req.messages == body["messages"]
    assert oa.parse_chat({"model": "m", "messages": body["messages"]}, "m").max_tokens is None


def test_session_fields():
    req = oa.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                         "session_id": "conv-7", "ttl_s": 45}, "m")
    assert req.settings["session_id"] == "conv-7" and req.settings["ttl_s"] == 45.0
    only = oa.parse_completion({"model": "m", "prompt": "x", "session_id": "a"}, "m")
    assert only.settings["session_id"] == "a" and "ttl_s" not in only.settings
    for body, param in (({"session_id": ""}, "session_id"), ({"session_id": 3}, "session_id"),
                        ({"session_id": "a", "ttl_s": -1}, "ttl_s"),
                        ({"session_id": "a", "ttl_s": "5"}, "ttl_s"),
                        ({"session_id": "a", "ttl_s": 10 ** 9}, "ttl_s"),
                        ({"ttl_s": 5}, "ttl_s")):
        with pytest.raises(oa.APIError) as e:
            oa.parse_completion({"model": "m", "prompt": "x", **body}, "m")
        assert e.value.status == 400 and e.value.body()["error"]["param"] == param


CHAT_MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("route,body,status,param,message", [
    ("completion", {"prompt": "x"}, 400, "model", "model is required"),
    ("completion", {"model": "other", "prompt": "x"}, 404, "model", "does not exist"),
    ("completion", {"model": "m"}, 400, "prompt", "prompt is required"),
    ("completion", {"model": "m", "prompt": []}, 400, "prompt", "prompt is empty"),
    ("completion", {"model": "m", "prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ("completion", {"model": "m", "prompt": [1, "2"]}, 400, "prompt", "integer token ids"),
    ("completion", {"model": "m", "prompt": [1, True]}, 400, "prompt", "integer token ids"),
    ("completion", {"model": "m", "prompt": {"a": 1}}, 400, "prompt", "got dict"),
    ("completion", {"model": "m", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("completion", {"model": "m", "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", ">= 1"),
    ("completion", {"model": "m", "prompt": "x", "temperature": 5}, 400, "temperature",
     "[0, 2]"),
    ("completion", {"model": "m", "prompt": "x", "temperature": "hot"}, 400, "temperature",
     "[0, 2]"),
    ("completion", {"model": "m", "prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("completion", {"model": "m", "prompt": "x", "top_k": -2}, 400, "top_k", ">= -1"),
    ("completion", {"model": "m", "prompt": "x", "seed": 1.5}, 400, "seed", "integer"),
    ("completion", {"model": "m", "prompt": "x", "stop": 3}, 400, "stop", "list of strings"),
    ("completion", {"model": "m", "prompt": "x", "stop_token_ids": ["a"]}, 400,
     "stop_token_ids", "integer"),
    ("completion", {"model": "m", "prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos",
     "true or false"),
    ("completion", {"model": "m", "prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    ("completion", {"model": "m", "prompt": "x", "stream": "yes"}, 400, "stream", "true or false"),
    ("completion", {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "only allowed when stream is true"),
    ("completion", {"model": "m", "prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ("completion", {"model": "m", "prompt": "x", "logprobs": 2}, 400, "logprobs",
     "not supported"),
    ("chat", {"model": "m"}, 400, "messages", "non-empty list"),
    ("chat", {"model": "m", "messages": []}, 400, "messages", "non-empty list"),
    ("chat", {"model": "m", "messages": "hi"}, 400, "messages", "non-empty list"),
    ("chat", {"model": "m", "messages": CHAT_MSGS, "max_completion_tokens": -1}, 400,
     "max_completion_tokens", ">= 1"),
    ("chat", {"model": "m", "messages": CHAT_MSGS, "tools": [{"type": "function"}]}, 400,
     "tools", "not supported"),
])
def test_bad_fields_answer_openai_errors(route, body, status, param, message):
    parse = oa.parse_chat if route == "chat" else oa.parse_completion
    with pytest.raises(oa.APIError) as e:
        parse(body, "m")
    err = e.value.body()["error"]
    assert (e.value.status, err["param"], err["type"]) == (status, param, "invalid_request_error")
    assert message in err["message"], err
    if status == 404:
        assert err["code"] == "model_not_found"


@pytest.mark.parametrize("raw,status,message", [
    (b"{oops", 400, "invalid JSON"), (b"[1, 2]", 400, "must be a JSON object, got list"),
    (b"\xff\xfe", 400, "invalid JSON"), (b"[" * 100_000, 400, "invalid JSON"),
    (b" " * (oa.MAX_BODY_BYTES + 1), 413, "larger than"),
])
def test_bad_bodies(raw, status, message):
    with pytest.raises(oa.APIError) as e:
        oa.parse_body(raw)
    assert e.value.status == status and message in e.value.message
    assert oa.parse_body(b'{"a": 1}') == {"a": 1}


def test_api_key():
    digest = oa.key_digest("k")
    assert digest != "k" and len(digest) == 64
    oa.check_api_key(None, None)                      # no key set: nothing asked
    oa.check_api_key("Bearer k", digest)
    oa.check_api_key("bearer  k ", digest)
    for header, message in ((None, "missing API key"), ("k", "missing API key"),
                            ("Bearer ", "missing API key"), ("Bearer x", "incorrect API key"),
                            ("Basic k", "missing API key")):
        with pytest.raises(oa.APIError) as e:
            oa.check_api_key(header, digest)
        assert e.value.status == 401 and message in e.value.message
        assert e.value.code == "invalid_api_key"


def test_fabric_errors_map_to_statuses():
    cases = [(RequestError("prompt 0: prompt is empty"), 400, "invalid_request_error"),
             (CapacityError("request needs 9 KV blocks"), 400, "invalid_request_error"),
             (ConfigError("x"), 500, "internal_error"),
             (FabricError("every instance of the fabric has died"), 500, "internal_error"),
             (ValueError("secret internals"), 500, "internal_error")]
    for exc, status, kind in cases:
        e = oa.from_fabric_error(exc)
        assert (e.status, e.type) == (status, kind)
    assert oa.from_fabric_error(RequestError("prompt 0: prompt is empty")).message == \
        "prompt is empty"
    assert oa.from_fabric_error(CapacityError("x")).code == "context_length_exceeded"
    assert "secret" not in oa.from_fabric_error(ValueError("secret internals")).message


def test_served_model_name():
    assert oa.served_model_name({"preset": "tiny-llama", "path": None}) == "tiny-llama"
    assert oa.served_model_name({"preset": "smollm2-135m-instruct",
                                 "path": "/x/SmolLM2.Q4_1.gguf"}) == "smollm2-135m-instruct"
    assert oa.served_model_name({"preset": None, "path": "/ckpt/llama-3-8b/"}) == "llama-3-8b"
    assert oa.served_model_name({"preset": None, "path": "/m/model.gguf"}) == "model.gguf"


def test_chat_default_max_tokens_fills_what_fits():
    assert oa.default_chat_max_tokens(100, 2048, 10, 16) == 60
    assert oa.default_chat_max_tokens(100, 120, 10, 16) == 20
    with pytest.raises(CapacityError, match="160 tokens but at most 159 fit"):
        oa.default_chat_max_tokens(160, 2048, 10, 16)


def sse_events(data: bytes) -> list:
    """Parse server-sent events, checking the framing: `data: ` lines, blank-line separated."""
    assert data.endswith(b"\n\n"), data[-200:]
    events = []
    for frame in data[:-2].split(b"\n\n"):
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame
        payload = frame[len(b"data: "):]
        events.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return events


def test_chunks_of_a_streamed_chat():
    req = oa.parse_chat({"model": "m", "messages": CHAT_MSGS, "stream": True,
                         "stream_options": {"include_usage": True}}, "m")
    w = oa.ChunkWriter(req)
    out = w.start() + w.token({"token": 5, "text": "Hel"}) + w.token({"token": 6, "text": ""})
    out += w.final({"finish_reason": "stop", "tokens": [5, 6, 7], "text": "Hello",
                    "num_prompt_tokens": 11}) + w.done()
    events = sse_events(out)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["id"] == req.id and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1] if c["choices"]]
    assert deltas == ["Hel", "lo", None]               # held-back text comes at the end
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]] == [None, None, "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == oa.usage(11, 3)
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chunks_of_a_streamed_completion_and_errors():
    req = oa.parse_completion({"model": "m", "prompt": "x", "stream": True}, "m")
    w = oa.ChunkWriter(req)
    assert w.start() == b""
    out = w.token({"token": 1, "text": "a"}) + w.final(
        {"finish_reason": "length", "tokens": [1], "text": "a", "num_prompt_tokens": 2})
    chunks = sse_events(out)
    assert [c["choices"][0]["text"] for c in chunks] == ["a", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]
    err = sse_events(w.error(oa.from_fabric_error(FabricError("boom"))))[0]
    assert err["error"]["type"] == "internal_error" and "boom" in err["error"]["message"]
    body = oa.response(req, "a", "length", 2, 1)
    assert body["choices"][0]["text"] == "a" and body["usage"]["total_tokens"] == 3


def test_metrics_page_is_prometheus_text():
    parser = pytest.importorskip("prometheus_client.parser")
    m = ServingMetrics('tiny "llama"\n')
    m.http_request("/v1/completions", "POST", 200)
    m.http_request("/v1/completions", "POST", 200)
    m.http_request("other", "GET", 404)
    m.started()
    m.first_token(0.03)
    m.inter_token(0.002)
    m.request_finished("length", 6, 8, 0.2)
    m.request_cancelled()
    stats = {"instances": [
        {"blocks_total": 32, "blocks_free": 20, "blocks_lent": 4, "blocks_borrowed": 0,
         "detail": {"num_running": 2, "num_waiting": 1}},
        {"blocks_total": 32, "blocks_free": 28, "blocks_lent": 0, "blocks_borrowed": 4,
         "detail": {"num_running": 1, "num_waiting": 0}}], "lending": {"borrow_events": 3}}
    families = {f.name: f for f in parser.text_string_to_metric_families(m.render(stats))}
    value = {(f.name, s.name, tuple(sorted((k, v) for k, v in s.labels.items()
                                           if k != "model_name"))): s.value
             for f in families.values() for s in f.samples}
    assert value[("kvfabric:http_requests", "kvfabric:http_requests_total",
                  (("method", "POST"), ("route", "/v1/completions"), ("status", "200")))] == 2
    assert value[("kvfabric:num_requests_running", "kvfabric:num_requests_running", ())] == 3
    assert value[("kvfabric:num_requests_waiting", "kvfabric:num_requests_waiting", ())] == 1
    assert value[("kvfabric:kv_blocks_borrowed", "kvfabric:kv_blocks_borrowed", ())] == 4
    assert value[("kvfabric:kv_cache_usage_perc", "kvfabric:kv_cache_usage_perc", ())] == 0.25
    ttft = "kvfabric:time_to_first_token_seconds"
    assert value[(ttft, ttft + "_count", ())] == 1
    assert value[(ttft, ttft + "_bucket", (("le", "0.04"),))] == 1
    assert value[(ttft, ttft + "_bucket", (("le", "0.02"),))] == 0
    assert value[("kvfabric:request_success", "kvfabric:request_success_total",
                  (("finished_reason", "cancelled"),))] == 1
    assert families["kvfabric:e2e_request_latency_seconds"].type == "histogram"
    labels = families["kvfabric:stats_up"].samples[0].labels
    assert labels["model_name"] == 'tiny "llama"\n'          # escaped and read back
    down = {f.name: f for f in parser.text_string_to_metric_families(m.render(None))}
    assert down["kvfabric:stats_up"].samples[0].value == 0
    assert "kvfabric:num_requests_running" not in down


@pytest.mark.parametrize("extra,message", [
    (["--api-key", "k"], "need --http-port"), (["--served-model-name", "m"], "need --http-port"),
    (["--http-port", "0"], "--http-port must be a port number"),
    (["--http-port", "70000"], "--http-port must be a port number"),
])
def test_serve_usage_errors_exit_2(capsys, extra, message):
    assert cli.main(["serve", "--name", "x", *extra]) == 2
    assert message in capsys.readouterr().err


# ---- a real server -----------------------------------------------------------------------------
try:
    import openai
except ImportError:                    # the `test` extra brings it
    openai = None


def fabric_cli(*args: str, env: dict, timeout: int = CLI_TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", "fabric", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


DRIVER = r"""
import json, sys
import fabric
fab = fabric.connect(sys.argv[1], address=sys.argv[2])
def totals():
    inst = fab.stats()["instances"]
    return {"live": sum(s["detail"]["num_running"] + s["detail"]["num_waiting"] for s in inst),
            "generated": sum(s["detail"]["num_generated"] for s in inst),
            "borrowed": sum(s["blocks_borrowed"] for s in inst),
            "borrow_events": sum(s["detail"]["borrow_events"] for s in inst),
            "all_free": all(s["blocks_free"] == s["blocks_total"] for s in inst)}
print("@@" + json.dumps({"max_tokens": fab.max_request_blocks * fab.block_size,
                         "max_positions": fab.max_positions}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    if op == "totals":
        out = totals()
    elif op == "generate":
        (r,) = fab.generate([cmd.pop("prompt")], **cmd)
        out = {"tokens": r.tokens, "text": r.text, "finish_reason": r.finish_reason}
    elif op == "render_chat":
        out = fab.render_chat(cmd["messages"])
    print("@@" + json.dumps(out), flush=True)
"""


class Driver:
    """A driver process of the test, `fabric.connect`ed to the served fabric: answers one JSON
    command a line (totals of `fab.stats()`, a reference `generate`, `render_chat`)."""

    def __init__(self, name: str, head: dict):
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, name, head["address"]],
                                     env=head["env"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.info = self._reply()

    def _reply(self):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise AssertionError(f"the test driver exited ({self.proc.wait()})")

    def __call__(self, op: str, **kwargs):
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def wait_idle(self) -> dict:
        """Totals once nothing runs and every block is free again (or the deadline passed)."""
        end = time.monotonic() + DEADLINE_S
        while True:
            t = self("totals")
            if (t["live"] == 0 and t["all_free"] and t["borrowed"] == 0) or \
                    time.monotonic() > end:
                return t
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.kill()                 # a driver that goes away: the fabric stays
        self.proc.wait()


def write_config(tmp_path_factory, prefix: str, config: dict) -> str:
    path = tmp_path_factory.mktemp(prefix) / "fabric.json"
    path.write_text(json.dumps(config))                    # JSON is YAML
    return str(path)


@contextmanager
def served(head: dict, name: str, *serve_args: str):
    """`python -m fabric serve --name NAME ... --http-port P --api-key KEY`, a test driver
    connected to the fabric and an `openai` client; `stop` at the end (unless a test did)."""
    if openai is None:
        pytest.skip("the openai client is not installed (pip install -e '.[test]')")
    port = ray_head.free_port()
    target = ["--name", name, "--address", head["address"]]
    res = fabric_cli("serve", *serve_args, *target, "--http-port", str(port), "--api-key", KEY,
                     env=head["env"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert f"OpenAI-compatible API on http://127.0.0.1:{port}/v1" in res.stdout
    server = {"name": name, "port": port, "target": target, "env": head["env"],
              "serve_stdout": res.stdout, "stopped": False}
    try:
        server["driver"] = Driver(name, head)
        server["client"] = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                                         max_retries=0, timeout=DEADLINE_S)
        yield server
    finally:
        if "driver" in server:
            server["driver"].close()
        if not server["stopped"]:
            fabric_cli("stop", *target, env=head["env"])


def raw(port: int, method: str, path: str, body=None, key: str | None = KEY,
        read: int | None = None):
    """One HTTP request with http.client: (status, headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def chat_fabric(ray_head, tmp_path_factory):
    """The chat model's fabric, started (no HTTP yet: one app holds route / per cluster) while
    the tiny server's tests run; `TestChatServer` puts the HTTP API in front of it."""
    missing = chat_model_missing()
    if missing:
        yield {"missing": missing}
        return
    name = f"http-chat-{uuid.uuid4().hex[:6]}"
    target = ["--name", name, "--address", ray_head["address"]]
    log = tmp_path_factory.mktemp("chat-log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fabric", "serve", "--config",
                                 write_config(tmp_path_factory, "chat", CHAT), *target],
                                env=ray_head["env"], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield {"name": name, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        fabric_cli("stop", *target, env=ray_head["env"])       # exit 2 when already stopped


@pytest.fixture(scope="class")
def tiny(ray_head, tmp_path_factory, chat_fabric):
    name = f"http-tiny-{uuid.uuid4().hex[:6]}"
    with served(ray_head, name, "--config", write_config(tmp_path_factory, "tiny", TINY)) as s:
        yield s


class TestTinyServer:
    """tiny-llama (byte tokenizer, no chat template): everything but chat."""

    def test_models_and_health(self, tiny):
        assert [m.id for m in tiny["client"].models.list()] == ["tiny-llama"]
        assert tiny["client"].models.retrieve("tiny-llama").id == "tiny-llama"
        status, _, body = raw(tiny["port"], "GET", "/health", key=None)   # no key needed
        assert status == 200 and json.loads(body)["status"] == "ok"

    def test_completion_equals_the_fabric_and_counts_usage(self, tiny):
        prompt = "The fabric lends KV blocks."
        ref = tiny["driver"]("generate", prompt=prompt, max_new_tokens=12, ignore_eos=True)
        out = tiny["client"].completions.create(model="tiny-llama", prompt=prompt, max_tokens=12,
                                                temperature=0, extra_body={"ignore_eos": True},
                                                user="someone")
        assert out.object == "text_completion" and out.model == "tiny-llama"
        assert out.choices[0].text == ref["text"] and out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(prompt.encode()) + 1          # BOS + bytes
        assert out.usage.completion_tokens == 12 and out.usage.total_tokens == \
            out.usage.prompt_tokens + 12

        ids = [3, 1, 4, 1, 5, 9, 2, 6]
        ref = tiny["driver"]("generate", prompt=ids, max_new_tokens=5, ignore_eos=True)
        out = tiny["client"].completions.create(model="tiny-llama", prompt=ids, max_tokens=5,
                                                temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == ref["text"] and out.usage.prompt_tokens == len(ids)

    def test_usage_counts_prompt_tokens_served_from_the_prefix_cache(self, tiny):
        prompt = "A fabric-wide prefix index routes a repeated prompt to its cached KV. " * 2
        first = tiny["client"].completions.create(model="tiny-llama", prompt=prompt, max_tokens=4,
                                                  temperature=0, extra_body={"ignore_eos": True})
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        deadline = time.monotonic() + 120          # the index learns with the next heartbeats
        while True:
            again = tiny["client"].completions.create(
                model="tiny-llama", prompt=prompt, max_tokens=4, temperature=0,
                extra_body={"ignore_eos": True})
            cached = again.usage.prompt_tokens_details.cached_tokens
            if cached > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert 0 < cached < again.usage.prompt_tokens
        assert again.choices[0].text == first.choices[0].text

    def test_session_turn_is_served_from_the_kept_kv(self, tiny):
        prompt = "A session keeps its KV in the pool between turns, for a while. " * 2
        body = {"ignore_eos": True, "session_id": "http-session", "ttl_s": 120}
        first = tiny["client"].completions.create(model="tiny-llama", prompt=prompt,
                                                  max_tokens=4, temperature=0, extra_body=body)
        deadline = time.monotonic() + 120          # the index learns with the next heartbeats
        while True:
            again = tiny["client"].completions.create(model="tiny-llama", prompt=prompt,
                                                      max_tokens=4, temperature=0,
                                                      extra_body=body)
            cached = again.usage.prompt_tokens_details.cached_tokens
            if cached > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert cached > 0 and again.choices[0].text == first.choices[0].text
        with pytest.raises(openai.BadRequestError, match="ttl_s"):
            tiny["client"].completions.create(model="tiny-llama", prompt=prompt, max_tokens=2,
                                              extra_body={"session_id": "s", "ttl_s": -1})

    def test_streamed_completion_with_usage(self, tiny):
        prompt = "Attention runs where the KV lives."
        whole = tiny["client"].completions.create(model="tiny-llama", prompt=prompt,
                                                  max_tokens=10, temperature=0,
                                                  extra_body={"ignore_eos": True})
        chunks = list(tiny["client"].completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
        assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")

    def test_stop_strings(self, tiny):
        prompt = [7, 7, 100, 42, 9, 13]
        ref = tiny["driver"]("generate", prompt=prompt, max_new_tokens=24, ignore_eos=True)
        text = ref["text"]
        k = next(i for i in range(4, len(text) - 1) if "\ufffd" not in text[i:i + 2])
        stop = text[k:k + 2]
        cut = text[:text.index(stop)]
        out = tiny["client"].completions.create(model="tiny-llama", prompt=prompt, max_tokens=24,
                                                temperature=0, stop=[stop, "\x00never\x00"],
                                                extra_body={"ignore_eos": True})
        assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
        streamed = list(tiny["client"].completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0, stop=stop,
            stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in streamed) == cut
        assert streamed[-1].choices[0].finish_reason == "stop"

    def test_sse_framing_over_raw_http(self, tiny):
        status, headers, body = raw(tiny["port"], "POST", "/v1/completions", {
            "model": "tiny-llama", "prompt": "Hi", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        events = sse_events(body)
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        assert events[-2]["usage"] == oa.usage(3, 4)           # BOS + "Hi", 4 tokens

    def test_client_disconnect_cancels_and_frees_blocks(self, tiny):
        d = tiny["driver"]
        before = d.wait_idle()
        prompt = [(i * 7) % 256 for i in range(600)]     # more than one instance holds: borrows
        max_tokens = d.info["max_tokens"] - len(prompt)
        stream = tiny["client"].completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=max_tokens, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        got = 0
        for chunk in stream:
            got += 1
            if got == 3:
                break
        running = d("totals")
        stream.close()                                    # the client goes away
        after = d.wait_idle()
        assert running["live"] == 1 and running["borrow_events"] > before["borrow_events"]
        assert after["live"] == 0 and after["all_free"] and after["borrowed"] == 0, after
        assert after["generated"] - before["generated"] < max_tokens, \
            "the request ran to its end: the disconnect did not cancel it"
        out = tiny["client"].completions.create(model="tiny-llama", prompt="still serving",
                                                max_tokens=2, temperature=0)
        assert out.usage.completion_tokens >= 1

    def test_errors(self, tiny):
        c, port = tiny["client"], tiny["port"]
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
        assert e.value.code == "model_not_found" and "tiny-llama" in e.value.message
        for kwargs, param in (({"max_tokens": 0}, "max_tokens"),
                              ({"temperature": 3.5}, "temperature"),
                              ({"n": 2}, "n")):
            with pytest.raises(openai.BadRequestError) as e:
                c.completions.create(model="tiny-llama", prompt="x", **{"max_tokens": 2,
                                                                        **kwargs})
            assert e.value.param == param, e.value.body
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny-llama", prompt=list(range(200)) * 8, max_tokens=4)
        assert e.value.code == "context_length_exceeded"
        assert "KV blocks" in e.value.message and "at most" in e.value.message
        with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
            c.completions.create(model="tiny-llama", prompt=[1, 10**6], max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="stop strings"):
            c.completions.create(model="tiny-llama", prompt="x", max_tokens=2, stop=[""])
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model="tiny-llama", messages=CHAT_MSGS, max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="non-empty list"):
            c.chat.completions.create(model="tiny-llama", messages=[], max_tokens=2)
        with pytest.raises(openai.BadRequestError) as e:     # a bad streamed one: 400, no stream
            c.completions.create(model="tiny-llama", prompt="x", max_tokens=2, top_p=0,
                                 stream=True)
        assert e.value.param == "top_p"
        wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong",
                              max_retries=0, timeout=DEADLINE_S)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="tiny-llama", prompt="x", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        for method, path, body, key, status in (
                ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": "x"}, None, 401),
                ("POST", "/v1/completions", b'{"model": "tiny-llama", "prompt": ', KEY, 400),
                ("POST", "/v1/completions", b"[1, 2]", KEY, 400),
                ("GET", "/v1/nothing", None, KEY, 404),
                ("GET", "/v1/completions", None, KEY, 405),
                ("GET", "/v1/models/other", None, KEY, 404)):
            got, headers, text = raw(port, method, path, body, key=key)
            err = json.loads(text)["error"]
            assert got == status and set(err) == {"message", "type", "param", "code"}, text
        out = c.completions.create(model="tiny-llama", prompt="ok", max_tokens=2, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop")     # still serving

    def test_metrics(self, tiny):
        parser = pytest.importorskip("prometheus_client.parser")
        status, headers, body = raw(tiny["port"], "GET", "/metrics", key=None)
        assert status == 200 and headers["content-type"].startswith("text/plain")
        samples = {}
        for f in parser.text_string_to_metric_families(body.decode()):
            for s in f.samples:
                samples.setdefault(s.name, []).append(s)

        def total(name, **labels):
            return sum(s.value for s in samples.get(name, [])
                       if all(s.labels.get(k) == v for k, v in labels.items()))
        assert total("kvfabric:http_requests_total", route="/v1/completions", status="200") >= 5
        assert total("kvfabric:http_requests_total", route="/v1/completions", status="400") >= 3
        assert total("kvfabric:http_requests_total", status="401") >= 2
        assert total("kvfabric:time_to_first_token_seconds_count") >= 5
        assert total("kvfabric:inter_token_latency_seconds_count") >= 5
        assert total("kvfabric:e2e_request_latency_seconds_count") >= 5
        assert total("kvfabric:request_success_total", finished_reason="cancelled") >= 1
        assert total("kvfabric:generation_tokens_total") >= 12
        assert total("kvfabric:kv_blocks_total") == 64 and total("kvfabric:num_instances") == 2
        # the prefix-cache test before this one repeated a prompt until it hit
        assert total("kvfabric:prompt_tokens_cached_total") > 0
        assert 0 < total("kvfabric:prefix_cache_hits_total") < \
            total("kvfabric:prefix_cache_queries_total")
        for name in ("kvfabric:num_requests_running", "kvfabric:num_requests_waiting",
                     "kvfabric:kv_cache_usage_perc", "kvfabric:kv_blocks_borrowed"):
            assert len(samples[name]) == 1 and samples[name][0].labels["model_name"] == \
                "tiny-llama"
        assert total("kvfabric:borrow_events_total") >= 1

    def test_stop_ends_the_ingress_and_the_fabric(self, tiny):
        res = fabric_cli("stop", *tiny["target"], env=tiny["env"])
        tiny["stopped"] = res.returncode == 0
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"HTTP ingress {tiny['name']!r} stopped" in res.stdout
        assert f"fabric {tiny['name']!r} stopped" in res.stdout
        with pytest.raises(OSError):
            raw(tiny["port"], "GET", "/health")
        again = fabric_cli("stop", *tiny["target"], env=tiny["env"])
        assert again.returncode == 2 and f"no fabric named {tiny['name']!r}" in again.stderr


def chat_model_missing() -> str | None:
    try:
        from fabric.config import load_config
        from fabric.tokenizer import chat_template, load_tokenizer

        cfg = load_config(CHAT)
        if chat_template(load_tokenizer(cfg.model)) is None:
            return "the smollm2-135m-instruct tokenizer has no chat template here"
    except (ConfigError, ImportError) as e:
        return f"the smollm2-135m-instruct preset is not available: {e}"
    return None


@pytest.fixture(scope="class")
def chat(ray_head, chat_fabric):
    if "missing" in chat_fabric:
        pytest.skip(chat_fabric["missing"])
    rc = chat_fabric["proc"].wait(timeout=CLI_TIMEOUT_S)
    assert rc == 0, chat_fabric["log"].read_text()[-4000:]
    with served(ray_head, chat_fabric["name"]) as s:     # the HTTP API for a running fabric
        assert "is serving" not in s["serve_stdout"]
        yield s


class TestChatServer:
    """smollm2-135m-instruct (a real chat template); runs after the tiny server has stopped."""
    MESSAGES = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"}]

    def test_chat_completion_and_stream(self, chat):
        c = chat["client"]
        assert [m.id for m in c.models.list()] == ["smollm2-135m-instruct"]
        rendered = chat["driver"]("render_chat", messages=self.MESSAGES)
        out = c.chat.completions.create(model="smollm2-135m-instruct", messages=self.MESSAGES,
                                        max_completion_tokens=6, temperature=0, seed=1)
        assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
        msg = out.choices[0].message
        assert msg.role == "assistant" and msg.content
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage.prompt_tokens == len(rendered)
        assert 1 <= out.usage.completion_tokens <= 6

        chunks = list(c.chat.completions.create(
            model="smollm2-135m-instruct", messages=self.MESSAGES, max_tokens=6, temperature=0,
            stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            msg.content
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == \
            out.choices[0].finish_reason
        assert chunks[-1].usage.prompt_tokens == len(rendered)
        assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens

    def test_chat_errors(self, chat):
        c = chat["client"]
        with pytest.raises(openai.BadRequestError, match="unknown role"):
            c.chat.completions.create(model="smollm2-135m-instruct", max_tokens=2,
                                      messages=[{"role": "wizard", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="content must be a string"):
            c.chat.completions.create(model="smollm2-135m-instruct", max_tokens=2,
                                      messages=[{"role": "user", "content": 42}])
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="tiny-llama", messages=self.MESSAGES, max_tokens=2)
        long = [{"role": "user", "content": "word " * 1200}]
        with pytest.raises(openai.BadRequestError) as e:      # no max_tokens: nothing fits
            c.chat.completions.create(model="smollm2-135m-instruct", messages=long)
        assert e.value.code == "context_length_exceeded" and "at most" in e.value.message
