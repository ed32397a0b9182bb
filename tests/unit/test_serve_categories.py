"""The serve app's slice labels default to the prompt set's categories (prompts/report.json)."""

from __future__ import annotations

from distill_ray.serve.deployment import known_categories
from distill_ray.storage import Workdir


def test_the_categories_are_the_counted_ones_not_the_report_sections(tmp_path):
    workdir = Workdir(str(tmp_path))
    assert known_categories(workdir) == []
    workdir.write_json({"category_counts": {"source": {"shipping": 9, "refund": 4, "fraud_report": 1},
                                            "available_after_dedupe": {"shipping": 8, "refund": 4},
                                            "quota": {"shipping": 5}, "train": {"shipping": 4, "refund": 2},
                                            "holdout": {"shipping": 1, "fraud_report": 1}}}, "prompts", "report.json")
    assert known_categories(workdir) == ["fraud_report", "refund", "shipping"]
    # a flywheel round's report counts train and holdout only
    workdir.write_json({"category_counts": {"train": {"billing": 3}, "holdout": {"account": 1}}},
                       "prompts", "report.json")
    assert known_categories(workdir) == ["account", "billing"]
