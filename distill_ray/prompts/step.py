"""Step 2: production logs -> `prompts/train`, `prompts/holdout`, `prompts/report.json`, manifest.

Read (bad rows reported, never fatal) -> dedupe (exact and near clusters) -> sample to `size`
keeping the source's category mix -> split by whole clusters -> write. Re-running with the same
source bytes and `prompts:` config does nothing.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from distill_ray.config.schema import PipelineConfig, Prompts
from distill_ray.manifest import StepRecord, up_to_date, write_manifest
from distill_ray.prompts.dedupe import Clusters, cluster_prompts
from distill_ray.prompts.normalize import seeded_rank
from distill_ray.prompts.read import SourceError, check_source, parse_unit, plan_units, unit_rows
from distill_ray.prompts.sample import allocate, holdout_split
from distill_ray.ray_env import init_ray
from distill_ray.storage import Workdir, content_hash

STEP = "prompts"
MAX_BAD_ROWS_LISTED = 1000
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
ARTIFACT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES_TYPE),
        ("category", pa.string()),
        ("reference", pa.string()),
        ("cluster", pa.string()),
        ("source", pa.string()),
    ]
)


def _parse_batch(batch: pa.Table, cfg_json: dict[str, Any], limit: int | None) -> pa.Table:
    return pa.concat_tables([parse_unit(unit, cfg_json, limit) for unit in batch.to_pylist()])


def _valid_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["error"])).drop_columns(["error"])


def _rows_in(batch: pa.Table, column: str, values: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch[column], value_set=values))


def _block_stats(batch: pa.Table, listed: int) -> pa.Table:
    """Per block: valid rows per category, and the first `listed` bad rows (merged on the driver)."""
    bad = batch.filter(pc.is_valid(batch["error"])).select(["order", "source", "error"]).sort_by("order")
    good = batch.filter(pc.is_null(batch["error"]))
    counts = Counter(good["category"].to_pylist())
    return pa.table({"stats": [json.dumps({"categories": counts, "bad": bad.num_rows,
                                           "bad_listed": bad.slice(0, listed).to_pylist()})]})


def _category_counts(batch: pa.Table) -> pa.Table:
    return pa.table({"counts": [json.dumps(Counter(batch["category"].to_pylist()))]})


def _merged_counts(ds: ray.data.Dataset) -> dict[str, int]:
    total: Counter[str] = Counter()
    for row in ds.map_batches(_category_counts, batch_format="pyarrow").take_all():
        total.update(json.loads(row["counts"]))
    return dict(total)


def _top_by_category(batch: pa.Table, quotas: dict[str, int], seed: int) -> pa.Table:
    """Per block, keep each category's `quota` best-ranked rows (the driver merges blocks)."""
    rows = batch.select(["order", "id", "category"]).to_pylist()
    for row in rows:
        row["rank"] = seeded_rank(seed, row["id"], str(row["order"]))
    kept: list[dict[str, Any]] = []
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    for category, members in by_category.items():
        members.sort(key=lambda r: r["rank"])
        kept.extend(members[: quotas.get(category, 0)])
    return pa.Table.from_pylist(
        kept, schema=pa.schema([("order", pa.int64()), ("id", pa.string()), ("category", pa.string()), ("rank", pa.uint64())])
    )


def _mix(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {c: round(100.0 * n / total, 2) for c, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def run_prompts(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the prompt set; returns the manifest (the existing one when up to date).

    Raises:
        SourceError: the source is missing, empty or of unknown format (exit 2 at the CLI).
    """
    cfg: Prompts = config.prompts
    workdir = Workdir(config.workdir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    files = check_source(cfg)
    record = StepRecord(STEP, {f: content_hash(f) for f in files}, {"prompts": cfg.model_dump(mode="json")})
    if manifest := up_to_date(workdir, record):
        echo(f"prompts: up to date ({manifest['counts']['train']} train, {manifest['counts']['holdout']} holdout "
             f"in {workdir.uri_of(STEP)}); nothing to do")
        return manifest
    units = plan_units(files, cfg)
    workdir.remove(STEP, "manifest.json")  # a half-rewritten step must never look complete
    timings["plan"] = time.perf_counter() - t0

    init_ray()
    t = time.perf_counter()
    echo(f"prompts: reading {len(files)} file(s) in {len(units)} unit(s)")
    parsed = (
        ray.data.from_items(unit_rows(units))
        .map_batches(_parse_batch, batch_size=1, batch_format="pyarrow",
                     fn_kwargs={"cfg_json": cfg.model_dump(mode="json"), "limit": cfg.limit})
        .materialize()
    )
    source_mix: Counter[str] = Counter()
    bad_count, bad_listed = 0, []
    for row in parsed.map_batches(_block_stats, batch_format="pyarrow", fn_kwargs={"listed": MAX_BAD_ROWS_LISTED}).take_all():
        stats = json.loads(row["stats"])
        source_mix.update(stats["categories"])
        bad_count += stats["bad"]
        bad_listed.extend(stats["bad_listed"])
    bad_listed = sorted(bad_listed, key=lambda r: r["order"])[:MAX_BAD_ROWS_LISTED]
    valid_count = sum(source_mix.values())
    timings["read"] = time.perf_counter() - t
    if valid_count == 0:
        raise SourceError(f"prompts.source: no usable rows in {', '.join(files)} ({bad_count} bad rows)")
    echo(f"prompts: {valid_count:,} valid rows, {bad_count:,} bad rows; clustering duplicates")

    t = time.perf_counter()
    clusters = cluster_prompts(parsed.map_batches(_valid_rows, batch_format="pyarrow"),
                               cfg.near_threshold, cfg.num_perm, cfg.shingle_size)
    root_of = clusters.root_of
    if cfg.dedupe == "near":
        dropped = pa.array([o for o, r in root_of.items() if o != r], pa.int64())
        candidates = clusters.unique.map_batches(
            lambda b, drop=dropped: b.filter(pc.invert(pc.is_in(b["order"], value_set=drop))), batch_format="pyarrow"
        ).materialize()
    elif cfg.dedupe == "exact":
        candidates = clusters.unique
    else:
        candidates = parsed.map_batches(_valid_rows, batch_format="pyarrow").materialize()
    available = _merged_counts(candidates)
    timings["dedupe"] = time.perf_counter() - t

    t = time.perf_counter()
    quotas = allocate(dict(source_mix), available, cfg.size, cfg.min_per_category)
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in candidates.map_batches(_top_by_category, batch_format="pyarrow",
                                      fn_kwargs={"quotas": quotas, "seed": cfg.seed}).take_all():
        by_category.setdefault(row["category"], []).append(row)
    chosen = [r for c, members in by_category.items() for r in sorted(members, key=lambda r: r["rank"])[: quotas[c]]]
    orders = pa.array(sorted(r["order"] for r in chosen), pa.int64())
    payload = sorted(parsed.map_batches(_rows_in, batch_format="pyarrow",
                                        fn_kwargs={"column": "order", "values": orders}).take_all(),
                     key=lambda r: r["order"])
    rows = _label_clusters(payload, clusters, cfg.dedupe)
    holdout_idx = holdout_split(
        [(r["category"], r["cluster"], seeded_rank(cfg.seed, "holdout", r["cluster"])) for r in rows],
        cfg.holdout_fraction, cfg.holdout_min_per_category,
    )
    holdout = sorted((rows[i] for i in holdout_idx), key=lambda r: r["id"])
    train = sorted((r for i, r in enumerate(rows) if i not in holdout_idx), key=lambda r: r["id"])
    timings["sample_split"] = time.perf_counter() - t

    t = time.perf_counter()
    workdir.write_table(pa.Table.from_pylist(train, schema=ARTIFACT_SCHEMA), STEP, "train")
    workdir.write_table(pa.Table.from_pylist(holdout, schema=ARTIFACT_SCHEMA), STEP, "holdout")
    output_counts = Counter(r["category"] for r in rows)
    source_pct, output_pct = _mix(source_mix), _mix(dict(output_counts))
    off_mix = {
        c: {"source_pct": source_pct.get(c, 0.0), "output_pct": output_pct.get(c, 0.0),
            "why": "raised to prompts.min_per_category" if output_counts[c] > source_mix[c] * len(rows) / valid_count
            else "the source has too few unique prompts of this category"}
        for c in source_mix if abs(source_pct.get(c, 0.0) - output_pct.get(c, 0.0)) > 2.0
    }
    report = {
        "source_files": files,
        "source_rows": valid_count + bad_count,
        "bad_rows": bad_count,
        "bad_rows_listed": [{"where": r["source"], "error": r["error"]} for r in bad_listed],
        "bad_rows_by_reason": dict(Counter(r["error"].split(":")[0] for r in bad_listed)),
        "valid_rows": valid_count,
        "duplicates_removed": {
            "exact": clusters.exact if cfg.dedupe != "none" else 0,
            "normalized": clusters.normalized if cfg.dedupe != "none" else 0,
            "near": clusters.near if cfg.dedupe == "near" else 0,
        },
        "duplicates_found": {"exact": clusters.exact, "normalized": clusters.normalized, "near": clusters.near},
        "dedupe": {"mode": cfg.dedupe, "method": "MinHash LSH over character shingles",
                   "threshold": cfg.near_threshold, "num_perm": cfg.num_perm, "shingle_size": cfg.shingle_size,
                   "bands": clusters.bands, "rows_per_band": clusters.rows_per_band},
        "unique_prompts": clusters.unique.count() - clusters.near,
        "category_mix": {"source_pct": source_pct, "output_pct": output_pct, "outside_2pp": off_mix},
        "category_counts": {"source": source_mix, "available_after_dedupe": available, "quota": quotas,
                            "train": dict(Counter(r["category"] for r in train)),
                            "holdout": dict(Counter(r["category"] for r in holdout))},
        "train": len(train),
        "holdout": len(holdout),
    }
    workdir.write_json(report, STEP, "report.json")
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    record.counts = {k: report[k] for k in ("source_rows", "bad_rows", "valid_rows", "unique_prompts", "train", "holdout")}
    record.counts["duplicates_removed"] = report["duplicates_removed"]
    record.timings = timings
    manifest = write_manifest(workdir, record)
    echo(summary(report, workdir.uri_of(STEP), timings["total"]))
    return manifest


def _label_clusters(payload: list[dict[str, Any]], clusters: Clusters, dedupe: str) -> list[dict[str, Any]]:
    """Artifact rows, each with `cluster`: the id of its cluster's earliest prompt."""
    first_order = {}
    if dedupe == "none":  # repeats of an id belong to the cluster of the id's first occurrence
        ids = pa.array(sorted({r["id"] for r in payload}), pa.string())
        first_order = {r["id"]: r["order"] for r in clusters.unique.map_batches(
            _rows_in, batch_format="pyarrow", fn_kwargs={"column": "id", "values": ids}).take_all()}
    root = {r["order"]: clusters.root_of.get(first_order.get(r["id"], r["order"]), first_order.get(r["id"], r["order"]))
            for r in payload}
    roots = pa.array(sorted(set(root.values())), pa.int64())
    root_id = {r["order"]: r["id"] for r in clusters.unique.map_batches(
        _rows_in, batch_format="pyarrow", fn_kwargs={"column": "order", "values": roots}).take_all()}
    seen: Counter[str] = Counter()
    rows = []
    for r in payload:
        seen[r["id"]] += 1
        rows.append({
            # Ids are unique unless dedupe is none: then repeats get a suffix (.2, .3, ...).
            "id": r["id"] if seen[r["id"]] == 1 else f"{r['id']}.{seen[r['id']]}",
            "messages": json.loads(r["messages"]), "category": r["category"], "reference": r["reference"],
            "cluster": root_id[root[r["order"]]], "source": r["source"],
        })
    return rows


def summary(report: dict[str, Any], where: str, seconds: float) -> str:
    """The one-screen summary printed at the end of the step."""
    dup = report["duplicates_removed"]
    lines = [
        f"prompts: {report['train']} train + {report['holdout']} holdout written to {where} in {seconds:.1f}s",
        f"  source rows {report['source_rows']:,}  bad rows {report['bad_rows']:,}  "
        f"duplicates removed: exact {dup['exact']:,}, normalized {dup['normalized']:,}, near {dup['near']:,}  "
        f"unique prompts {report['unique_prompts']:,}",
        f"  {'category':<22}{'source %':>9}{'output %':>9}{'train':>7}{'holdout':>8}",
    ]
    counts = report["category_counts"]
    for category, pct in report["category_mix"]["source_pct"].items():
        lines.append(
            f"  {category:<22}{pct:>9.1f}{report['category_mix']['output_pct'].get(category, 0.0):>9.1f}"
            f"{counts['train'].get(category, 0):>7}{counts['holdout'].get(category, 0):>8}"
        )
    for listed in report["bad_rows_listed"][:5]:
        lines.append(f"  bad row {listed['where']}: {listed['error']}")
    if report["bad_rows"] > 5:
        lines.append(f"  ... {report['bad_rows'] - 5} more bad rows in {where}/report.json")
    return "\n".join(lines)
