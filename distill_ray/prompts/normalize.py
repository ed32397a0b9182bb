"""Prompt normalisation and stable ids.

Two prompts that differ only in case, spacing, punctuation or Unicode form normalise to the same
text and so get the same id: `id = sha256(normalised text)[:16]` (hex), stable across machines,
runs and storage backends.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation and symbols turned to spaces, whitespace collapsed."""
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def prompt_id(normalized: str) -> str:
    """The stable id of a prompt: the first 16 hex digits of the sha256 of its normalised text."""
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:16]


def text_hash(text: str) -> int:
    """A signed 64-bit hash of the raw text (tells byte-identical repeats from normalised ones)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def seeded_rank(seed: int, *keys: str) -> int:
    """A pseudo-random but reproducible sort key for sampling and splitting."""
    raw = "\x1f".join([str(seed), *keys]).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")
