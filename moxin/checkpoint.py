"""Load a trained model from whatever a run left: a Hugging Face folder, a run folder or a .ckpt."""

from __future__ import annotations

import os

import torch

from moxin.hf import load_state_dict_checked
from moxin.model import ModelConfig, Transformer


def resolve_model_path(path: str) -> str:
    """A run folder stands for its exported `final/` weights."""
    path = os.path.expanduser(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        final = os.path.join(path, "final")
        if os.path.exists(os.path.join(final, "config.json")):
            return final
        raise FileNotFoundError(f"{path} is neither a Hugging Face checkpoint folder nor a run folder with final/")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return path


def load_model(path: str, device: str | torch.device = "cpu") -> Transformer:
    """Transformer from a Hugging Face folder, a run folder, or a Lightning .ckpt of a moxin run.

    Lightning checkpoints are read with torch.load(weights_only=True): tensors and plain values only.
    """
    path = resolve_model_path(path)
    if os.path.isdir(path):
        return Transformer.from_hf(path).to(device)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    try:
        cfg = ModelConfig(**checkpoint["hyper_parameters"]["model"])
    except KeyError as missing:
        raise ValueError(f"{path} is not a moxin Lightning checkpoint (no {missing} entry)") from None
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    with torch.device("meta"):
        model = Transformer(cfg)
    load_state_dict_checked(model, state, source=path)
    return model.to(device)


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
