"""The bad-input catalogue of docs/reliability.md: every bad input tried and what it gets.

Requests go through one running embedded fabric (2 CPU instances, Ray data-plane backend so that
raw messages can be sent to an instance); after each, a good request must still give its
reference tokens. Configs, checkpoints and data-plane messages are checked without Ray.
Rows already covered elsewhere (tests/test_config_and_errors.py, tests/test_transport.py,
tests/test_ledger.py, tests/test_cli_jobs.py, tests/test_fabric_ray.py) are not repeated here.
"""

import json
import math
import pickle
import shutil

import msgpack
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
from ray.exceptions import RayTaskError

import fabric
from actors.messages import WireError, decode, decode_split, encode, encode_split
from fabric import CapacityError, ConfigError, RequestError, load_config
from fabric.model import load_model, save_checkpoint
from fabric.model.checkpoint import check_checkpoint

GOOD = [5, 9, 200, 17, 3, 88, 41]
CONFIG = {"instances": {"count": 2, "kv_blocks": 16, "block_size": 8, "max_batch_tokens": 64},
          "transport": {"backend": "ray"}}
REQUEST_FIELDS = ("id", "prompt", "max_new_tokens", "temperature", "seed", "ignore_eos")


@pytest.fixture(scope="module")
def fab():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    f = fabric.start(CONFIG)
    f.reference = f.generate([GOOD], max_new_tokens=6, ignore_eos=True)[0].tokens
    yield f
    f.shutdown()
    ray.shutdown()


def assert_still_serves(fab) -> None:
    """A good request after a bad one: answered, same tokens as before any bad input."""
    for home in range(len(fab.instances)):       # round robin: one request per instance
        (res,) = fab.generate([GOOD], max_new_tokens=6, ignore_eos=True)
        assert res.error is None and res.tokens == fab.reference, (home, res)


# ---- requests ------------------------------------------------------------------------------------
def req(**fields) -> dict:
    return {"prompt": [1, 2, 3], "max_new_tokens": 4} | fields


NAN, INF = float("nan"), float("inf")
BAD_REQUESTS = [
    # (request, error, message fragment)
    (req(prompt=[]), RequestError, "prompt is empty"),
    ({"max_new_tokens": 4}, RequestError, "prompt is missing"),
    (req(prompt=None), RequestError, "prompt is missing"),
    (req(prompt=123), RequestError, "prompt"),          # says "prompt is empty" (see the doc)
    (req(prompt={"a": 1}), RequestError, "prompt"),
    (req(prompt=b"abc"), RequestError, "prompt"),
    (req(prompt=[1, "a"]), RequestError, "not an integer id"),
    (req(prompt=[1, 2.0]), RequestError, "not an integer id"),
    (req(prompt=[1, None]), RequestError, "not an integer id"),
    (req(prompt=[True, 2]), RequestError, "not an integer id"),
    (req(prompt=[1, 320]), RequestError, "outside the vocabulary"),
    (req(prompt=[-1]), RequestError, "outside the vocabulary"),
    (req(prompt=[10**30]), RequestError, "outside the vocabulary"),
    (req(max_new_tokens=0), RequestError, "max_new_tokens must be an integer >= 1"),
    (req(max_new_tokens=-3), RequestError, "max_new_tokens must be an integer >= 1"),
    (req(max_new_tokens=2.5), RequestError, "max_new_tokens must be an integer >= 1"),
    (req(max_new_tokens="8"), RequestError, "max_new_tokens must be an integer >= 1"),
    (req(max_new_tokens=True), RequestError, "max_new_tokens must be an integer >= 1"),
    (req(max_new_tokens=None), RequestError, "max_new_tokens must be an integer >= 1"),
    (req(max_new_tokens=5000), RequestError, "maximum position"),
    (req(max_new_tokens=10**20), RequestError, "maximum position"),
    (req(temperature=-0.5), RequestError, "temperature must be a finite number >= 0"),
    (req(temperature=NAN), RequestError, "temperature must be a finite number >= 0"),
    (req(temperature=INF), RequestError, "temperature must be a finite number >= 0"),
    (req(temperature=-INF), RequestError, "temperature must be a finite number >= 0"),
    (req(temperature="hot"), RequestError, "temperature must be a finite number >= 0"),
    (req(temperature=True), RequestError, "temperature must be a finite number >= 0"),
    (req(temperature=None), RequestError, "temperature must be a finite number >= 0"),
    (req(temperature=0.7, seed="x"), RequestError, "seed must be an integer"),
    (req(temperature=0.7, seed=1.5), RequestError, "seed must be an integer"),
    (req(temperature=0.7, seed=True), RequestError, "seed must be an integer"),
    (req(top_q=0.9), RequestError, "unknown field 'top_q'"),
    (req(top_p=0.0), RequestError, "top_p must be a number"),
    (req(stop=[""]), RequestError, "stop strings must be non-empty"),
    ("just a string", RequestError, "must be a mapping"),
    ([1, 2, 3], RequestError, "must be a mapping"),
    (req(prompt=[7] * 300, max_new_tokens=8), CapacityError, "KV blocks"),
]


@pytest.mark.parametrize("bad,error,match", BAD_REQUESTS,
                         ids=[f"{i}-{e.__name__}-{m[:24]}" for i, (_, e, m) in enumerate(BAD_REQUESTS)])
def test_bad_request_fails_alone(fab, bad, error, match):
    with pytest.raises(error, match=match):
        fab.submit([bad])
    # errors="return": the bad one comes back with its error, the good ones beside it run
    good = {"id": "good", "prompt": GOOD, "max_new_tokens": 6, "ignore_eos": True}
    out = fab.submit([good, bad, dict(good, id="good2")], errors="return")
    assert [r.error_type for r in out] == [None, error.__name__, None]
    assert match in out[1].error
    assert out[0].tokens == out[2].tokens == fab.reference
    assert_still_serves(fab)


def test_duplicate_ids_in_one_call(fab):
    with pytest.raises(RequestError, match="appears twice"):
        fab.submit([req(id="x"), req(id="x", prompt=[4])])
    with pytest.raises(RequestError, match="appears twice"):
        fab.submit([req(id=1), req(id="1")])           # ids are compared as strings
    assert_still_serves(fab)


@pytest.mark.parametrize("prompts", ["hello", b"hello", None, 5, {"prompt": [1]}])
def test_prompts_not_a_list(fab, prompts):
    with pytest.raises(RequestError, match="prompts must be a list"):
        fab.generate(prompts, max_new_tokens=2)
    assert_still_serves(fab)


def test_errors_mode_and_empty_batch(fab):
    with pytest.raises(ValueError, match="errors must be 'raise' or 'return'"):
        fab.submit([req()], errors="maybe")
    assert fab.generate([], max_new_tokens=2) == []
    assert fab.submit([]) == []


def test_accepted_edge_cases(fab):
    """Inputs that look odd but are valid: what each gives."""
    (text,) = fab.generate(["Hello"], max_new_tokens=4, ignore_eos=True)
    assert len(text.tokens) == 4 and isinstance(text.text, str)
    (empty_text,) = fab.generate([""], max_new_tokens=2, ignore_eos=True)   # BOS alone
    assert empty_text.error is None and empty_text.metrics["num_prompt_tokens"] == 1
    (as_tuple,) = fab.generate([tuple(GOOD)], max_new_tokens=6, ignore_eos=True)
    assert as_tuple.tokens == fab.reference
    a, b = fab.submit([req(id="a", temperature=0.9, seed=-1), req(id="b", temperature=0.9, seed=-1)])
    assert a.tokens == b.tokens                           # a negative seed is a seed
    (edge,) = fab.generate([[0, 319]], max_new_tokens=2)  # first and last id of the vocabulary
    assert edge.error is None
    assert fab.cancel("no-such-request") is False
    assert_still_serves(fab)


def test_bad_stream_request_raises_before_any_token(fab):
    for bad in ([], [1, 320]):
        it = fab.stream(bad, max_new_tokens=3)
        with pytest.raises(RequestError):
            next(it)
    with pytest.raises(RequestError, match="max_new_tokens"):
        next(fab.stream([1, 2], max_new_tokens=0))
    assert list(fab.stream(GOOD, max_new_tokens=6, ignore_eos=True)) == fab.reference
    assert_still_serves(fab)


def test_out_of_range_seed_fails_alone(fab):
    good = {"id": "good", "prompt": GOOD, "max_new_tokens": 40, "ignore_eos": True}
    bad = {"id": "bad", "prompt": [1, 2], "max_new_tokens": 2, "temperature": 0.5, "seed": 2**64}
    out = fab.submit([good, dict(good, id="good2"), bad], errors="return")   # homes 0, 1, 0
    try:
        assert [r.error_type for r in out[:2]] == [None, None], [r.error for r in out]
        assert out[2].error_type == "RequestError"
    finally:
        assert_still_serves(fab)


def test_ignore_eos_must_be_a_boolean(fab):
    with pytest.raises(RequestError, match="ignore_eos"):
        fab.submit([req(ignore_eos="false")])


def test_submit_requests_not_a_list(fab):
    with pytest.raises(RequestError, match="list"):
        fab.submit(None)


# ---- client messages to the actors ---------------------------------------------------------------
def raw_call(fab, dst: int, src: int, envelope: bytes, payload: np.ndarray):
    """What a peer's data-plane call delivers to an instance (Ray backend): (ok, meta)."""
    ok, env, region = ray.get(fab.instances[dst]._transport_handle.remote(src, envelope, payload),
                              timeout=60)
    meta, _ = decode_split(env, torch.from_numpy(region.copy()))
    return ok, meta


def attn_call(block: int):
    q = torch.zeros(1, 4, 16)
    kv = torch.zeros(1, 2, 16)
    return encode_split({"op": "attn", "layer": 0, "decode": True},
                        [q, kv, kv, torch.tensor([block * 8]), torch.tensor([[block]], dtype=torch.int32),
                         torch.tensor([1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)])


def test_data_plane_garbage_to_an_instance(fab):
    empty = np.zeros(0, dtype=np.uint8)
    ok, meta = raw_call(fab, 0, 1, b"\xc1 not msgpack", empty)
    assert not ok and "corrupt message envelope" in meta["error"]
    ok, meta = raw_call(fab, 0, 1, pickle.dumps({"m": {"op": "attn"}, "t": []}), empty)
    assert not ok and "corrupt message envelope" in meta["error"]
    env, region = encode_split({"op": "steal"}, [])
    ok, meta = raw_call(fab, 0, 1, env, region.numpy())
    assert not ok and "unknown op 'steal'" in meta["error"]
    env, region = attn_call(block=3)           # block 3 of instance 0 was never lent to 1
    ok, meta = raw_call(fab, 0, 1, env, region.numpy())
    assert not ok and "touched blocks it did not borrow here" in meta["error"]
    env, region = encode_split({"op": "attn", "layer": 0, "decode": True}, [torch.zeros(2)])
    ok, meta = raw_call(fab, 0, 1, env, region.numpy())
    assert not ok and "ValueError" in meta["error"]      # too few tensors
    assert_still_serves(fab)


def test_bad_tensor_description_to_an_instance(fab):
    """A malformed tensor description is refused as a corrupt message; the instance keeps
    serving."""
    env = msgpack.packb({"m": {"op": "attn"}, "t": [5]})
    ok, meta = raw_call(fab, 1, 0, env, np.zeros(64, dtype=np.uint8))
    assert not ok and "corrupt" in meta["error"]
    assert_still_serves(fab)


def test_malformed_heartbeat_to_the_controller(fab):
    for bad in ({"bogus": 1}, {"instance_id": "0"}, [1, 2], None):
        with pytest.raises(RayTaskError, match="Heartbeat|must be a dict"):
            ray.get(fab.controller.heartbeat.remote(bad), timeout=60)
    assert fab.stats()["controller"]["calls"]["heartbeat"] > 0
    assert_still_serves(fab)


# ---- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,field", [
    # unknown keys at each level (top level and instances: test_config_and_errors.py)
    ({"model": {"presett": "tiny-llama"}}, "model.presett"),
    ({"lending": {"enabeld": True}}, "lending.enabeld"),
    ({"transport": {"backnd": "ray"}}, "transport.backnd"),
    ({"autoscale": {"max_replica": 2}}, "autoscale.max_replica"),
    # wrong types
    ({"instances": {"kv_blocks": 2.5}}, "instances.kv_blocks"),
    ({"instances": {"device": None}}, "instances.device"),
    ({"instances": {"num_cpus": "one"}}, "instances.num_cpus"),
    ({"model": {"seed": "0"}}, "model.seed"),
    ({"model": {"dtype": 32}}, "model.dtype"),
    ({"model": {"path": 5}}, "model.path"),
    ({"lending": {"enabled": 1}}, "lending.enabled"),
    ({"lending": {"heartbeat_s": "fast"}}, "lending.heartbeat_s"),
    ({"model": "tiny-llama"}, "model"),
    ({"lending": [True]}, "lending"),
    # non-positive sizes and out-of-range numbers
    ({"instances": {"count": 0}}, "instances.count"),
    ({"instances": {"max_num_seqs": 0}}, "instances.max_num_seqs"),
    ({"instances": {"max_batch_tokens": -1}}, "instances.max_batch_tokens"),
    ({"instances": {"num_cpus": -1}}, "instances.num_cpus"),
    ({"lending": {"heartbeat_s": 0}}, "lending.heartbeat_s"),
    ({"lending": {"min_free_fraction": -0.1}}, "lending.min_free_fraction"),
    ({"autoscale": {"min_replicas": 0}}, "autoscale.min_replicas"),
    ({"autoscale": {"kv_utilization_high": 2.0}}, "autoscale.kv_utilization_high"),
    ({"autoscale": {"kv_utilization_low": 0.9, "kv_utilization_high": 0.5}}, "autoscale.kv_utilization_low"),
    # bad enum values (device, preset, dtype, backend: test_config_and_errors.py)
    ({"model": {"preset": None}}, "model.preset or model.path"),
])
def test_bad_config_names_the_field(config, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(config)


@pytest.mark.parametrize("text,match", [
    ("- a\n- b\n", "config must be a mapping, got list"),
    ("just words\n", "config must be a mapping, got str"),
    ("42\n", "config must be a mapping, got int"),
    ("instances: 5\n", "instances must be a mapping, got int"),
    ("!!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),   # safe_load only
    ("model: {preset: tiny-llama\n", "not valid YAML"),
    ("a: 1\n\ta: 2\n", "not valid YAML"),
])
def test_bad_yaml(tmp_path, text, match):
    path = tmp_path / "fabric.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(path))


def test_empty_yaml_and_config_of_wrong_type(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(str(path)) == load_config(None)
    for bad in (42, [1], b"fabric.yaml"):
        with pytest.raises(ConfigError, match="config must be a path, a dict or a FabricConfig"):
            load_config(bad)
    with pytest.raises(ConfigError, match="is a directory|does not exist"):
        load_config(str(tmp_path))


def test_bad_config_to_start_fails_before_any_actor(fab):
    from ray._private import state

    before = len(state.actors())
    with pytest.raises(ConfigError, match="instances.kv_blockz"):
        fabric.start({"instances": {"kv_blockz": 3}})
    assert len(state.actors()) == before


# ---- checkpoints ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(load_model("tiny-llama", seed=1), str(path))
    return path


def broken(checkpoint, tmp_path, edit_config=None, config_text=None):
    """A copy of `checkpoint` in tmp_path, its config.json edited."""
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    if edit_config is not None:
        cfg = json.loads((tmp_path / "config.json").read_text())
        edit_config(cfg)
        config_text = json.dumps(cfg)
    if config_text is not None:
        (tmp_path / "config.json").write_text(config_text)
    return str(tmp_path)


def test_checkpoint_missing_or_invalid_config_json(checkpoint, tmp_path):
    path = broken(checkpoint, tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_model(None, path=path)
    path = broken(checkpoint, tmp_path, config_text='{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_model(None, path=path)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("num_attention_heads"), "lacks 'num_attention_heads'"),
    (lambda c: c.pop("architectures"), "architecture '\\?' is not supported"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (lambda c: c.update(mlp_bias=True), "mlp_bias"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
    (lambda c: c.update(num_hidden_layers=3), "missing tensor 'model.layers.2"),
    (lambda c: c.update(num_hidden_layers=1), "unexpected tensor 'model.layers.1"),
    (lambda c: c.update(vocab_size=321), "shape \\(320, 64\\), expected \\(321, 64\\)"),
])
def test_checkpoint_config_json_errors(checkpoint, tmp_path, edit, match):
    path = broken(checkpoint, tmp_path, edit_config=edit)
    with pytest.raises(ConfigError, match=match):
        load_model(None, path=path)


def test_checkpoint_shard_index_names_a_missing_file(checkpoint, tmp_path):
    path = broken(checkpoint, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ConfigError, match="'model-00002-of-00002.safetensors' is missing"):
        load_model(None, path=path)


def edited(**fields):
    """A damage that sets `fields` in the copy's config.json."""
    return lambda d, c: broken(c, d, edit_config=lambda h: h.update(fields))


CORRUPTIONS = {   # name: (how the copy is broken, what the ConfigError says)
    "config_not_object": (lambda d, c: (d / "config.json").write_text("[1, 2]"),
                          "config.json holds a list, not an object"),
    "field_wrong_type": (edited(hidden_size="64"),
                         "field 'hidden_size' is '64', expected a positive integer"),
    "negative_size": (edited(hidden_size=-64),
                      "field 'hidden_size' is -64, expected a positive integer"),
    "size_a_bool": (edited(num_hidden_layers=True),
                    "field 'num_hidden_layers' is True, expected a positive integer"),
    "eps_a_string": (edited(rms_norm_eps="1e-5"),
                     "field 'rms_norm_eps' is '1e-5', expected a positive number"),
    "heads_not_divisible": (edited(num_key_value_heads=3),
                            "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "architectures_a_string": (edited(architectures="LlamaForCausalLM"),
                               "field 'architectures' is 'LlamaForCausalLM', expected a list"),
    "config_not_utf8": (lambda d, c: (d / "config.json").write_bytes(b"\xff\xfe{}"),
                        "config.json is not valid JSON"),
    "safetensors_garbage": (lambda d, c: (d / "model.safetensors").write_bytes(b"garbage" * 10),
                            "model.safetensors is not a readable safetensors file"),
    "index_not_json": (lambda d, c: (d / "model.safetensors.index.json").write_text("{bad"),
                       "model.safetensors.index.json is not valid JSON"),
    "index_not_object": (lambda d, c: (d / "model.safetensors.index.json").write_text("[]"),
                         "index.json has no \"weight_map\" object"),
    "index_map_of_numbers": (lambda d, c: (d / "model.safetensors.index.json").write_text(
                                 json.dumps({"weight_map": {"lm_head.weight": 7}})),
                             "index.json has no \"weight_map\" object"),
    "index_names_a_path": (lambda d, c: (d / "model.safetensors.index.json").write_text(
                               json.dumps({"weight_map": {"lm_head.weight": "../x.safetensors"}})),
                           "names a file outside the checkpoint directory"),
}


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_checkpoint_corruption_is_a_config_error(checkpoint, tmp_path, corrupt):
    """Each corruption is refused by the loader and by the driver's header-only check, with a
    `ConfigError` naming model.path and what is wrong (no error from the library below)."""
    path = broken(checkpoint, tmp_path)
    damage, says = CORRUPTIONS[corrupt]
    damage(tmp_path, checkpoint)
    for read in (lambda: load_model(None, path=path), lambda: check_checkpoint(path)):
        with pytest.raises(ConfigError, match="model.path") as e:
            read()
        assert says in str(e.value)


def test_start_with_broken_checkpoint_raises_config_error(fab, checkpoint, tmp_path):
    from ray._private import state

    path = broken(checkpoint, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    before = {a["ActorID"] for a in state.actors().values() if a["State"] == "ALIVE"}
    try:
        with pytest.raises(ConfigError, match="model.safetensors"):
            fabric.start({"model": {"path": path}, "instances": {"count": 1}})
    finally:
        for a in state.actors().values():     # what a failed start left behind
            if a["State"] == "ALIVE" and a["ActorID"] not in before:
                try:
                    ray.kill(ray.get_actor(a["Name"], namespace="kv-fabric"), no_restart=True)
                except ValueError:                # gone meanwhile
                    pass
        assert_still_serves(fab)


# ---- data-plane messages (actors/messages.py) ----------------------------------------------------
REGION = torch.zeros(256, dtype=torch.uint8)


def envelope(meta, descs) -> bytes:
    return msgpack.packb({"m": meta, "t": descs})


UNPICKLED = []


class Trap:
    """Unpickling this records it: the test checks that decoding never does."""

    def __reduce__(self):
        return (UNPICKLED.append, ("unpickled!",))


@pytest.mark.parametrize("data,match", [
    (b"\xc1\xc1", "corrupt message envelope"),                        # not msgpack
    (envelope({"a": 1}, [])[:-2], "incomplete input"),                # truncated
    (msgpack.packb([1, 2]), "corrupt message envelope"),              # not a map
    (msgpack.packb(7), "corrupt message envelope"),
    (msgpack.packb({"m": {}}), "corrupt message envelope"),           # no tensor list
    (b"\xdb\xff\xff\xff\xff", "incomplete input"),                    # a 4 GiB string, 5 bytes
    (b"\xdd\xff\xff\xff\xff", "exceeds max_array_len"),               # 2**32 items, 5 bytes
    (b"\x91" * 100_000 + b"\xc0", "corrupt message envelope"),        # nested 100k deep
    (pickle.dumps(Trap()), "corrupt message envelope"),               # pickle: refused
    ("a str, not bytes", "corrupt message envelope"),
    (envelope({}, [["object", [4], 0, 4]]), "corrupt tensor description"),     # unknown dtype
    (envelope({}, [["float32", [1000], 0, 4000]]), "corrupt tensor description"),  # past region
])
def test_data_plane_envelope_errors(data, match):
    with pytest.raises(WireError, match=match):
        decode_split(data, REGION)
    assert UNPICKLED == []


def test_data_plane_never_unpickles():
    trap = pickle.dumps(Trap())
    with pytest.raises(WireError):
        decode_split(trap, REGION)
    buf, _ = encode({"x": 1}, [torch.ones(100)])
    body = buf.clone()
    body[:len(trap)] = torch.frombuffer(bytearray(trap), dtype=torch.uint8)
    with pytest.raises(WireError):
        decode(body, len(trap))
    # a msgpack extension carrying a pickle arrives as inert bytes (msgpack.ExtType)
    meta, _ = decode_split(msgpack.packb({"m": {"x": msgpack.ExtType(1, trap)}, "t": []}), REGION)
    assert isinstance(meta["x"], msgpack.ExtType) and UNPICKLED == []


def test_data_plane_wrong_envelope_length():
    buf, n = encode({"a": 1}, [torch.ones(3)])
    for bad in (0, n - 1, n + 5, 10**9):
        with pytest.raises(WireError):
            decode(buf, bad)
    assert decode(buf, n)[0] == {"a": 1}


@pytest.mark.parametrize("descs", [
    [5],                                       # not a list
    [["float32", [1]]],                        # too short
    7,                                         # tensor list not a list
    [["float32", [1000], 0, 8]],               # nbytes does not match the shape
    [["float32", [2], 1, 8]],                  # offset not aligned
    [["float32", [1], 0, 3]],                  # nbytes not a multiple of the item size
    [["float32", [-2], 0, 8]],                 # negative dimension
    [["float32", "ab", 0, 8]],                 # shape not a list
    [["float32", [2], "0", 8]],                # offset not an integer
    [[["float32"], [2], 0, 8]],                # dtype name not a string (unhashable)
    [[{"a": 1}, [2], 0, 8]],
])
def test_data_plane_bad_tensor_description(descs):
    with pytest.raises(WireError):
        decode_split(envelope({}, descs), REGION)


def test_data_plane_negative_offset():
    with pytest.raises(WireError):
        decode_split(envelope({}, [["float32", [2], -64, 8]]), REGION)


def test_nan_and_inf_in_tensors_travel_as_data():
    """Tensor contents are not judged by the codec: NaN and inf arrive bit for bit."""
    t = torch.tensor([math.nan, math.inf, -math.inf, 1.0])
    meta, (out,) = decode(*encode({"k": "v"}, [t]))
    assert meta == {"k": "v"} and torch.equal(out.view(torch.int32), t.view(torch.int32))


@pytest.mark.parametrize("meta", [{"a": object()}, {"a": {1, 2}}, [1, 2], {"t": torch.ones(1)}])
def test_data_plane_refuses_to_encode_non_plain_meta(meta):
    with pytest.raises(WireError):
        encode(meta, [])
