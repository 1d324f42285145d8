"""Load a trained model from whatever a run left: a Hugging Face folder, a run folder or a .ckpt."""

from __future__ import annotations

import os

import torch

from moxin.hf import load_state_dict_checked
from moxin.model import ModelConfig, Transformer
from moxin.parallel import fuse_split, split_fused

SHARDED_META = "meta.pt"  # Lightning's part of a folder checkpoint (FSDP's distributed one, Colossal-AI's)


def is_sharded_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, SHARDED_META))


def resolve_model_path(path: str) -> str:
    """A run folder stands for its exported `final/` weights."""
    path = os.path.expanduser(path)
    if is_sharded_checkpoint(path):
        return path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        final = os.path.join(path, "final")
        if os.path.exists(os.path.join(final, "config.json")):
            return final
        raise FileNotFoundError(f"{path} is neither a Hugging Face checkpoint folder nor a run folder with final/")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return path


def load_model(path: str, device: str | torch.device = "cpu") -> Transformer:
    """Transformer from a Hugging Face folder, a run folder, a Lightning .ckpt of a moxin run, or a
    folder checkpoint of a sharded run (FSDP's distributed checkpoint, Colossal-AI's booster folder).

    Everything is read without unpickling objects: torch.load(weights_only=True), safetensors, DCP.
    """
    path = resolve_model_path(path)
    if is_sharded_checkpoint(path):
        checkpoint = torch.load(os.path.join(path, SHARDED_META), map_location="cpu", weights_only=True)
        cfg = _model_config(checkpoint, path)
        state = _colossalai_model_state(path) if os.path.isdir(os.path.join(path, "model")) else _dcp_model_state(
            path, cfg)
    elif os.path.isdir(path):
        return Transformer.from_hf(path).to(device)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        cfg, state = _model_config(checkpoint, path), checkpoint["state_dict"]
    state = fuse_split({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    with torch.device("meta"):
        model = Transformer(cfg)
    load_state_dict_checked(model, state, source=path)
    return model.to(device)


def _model_config(checkpoint: dict, path: str) -> ModelConfig:
    try:
        return ModelConfig(**checkpoint["hyper_parameters"]["model"])
    except KeyError as missing:
        raise ValueError(f"{path} is not a moxin Lightning checkpoint (no {missing} entry)") from None


def _dcp_model_state(path: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's tensors from a distributed checkpoint (FSDP), read in this one process."""
    import torch.distributed.checkpoint as dcp

    from moxin.safe_dcp import SafeMetadataReader

    reader = SafeMetadataReader(path)
    stored = reader.read_metadata().state_dict_metadata  # a refused .metadata raises here, plainly
    with torch.device("meta"):
        empty = Transformer(cfg).to_empty(device="cpu")  # storage to read into, not initialised
    template = {f"model.{k}": v for k, v in empty.state_dict().items()}
    if any(key.endswith(".wqkv.q.weight") for key in stored):  # a tensor-parallel run's parts
        template = split_fused(template, cfg)
    state = {"state_dict": template}
    # no_dist: this process alone reads it, even inside a distributed run (a later recipe stage's init_from).
    # Fills the tensors in place from every rank's shard file (tensors are read with weights_only=True).
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state["state_dict"]


def _colossalai_model_state(path: str) -> dict[str, torch.Tensor]:
    """The model's tensors from a Colossal-AI booster folder (its index names the shard files)."""
    import json

    from safetensors.torch import load_file

    folder = os.path.join(path, "model")
    (index,) = [name for name in os.listdir(folder) if name.endswith(".index.json")]
    with open(os.path.join(folder, index)) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = os.path.join(folder, name)
        state.update(load_file(file) if name.endswith(".safetensors")
                     else torch.load(file, map_location="cpu", weights_only=True))
    return state


def tokenizer_for(path: str, fallback: str):
    """The tokenizer saved beside the weights, else the configured one."""
    from moxin.tokenizer import load_tokenizer

    folder = resolve_model_path(path)
    folder = folder if os.path.isdir(folder) else os.path.dirname(os.path.dirname(folder))  # run/checkpoints/x.ckpt
    candidates = [folder, os.path.join(folder, "final")]
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, "tokenizer_config.json")):
            return load_tokenizer(os.path.abspath(candidate))
    return load_tokenizer(fallback)
