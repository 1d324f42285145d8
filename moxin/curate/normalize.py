"""Text normalisation: the light clean-up every kept document gets, and the aggressive form
that duplicate detection compares (SlimPajama's: NFC, lower case, no punctuation, single spaces)."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0 and C1 controls; keeps \t, \n, \r
_SPACES = re.compile(r"\s+")


def normalize_document(text: str) -> str:
    """NFC, Unix newlines, no control characters, no trailing whitespace at either end."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text).strip()


@lru_cache(maxsize=1)
def _punctuation_table() -> dict[int, None]:
    """Every Unicode punctuation code point (categories P*), for str.translate."""
    # Planes 0-1 hold every punctuation character (planes 2+ are ideographs and private use).
    return {c: None for c in range(0x20000) if unicodedata.category(chr(c)).startswith("P")}


def normalize_for_dedup(text: str) -> str:
    """NFC, lower case, punctuation removed, whitespace runs collapsed to one space."""
    text = unicodedata.normalize("NFC", text).lower().translate(_punctuation_table())
    return _SPACES.sub(" ", text).strip()


def words(text: str) -> list[str]:
    """Words of a dedup-normalised text."""
    return normalize_for_dedup(text).split()
