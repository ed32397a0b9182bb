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
