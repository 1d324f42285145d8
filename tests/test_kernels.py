import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moxin import kernels
from moxin.generate import generate
from moxin.losses import linear_cross_entropy
from moxin.model import ModelConfig, Transformer

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def restore_switch():
    before = kernels.onednn_enabled()
    yield
    kernels.use_onednn_on_cpu(before)


@pytest.mark.parametrize("out_features", [80, 48 * 70])  # the second: an LM-head shape (MKL weight gradient)
def test_onednn_linear_matches_nn_linear_forward_and_backward(out_features):
    torch.manual_seed(0)
    plain = nn.Linear(48, out_features, bias=False)
    fast = copy.deepcopy(plain)
    assert kernels.use_onednn_linears(fast) == 1 and type(fast) is kernels.OneDNNLinear
    x1 = torch.randn(3, 7, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = plain(x1), fast(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)


def test_switching_keeps_parameters_and_the_context_switches_back():
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                                    hidden_dim=64))
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    with kernels.onednn_linears(model):
        assert sum(type(m) is kernels.OneDNNLinear for m in model.modules()) == 2 * 4 + 1  # 4 per block + head
        assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    assert not any(type(m) is kernels.OneDNNLinear for m in model.modules())


def test_onednn_is_really_used_when_switched_on(monkeypatch):
    calls = []
    real = kernels._onednn_mm
    monkeypatch.setattr(kernels, "_onednn_mm", lambda a, b: calls.append(1) or real(a, b))
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                                    hidden_dim=64, max_seq_len=32))
    generate(model, [[1, 2, 3]], max_new_tokens=3)
    assert calls == []  # switched off: PyTorch's default kernels
    kernels.use_onednn_on_cpu(True)
    generate(model, [[1, 2, 3]], max_new_tokens=3)
    assert len(calls) >= 3 * 5  # 4 products per block + the head, per forward
    with torch.autocast("cpu", dtype=torch.bfloat16), kernels.onednn_linears(model):
        assert model.output(torch.randn(2, 32)).dtype == torch.bfloat16  # autocast's rules still hold


def test_no_double_backward_through_onednn():
    layer = nn.Linear(8, 4, bias=False)
    kernels.use_onednn_linears(layer)
    x = torch.randn(3, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_chunked_loss_and_generation_agree_with_and_without_onednn():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                    hidden_dim=64, sliding_window=8, max_seq_len=128)).eval()
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    labels = torch.randint(0, 300, (2, 9))
    results = []
    for enabled in (False, True):
        kernels.use_onednn_on_cpu(enabled)
        loss = linear_cross_entropy(hidden, model.output.weight, labels, chunk_size=5)
        (grad,) = torch.autograd.grad(loss, hidden)
        tokens = generate(model, [[1, 5, 7], [1, 9]], max_new_tokens=20).tokens
        results.append((loss, grad, tokens))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
    assert results[1][2] == results[0][2]
    assert not any(type(m) is kernels.OneDNNLinear for m in model.modules())  # generate switched back


def small_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    settings = dict(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                    sliding_window=8, max_seq_len=128) | overrides
    return Transformer(ModelConfig(**settings)).eval()


def linears(model) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_packed_weights_give_the_same_products_and_are_freed_on_exit():
    model = small_model()
    with torch.no_grad(), kernels.onednn_linears(model, pack=True):
        assert all(layer.packed is not None and layer.packed.source is layer.weight for layer in linears(model))
        for layer in linears(model):
            for rows in [(1,), (8,), (2, 5)]:  # decode steps and a prefill
                x = torch.randn(*rows, layer.in_features)
                torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
    assert not any("packed" in vars(layer) for layer in linears(model))
    assert not any(type(m) is kernels.OneDNNLinear for m in model.modules())


def test_an_updated_or_replaced_weight_is_read_not_its_stale_packed_copy():
    model = small_model()
    x = torch.randn(2, 32)
    layer = model.layers[0].attention.wqkv
    with torch.no_grad(), kernels.onednn_linears(model, pack=True):
        layer.weight.mul_(2)  # in place: the version counter moves
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        layer.weight = nn.Parameter(torch.randn_like(layer.weight))  # a new tensor
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)


def test_generate_packs_once_per_call_and_not_inside_an_enclosing_packed_block(monkeypatch):
    packs, products = [], []
    real_pack, real_mm = kernels.pack_weight, kernels._onednn_mm
    monkeypatch.setattr(kernels, "pack_weight", lambda w: packs.append(real_pack(w)) or packs[-1])
    monkeypatch.setattr(kernels, "_onednn_mm", lambda a, b: products.append(b) or real_mm(a, b))
    model = small_model()
    prompts = [[1, 5, 7], [1, 9]]
    plain = generate(model, prompts, max_new_tokens=40).tokens  # oneDNN off: nothing packed
    assert packs == []
    kernels.use_onednn_on_cpu(True)
    generate(model, prompts, max_new_tokens=8)  # too few steps to repay packing
    assert packs == []
    products.clear()
    assert generate(model, prompts, max_new_tokens=40).tokens == plain
    assert len(packs) == len(linears(model)) == 2 * 4 + 1
    assert all(any(b is p for p in packs) for b in products)  # every product read a packed weight
    with torch.no_grad(), kernels.onednn_linears(model, pack=True):
        assert len(packs) == 2 * (2 * 4 + 1)
        assert generate(model, prompts, max_new_tokens=40).tokens == plain
        assert len(packs) == 2 * (2 * 4 + 1)  # the enclosing block's copies served
        assert all(layer.packed is not None for layer in linears(model))  # and outlived generate's block


def test_generate_does_not_pack_without_memory_for_a_second_copy(monkeypatch):
    import moxin.generate

    model = small_model()
    weight_bytes = sum(p.nbytes for p in model.parameters())
    assert moxin.generate.worth_packing(model, 256)
    assert not moxin.generate.worth_packing(model, moxin.generate.PACK_FROM_NEW_TOKENS - 1)
    monkeypatch.setattr(moxin.generate, "available_memory_bytes", lambda: 2 * weight_bytes - 1)
    assert not moxin.generate.worth_packing(model, 256)


def test_weights_made_under_inference_mode_are_not_packed_and_still_decode():
    with torch.inference_mode():  # inference tensors keep no version counter
        model = small_model()
    kernels.use_onednn_on_cpu(True)
    tokens = generate(model, [[1, 5, 7]], max_new_tokens=40).tokens
    kernels.use_onednn_on_cpu(False)
    assert tokens == generate(model, [[1, 5, 7]], max_new_tokens=40).tokens
