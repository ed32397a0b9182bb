"""`distill-ray drift`: is the served traffic still the traffic the student was distilled for?

Compares the request logs (`serve/logs/`) with the training prompt set (`prompts/train`):
- category mix: population stability index (PSI) over the categories (`drift.max_category_psi`);
- prompt length: relative change of the median user-text length in words (`max_length_shift`);
- vocabulary: the share of served words never seen in training prompts, digits folded so that new
  order numbers are not new words (`max_unseen_token_rate`);
- shadow agreement per slice, from shadow-mode requests (`min_shadow_agreement`).
The verdict is `drift` with a reason per failed check, `ok`, or `not_enough_traffic` (below
`MIN_REQUESTS` logged requests). Written to `drift/report.json`. The same logs can be the next
prompt set: `prompts.source: <workdir>/serve/logs/`, `messages_field: prompt`, `text_field: null`,
`category_field: category` (the flywheel).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from distill_ray.config.schema import PipelineConfig
from distill_ray.serve.logs import read_logs
from distill_ray.storage import Workdir
from distill_ray.teacher.errors import MissingInput

MIN_REQUESTS = 20
MIN_SLICE_REQUESTS = 5
_WORD = re.compile(r"\w+")
EPS = 1e-4


def user_text(messages: list[dict[str, Any]]) -> str:
    return "\n".join(str(m.get("content") or "") for m in messages or [] if m.get("role") == "user")


def words(text: str) -> list[str]:
    return [re.sub(r"\d", "0", w) for w in _WORD.findall(text.lower())]


def psi(expected: Counter, actual: Counter) -> float:
    """Population stability index of `actual` against `expected` (category counts)."""
    keys = set(expected) | set(actual)
    n_e, n_a = sum(expected.values()) or 1, sum(actual.values()) or 1
    total = 0.0
    for k in keys:
        e, a = max(expected[k] / n_e, EPS), max(actual[k] / n_a, EPS)
        total += (a - e) * math.log(a / e)
    return total


def compare(train: list[dict[str, Any]], served: list[dict[str, Any]], config: PipelineConfig) -> dict[str, Any]:
    """train: {category, text}; served: log lines. The checks, their figures and the verdict."""
    d = config.drift
    checks: dict[str, Any] = {}
    reasons: list[str] = []
    mix_train = Counter(r["category"] for r in train)
    mix_served = Counter(r.get("category") or "unknown" for r in served)
    value = psi(mix_train, mix_served)
    checks["category_psi"] = {"value": round(value, 4), "max": d.max_category_psi,
                              "train_mix": _shares(mix_train), "served_mix": _shares(mix_served)}
    if value > d.max_category_psi:
        moved = sorted(set(mix_train) | set(mix_served),
                       key=lambda c: -abs(mix_served[c] / max(1, len(served)) - mix_train[c] / max(1, len(train))))[:3]
        reasons.append(f"category mix moved (PSI {value:.3f} > {d.max_category_psi}; most: {', '.join(moved)})")
    len_train = statistics.median(len(words(r["text"])) for r in train) if train else 0
    texts = [user_text(r.get("prompt") or []) for r in served]
    len_served = statistics.median(len(words(t)) for t in texts) if texts else 0
    shift = abs(len_served - len_train) / len_train if len_train else 0.0
    checks["length_shift"] = {"value": round(shift, 4), "max": d.max_length_shift, "train_median_words": len_train,
                              "served_median_words": len_served}
    if shift > d.max_length_shift:
        reasons.append(f"prompt length changed by {shift:.0%} (median {len_train} -> {len_served} words)")
    vocab = {w for r in train for w in words(r["text"])}
    served_words = [w for t in texts for w in words(t)]
    unseen = [w for w in served_words if w not in vocab]
    rate = len(unseen) / len(served_words) if served_words else 0.0
    checks["unseen_token_rate"] = {"value": round(rate, 4), "max": d.max_unseen_token_rate,
                                   "examples": [w for w, _ in Counter(unseen).most_common(10)]}
    if rate > d.max_unseen_token_rate:
        reasons.append(f"{rate:.1%} of served words never appear in the training prompts "
                       f"(e.g. {', '.join(checks['unseen_token_rate']['examples'][:5])})")
    agreement: dict[str, list[float]] = defaultdict(list)
    for r in served:
        if r.get("shadow_agreement") is not None:
            agreement[r.get("category") or "unknown"].append(float(r["shadow_agreement"]))
    slices = {c: {"requests": len(v), "agreement": round(sum(v) / len(v), 4)} for c, v in sorted(agreement.items())}
    low = [c for c, s in slices.items() if s["requests"] >= MIN_SLICE_REQUESTS and s["agreement"] < d.min_shadow_agreement]
    checks["shadow_agreement"] = {"min": d.min_shadow_agreement, "slices": slices, "below": low}
    if low:
        reasons.append("shadow agreement below " + f"{d.min_shadow_agreement} in " + ", ".join(
            f"{c} ({slices[c]['agreement']:.2f})" for c in low))
    if len(served) < MIN_REQUESTS:
        verdict = "not_enough_traffic"
    else:
        verdict = "drift" if reasons else "ok"
    return {"verdict": verdict, "reasons": reasons, "served_requests": len(served), "train_prompts": len(train),
            "checks": checks}


def run_drift(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    workdir = Workdir(config.workdir)
    if not workdir.exists("prompts", "manifest.json"):
        raise MissingInput(f"no prompt set in {workdir.uri_of('prompts')}: run `distill-ray prompts` first")
    served = read_logs(workdir)
    if not served:
        raise MissingInput(f"no request logs in {workdir.uri_of('serve', 'logs')}: serve some traffic first")
    train = [{"category": r["category"], "text": user_text(r["messages"])}
             for r in workdir.read_table("prompts", "train").to_pylist()]
    report = {**compare(train, served, config), "time": time.time()}
    workdir.write_json(report, "drift", "report.json")
    echo(f"drift: {report['verdict']} over {report['served_requests']} served requests against "
         f"{report['train_prompts']} training prompts (category PSI {report['checks']['category_psi']['value']}, "
         f"length shift {report['checks']['length_shift']['value']:.0%}, unseen words "
         f"{report['checks']['unseen_token_rate']['value']:.1%})")
    for reason in report["reasons"]:
        echo(f"  - {reason}")
    if report["verdict"] == "drift":
        echo("  next: distill again from the served traffic (prompts.source: "
             f"{workdir.uri_of('serve', 'logs')}, messages_field: prompt, category_field: category)")
    echo(f"drift: report in {workdir.uri_of('drift', 'report.json')}")
    return report


def _shares(counts: Counter) -> dict[str, float]:
    n = sum(counts.values()) or 1
    return {k: round(v / n, 4) for k, v in sorted(counts.items())}
