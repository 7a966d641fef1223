"""Linear layers through oneDNN with packed weights (fabric/model/linear.py) against F.linear,
and the fall-backs: a weight changed after packing, a model cast to another dtype, the
`model.linear_kernel` choices."""

import pytest
import torch
import torch.nn.functional as F

from fabric.config import load_config
from fabric.errors import ConfigError
from fabric.model import load_model
from fabric.model.linear import Linear, bucket_rows, onednn_works, pack_linears

needs_onednn = pytest.mark.skipif(not onednn_works(torch.float32),
                                  reason="torch's oneDNN cannot run packed linears here")


def packed_layer(out_f: int, in_f: int, bias: bool, dtype, seed: int) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g).to(dtype))
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=g).to(dtype))
    assert pack_linears(layer, True) == out_f * in_f * layer.weight.element_size()
    return layer


@needs_onednn
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("rows", [1, 7, 33, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(dtype, tol, rows, bias):
    if not onednn_works(dtype):
        pytest.skip(f"no packed {dtype} here")
    layer = packed_layer(96, 80, bias, dtype, seed=rows)
    x = torch.randn(rows, 80, generator=torch.Generator().manual_seed(100 + rows)).to(dtype)
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert layer.packed is not None
    assert got.dtype == dtype and got.shape == (rows, 96)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_row_buckets_bound_the_shapes_onednn_meets():
    buckets = {bucket_rows(n) for n in range(1, 4097)}
    assert all(bucket_rows(n) >= n for n in range(1, 4097))
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 64, 65, 130, 512, 513, 4095)] == \
        [1, 2, 4, 8, 64, 128, 192, 512, 768, 4096]
    assert len(buckets) == 28


@needs_onednn
def test_padded_rows_and_other_shapes_give_f_linear_values():
    layer = packed_layer(40, 24, True, torch.float32, seed=9)
    g = torch.Generator().manual_seed(10)
    for shape in ((3, 24), (65, 24), (2, 5, 24)):            # padded to 4, 128; 3-d input
        x = torch.randn(*shape, generator=g)
        got = layer(x)
        assert got.shape == (*shape[:-1], 40)
        torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-4, atol=1e-4)


@needs_onednn
def test_the_packed_copy_is_what_runs():
    layer = packed_layer(64, 48, False, torch.float32, seed=3)
    layer.packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(64, 48), None)  # a marker
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(4))
    assert layer(x).abs().max() == 0
    layer.packed = None
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


@needs_onednn
def test_a_weight_changed_after_packing_is_not_read_stale():
    layer = packed_layer(64, 48, True, torch.float32, seed=1)
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(2))
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(-2.0)                       # in place: a new version
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(layer(x), before)
    layer.weight = torch.nn.Parameter(torch.randn(64, 48))     # replaced: another storage
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_model_kernels_agree_and_a_cast_model_falls_back():
    fast = load_model("tiny-llama", seed=5)
    plain = load_model("tiny-llama", seed=5, linear_kernel="torch")
    assert fast.linear_kernel == "onednn" and fast.packed_bytes > 0
    assert plain.linear_kernel == "torch" and plain.packed_bytes == 0
    assert fast.model.layers[0].mlp.up_proj.packed is not None
    assert plain.model.layers[0].mlp.up_proj.packed is None
    ids = torch.randint(0, fast.args.vocab_size, (11,), generator=torch.Generator().manual_seed(6))
    pos = torch.arange(11)

    def attn(layer, q, k, v):          # causal attention over these 11 tokens alone
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True)
        return out.transpose(0, 1)

    a, b = fast.logits(fast(ids, pos, attn)), plain.logits(plain(ids, pos, attn))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    wide = fast.double()                  # the packed float32 copies no longer match
    c = wide.logits(wide(ids, pos, attn))
    assert c.dtype == torch.float32
    torch.testing.assert_close(c, b, rtol=1e-3, atol=1e-3)


def test_linear_kernel_config():
    assert load_config({}).model.linear_kernel == "auto"
    with pytest.raises(ConfigError, match=r"model\.linear_kernel must be one of"):
        load_config({"model": {"linear_kernel": "mkl"}})
    with pytest.raises(ConfigError, match=r"model\.linear_kernel: 'onednn' needs the CPU and "
                                          r"float32 or bfloat16"):
        load_model("tiny-llama", dtype="float64", linear_kernel="onednn")
    assert load_model("tiny-llama", dtype="float64").linear_kernel == "torch"   # auto


@needs_onednn
def test_packing_a_few_weights_at_a_time():
    """`pack=False` leaves the packing to `pack_some`, as an instance's engine thread does it
    between steps: the model serves meanwhile, each layer from its packed copy once made."""
    model = load_model("tiny-llama", seed=7, pack=False)
    total = model.left_to_pack
    assert total == 1 + 7 * model.args.num_layers          # the lm_head and 7 per layer
    assert model.linear_kernel == "torch" and model.packed_bytes == 0
    assert model.pack_some(0.0) is False                   # at least one, even with no time
    assert model.left_to_pack == total - 1 and model.head_packed is not None
    while not model.pack_some(0.0):
        pass
    assert model.linear_kernel == "onednn" and model.left_to_pack == 0
    assert model.packed_bytes == load_model("tiny-llama", seed=7).packed_bytes
    plain = load_model("tiny-llama", seed=7, linear_kernel="torch", pack=False)
    assert plain.left_to_pack == 0 and plain.pack_some(1.0)
