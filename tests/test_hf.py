"""Parity with transformers' MistralForCausalLM in both directions, fp32, on tiny random models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from moxin.model import ModelConfig, Transformer

TOKENS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))


def random_hf_mistral(sliding_window=16, tie=False) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        sliding_window=sliding_window, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, attn_implementation="sdpa",
    )
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("sliding_window", [16, None])
def test_from_hf_matches_transformers(tmp_path, sliding_window):
    hf = random_hf_mistral(sliding_window)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_hf(str(tmp_path)).eval()
    assert ours.config.n_kv_heads < ours.config.n_heads
    assert ours.config.sliding_window == sliding_window
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)


def test_save_hf_loads_in_transformers_with_same_logits(tmp_path):
    torch.manual_seed(1)
    ours = Transformer(ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   head_dim=16, hidden_dim=96, sliding_window=8, max_seq_len=256)).eval()
    ours.save_hf(str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert type(hf).__name__ == "MistralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, TOKENS), ours(TOKENS), atol=1e-4, rtol=1e-4)


def test_sharded_round_trip(tmp_path):
    hf = random_hf_mistral()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = Transformer.from_hf(str(tmp_path / "hf"))
    ours.save_hf(str(tmp_path / "ours"), max_shard_size="40KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(hf_logits(again, TOKENS), hf_logits(hf, TOKENS), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_round_trip(tmp_path):
    hf = random_hf_mistral(tie=True)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_hf(str(tmp_path)).eval()
    assert ours.output.weight is ours.tok_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)


def test_pickled_checkpoints_are_refused(tmp_path):
    hf = random_hf_mistral()
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Transformer.from_hf(str(tmp_path))


def test_shape_mismatch_names_the_tensor(tmp_path):
    hf = random_hf_mistral()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 200
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor layers\.\d+\.feed_forward\.w(13|2)\.weight has shape"):
        Transformer.from_hf(str(tmp_path))


def test_scaled_rope_is_refused(tmp_path):
    hf = random_hf_mistral()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_scaling"):
        Transformer.from_hf(str(tmp_path))


def test_tied_moxin_model_saves_and_reloads(tmp_path):
    torch.manual_seed(2)
    ours = Transformer(ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                   hidden_dim=96, sliding_window=8, max_seq_len=256, tie_embeddings=True)).eval()
    ours.save_hf(str(tmp_path), max_shard_size="40KB")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again = Transformer.from_hf(str(tmp_path)).eval()
    assert again.output.weight is again.tok_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, TOKENS), ours(TOKENS), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(again(TOKENS), ours(TOKENS))
