"""DistAttention without Ray: three engines in one process, the first borrowing blocks from
the other two, attention over the borrowed blocks computed on the lenders' pools. Greedy tokens
must equal Hugging Face `transformers` (local, borrowed, and split over three instances)."""

from concurrent.futures import Future

import pytest
import torch

from fabric.distattn import serve_partial
from fabric.engine import Engine
from fabric.model import load_model, save_checkpoint
from fabric.rmanager import BlockRef
from fabric.sequence import SamplingParams

transformers = pytest.importorskip("transformers")


class InProcessPartials:
    """Runs creditors' partials directly on their engines' pools, with the creditor side the
    actors use (`serve_partial`); only the transport between them is left out."""

    def __init__(self, engines: dict[int, Engine], home: int):
        self.engines, self.home = engines, home
        self.num_calls = 0
        self.creditors_used: set[int] = set()

    def submit(self, layer, jobs):
        fut = Future()
        out = {}
        for inst, job in jobs.items():
            eng, s = self.engines[inst], job.shard
            out[inst] = serve_partial(eng.rm, eng.kv, self.home, layer, job.q, job.k_new,
                                      job.v_new, s.write_slots, s.block_tables, s.kv_lens,
                                      s.cu_seqlens, s.is_decode, eng.scale)
            self.num_calls += 1
            self.creditors_used.add(inst)
        fut.set_result(out)
        return fut


def wire(engines: list[Engine], home: int = 0, chunk: int = 3):
    def borrow(n):
        refs = []
        for other in engines:
            if other.instance_id == home or len(refs) >= n:
                continue
            ids = other.rm.lend(home, min(n - len(refs), chunk, other.rm.lendable()))
            refs += [BlockRef(other.instance_id, b) for b in ids]
        return refs

    def release(creditor, ids):
        engines[creditor].rm.reclaim(home, ids)

    e = engines[home]
    e.rm.borrow_fn, e.rm.release_fn = borrow, release
    e.remote = InProcessPartials({x.instance_id: x for x in engines}, home)
    return e


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-moe"])
def model_and_hf(request, tmp_path_factory):
    model = load_model(request.param, seed=5)
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model, str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, hf


def hf_greedy(hf, prompt, n):
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("block_size,max_batch_tokens", [(8, 64), (5, 13)])
def test_borrowed_and_split_kv_matches_transformers(model_and_hf, block_size, max_batch_tokens):
    model, hf = model_and_hf
    engines = [Engine(model, kv_blocks=6, block_size=block_size, instance_id=i,
                      max_batch_tokens=max_batch_tokens) for i in range(3)]
    home = wire(engines)
    g = torch.Generator().manual_seed(block_size)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (70, 3, 11)]
    home.max_request_blocks = 6 * 3
    got = home.generate(prompts, SamplingParams(max_new_tokens=9, ignore_eos=True))
    for p, seq in zip(prompts, got):
        assert seq.output == hf_greedy(hf, p, 9), f"prompt of {len(p)} tokens diverged"
    assert home.rm.num_borrow_events > 0
    assert home.remote.num_calls > 0
    assert home.remote.creditors_used == {1, 2}, "the long request should span all three"
    home.rm.release_spares()
    for e in engines:
        e.rm.check_integrity()
        assert e.rm.num_free == 6 and e.rm.num_lent == 0, "blocks leaked"


def test_merge_split_equals_local(model_and_hf):
    """The same request with all KV local and with KV split gives the same logits path."""
    model, _ = model_and_hf
    prompt = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    local = Engine(model, kv_blocks=64, block_size=4)
    a = local.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].output
    engines = [Engine(model, kv_blocks=6, block_size=4, instance_id=i) for i in range(3)]
    home = wire(engines, chunk=2)                  # 56 tokens = 14 blocks: 6 home + 8 borrowed
    home.max_request_blocks = 16
    b = home.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].output
    assert a == b
    assert home.remote.creditors_used == {1, 2}
