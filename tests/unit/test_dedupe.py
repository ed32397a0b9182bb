"""Normalisation, ids and MinHash LSH."""

from __future__ import annotations

import numpy as np

from distill_ray.prompts.dedupe import UnionFind
from distill_ray.prompts.minhash import band_keys, estimated_jaccard, lsh_params, signatures
from distill_ray.prompts.normalize import normalize, prompt_id

BASE = "Hi, where is my order ORD-123456? It was due last Tuesday and the tracking page shows nothing at all."


def test_ids_ignore_case_spacing_and_punctuation():
    variants = [BASE, BASE.upper(), "  hi where is my order ord 123456 it was due last tuesday and the tracking "
                "page shows nothing at all!!!", BASE.replace(" ", "   ")]
    assert len({prompt_id(normalize(v)) for v in variants}) == 1
    assert prompt_id(normalize(BASE)) != prompt_id(normalize(BASE.replace("Tuesday", "Monday")))
    assert len(prompt_id(normalize(BASE))) == 16


def _collide(a: str, b: str, threshold: float = 0.8, num_perm: int = 64) -> bool:
    sig = signatures([normalize(a), normalize(b)], num_perm, 5)
    keys = band_keys(sig, *lsh_params(threshold, num_perm))
    return bool(np.any(keys[0] == keys[1]))


def test_small_edits_collide_and_different_messages_do_not():
    assert _collide(BASE, BASE.replace("last Tuesday", "last Wednesday"))
    assert _collide(BASE, BASE.replace("nothing at all", "nothing"))
    assert not _collide(BASE, "I want a refund for the blender I bought, it arrived broken and the box was wet.")


def test_signature_similarity_tracks_jaccard():
    sig = signatures([normalize(BASE), normalize(BASE + " thanks"), normalize("completely different text here")], 128, 5)
    assert estimated_jaccard(sig[0], sig[1]) > 0.8
    assert estimated_jaccard(sig[0], sig[2]) < 0.2


def test_lsh_parameters_fit_the_signature():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 64)
        assert bands * rows <= 64
        # the S-curve's midpoint sits near the threshold
        assert abs((1 / bands) ** (1 / rows) - threshold) < 0.12


def test_union_find_roots_are_the_earliest_rows():
    uf = UnionFind()
    for a, b in [(5, 9), (9, 2), (7, 8)]:
        uf.union(a, b)
    assert uf.roots() == {5: 2, 9: 2, 2: 2, 7: 7, 8: 7}
