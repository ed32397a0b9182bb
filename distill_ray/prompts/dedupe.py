"""Exact and near-duplicate clustering on Ray Data, in memory bounded per node, not by the data.

1. Exact: rows are hash-partitioned by id (the hash of the normalised text) with Ray Data's
   `repartition(keys=...)`, which keeps every row of a key in one block; each block is then
   aggregated with pyarrow's vectorised group-by. Each id keeps its first occurrence in source
   order (the minimum of a zero-padded `order|category` key carries the first row's category
   along without a join). Repeats are counted as `exact` (byte-identical text) or `normalized`
   (differs only in case, spacing, punctuation).
2. Near: MinHash signatures of the unique prompts are cut into LSH bands (see `minhash`); the
   (band key, row) pairs are hash-partitioned by band key the same way, and every bucket holding
   more than one prompt yields edges to its earliest member. Only these edges (as many as there are near duplicates, not rows)
   reach the driver, where union-find turns them into clusters. The earliest prompt of a cluster
   is its representative.

Everything row-sized stays in Ray's object store (which spills to disk), so the source can be far
larger than one machine's memory; the driver holds the edges and the final sample only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from distill_ray.prompts.minhash import band_keys, lsh_params, signatures

ORDER_DIGITS = 20  # zero-padded order: the string minimum is the earliest row


@dataclass
class Clusters:
    """The outcome of dedupe."""

    unique: ray.data.Dataset  # one row per id: id, order (first occurrence), category, normalized
    exact: int = 0  # byte-identical repeats
    normalized: int = 0  # repeats equal after normalisation
    near: int = 0  # unique prompts that are near duplicates of an earlier one
    bands: int = 0
    rows_per_band: int = 0
    root_of: dict[int, int] = field(default_factory=dict)  # order -> order of its cluster's representative


def _partitions() -> int:
    return max(2, min(64, int(ray.cluster_resources().get("CPU", 2))))


def _id_keys(batch: pa.Table) -> pa.Table:
    first = pc.binary_join_element_wise(
        pc.utf8_lpad(pc.cast(batch["order"], pa.string()), ORDER_DIGITS, "0"), batch["category"], "|"
    )
    return pa.table({"id": batch["id"], "raw_hash": batch["raw_hash"], "first": first, "normalized": batch["normalized"]})


def _aggregate_ids(block: pa.Table) -> pa.Table:
    """One row per id in this block (a hash partition holds every row of its ids)."""
    grouped = block.group_by("id").aggregate(
        [("id", "count"), ("raw_hash", "count_distinct"), ("first", "min"), ("normalized", "min")]
    )
    first = grouped["first_min"].to_pylist()
    return pa.table({
        "id": grouped["id"],
        "order": pa.array([int(f[:ORDER_DIGITS]) for f in first], pa.int64()),
        "category": pa.array([f[ORDER_DIGITS + 1:] for f in first], pa.string()),
        "normalized": grouped["normalized_min"],
        "n": grouped["id_count"],
        "n_raw": grouped["raw_hash_count_distinct"],
    })


def _band_rows(batch: pa.Table, num_perm: int, shingle_size: int, bands: int, rows: int) -> pa.Table:
    keys = band_keys(signatures(batch["normalized"].to_pylist(), num_perm, shingle_size), bands, rows)
    return pa.table({"band": keys.reshape(-1), "order": np.repeat(batch["order"].to_numpy(), bands)})


def _bucket_edges(block: pa.Table) -> pa.Table:
    """Edges from every prompt in a shared LSH bucket to the bucket's earliest prompt."""
    buckets = block.group_by("band").aggregate([("order", "min"), ("order", "count")])
    shared = buckets.filter(pc.greater(buckets["order_count"], 1)).select(["band", "order_min"])
    edges = block.join(shared, "band", join_type="inner").select(["order", "order_min"])
    edges = edges.filter(pc.not_equal(edges["order"], edges["order_min"])).rename_columns(["order", "root"])
    return edges.group_by(["order", "root"]).aggregate([])


def _sums(batch: pa.Table) -> pa.Table:
    return pa.table({"rows": [pc.sum(batch["n"]).as_py() or 0], "raw": [pc.sum(batch["n_raw"]).as_py() or 0],
                     "ids": [batch.num_rows]})


class UnionFind:
    """Union-find where the smaller key (the earlier source row) always becomes the root."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> dict[int, int]:
        return {x: self.find(x) for x in list(self.parent)}


def cluster_prompts(valid: ray.data.Dataset, threshold: float, num_perm: int, shingle_size: int) -> Clusters:
    """Group valid source rows (order, id, raw_hash, normalized, category) into duplicate clusters.

    Near-duplicate clusters are computed whatever `prompts.dedupe` says: even when duplicates are
    kept, the holdout split must not separate them.
    """
    parts = _partitions()
    unique = (
        valid.map_batches(_id_keys, batch_format="pyarrow")
        .repartition(parts, keys=["id"])
        .map_batches(_aggregate_ids, batch_format="pyarrow", batch_size=None)
        .materialize()
    )
    totals = unique.map_batches(_sums, batch_format="pyarrow").take_all()
    rows, raw, ids = (sum(t[k] for t in totals) for k in ("rows", "raw", "ids"))

    bands, per_band = lsh_params(threshold, num_perm)
    edges = (
        unique.map_batches(_band_rows, batch_format="pyarrow", batch_size=1024,
                           fn_kwargs={"num_perm": num_perm, "shingle_size": shingle_size, "bands": bands, "rows": per_band})
        .repartition(parts, keys=["band"])
        .map_batches(_bucket_edges, batch_format="pyarrow", batch_size=None)
    )
    clusters = UnionFind()
    for batch in edges.iter_batches(batch_format="pyarrow", batch_size=65536):
        for member, root in zip(batch["order"].to_pylist(), batch["root"].to_pylist(), strict=True):
            clusters.union(member, root)
    root_of = clusters.roots()
    near = sum(1 for order, root in root_of.items() if order != root)
    return Clusters(unique=unique, exact=rows - raw, normalized=raw - ids, near=near,
                    bands=bands, rows_per_band=per_band, root_of=root_of)
