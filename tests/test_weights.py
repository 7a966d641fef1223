"""Publishing weights into Ray's object store and mapping them zero-copy: the mapped model is the
same model (same logits), its tensors lie in shared memory, tied weights are stored once, and
bfloat16 survives the trip. Plus the `autoscale:` config checks."""

import pytest
import torch

from autoscale.weights import all_shared, from_numpy, group_of, split_state, to_numpy
from fabric.config import load_config
from fabric.errors import ConfigError
from fabric.model.args import PRESETS
from fabric.model.checkpoint import build_model, random_state_dict

ray = pytest.importorskip("ray")


def test_groups_and_aliases():
    args = PRESETS["tiny-moe"]
    state = random_state_dict(args, seed=3)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]          # tie them
    groups, aliases = split_state(state, "float32")
    assert aliases == {"model.embed_tokens.weight": "lm_head.weight"} or \
        aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    experts = [k for k in groups if k != "dense"]
    assert sorted(experts) == [(l, e) for l in range(args.num_layers) for e in range(args.num_experts)]
    assert group_of("model.layers.1.block_sparse_moe.experts.3.w2.weight") == (1, 3)
    assert group_of("model.layers.1.block_sparse_moe.gate.weight") == "dense"
    names = {n for g in groups.values() for n in g} | set(aliases)
    assert names == set(state)


def test_bfloat16_round_trip_is_exact():
    t = torch.randn(7, 5).to(torch.bfloat16)
    back = from_numpy(to_numpy(t), "bfloat16")
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)


def test_mapped_model_equals_loaded_model_and_is_shared():
    from autoscale.weights import WeightStore, map_weights

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        store = ray.remote(WeightStore).remote({"preset": "tiny-moe", "path": None,
                                                "dtype": "float32", "seed": 5})
        cost = ray.get(store.load.remote())
        assert cost["bytes_loaded_from_disk"] == 0
        manifest = ray.get(store.manifest.remote())

        @ray.remote
        def logits_of_mapped(manifest, ids):
            from autoscale.weights import all_shared, map_weights
            from fabric.model.checkpoint import build_model

            state, nbytes = map_weights(manifest)
            model = build_model(manifest["args"], state)
            shared = all_shared(list(model.parameters()))
            with torch.no_grad():
                emb = model.model.embed_tokens(ids)
            return shared, nbytes, emb, float(next(model.parameters()).detach().sum())

        ids = torch.randint(0, 300, (9,))
        shared, nbytes, emb, first_sum = ray.get(logits_of_mapped.remote(manifest, ids))
        reference = build_model(PRESETS["tiny-moe"], random_state_dict(PRESETS["tiny-moe"], 5))
        assert shared is True
        assert nbytes == sum(p.numel() * 4 for p in reference.parameters())
        assert torch.equal(emb, reference.model.embed_tokens(ids).detach())
        assert first_sum == pytest.approx(float(next(reference.parameters()).detach().sum()), rel=1e-6)
        state, _ = map_weights(manifest)                 # the driver maps the same pages
        assert all_shared(list(state.values())) and not all_shared([torch.randn(3)])
        dense = ray.get(manifest["refs"]["dense"])
        assert not any(a.flags.writeable for a in dense.values())     # read-only for everyone
    finally:
        ray.shutdown()


@pytest.mark.parametrize("section, field", [
    ({"max_replicas": 1}, "instances.count"),                 # count 2 > max 1
    ({"max_replicas": 0}, "autoscale.max_replicas"),
    ({"min_replicas": 0}, "autoscale.min_replicas"),
    ({"max_replicas": 4, "initial_replicas": 5}, "autoscale.initial_replicas"),
    ({"interval_s": 0}, "autoscale.interval_s"),
    ({"scale_timeout_s": -1}, "autoscale.scale_timeout_s"),
    ({"ttft_slo_s": 0}, "autoscale.ttft_slo_s"),
    ({"kv_utilization_low": 0.9, "kv_utilization_high": 0.5}, "autoscale.kv_utilization_low"),
    ({"upscale_delay_s": -1}, "autoscale.upscale_delay_s"),
    ({"target_ongoing_requests": 0}, "autoscale.target_ongoing_requests"),
    ({"max_replica": 3}, "autoscale.max_replica"),
])
def test_bad_autoscale_config_names_the_field(section, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config({"autoscale": section})


def test_autoscale_defaults_and_initial_replicas():
    cfg = load_config(None)
    assert not cfg.autoscale.enabled and cfg.initial_replicas == cfg.instances.count
    cfg = load_config({"autoscale": {"max_replicas": 4, "initial_replicas": 3}})
    assert cfg.autoscale.enabled and cfg.initial_replicas == 3
