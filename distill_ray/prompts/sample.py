"""Sampling to the production mix, and the leak-free holdout split. Pure functions, unit-tested.

Mix: each category gets `size x its share of the source` prompts (largest-remainder rounding),
except that a category never gets more than it has (its surplus goes to the others in proportion)
and a rare category keeps at least `min_per_category` (when it has that many), so edge cases do not
vanish. Categories then sit within a rounding error of their source share, apart from the lifted
rare ones and those the source cannot fill; both are listed in the report.

Split: per category, whole near-duplicate clusters go to the holdout in a seeded random order until
`holdout_fraction` of the category's prompts (at least `holdout_min_per_category`, never all of them)
are held out. A prompt and its near duplicates therefore never straddle train and holdout.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence


def allocate(shares: Mapping[str, float], available: Mapping[str, int], size: int, minimum: int) -> dict[str, int]:
    """How many prompts each category gets.

    Args:
        shares: each category's share of the source (any positive weights).
        available: prompts each category has after dedupe.
        size: prompts wanted in total.
        minimum: the floor for rare categories (capped by what they have, and by size / categories).

    Returns:
        category -> count, summing to min(size, total available).
    """
    cats = [c for c in shares if available.get(c, 0) > 0]
    total = min(size, sum(available[c] for c in cats))
    if not cats or total == 0:
        return {c: 0 for c in shares}
    floor = min(minimum, total // len(cats))
    fixed: dict[str, int] = {}
    while True:
        free = [c for c in cats if c not in fixed]
        remaining = total - sum(fixed.values())
        weight = sum(shares[c] for c in free)
        if not free:
            break
        desired = {c: remaining * shares[c] / weight if weight > 0 else remaining / len(free) for c in free}
        changed = False
        for c in free:
            if desired[c] > available[c]:
                fixed[c], changed = available[c], True
            elif desired[c] < min(floor, available[c]):
                fixed[c], changed = min(floor, available[c]), True
        if not changed:
            fixed.update(_largest_remainder(desired, remaining))
            break
    return {c: fixed.get(c, 0) for c in shares}


def _largest_remainder(desired: Mapping[str, float], total: int) -> dict[str, int]:
    base = {c: math.floor(v) for c, v in desired.items()}
    left = total - sum(base.values())
    for c in sorted(desired, key=lambda c: (desired[c] - base[c], c), reverse=True)[:left]:
        base[c] += 1
    return base


def holdout_split(
    rows: Sequence[tuple[str, str, int]],
    fraction: float,
    minimum: int,
) -> set[int]:
    """Choose holdout rows by whole clusters, stratified by category.

    Args:
        rows: (category, cluster, rank) per selected prompt; `rank` is a seeded random key.
        fraction: share of each category to hold out.
        minimum: at least this many per category (when the category has more than that).

    Returns:
        The indices (into `rows`) of the holdout prompts.
    """
    if fraction <= 0:
        return set()
    members: dict[str, list[int]] = defaultdict(list)
    cluster_rank: dict[str, int] = {}
    for index, (_, cluster, rank) in enumerate(rows):
        members[cluster].append(index)
        cluster_rank[cluster] = min(rank, cluster_rank.get(cluster, rank))
    # A cluster moves as one; it is counted under its most common category.
    by_category: dict[str, list[str]] = defaultdict(list)
    for cluster, indices in members.items():
        category = Counter(rows[i][0] for i in indices).most_common(1)[0][0]
        by_category[category].append(cluster)
    holdout: set[int] = set()
    for clusters in by_category.values():
        n = sum(len(members[c]) for c in clusters)
        if n < 2:
            continue  # a single prompt: training needs it more than a one-row slice score does
        target = min(max(round(fraction * n), min(minimum, n // 2), 1), n - 1)
        taken = 0
        for cluster in sorted(clusters, key=lambda c: (cluster_rank[c], c)):
            if taken >= target:
                break
            if taken + len(members[cluster]) > n - 1:
                continue  # would leave no training prompt for this category
            holdout.update(members[cluster])
            taken += len(members[cluster])
    return holdout
