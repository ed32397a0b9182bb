"""Drift checks on served traffic against the training prompts (no Ray)."""

from __future__ import annotations

import json

from distill_ray.config import load_config
from distill_ray.drift import compare, psi


def _served(category: str, text: str, agreement: float | None = None) -> dict:
    return {"category": category, "prompt": [{"role": "user", "content": text}], "shadow_agreement": agreement}


TRAIN = [{"category": "shipping", "text": f"where is my order ORD-{100000 + i}? it is late"} for i in range(60)] + [
    {"category": "refund", "text": f"please refund ORD-{200000 + i}, the item broke"} for i in range(40)]


def test_same_traffic_is_ok_and_new_order_numbers_are_not_new_words():
    config = load_config(None, [])
    served = [_served("shipping", f"where is my order ORD-{300000 + i}? it is late", 1.0) for i in range(30)] + [
        _served("refund", f"please refund ORD-{400000 + i}, the item broke", 1.0) for i in range(20)]
    report = compare(TRAIN, served, config)
    assert report["verdict"] == "ok" and report["reasons"] == []
    assert report["checks"]["unseen_token_rate"]["value"] == 0.0
    assert report["checks"]["category_psi"]["value"] < 0.01


def test_shifted_traffic_is_drift_with_a_reason_per_check():
    config = load_config(None, [])
    served = [_served("billing", "i was charged twice for the subscription renewal this month, why is that so "
                                 "expensive and who approved it", 0.5) for _ in range(30)]
    report = compare(TRAIN, served, config)
    assert report["verdict"] == "drift"
    text = " | ".join(report["reasons"])
    assert "category mix moved" in text and "billing" in text
    assert "prompt length changed" in text and "never appear in the training prompts" in text
    assert "shadow agreement below 0.9 in billing (0.50)" in text
    assert psi({"a": 50, "b": 50}, {"a": 50, "b": 50}) == 0.0


def test_little_traffic_is_not_a_verdict():
    assert compare(TRAIN, [_served("shipping", "where is my order")] * 5, load_config(None, []))["verdict"] == \
        "not_enough_traffic"


def test_serve_logs_are_a_prompt_source_for_the_next_distillation():
    """The flywheel: a line of serve/logs/ parses as a prompt row with its category."""
    from distill_ray.config.schema import Prompts
    from distill_ray.prompts.read import RowParser

    line = {"request_id": "r1", "user": "u", "category": "refund", "mode": "shadow", "served_by": "teacher",
            "prompt": [{"role": "user", "content": "Please refund ORD-123456"}], "answer": "ORD-123456"}
    cfg = Prompts(source="runs/x/serve/logs/", messages_field="prompt", text_field=None, category_field="category",
                  reference_field=None)
    row = RowParser(cfg).parse(line, 0, "requests-1.jsonl")
    assert row["error"] is None and row["category"] == "refund"
    assert json.loads(row["messages"]) == line["prompt"]


# Each traffic origin against its own reference, on a workdir as the prompts step and the serve app
# leave it: production has 5% fraud reports, the training set lifts them to 10 prompts and the
# stratified holdout keeps 10 of each category, so the holdout's mix is nothing like production's.
SOURCE_MIX = {"shipping": 600, "refund": 350, "fraud_report": 50}
TEXTS = {"shipping": "where is my order ORD-{n}? it is late",
         "refund": "please refund ORD-{n}, the item broke",
         "fraud_report": "someone used my card for order ORD-{n} and i did not buy it"}


def _rows(split: str, counts: dict[str, int], texts: dict[str, str] = TEXTS) -> list[dict]:
    return [{"id": f"{split}-{c}-{i}", "category": c, "messages": [{"role": "user", "content": texts[c].format(n=100000 + i)}]}
            for c, n in counts.items() for i in range(n)]


def _line(category: str, text: str, origin: str | None = None, status: int | None = 200, agreement: float | None = 1.0):
    return {"request_id": "r", "category": category, "mode": "shadow", "prompt": [{"role": "user", "content": text}],
            "shadow_agreement": agreement, "origin": origin, "status": status}


def _replayed_holdout(origin: str | None, texts: dict[str, str] = TEXTS) -> list[dict]:
    """What `distill-ray replay` logs: every held-out prompt twice (shadow, then canary)."""
    return [_line(r["category"], r["messages"][0]["content"], origin) for r in _rows("holdout", HOLDOUT, texts)] * 2


TRAIN_COUNTS = {"shipping": 60, "refund": 35, "fraud_report": 10}
HOLDOUT = {"shipping": 12, "refund": 10, "fraud_report": 10}


def _drift(tmp_path, lines: list[dict], holdout_texts: dict[str, str] = TEXTS) -> tuple[dict, list[str]]:
    import pyarrow as pa

    from distill_ray.drift import run_drift
    from distill_ray.storage import Workdir

    workdir = Workdir(str(tmp_path / "run"))
    workdir.write_json({"step": "prompts", "status": "complete"}, "prompts", "manifest.json")
    workdir.write_table(pa.Table.from_pylist(_rows("train", TRAIN_COUNTS)), "prompts", "train")
    workdir.write_table(pa.Table.from_pylist(_rows("holdout", HOLDOUT, holdout_texts)), "prompts", "holdout")
    workdir.write_json({"category_counts": {"source": SOURCE_MIX, "train": TRAIN_COUNTS, "holdout": HOLDOUT}},
                       "prompts", "report.json")
    workdir.write_bytes("".join(json.dumps(line) + "\n" for line in lines).encode(), "serve", "logs",
                        "requests-20270101T000000-abc-000001.jsonl")
    echoed: list[str] = []
    report = run_drift(load_config(None, [f"workdir={workdir.uri}"]), echoed.append)
    assert json.loads((tmp_path / "run" / "drift" / "report.json").read_text())["verdict"] == report["verdict"]
    return report, echoed


def test_the_replay_of_a_stratified_holdout_is_compared_with_the_holdout_not_with_production(tmp_path):
    report, echoed = _drift(tmp_path, _replayed_holdout("replay:holdout"))
    assert report["verdict"] == "ok" and report["reasons"] == []
    replay = report["origins"]["replay:holdout"]
    assert replay["checks"]["category_psi"]["value"] == 0.0 and replay["checks"]["length_shift"]["value"] == 0.0
    assert replay["reference"] == "the replayed sample of prompts/holdout (32 prompts)"
    assert report["checks_origin"] == "replay:holdout" and report["checks"] == replay["checks"]
    assert report["served_requests"] == 64 and report["train_prompts"] == 105 and "client" not in report["origins"]
    assert any(line.startswith("  replay:holdout: ok, 64 requests") for line in echoed)


def test_the_same_lines_as_client_traffic_are_a_moved_mix(tmp_path):
    report, _ = _drift(tmp_path, _replayed_holdout(None))
    assert report["verdict"] == "drift"
    client = report["origins"]["client"]
    assert client["checks"]["category_psi"]["value"] > 0.5  # 31% fraud reports against production's 5%
    assert client["reference"].startswith("the production mix (prompts/report.json)")
    assert any(r.startswith("client: category mix moved") and "fraud_report" in r for r in report["reasons"])


def test_client_traffic_with_the_production_mix_is_ok_beside_a_replay(tmp_path):
    # 5% fraud reports, as in production; against the train mix (10 of 105) this alone reads PSI ~0.03
    client = [_line(c, TEXTS[c].format(n=500000 + i)) for c, n in {"shipping": 60, "refund": 35, "fraud_report": 5}.items()
              for i in range(n)]
    report, echoed = _drift(tmp_path, client + _replayed_holdout("replay:holdout"))
    assert report["verdict"] == "ok", report["reasons"]
    assert report["origins"]["client"]["checks"]["category_psi"]["value"] < 0.001
    assert report["checks_origin"] == "client" and report["served_requests"] == 164
    assert not any("next: distill again" in line for line in echoed)


def test_failed_requests_are_counted_apart_and_left_out_of_the_checks(tmp_path):
    client = [_line(c, TEXTS[c].format(n=500000 + i)) for c, n in {"shipping": 60, "refund": 35, "fraud_report": 5}.items()
              for i in range(n)]
    long_text = "an unknown kind of request that is much longer than anything in training " * 5
    failed = [_line("other", long_text, status=429, agreement=None)] * 20 + [
        _line("other", long_text, origin="replay:holdout", status=500, agreement=None)] * 10
    report, _ = _drift(tmp_path, client + _replayed_holdout("replay:holdout") + failed)
    assert report["verdict"] == "ok", report["reasons"]
    assert report["served_requests"] == 164 and report["error_requests"] == 30
    assert report["errors_by_status"] == {"429": 20, "500": 10}
    assert report["origins"]["client"]["error_requests"] == 20
    assert report["origins"]["replay:holdout"]["errors_by_status"] == {"500": 10}
    assert "other" not in report["origins"]["client"]["checks"]["category_psi"]["served_mix"]
    assert report["origins"]["client"]["checks"]["unseen_token_rate"]["value"] == 0.0


def test_replayed_prompts_are_still_checked_for_words_never_trained_on(tmp_path):
    """The holdout is real traffic the student never trained on: words new to training are news there too."""
    texts = {**TEXTS, "fraud_report": "chargeback dispute: unauthorised transaction at merchant for ORD-{n}"}
    report, _ = _drift(tmp_path, _replayed_holdout("replay:holdout", texts), holdout_texts=texts)
    checks = report["origins"]["replay:holdout"]["checks"]
    assert checks["category_psi"]["value"] == 0.0 and checks["length_shift"]["value"] == 0.0
    assert checks["unseen_token_rate"]["value"] > 0.05 and "chargeback" in checks["unseen_token_rate"]["examples"]
    assert report["verdict"] == "drift"
    assert report["reasons"] == [f"replay:holdout: {checks['unseen_token_rate']['value']:.1%} of served words never "
                                 "appear in the training prompts (e.g. chargeback, dispute, unauthorised, transaction, at)"]


def test_an_origin_without_a_reference_is_counted_not_checked_and_small_origins_do_not_decide(tmp_path):
    lines = [_line("shipping", "where is my order ORD-1?", origin="loadtest")] * 50 + _replayed_holdout(
        "replay:holdout")[:10]
    report, echoed = _drift(tmp_path, lines)
    assert report["verdict"] == "not_enough_traffic" and report["reasons"] == []
    assert report["origins"]["loadtest"] == {"verdict": "no_reference", "reasons": [], "served_requests": 50,
                                             "error_requests": 0, "errors_by_status": {}}
    assert report["origins"]["replay:holdout"]["verdict"] == "not_enough_traffic"
    assert "  loadtest: 50 requests, not checked (no reference for this origin)" in echoed
