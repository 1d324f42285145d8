"""GGUF files for llama.cpp (written with the `gguf` package, llama.cpp's own writer), and back.

A Moxin model is a Mistral-architecture model, which llama.cpp runs as arch `llama` (plus the
sliding window). Tensors use llama.cpp's names. The query and key projections are permuted as
llama.cpp's converter permutes Hugging Face weights: the Hugging Face layout rotates the two
halves of each head, llama.cpp rotates adjacent pairs. 2-D weights take the chosen type (F16,
Q8_0, Q4_0, ...); norms stay F32. The SentencePiece vocabulary (pieces, scores, types) and the
special-token ids go into the metadata, with the chat template when there is one.

`load_gguf` reads a file back into a moxin Transformer (dequantized to fp32), which is how
`task=quant_eval` measures what a quantization type costs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moxin.hf import hf_state_dict, model_from_hf_state
from moxin.model import ModelConfig, Transformer

ARCH = "llama"
TYPES = ("f32", "f16", "q8_0", "q5_0", "q4_0", "q4_1")  # what `gguf.quants` quantizes without an importance matrix


def ggml_type(name: str):
    import gguf

    if name.lower() not in TYPES:
        raise ValueError(f"GGUF type {name!r} is not one of {TYPES}")
    return gguf.GGMLQuantizationType[name.upper()]


# llama.cpp tensor name <- Hugging Face name; {i} = block index.
_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
}


def gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        return _NAMES[".".join(parts[:2] + ["{i}"] + parts[3:])].replace("{i}", parts[2])
    return _NAMES[hf_name]


def hf_name_of(gguf_tensor: str) -> str:
    for hf, ours in _NAMES.items():
        prefix, _, suffix = ours.partition("{i}")
        if suffix and gguf_tensor.startswith(prefix) and gguf_tensor.endswith(suffix):
            index = gguf_tensor[len(prefix):-len(suffix)]
            if index.isdigit():
                return hf.replace("{i}", index)
        elif gguf_tensor == ours:
            return hf
    raise ValueError(f"GGUF tensor {gguf_tensor!r} has no Moxin counterpart")


def permute_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from rotate-half (Hugging Face) to adjacent pairs (llama.cpp)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_from_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _sentencepiece_of(tokenizer):
    """The SentencePiece model behind a Hugging Face tokenizer: its vocab_file, a tokenizer.model beside
    it, or the Mistral v0.1 model that mistral-common ships, whichever has exactly its vocabulary."""
    import sentencepiece

    from moxin.tokenizer import mistral_v1_model_file

    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    candidates = [getattr(tokenizer, "vocab_file", None), folder / "tokenizer.model", mistral_v1_model_file()]
    ours = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            processor = sentencepiece.SentencePieceProcessor(model_file=str(candidate))
            if [processor.id_to_piece(i) for i in range(processor.vocab_size())] == ours:
                return processor
    raise ValueError("GGUF export needs the tokenizer's SentencePiece model (tokenizer.model) and found none "
                     f"with its {len(ours)}-token vocabulary")


def _vocabulary(tokenizer) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and llama.cpp token types of a SentencePiece tokenizer."""
    import gguf

    processor = _sentencepiece_of(tokenizer)
    pieces, scores, types = [], [], []
    for i in range(processor.vocab_size()):
        pieces.append(processor.id_to_piece(i).encode("utf-8"))
        scores.append(processor.get_score(i))
        kind = gguf.TokenType.NORMAL
        if processor.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif processor.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif processor.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif processor.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(int(kind))
    return pieces, scores, types


def _fit_vocabulary(pieces: list[bytes], scores: list[float], types: list[int], rows: int):
    """Pad the vocabulary with unused [PADn] tokens up to the embedding's rows, as llama.cpp's converter
    does; a vocabulary larger than the embedding is an error."""
    import gguf

    if len(pieces) > rows:
        raise ValueError(f"the tokenizer has {len(pieces)} tokens but the model's embedding only {rows} rows")
    for i in range(len(pieces), rows):
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return pieces, scores, types


def export_gguf(model: Transformer, tokenizer, path: str | Path, type_name: str = "f16", name: str = "moxin",
                chat_template: str | None = None) -> Path:
    """Write `model` as one GGUF file of `type_name` (f32, f16, q8_0, q5_0, q4_0, q4_1)."""
    import gguf

    qtype, path = ggml_type(type_name), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    try:
        _write(writer, model, tokenizer, qtype, type_name, name, chat_template)
    finally:
        writer.close()
    return path


def _write(writer, model: Transformer, tokenizer, qtype, type_name: str, name: str, chat_template: str | None) -> None:
    import gguf

    cfg = model.config
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.sliding_window:
        # Read by our load_gguf; llama.cpp's `llama` arch may attend over the whole context instead,
        # which equals the window up to W tokens (4,096 for Moxin-7B).
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_file_type(int(gguf.LlamaFileType[f"MOSTLY_{type_name.upper()}"]) if type_name != "f32"
                         else int(gguf.LlamaFileType.ALL_F32))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pieces, scores, types = _fit_vocabulary(*_vocabulary(tokenizer), rows=cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template or getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(chat_template or tokenizer.chat_template)

    for hf_name, tensor in hf_state_dict(model).items():
        data = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_for_llama_cpp(data, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_for_llama_cpp(data, cfg.n_kv_heads)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(hf_name), data.astype(np.float32))  # norms stay F32
        elif qtype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % block:
            writer.add_tensor(gguf_name(hf_name), data.astype(np.float16))  # rows that blocks don't divide: F16
        else:
            writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()


def _field(reader, key: str):
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"GGUF file has no {key}")
    return field.contents()


def config_from_gguf(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"GGUF architecture {arch!r}; expected {ARCH!r}")
    vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    window = reader.get_field(f"{ARCH}.attention.sliding_window")
    return ModelConfig(
        vocab_size=vocab, dim=_field(reader, f"{ARCH}.embedding_length"),
        n_layers=_field(reader, f"{ARCH}.block_count"),
        n_heads=_field(reader, f"{ARCH}.attention.head_count"),
        n_kv_heads=_field(reader, f"{ARCH}.attention.head_count_kv"),
        head_dim=_field(reader, f"{ARCH}.attention.key_length"),
        hidden_dim=_field(reader, f"{ARCH}.feed_forward_length"),
        norm_eps=float(_field(reader, f"{ARCH}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{ARCH}.rope.freq_base")),
        sliding_window=window.contents() if window is not None else None,
        max_seq_len=_field(reader, f"{ARCH}.context_length"),
        tie_embeddings=all(t.name != "output.weight" for t in reader.tensors),  # llama.cpp: no output = tied
    )


def load_gguf(path: str | Path) -> Transformer:
    """A fp32 Transformer from a GGUF file this module wrote (quantized tensors dequantized)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    cfg = config_from_gguf(reader)
    hf_state = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dimension first
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        hf_name = hf_name_of(tensor.name)
        if hf_name.endswith("q_proj.weight"):
            data = unpermute_from_llama_cpp(data, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = unpermute_from_llama_cpp(data, cfg.n_kv_heads)
        hf_state[hf_name] = torch.from_numpy(np.ascontiguousarray(data))
    return model_from_hf_state(cfg, hf_state, source=str(path))
