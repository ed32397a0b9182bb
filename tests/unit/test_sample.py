"""The production mix arithmetic and the leak-free split."""

from __future__ import annotations

import random
from collections import Counter

from distill_ray.prompts.sample import allocate, holdout_split

SHARES = {"shipping": 380, "refund": 220, "billing": 150, "account": 120, "product": 90, "damaged": 30, "fraud": 10}


def test_mix_within_two_points_and_sums_to_size():
    quotas = allocate(SHARES, {c: n * 10 for c, n in SHARES.items()}, size=2000, minimum=20)
    assert sum(quotas.values()) == 2000
    total = sum(SHARES.values())
    for category, share in SHARES.items():
        assert abs(100 * quotas[category] / 2000 - 100 * share / total) <= 2.0, category
    assert quotas["fraud"] == 20  # the rare edge case is lifted to the minimum, not left at 1%


def test_category_short_of_prompts_gives_its_surplus_to_the_others():
    available = {c: 10_000 for c in SHARES} | {"refund": 50}
    quotas = allocate(SHARES, available, size=1000, minimum=0)
    assert quotas["refund"] == 50 and sum(quotas.values()) == 1000
    # the others keep their relative proportions
    assert abs(quotas["shipping"] / quotas["billing"] - 380 / 150) < 0.05


def test_rare_category_floor_is_capped_by_what_exists():
    quotas = allocate({"a": 990, "b": 10}, {"a": 5000, "b": 3}, size=100, minimum=20)
    assert quotas == {"a": 97, "b": 3}


def test_fewer_prompts_than_size_takes_everything():
    assert allocate({"a": 3, "b": 1}, {"a": 30, "b": 10}, size=1000, minimum=5) == {"a": 30, "b": 10}


def test_holdout_keeps_clusters_whole_and_is_stratified():
    rng = random.Random(0)
    rows = []
    for i in range(600):
        category = rng.choice(["a"] * 8 + ["b"] * 2)
        cluster = f"c{i // 3}"  # clusters of 3 near duplicates, sometimes logged under two categories
        rows.append((category, cluster, rng.getrandbits(64)))
    held = holdout_split(rows, fraction=0.1, minimum=5)
    held_clusters = {rows[i][1] for i in held}
    train_clusters = {rows[i][1] for i in range(len(rows)) if i not in held}
    assert not held_clusters & train_clusters
    assert abs(len(held) / len(rows) - 0.1) < 0.02
    per_category = Counter(rows[i][0] for i in held)
    totals = Counter(r[0] for r in rows)
    for category in totals:
        assert abs(per_category[category] / totals[category] - 0.1) < 0.05


def test_rare_category_gets_minimum_holdout_but_keeps_training_rows():
    rows = [("rare", f"r{i}", i) for i in range(8)] + [("big", f"b{i}", i) for i in range(200)]
    held = holdout_split(rows, fraction=0.05, minimum=5)
    assert sum(1 for i in held if rows[i][0] == "rare") == 4  # min(5, 8 // 2)
    assert sum(1 for i in held if rows[i][0] == "big") == 10
    assert holdout_split([("solo", "s", 1)], fraction=0.5, minimum=5) == set()
