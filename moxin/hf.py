"""Hugging Face `MistralForCausalLM` checkpoints <-> moxin `Transformer`.

The released Moxin models are `MistralForCausalLM` folders: config.json plus safetensors,
sharded (model.safetensors.index.json) or not. Both directions go through safetensors only:
nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moxin.model import ModelConfig, Transformer

# moxin tensor <- Hugging Face tensors, concatenated along dim 0 in this order; {i} = block index.
_TENSOR_MAP = [
    ("tok_embeddings.weight", ["model.embed_tokens.weight"]),
    ("layers.{i}.attention.wqkv.weight", ["model.layers.{i}.self_attn.q_proj.weight",
                                          "model.layers.{i}.self_attn.k_proj.weight",
                                          "model.layers.{i}.self_attn.v_proj.weight"]),
    ("layers.{i}.attention.wo.weight", ["model.layers.{i}.self_attn.o_proj.weight"]),
    ("layers.{i}.feed_forward.w13.weight", ["model.layers.{i}.mlp.gate_proj.weight",
                                            "model.layers.{i}.mlp.up_proj.weight"]),
    ("layers.{i}.feed_forward.w2.weight", ["model.layers.{i}.mlp.down_proj.weight"]),
    ("layers.{i}.attention_norm.weight", ["model.layers.{i}.input_layernorm.weight"]),
    ("layers.{i}.ffn_norm.weight", ["model.layers.{i}.post_attention_layernorm.weight"]),
    ("norm.weight", ["model.norm.weight"]),
    ("output.weight", ["lm_head.weight"]),
]
_PATTERNS = [(re.compile("^" + re.escape(ours).replace(r"\{i\}", r"(\d+)") + "$"), theirs)
             for ours, theirs in _TENSOR_MAP]


def hf_names(name: str) -> list[str]:
    """The Hugging Face tensors that make up moxin tensor `name`."""
    for pattern, theirs in _PATTERNS:
        match = pattern.match(name)
        if match:
            return [t.replace("{i}", match.group(1)) if match.groups() else t for t in theirs]
    raise KeyError(f"no Hugging Face counterpart for moxin tensor {name}")


def _fused_sizes(name: str, cfg: ModelConfig) -> list[int]:
    """Row counts of the Hugging Face tensors stacked in a fused moxin tensor."""
    if name.endswith("wqkv.weight"):
        return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    return [cfg.hidden_dim, cfg.hidden_dim]  # w13: gate, up


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a MistralForCausalLM config.json dict (transformers 4 or 5 layout)."""
    if hf.get("model_type", "mistral") not in ("mistral", "llama"):
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; expected 'mistral'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json has hidden_act {hf['hidden_act']!r}; the moxin model uses silu")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json uses rope_type {rope['rope_type']!r}; only 'default' is supported")
    if hf.get("rope_scaling"):  # the transformers 4 spelling of the same thing
        raise ValueError(f"config.json sets rope_scaling {hf['rope_scaling']!r}; only plain RoPE is supported")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        sliding_window=hf.get("sliding_window"),
        max_seq_len=hf.get("max_position_embeddings", 32768),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json contents for a MistralForCausalLM with cfg's shapes."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; transformers 4 reads rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": cfg.sliding_window,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(
        f"{path} holds neither model.safetensors nor model.safetensors.index.json; "
        "only safetensors checkpoints are loaded (pickled .bin files are refused)"
    )


def load_hf(path: str, dtype: torch.dtype | None = None) -> Transformer:
    """Build a Transformer from a Hugging Face MistralForCausalLM folder."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: expected a Hugging Face checkpoint folder")
    with open(config_path) as f:
        cfg = config_from_hf(json.load(f))

    hf_state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt") as shard:
            for hf_name in shard.keys():
                if not hf_name.endswith("rotary_emb.inv_freq"):  # recomputed, never learned
                    hf_state[hf_name] = shard.get_tensor(hf_name)
    return model_from_hf_state(cfg, hf_state, source=path, dtype=dtype)


def model_from_hf_state(cfg: ModelConfig, hf_state: dict[str, torch.Tensor], source: str,
                        dtype: torch.dtype | None = None) -> Transformer:
    """A Transformer from tensors under Hugging Face names (fused again into wqkv / w13)."""
    if cfg.tie_embeddings:
        hf_state.setdefault("lm_head.weight", hf_state.get("model.embed_tokens.weight"))
    with torch.device("meta"):
        model = Transformer(cfg)
    state, used = {}, set()
    for name in model.state_dict():
        parts = hf_names(name)
        missing = [p for p in parts if p not in hf_state]
        if missing:
            raise ValueError(f"{source}: missing tensors {missing[:5]} (for {name})")
        tensor = torch.cat([hf_state[p] for p in parts]) if len(parts) > 1 else hf_state[parts[0]]
        state[name] = tensor.to(dtype) if dtype is not None else tensor
        used.update(parts)
    unknown = sorted(set(hf_state) - used)
    if unknown:
        raise ValueError(f"{source}: tensors with no moxin counterpart: {unknown[:5]}")
    load_state_dict_checked(model, state, source=source)
    return model


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(assign=True) with errors that name the offending tensor."""
    check_state_dict(model, state, source)
    model.load_state_dict(state, assign=True)
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise, naming the tensor, unless `state` has exactly the model's tensors in the model's shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise ValueError(f"{source}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names, fused ones split (CPU, contiguous)."""
    hf_state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_embeddings and name == "output.weight":
            continue  # tied: transformers re-ties lm_head to the embedding
        parts = hf_names(name)
        pieces = tensor.detach().split(_fused_sizes(name, model.config)) if len(parts) > 1 else [tensor.detach()]
        for hf_name, piece in zip(parts, pieces, strict=True):
            hf_state[hf_name] = piece.contiguous().cpu()
    return hf_state


def save_hf(model: Transformer, path: str, max_shard_size: str | int = "5GB") -> None:
    """Write config.json, generation_config.json and safetensors (sharded past max_shard_size)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    os.makedirs(path, exist_ok=True)
    hf_state = hf_state_dict(model)
    dtype = next(iter(hf_state.values())).dtype

    split = split_torch_state_dict_into_shards(hf_state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: hf_state[n] for n in names}, os.path.join(path, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf_state.values())},
                 "weight_map": split.tensor_to_filename}
        _write_json(os.path.join(path, "model.safetensors.index.json"), index)
    _write_json(os.path.join(path, "config.json"), config_to_hf(model.config, dtype))
    _write_json(os.path.join(path, "generation_config.json"), {"bos_token_id": 1, "eos_token_id": 2})


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
