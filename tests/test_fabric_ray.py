"""The fabric on a real 3-node Ray cluster (`ray.cluster_utils.Cluster`): a request whose KV
spans three instances gives exactly the tokens of Hugging Face `transformers`."""

import time

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
from ray.cluster_utils import Cluster  # noqa: E402

import fabric  # noqa: E402
from fabric.model import load_model, save_checkpoint  # noqa: E402

BLOCKS, BLOCK = 8, 8          # 64 tokens of KV per instance


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    for _ in range(3):
        c.add_node(num_cpus=2)
    ray.init(address=c.address, namespace="kv-fabric")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-moe"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_checkpoint(load_model(request.param, seed=7), str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return str(path), hf


def config(path: str, backend: str = "torch", **instances) -> dict:
    return {"model": {"path": path},
            "instances": {"count": 3, "kv_blocks": BLOCKS, "block_size": BLOCK,
                          "max_batch_tokens": 64, **instances},
            "transport": {"backend": backend}}


def all_blocks_home(fab, timeout_s: float = 60.0) -> bool:
    """Borrowed spares go back to their lenders shortly after the requests finish."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        inst = fab.stats()["instances"]
        if all(s["blocks_free"] == s["blocks_total"] for s in inst):
            return True
        time.sleep(0.1)
    return False


def hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompt_of(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("backend", ["torch", "ray"])
def test_request_spanning_three_instances_matches_transformers(cluster, checkpoint, backend):
    path, hf = checkpoint
    prompt = prompt_of(1, 140)                     # 140 + 12 tokens = 19 blocks > 8 per instance
    with fabric.start(config(path, backend)) as fab:
        nodes = {s["node"] for s in fab.stats()["instances"]}
        assert len(nodes) == 3, "instances should spread over the three nodes"
        (res,) = fab.generate([prompt], max_new_tokens=12, ignore_eos=True)
        stats = fab.stats()
        assert all_blocks_home(fab), "blocks leaked"
    assert res.tokens == hf_greedy(hf, prompt, 12)
    lenders = [s for s in stats["instances"] if s["detail"]["remote_partials_served"] > 0]
    assert len(lenders) == 2, "the KV should have come from both other instances"
    assert stats["lending"]["borrow_events"] >= 1


def test_mixed_concurrent_requests_capacity_and_bad_input(cluster, checkpoint):
    path, hf = checkpoint
    with fabric.start(config(path)) as fab:
        prompts = [prompt_of(10 + i, n) for i, n in enumerate([90, 5, 33, 60, 17, 48, 2])]
        results = fab.generate(prompts, max_new_tokens=10, ignore_eos=True)
        for p, r in zip(prompts, results):
            assert r.tokens == hf_greedy(hf, p, 10)

        steps = [s["detail"]["num_steps"] for s in fab.stats()["instances"]]
        with pytest.raises(fabric.CapacityError):
            fab.generate([prompt_of(2, 3 * BLOCKS * BLOCK)], max_new_tokens=8)
        assert [s["detail"]["num_steps"] for s in fab.stats()["instances"]] == steps, \
            "CapacityError must come at admission, before any instance works on it"
        for bad, what in [([], "empty"), ([1, 99999], "vocabulary")]:
            with pytest.raises(fabric.RequestError, match=what):
                fab.generate([bad], max_new_tokens=4)
        with pytest.raises(fabric.RequestError, match="max_new_tokens"):
            fab.generate([[1, 2]], max_new_tokens=0)

        mixed = fab.generate([prompts[1], [], prompts[4], [7, 100000]], max_new_tokens=10,
                             ignore_eos=True, errors="return")
        assert [r.error_type for r in mixed] == [None, "RequestError", None, "RequestError"]
        assert mixed[0].tokens == results[1].tokens and mixed[2].tokens == results[4].tokens
        assert "vocabulary" in mixed[3].error
        with pytest.raises(fabric.RequestError, match="appears twice"):
            fab.submit([{"id": "x", "prompt": [1, 2]}, {"id": "x", "prompt": [3]}])

        again = fab.generate(prompts[:2], max_new_tokens=10, ignore_eos=True)
        assert [r.tokens for r in again] == [r.tokens for r in results[:2]]
        assert all_blocks_home(fab)
