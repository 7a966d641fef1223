"""Stopping and text: incremental detokenization (whole characters, one short window per
token), stop strings (cut from the text, never streamed), stop token ids, top-k / top-p, and
the same through an embedded fabric (generate, streamed text, chat errors)."""

import random

import pytest
import torch

from fabric.detokenize import Detokenizer
from fabric.engine import check_request
from fabric.errors import RequestError
from fabric.sampling import filter_probs
from fabric.sequence import SamplingParams
from fabric.tokenizer import ByteTokenizer

TOK = ByteTokenizer(320)
TEXT = "naïve café — ✓ 日本語 ok, done. ünïcödé!"


class CountingTokenizer(ByteTokenizer):
    """Counts the token ids it decodes: incremental decoding must not grow with the output."""

    def __init__(self):
        super().__init__(320)
        self.decoded: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.decoded.append(len(ids))
        return super().decode(ids)


def run(det: Detokenizer, prompt: list[int], output: list[int]) -> tuple[list[str], bool]:
    tokens, deltas, stopped = list(prompt), [], False
    for tok in output:
        tokens.append(tok)
        stopped = det.step(tokens)
        deltas.append(det.take_delta(stopped or len(tokens) == len(prompt) + len(output)))
        if stopped:
            break
    return deltas, stopped


def test_incremental_text_is_whole_characters_and_the_full_text():
    prompt = TOK.encode("Q: ")
    output = list(TEXT.encode("utf-8"))                 # multi-byte characters split over tokens
    det = Detokenizer(TOK, len(prompt))
    deltas, stopped = run(det, prompt, output)
    assert not stopped
    assert "".join(deltas) == TEXT == det.text
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) < len(output)     # some tokens carried half a character


def test_token_view_slices_like_the_token_list_and_detokenizes_the_same():
    """`Sequence.token_view` (what the engine hands the detokenizer) slices as prompt + output
    would, and the text it gives, stop string and all, is the list's."""
    from fabric.sequence import Sequence

    rng = random.Random(7)
    prompt = TOK.encode("Q: tell me ")
    output = list("naïve, done. ok".encode("utf-8"))
    seq = Sequence("r", list(prompt), SamplingParams(max_new_tokens=len(output)))
    by_view = Detokenizer(TOK, len(prompt), (", done",))
    by_list = Detokenizer(TOK, len(prompt), (", done",))
    for tok in output:
        seq.output.append(tok)
        view, full = seq.token_view, seq.tokens
        assert len(view) == len(full)
        for _ in range(5):
            a, b = rng.randrange(-3, len(full) + 3), rng.randrange(-3, len(full) + 3)
            assert view[a:b] == full[a:b] and view[a:] == full[a:] and view[:b] == full[:b]
        assert by_view.step(view) == by_list.step(full)
        assert by_view.take_delta() == by_list.take_delta()
    assert by_view.text == by_list.text == "naïve" and by_view.stopped
    with pytest.raises(ValueError):
        seq.token_view[::2]


def test_each_token_decodes_a_short_window():
    tok = CountingTokenizer()
    prompt = tok.encode("x" * 50)
    output = list(("abcé" * 100).encode("utf-8"))
    run(Detokenizer(tok, len(prompt)), prompt, output)
    assert max(tok.decoded) <= 12, "a window, not the whole output"


@pytest.mark.parametrize("stop", [[", done"], ["日本"], ["zzz", "é —"], ["!"]])
def test_stop_string_is_cut_and_never_streamed(stop):
    prompt = TOK.encode("Q: ")
    output = list(TEXT.encode("utf-8"))
    det = Detokenizer(TOK, len(prompt), tuple(stop))
    deltas, stopped = run(det, prompt, output)
    first = min(TEXT.find(s) for s in stop if s in TEXT)
    assert stopped and det.text == TEXT[:first]
    assert "".join(deltas) == TEXT[:first]               # nothing shown that was cut later


def test_stop_string_absent_leaves_all_text():
    prompt = TOK.encode("Q: ")
    output = list(TEXT.encode("utf-8"))
    det = Detokenizer(TOK, len(prompt), ("never here",))
    deltas, stopped = run(det, prompt, output)
    assert not stopped and "".join(deltas) == TEXT


def test_detokenizer_state_survives_a_handoff():
    prompt, output = TOK.encode("Q: "), list(TEXT.encode("utf-8"))
    a = Detokenizer(TOK, len(prompt), (", done",))
    tokens = list(prompt)
    for tok in output[:9]:
        tokens.append(tok)
        a.step(tokens)
    shown = a.take_delta()
    b = Detokenizer(TOK, len(prompt), (", done",))
    b.restore(a.state())
    for tok in output[9:]:
        tokens.append(tok)
        if b.step(tokens):
            break
    assert shown + b.take_delta(True) == TEXT[:TEXT.find(", done")]


def test_top_k_and_top_p_keep_the_right_tokens():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(50, generator=g, dtype=torch.float64) * 3, dim=0)
    order = probs.argsort(descending=True)
    k = filter_probs(probs, top_k=5, top_p=1.0)
    assert set(k.nonzero().flatten().tolist()) == set(order[:5].tolist())
    p = filter_probs(probs, top_k=0, top_p=0.6)
    kept = p.nonzero().flatten()
    mass = probs[order].cumsum(0)
    n = int((mass < 0.6).sum()) + 1                      # the smallest prefix reaching 0.6
    assert set(kept.tolist()) == set(order[:n].tolist())
    both = filter_probs(probs, top_k=3, top_p=0.01)
    assert both.nonzero().flatten().tolist() == [int(order[0])]     # the top token stays
    assert torch.equal(filter_probs(probs, 0, 1.0), probs)


@pytest.mark.parametrize("params, what", [
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(top_k=-3), "top_k"),
    (SamplingParams(top_k=2.5), "top_k"),
    (SamplingParams(stop=("",)), "stop strings"),
    (SamplingParams(stop=(5,)), "stop strings"),
    (SamplingParams(stop=("x",) * 17), "at most 16"),
    (SamplingParams(stop_token_ids=(320,)), "stop token id"),
    (SamplingParams(stop_token_ids=("a",)), "stop token id"),
])
def test_bad_filters_are_request_errors(params, what):
    with pytest.raises(RequestError, match=what):
        check_request([1, 2, 3], params, 320, 4096)


def test_from_request_takes_a_single_stop_string():
    p = SamplingParams.from_request({"stop": "\n\n", "stop_token_ids": 7})
    assert p.stop == ("\n\n",) and p.stop_token_ids == (7,)
    assert SamplingParams.from_request(p.to_request()) == p


# ---- through a fabric ------------------------------------------------------------------------
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def fab():
    import fabric

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    f = fabric.start({"instances": {"count": 1, "kv_blocks": 32, "block_size": 8}})
    yield f
    f.shutdown()
    ray.shutdown()


def printable_stop(text: str) -> str | None:
    """A 2-character piece of `text`, past its start, free of replacement characters."""
    for i in range(4, len(text) - 2):
        piece = text[i:i + 2]
        if "\ufffd" not in piece and piece not in text[:i]:
            return piece
    return None


def test_stop_strings_and_ids_through_the_fabric(fab):
    rng = random.Random(5)
    prompt = [rng.randrange(0, 256) for _ in range(20)]
    (ref,) = fab.generate([prompt], max_new_tokens=40, ignore_eos=True)
    assert ref.finish_reason == "length" and len(ref.tokens) == 40
    stop_tok = ref.tokens[6]
    (by_id,) = fab.generate([prompt], max_new_tokens=40, ignore_eos=True,
                            stop_token_ids=[stop_tok])
    assert by_id.finish_reason == "stop"
    assert by_id.tokens == ref.tokens[:ref.tokens.index(stop_tok) + 1]
    stop = printable_stop(ref.text)
    assert stop is not None, ref.text
    (by_text,) = fab.generate([prompt], max_new_tokens=40, ignore_eos=True, stop=[stop])
    assert by_text.finish_reason == "stop"
    assert by_text.text == ref.text[:ref.text.find(stop)]
    assert len(by_text.tokens) < 40
    streamed = list(fab.stream(prompt, max_new_tokens=40, ignore_eos=True, stop=stop,
                               output="text"))
    assert "".join(streamed) == by_text.text
    events = list(fab.stream(prompt, max_new_tokens=40, ignore_eos=True, output="events"))
    assert [e["token"] for e in events[:-1]] == ref.tokens
    assert events[-1]["finish_reason"] == "length" and events[-1]["text"] == ref.text
    assert "".join(e["text"] for e in events[:-1]) == ref.text


def test_chat_without_a_template_and_bad_settings_fail_alone(fab):
    import fabric

    with pytest.raises(fabric.RequestError, match="no chat template"):
        fab.chat([[{"role": "user", "content": "hi"}]])
    with pytest.raises(fabric.RequestError, match="unknown setting"):
        fab.generate([[1, 2]], top_q=0.5)
    res = fab.generate([[1, 2, 3], [4, 5]], max_new_tokens=4, errors="return", top_p=0.0)
    assert all(r.error_type == "RequestError" and "top_p" in r.error for r in res)
    (ok,) = fab.generate([[1, 2, 3]], max_new_tokens=4, temperature=0.8, top_k=5, top_p=0.9,
                         seed=3)
    (again,) = fab.generate([[1, 2, 3]], max_new_tokens=4, temperature=0.8, top_k=5, top_p=0.9,
                            seed=3)
    assert ok.tokens == again.tokens and len(ok.tokens) >= 1
