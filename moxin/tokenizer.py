"""Tokenizer loading.

The default is Mistral-7B v0.1's SentencePiece tokenizer (32,000 tokens, unk 0, bos 1, eos 2),
read from the copy that the `mistral-common` package ships, so no network is needed. Any
Hugging Face tokenizer folder (or hub name, where the user has the internet) can be used instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache

MISTRAL_V1 = "mistral_v1"


def mistral_v1_model_file() -> str:
    """Path of the Mistral v0.1 SentencePiece model inside the mistral-common package."""
    import mistral_common

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"mistral-common does not ship {path}; install mistral-common>=1.4 or configure "
            "data.tokenizer with a Hugging Face tokenizer folder"
        )
    return path


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = MISTRAL_V1):
    """A Hugging Face tokenizer: `mistral_v1` (offline default), a local folder, or a hub name.

    transformers builds a 3-token tokenizer from `LlamaTokenizer(vocab_file=...)`, but reads a
    folder holding `tokenizer.model` correctly, so the shipped model file is copied into one.
    """
    from transformers import AutoTokenizer

    if name_or_path == MISTRAL_V1:
        folder = tempfile.mkdtemp(prefix="moxin_tok_")
        try:
            shutil.copy(mistral_v1_model_file(), os.path.join(folder, "tokenizer.model"))
            tokenizer = AutoTokenizer.from_pretrained(
                folder, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        tokenizer.vocab_file = mistral_v1_model_file()  # the SentencePiece model (GGUF export reads it)
    else:
        looks_local = name_or_path.startswith(("/", "./", "../", "~")) or os.path.isdir(name_or_path)
        if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
            raise FileNotFoundError(f"tokenizer folder {name_or_path!r} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no eos token; packing needs one")
    return tokenizer
