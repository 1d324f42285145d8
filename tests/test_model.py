import os

import pytest
import torch
import torch.nn.functional as F

from moxin.model import ModelConfig, Transformer, sliding_window_mask
from tests.conftest import CONF_DIR

TINY = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
            hidden_dim=128, max_seq_len=128)


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


def test_logits_shape():
    model = tiny_model(sliding_window=None)
    tokens = torch.randint(0, 97, (3, 11))
    assert model(tokens).shape == (3, 11, 97)


@pytest.mark.parametrize("window", [None, 4])
def test_causality(window):
    model = tiny_model(sliding_window=window)
    tokens = torch.randint(0, 97, (1, 20))
    changed = tokens.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_sliding_window_bounds_influence_per_layer():
    # One layer: position i sees exactly positions i-W+1 .. i.
    window = 4
    model = tiny_model(sliding_window=window, n_layers=1)
    tokens = torch.randint(0, 97, (1, 24))
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    seen = [t for t in range(24) if not torch.allclose(a[0, t], b[0, t])]
    assert seen == list(range(5, 5 + window))


def test_sliding_window_span_grows_with_depth():
    # With L layers, information travels at most L * (W - 1) positions.
    window, layers = 4, 2
    model = tiny_model(sliding_window=window, n_layers=layers)
    tokens = torch.randint(0, 97, (1, 30))
    changed = tokens.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    reach = 2 + layers * (window - 1)
    torch.testing.assert_close(a[0, reach + 1:], b[0, reach + 1:])
    assert not torch.allclose(a[0, reach], b[0, reach])


def test_window_mask_matches_definition():
    mask = sliding_window_mask(6, 6, 3, "cpu")
    for i in range(6):
        for j in range(6):
            assert bool(mask[i, j]) == (j <= i and i - j < 3)


def test_window_longer_than_sequence_equals_full_causal():
    full = tiny_model(sliding_window=None)
    windowed = tiny_model(sliding_window=64)
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(full(tokens), windowed(tokens))


def test_gqa_equals_attention_with_repeated_kv_heads():
    gqa = tiny_model(n_heads=4, n_kv_heads=2, sliding_window=5)
    mha = tiny_model(n_heads=4, n_kv_heads=4, sliding_window=5)
    state = gqa.state_dict()
    for i in range(2):
        q, k, v = state[f"layers.{i}.attention.wqkv.weight"].split([64, 32, 32])
        # Query heads 0,1 share kv head 0; heads 2,3 share kv head 1.
        k, v = (w.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64) for w in (k, v))
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    tokens = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), atol=1e-5, rtol=1e-5)
    assert gqa.num_params() < mha.num_params()


@pytest.mark.parametrize("layers,expected", [(36, 8_114_180_096), (32, 7_241_732_096)])
def test_7b_parameter_counts_on_meta_device(layers, expected):
    cfg = ModelConfig(n_layers=layers)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == expected
    assert cfg.num_params() == expected


def test_model_yaml_files_match_the_recipe():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    for name, expected in [("moxin_7b", 8_114_180_096), ("mistral_7b", 7_241_732_096)]:
        cfg = instantiate(OmegaConf.load(os.path.join(CONF_DIR, "model", f"{name}.yaml")))
        assert cfg.num_params() == expected, name
        assert (cfg.sliding_window, cfg.max_seq_len, cfg.vocab_size) == (4096, 32768, 32000)


@pytest.mark.parametrize("field,value,message", [
    ("n_kv_heads", 3, "n_heads"),
    ("sliding_window", 0, "sliding_window"),
    ("dim", 0, "dim"),
    ("head_dim", 15, "head_dim"),
    ("norm_eps", 0.0, "norm_eps"),
    ("vocab_size", -5, "vocab_size"),
])
def test_impossible_configs_fail_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**TINY, field: value})


def test_sequence_longer_than_max_positions_is_refused():
    model = tiny_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_init_scales_residual_projections():
    model = Transformer(ModelConfig(**{**TINY, "n_layers": 8, "dim": 256, "hidden_dim": 512,
                                        "n_heads": 8, "n_kv_heads": 4, "head_dim": 32}))
    wq = model.layers[0].attention.wqkv.weight.std().item()
    wo = model.layers[0].attention.wo.weight.std().item()
    assert abs(wq - 0.02) < 2e-3
    assert abs(wo - 0.02 / 4) < 1e-3  # 1/sqrt(2 * 8 layers)
    assert torch.all(model.norm.weight == 1)


def test_tied_embeddings_share_storage():
    model = tiny_model(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.num_params() == model.config.num_params()


@pytest.mark.parametrize("T,window", [(37, 8), (32, 8), (9, 8), (50, 1)])
def test_blockwise_window_attention_equals_the_dense_mask(T, window):
    import torch.nn.functional as F

    from moxin.model import windowed_attention

    torch.manual_seed(0)
    q = torch.randn(2, 4, T, 16, requires_grad=True)
    k = torch.randn(2, 2, T, 16, requires_grad=True)
    v = torch.randn(2, 2, T, 16, requires_grad=True)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(T, T, window, "cpu"),
                                           enable_gqa=True)
    blocks = windowed_attention(q, k, v, window)
    torch.testing.assert_close(blocks, dense, atol=1e-5, rtol=1e-5)
    grads_dense = torch.autograd.grad(dense.sum(), (q, k, v))
    grads_blocks = torch.autograd.grad(blocks.sum(), (q, k, v))
    for got, want in zip(grads_blocks, grads_dense, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_single_query_attention_equals_sdpa_with_grouped_heads_and_a_mask():
    from moxin.model import single_query_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.rand(3, 1, 1, 10) > 0.4
    mask[..., 0] = True  # every row sees at least one key
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))  # as the cache gives a decode step
    torch.testing.assert_close(single_query_attention(q, k, v, additive), expected, rtol=1e-5, atol=1e-6)
