"""The whole model against Hugging Face transformers with the same random weights.

Greedy tokens must be identical: KV in the paged pool, prefill in one piece or in chunks,
batches of requests of different lengths, block sizes that do not divide the prompt.
"""

import pytest
import torch

from fabric.engine import Engine
from fabric.model import load_model, save_checkpoint
from fabric.model.linear import onednn_works
from fabric.sequence import SamplingParams

transformers = pytest.importorskip("transformers")


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-moe"])
def models(request, tmp_path_factory):
    ours = load_model(request.param, seed=11, dtype="float32")
    path = tmp_path_factory.mktemp(request.param)
    save_checkpoint(ours, str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    reloaded = load_model(None, path=str(path), dtype="float32")
    # the default kernel: oneDNN with packed weights where it runs, so that is what is compared
    assert reloaded.linear_kernel == ("onednn" if onednn_works(torch.float32) else "torch")
    return ours, reloaded, hf, path


def random_prompts(seed: int, lengths: list[int], vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("block_size,max_batch_tokens", [(16, 256), (5, 7), (1, 64)])
def test_greedy_matches_transformers(models, block_size, max_batch_tokens):
    _, ours, hf, _ = models
    prompts = random_prompts(block_size, [1, 9, 23, 40])
    engine = Engine(ours, kv_blocks=200, block_size=block_size, max_batch_tokens=max_batch_tokens)
    got = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for p, seq in zip(prompts, got):
        assert seq.output == hf_greedy(hf, p, 12), f"prompt of {len(p)} tokens diverged"
    engine.rm.check_integrity()
    assert engine.rm.num_free == 200


def test_greedy_matches_transformers_with_torch_linears(models):
    """`model.linear_kernel: torch` (F.linear on the weights as stored) gives the same tokens."""
    _, _, hf, path = models
    plain = load_model(None, path=str(path), dtype="float32", linear_kernel="torch")
    assert plain.linear_kernel == "torch"
    prompts = random_prompts(21, [5, 30])
    got = Engine(plain, kv_blocks=64, block_size=8).generate(
        prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for p, seq in zip(prompts, got):
        assert seq.output == hf_greedy(hf, p, 12), f"prompt of {len(p)} tokens diverged"


def test_preset_and_its_checkpoint_agree(models):
    ours, reloaded, _, _ = models
    prompts = random_prompts(3, [17])
    a = Engine(ours, 32, 8).generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    b = Engine(reloaded, 32, 8).generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert a[0].output == b[0].output


def test_preemption_recomputes_identically(models):
    _, ours, hf, _ = models
    prompts = random_prompts(5, [30, 30, 30])
    # 3 requests x 6 blocks at the end, only 12 blocks: someone is preempted and recomputed.
    engine = Engine(ours, kv_blocks=12, block_size=8, max_batch_tokens=64)
    got = engine.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert sum(s.num_preemptions for s in got) > 0
    for p, seq in zip(prompts, got):
        assert seq.output == hf_greedy(hf, p, 16)
    assert engine.rm.num_free == 12


def test_seeded_temperature_is_reproducible(models):
    ours = models[0]
    prompts = random_prompts(9, [12, 12])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    a = Engine(ours, 32, 8).generate(prompts, params)
    b = Engine(ours, 32, 8).generate(prompts, params)
    assert [s.output for s in a] == [s.output for s in b]
    greedy = Engine(ours, 32, 8).generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert [s.output for s in a] != [s.output for s in greedy]
