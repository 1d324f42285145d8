import math

import pytest
import torch

from moxin.losses import IGNORE_INDEX, causal_lm_loss, linear_cross_entropy


def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(2, 5, 32)
    labels = torch.randint(0, 32, (2, 5))
    assert causal_lm_loss(logits, labels).item() == torch.tensor(math.log(32)).item()


def test_ignored_labels_do_not_count():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[3, IGNORE_INDEX, 7, IGNORE_INDEX]])
    expected = -(logits.log_softmax(-1)[0, 0, 3] + logits.log_softmax(-1)[0, 2, 7]) / 2
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)
    torch.testing.assert_close(causal_lm_loss(logits, labels, reduction="sum"), expected * 2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_linear_cross_entropy_equals_full_logits_loss_and_gradients(reduction, chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(3, 21, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 21))
    labels[0, :6] = IGNORE_INDEX
    expected = causal_lm_loss(hidden @ weight.T, labels, reduction=reduction)
    expected_grads = torch.autograd.grad(expected * 2.5, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss * 2.5, (hidden, weight))  # the upstream gradient is applied
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_without_grad_is_the_same_loss():
    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 9, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (2, 9))
    labels[1, 3] = IGNORE_INDEX
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    torch.testing.assert_close(got, causal_lm_loss(hidden @ weight.T, labels))


def test_linear_cross_entropy_trains_the_model_like_full_logits():
    from moxin.model import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, hidden_dim=32)
    tokens = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg)
        if fused:
            loss = linear_cross_entropy(model.hidden_states(tokens[:, :-1]), model.output.weight, tokens[:, 1:])
        else:
            loss = causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
