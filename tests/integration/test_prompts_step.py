"""`distill-ray prompts` on a real local Ray: the example log, reruns, and a workdir on S3."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import boto3
import pyarrow.dataset as pads
import pytest

from distill_ray.cli import main
from distill_ray.config import load_config
from distill_ray.examples.support_orders import write_log
from distill_ray.prompts.step import run_prompts
from distill_ray.storage import Workdir

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def example_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("logs") / "support.jsonl"
    write_log(str(path), n_rows=1500, seed=7)
    return path


def _config(log, workdir, *extra):
    return load_config(None, [f"prompts.source={log}", f"workdir={workdir}", "prompts.size=400",
                              "prompts.reference_field=order_id", *extra])


@pytest.fixture(scope="module")
def example_run(example_log, tmp_path_factory):
    """The example log's prompt set with the default settings, built once for the module:
    (its workdir, its manifest, what the step printed). Tests that change it work on a copy."""
    workdir = tmp_path_factory.mktemp("example") / "run"
    printed: list[str] = []
    manifest = run_prompts(_config(example_log, workdir), echo=printed.append)
    return workdir, manifest, "\n".join(printed)


def test_prompt_set_is_deduplicated_representative_and_leak_free(example_log, example_run):
    workdir, manifest, out = example_run
    assert "train" in out and "holdout" in out and "bad row" in out

    work = Workdir(str(workdir))
    report = work.read_json("prompts", "report.json")
    train, holdout = work.read_table("prompts", "train").to_pylist(), work.read_table("prompts", "holdout").to_pylist()
    assert len(train) + len(holdout) == 400 == manifest["counts"]["train"] + manifest["counts"]["holdout"]
    assert set(train[0]) >= {"id", "messages", "category", "reference", "cluster"}
    assert train[0]["messages"][0]["role"] == "user"

    # bad lines are counted and listed with their line numbers
    log_lines = example_log.read_text().split("\n")
    assert report["bad_rows"] > 0 and report["bad_rows"] == len(report["bad_rows_listed"])
    for bad in report["bad_rows_listed"]:
        line_no = int(bad["where"].rsplit(":", 1)[1])
        raw = log_lines[line_no - 1]
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            continue  # unparseable: that is the reported reason
        assert not isinstance(record.get("text"), str) or not record["text"].strip(), bad

    # duplicates were found of every kind and none survive
    assert all(report["duplicates_removed"][kind] > 0 for kind in ("exact", "normalized", "near"))
    everything = train + holdout
    assert len({r["id"] for r in everything}) == len(everything)
    assert len({r["cluster"] for r in everything}) == len(everything)

    # no leakage: disjoint by id and by near-duplicate cluster
    assert not {r["id"] for r in train} & {r["id"] for r in holdout}
    assert not {r["cluster"] for r in train} & {r["cluster"] for r in holdout}

    # the production mix: each category within 2 points of the source, unless lifted or short
    mix = report["category_mix"]
    for category, source_pct in mix["source_pct"].items():
        if category not in mix["outside_2pp"]:
            assert abs(mix["output_pct"][category] - source_pct) <= 2.0, category
    for category, why in mix["outside_2pp"].items():
        assert why["why"] == "raised to prompts.min_per_category"
        floor = min(20, report["category_counts"]["available_after_dedupe"][category])  # the documented floor
        assert Counter(r["category"] for r in everything)[category] == floor

    # every category is in the holdout, stratified
    assert set(Counter(r["category"] for r in holdout)) == set(mix["source_pct"])
    assert manifest["status"] == "complete" and manifest["inputs"][str(example_log)].startswith("sha256:")


def test_rerun_with_same_inputs_does_nothing_and_changes_rerun(example_log, example_run, tmp_path, capsys):
    built, first, _ = example_run
    shutil.copytree(built, tmp_path / "run")  # a finished run, moved: its manifest still stands for it
    config = _config(example_log, tmp_path / "run")
    again = run_prompts(config)
    assert "up to date" in capsys.readouterr().out
    assert again["finished_at"] == first["finished_at"]

    changed = run_prompts(_config(example_log, tmp_path / "run", "prompts.size=300"))
    assert changed["counts"]["train"] + changed["counts"]["holdout"] == 300


def test_s3_workdir_and_source_give_the_same_ids_as_local(example_log, example_run, s3_bucket):
    boto3.client("s3").upload_file(str(example_log), s3_bucket, "logs/support.jsonl")
    built, local, _ = example_run
    remote = run_prompts(_config(f"s3://{s3_bucket}/logs/support.jsonl", f"s3://{s3_bucket}/runs/x"))
    assert local["counts"] == remote["counts"]
    ids = {}
    for name, root in (("local", str(built)), ("s3", f"s3://{s3_bucket}/runs/x")):
        work = Workdir(root)
        ids[name] = {split: sorted(r["id"] for r in work.read_table("prompts", split).to_pylist())
                     for split in ("train", "holdout")}
    assert ids["local"] == ids["s3"]
    # artifacts are readable by any Parquet reader straight from S3
    objects = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="runs/x/prompts/")["Contents"]
    assert {o["Key"].rsplit("/", 1)[-1] for o in objects} >= {"manifest.json", "report.json", "part-00000.parquet"}
    table = pads.dataset(f"{s3_bucket}/runs/x/prompts/train", filesystem=Workdir(f"s3://{s3_bucket}").fs).to_table()
    assert table.num_rows == local["counts"]["train"]


def test_keeping_duplicates_still_splits_by_cluster(example_log, tmp_path):
    run_prompts(_config(example_log, tmp_path / "run", "prompts.dedupe=none"))
    work = Workdir(str(tmp_path / "run"))
    train, holdout = work.read_table("prompts", "train").to_pylist(), work.read_table("prompts", "holdout").to_pylist()
    assert not {r["cluster"] for r in train} & {r["cluster"] for r in holdout}
    assert len({r["id"] for r in train + holdout}) == len(train) + len(holdout)  # repeats get a suffix


def test_cli_log_with_bad_lines_exits_zero(tmp_path, write_jsonl, capsys):
    log = write_jsonl([{"text": f"Where is order ORD-{100000 + i}? It is late by {i} days.", "category": "shipping"}
                       for i in range(60)] + ['{"text": ', {"text": 7}])
    config = tmp_path / "c.yaml"
    config.write_text(f"workdir: {tmp_path / 'w'}\nprompts:\n  source: {log}\n  size: 20\n")
    code = main(["prompts", str(config)])
    out = capsys.readouterr().out
    assert code == 0
    assert "bad rows 2" in out and "log.jsonl:61" in out and "log.jsonl:62" in out
