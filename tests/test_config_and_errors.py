"""Config validation names the field; bad checkpoints and bad requests get clear errors."""

import json

import pytest
import torch

from fabric import CapacityError, ConfigError, FabricConfig, RequestError, load_config
from fabric.engine import Engine
from fabric.model import load_model, save_checkpoint
from fabric.sequence import SamplingParams


def test_defaults_and_yaml(tmp_path):
    cfg = load_config(None)
    assert cfg.instances.count == 2 and cfg.model.preset == "tiny-llama"
    path = tmp_path / "f.yaml"
    path.write_text("model: {preset: tiny-moe, seed: 3}\ninstances: {count: 3, kv_blocks: 9}\n")
    cfg = load_config(str(path))
    assert (cfg.model.preset, cfg.model.seed, cfg.instances.count, cfg.instances.kv_blocks) == \
        ("tiny-moe", 3, 3, 9)
    assert load_config(cfg) == cfg and isinstance(cfg, FabricConfig)


@pytest.mark.parametrize("config,field", [
    ({"instances": {"kv_blocks": 0}}, "instances.kv_blocks"),
    ({"instances": {"block_size": -4}}, "instances.block_size"),
    ({"instances": {"count": "3"}}, "instances.count"),
    ({"instances": {"count": True}}, "instances.count"),
    ({"instances": {"device": "tpu"}}, "instances.device"),
    ({"instances": {"kv_blockz": 3}}, "instances.kv_blockz"),
    ({"modle": {}}, "modle"),
    ({"model": {"preset": "gpt-5"}}, "model.preset"),
    ({"model": {"dtype": "int8"}}, "model.dtype"),
    ({"model": {"path": "/nonexistent/dir"}}, "model.path"),
    ({"lending": {"enabled": "yes"}}, "lending.enabled"),
    ({"lending": {"max_lend_fraction": 1.5}}, "lending.max_lend_fraction"),
    ({"transport": {"backend": "carrier-pigeon"}}, "transport.backend"),
    ({"autoscale": {"min_replicas": 3, "max_replicas": 2}}, "autoscale.max_replicas"),
    ({"instances": [1, 2]}, "instances"),
])
def test_bad_config_names_the_field(config, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(config)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(load_model("tiny-llama", seed=1), str(path))
    return path


def test_unsupported_architecture(checkpoint, tmp_path):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="LlamaForCausalLM, MixtralForCausalLM"):
        load_model(None, path=str(tmp_path))


def test_missing_and_misshaped_tensors(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    state = load_file(str(checkpoint / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in state.items() if k != name}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="missing tensor.*k_proj"):
        load_model(None, path=str(tmp_path))
    state[name] = torch.randn(3, 5)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"k_proj.*shape \(3, 5\)"):
        load_model(None, path=str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="model.safetensors"):
        load_model(None, path=str(tmp_path))


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "empty"),
    ([1, 320], SamplingParams(), "outside the vocabulary"),
    ([1, -1], SamplingParams(), "outside the vocabulary"),
    ([1, "a"], SamplingParams(), "not an integer"),
    ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([1, 2], SamplingParams(max_new_tokens=5000), "maximum position"),
    ([1, 2], SamplingParams(temperature=-1.0), "temperature"),
])
def test_bad_requests_fail_alone(prompt, params, match):
    engine = Engine(load_model("tiny-llama"), kv_blocks=16, block_size=8)
    good = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=3))
    with pytest.raises(RequestError, match=match):
        engine.add_request(prompt, params)
    with pytest.raises(CapacityError):
        engine.add_request(list(range(200)), SamplingParams(max_new_tokens=8))
    done = []
    while engine.has_unfinished():
        done += engine.step()[1]
    assert [s.req_id for s in done] == [good] and len(done[0].output) == 3


def test_request_times_count_from_its_arrival():
    """An instance passes when a request reached it: what happened before admission (a prefix
    fetched from a peer, a tier lookup, the inbox) counts in ttft_s and queued_s."""
    import time

    engine = Engine(load_model("tiny-llama"), kv_blocks=16, block_size=8)
    early = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=3),
                               arrival=time.perf_counter() - 2.0, prefix_fetch_s=1.5)
    now = engine.add_request([8, 9], SamplingParams(max_new_tokens=3))
    done = {}
    while engine.has_unfinished():
        done.update((s.req_id, s.metrics()) for s in engine.step()[1])
    m, n = done[early], done[now]
    assert m["latency_s"] >= m["ttft_s"] >= m["queued_s"] >= 2.0 and m["prefix_fetch_s"] == 1.5
    assert n["ttft_s"] >= n["queued_s"] >= 0 and n["prefix_fetch_s"] == 0.0
    assert m["ttft_s"] - n["ttft_s"] >= 2.0 - 1e-6       # same first step, 2 s earlier
