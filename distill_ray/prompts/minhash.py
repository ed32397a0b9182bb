"""MinHash signatures and LSH band keys over character shingles, vectorised with numpy.

Method (documented in the README): each normalised prompt is cut into overlapping character
shingles of `shingle_size`; each shingle is hashed to 32 bits; `num_perm` universal hash
functions `(a*h + b) mod (2^61 - 1)` give the signature (the minimum per function). The signature
is cut into `bands` bands of `rows` values; two prompts that agree on every value of at least one
band are candidate near duplicates. `bands` and `rows` are chosen (like datasketch's MinHashLSH)
to minimise the false-positive plus false-negative area around the Jaccard `threshold`, so pairs
above the threshold collide with high probability and pairs well below it rarely do.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)


@lru_cache(maxsize=16)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives around `threshold`."""
    grid = np.linspace(0.0, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        if rows < 1:
            break
        collide = 1.0 - (1.0 - grid**rows) ** bands
        below, above = grid <= threshold, grid >= threshold
        false_pos = np.trapezoid(collide[below], grid[below])
        false_neg = np.trapezoid(1.0 - collide[above], grid[above])
        if false_pos + false_neg < best_err:
            best, best_err = (bands, rows), false_pos + false_neg
    return best


@lru_cache(maxsize=16)
def _permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
    return a, b


def _shingle_hashes(text: str, size: int) -> np.ndarray:
    """32-bit hashes of every `size`-character shingle (the whole text when shorter)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) == 0:
        codes = np.zeros(1, dtype=np.uint64)
    if len(codes) < size:
        codes = np.pad(codes, (0, size - len(codes)))
    windows = np.lib.stride_tricks.sliding_window_view(codes, size)
    powers = np.uint64(1_000_003) ** np.arange(size - 1, -1, -1, dtype=np.uint64)
    h = (windows * powers).sum(axis=1, dtype=np.uint64)  # wraps mod 2^64 on purpose
    # splitmix64 finaliser: spreads the polynomial hash over all 64 bits before taking 32.
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return np.unique(h & _MASK32)


def signatures(texts: list[str], num_perm: int, shingle_size: int) -> np.ndarray:
    """MinHash signatures, shape (len(texts), num_perm), dtype uint32."""
    a, b = _permutations(num_perm)
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    chunk = 256  # bounds the (shingles x num_perm) matrix to a few tens of MB
    for start in range(0, len(texts), chunk):
        parts = [_shingle_hashes(t, shingle_size) for t in texts[start : start + chunk]]
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        hashes = np.concatenate(parts)
        permuted = ((hashes[:, None] * a[None, :] + b[None, :]) % _MERSENNE) & _MASK32
        out[start : start + len(parts)] = np.minimum.reduceat(permuted, offsets, axis=0)
    return out


def band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One signed 64-bit key per (prompt, band), shape (n, bands); equal keys = the band agrees."""
    n = signature.shape[0]
    banded = signature[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    key = np.full((n, bands), np.uint64(0xCBF29CE484222325))
    for i in range(rows):
        key ^= banded[:, :, i]
        key *= np.uint64(0x100000001B3)
    key ^= np.arange(bands, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
    return key.view(np.int64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))
