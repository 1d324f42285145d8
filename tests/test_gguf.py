"""GGUF export read back with the gguf package's reader, and task=quant_eval."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from moxin.chat import CHAT_TEMPLATE  # noqa: E402
from moxin.gguf_export import export_gguf, load_gguf, permute_for_llama_cpp, unpermute_from_llama_cpp  # noqa: E402
from moxin.model import ModelConfig, Transformer  # noqa: E402
from moxin.tokenizer import load_tokenizer  # noqa: E402

CFG = ModelConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                  sliding_window=32, max_seq_len=256, rope_theta=1e6)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def test_permutation_is_llama_cpps_and_is_undone():
    # One head of 4 rows in rotate-half order (x0, x1 | y0, y1) becomes pairs (x0, y0, x1, y1).
    rows = np.arange(4, dtype=np.float32)[:, None]
    assert permute_for_llama_cpp(rows, heads=1)[:, 0].tolist() == [0, 2, 1, 3]
    weight = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    assert np.array_equal(unpermute_from_llama_cpp(permute_for_llama_cpp(weight, 4), 4), weight)


@pytest.mark.parametrize("type_name", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_file_has_llama_cpps_names_shapes_types_and_metadata(model, tmp_path, type_name):
    tokenizer = load_tokenizer()
    path = export_gguf(model, tokenizer, tmp_path / f"m-{type_name}.gguf", type_name, name="Moxin-7B-Test",
                       chat_template=CHAT_TEMPLATE)
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.name") == "Moxin-7B-Test"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.feed_forward_length")) == \
        (2, 64, 128)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.attention.sliding_window") == 32 and field("llama.context_length") == 256
    assert field("llama.rope.freq_base") == pytest.approx(1e6)
    assert field("llama.rope.dimension_count") == 16
    assert field("tokenizer.ggml.model") == "llama" and len(field("tokenizer.ggml.tokens")) == 32000
    assert field("tokenizer.ggml.tokens")[1] == "<s>" and field("tokenizer.ggml.tokens")[3] == "<0x00>"
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.token_type")[1] == int(gguf.TokenType.CONTROL)
    assert field("tokenizer.chat_template") == CHAT_TEMPLATE

    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(2) for part in
        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")}
    assert set(tensors) == expected
    assert [int(d) for d in tensors["blk.0.attn_k.weight"].shape] == [64, 32]  # GGUF: fastest dimension first
    assert [int(d) for d in tensors["token_embd.weight"].shape] == [64, 32000]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay F32
    assert tensors["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType[type_name.upper()]


def test_read_back_logits_degrade_with_fewer_bits(model, tmp_path):
    tokenizer = load_tokenizer()
    tokens = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens)
        error = {t: float((load_gguf(export_gguf(model, tokenizer, tmp_path / f"{t}.gguf", t))(tokens)
                           - reference).abs().max()) for t in ("f32", "f16", "q8_0", "q4_0")}
    assert error["f32"] == 0.0  # names, permutation and shapes round-trip exactly
    assert error["f16"] < error["q8_0"] < error["q4_0"] and error["q8_0"] < 0.05


def test_unknown_type_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="q3_k"):
        export_gguf(model, load_tokenizer(), tmp_path / "x.gguf", "q3_k")


@pytest.mark.slow
def test_quant_eval_reports_perplexity_and_size_for_each_type(make_cfg, tmp_path, eval_data_dir):
    from moxin.train import run

    trained = run(make_cfg("+experiment=tiny_debug", "phase.max_steps=8", run_name="trained"))
    out = run(make_cfg("task=quant_eval", f"ckpt={trained['run_dir']}", "quant=[q8_0,q4_0]",
                       "quant_eval.max_sequences=8", run_name="quant"))
    rows = json.loads((tmp_path / "quant" / "quant_eval.json").read_text())
    assert list(rows) == ["unquantized (fp32)", "q8_0", "q4_0"]
    fp32, q8, q4 = (rows[k]["perplexity"] for k in rows)
    assert abs(q8 - fp32) / fp32 < 0.01 and abs(q4 - fp32) > abs(q8 - fp32)  # 4 bits cost more than 8
    assert rows["q4_0"]["megabytes"] < rows["q8_0"]["megabytes"] < rows["unquantized (fp32)"]["megabytes"]
    assert "| q4_0 |" in out["table"] and (tmp_path / "quant" / "gguf" / "model-q4_0.gguf").is_file()
    with_suite = run(make_cfg("task=quant_eval", f"ckpt={trained['run_dir']}", "quant=[q4_0]",
                              "quant_eval.max_sequences=4", "quant_eval.suite=true", "eval=zeroshot",
                              f"eval.data_dir={eval_data_dir}", "eval.limit=4",
                              "eval.tasks=[{name: arc_easy, num_fewshot: 0, metric: acc_norm, column: ARC-E}]",
                              run_name="quant_suite"))
    suite_rows = json.loads((tmp_path / "quant_suite" / "quant_eval.json").read_text())
    assert all(0 <= row["eval/zeroshot/ARC-E"] <= 100 for row in suite_rows.values())  # accuracy for each type
    assert "eval/zeroshot/ARC-E" in with_suite["table"]
    with pytest.raises(ValueError, match="q9"):
        run(make_cfg("task=quant_eval", f"ckpt={trained['run_dir']}", "quant=q9", run_name="bad"))


def test_tied_embeddings_and_a_padded_vocabulary_round_trip(tmp_path):
    import dataclasses

    torch.manual_seed(0)
    tied = Transformer(dataclasses.replace(CFG, vocab_size=32064, tie_embeddings=True)).eval()
    path = export_gguf(tied, load_tokenizer(), tmp_path / "tied.gguf", "f32")
    reader = gguf.GGUFReader(str(path))
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    assert len(tokens) == 32064 and tokens[-1] == "[PAD32063]"  # unused pads, as llama.cpp's converter writes
    assert "output.weight" not in {t.name for t in reader.tensors}
    back = load_gguf(path)
    assert back.config.tie_embeddings and back.output.weight is back.tok_embeddings.weight
    ids = torch.randint(0, 32064, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), tied(ids))
    with pytest.raises(ValueError, match="32000 tokens but the model's embedding only 100 rows"):
        export_gguf(Transformer(dataclasses.replace(CFG, vocab_size=100)), load_tokenizer(), tmp_path / "x.gguf")


def test_quant_eval_measures_chat_models_on_sft_data_and_refuses_pairs(make_cfg):
    from moxin.quant_eval import held_out_sequences, perplexity

    items = held_out_sequences(make_cfg("+experiment=cot_sft_openr1", "+scale=tiny"), limit=3)
    assert len(items) == 3 and {"input_ids", "labels", "segments"} <= set(items[0])
    assert (items[0]["labels"] != -100).any() and (items[0]["labels"] == -100).any()  # replies only
    model = Transformer(ModelConfig(vocab_size=32000, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                                    hidden_dim=64, max_seq_len=4096)).eval()
    assert 1.0 < perplexity(model, items) < 1e6
    with pytest.raises(ValueError, match="preference"):
        held_out_sequences(make_cfg("+experiment=dpo_tulu3", "+scale=tiny"), limit=3)
