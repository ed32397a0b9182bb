"""`distill-ray drift`: is the served traffic still the traffic the student was distilled for?

Compares the request logs (`serve/logs/`) with the prompt sets, each traffic origin with its own
reference. A line's `origin` is the request's `x-distill-origin` header:
- no origin (`client` in the report): ordinary client traffic, against the production mix. That is
  the source's category mix recorded in `prompts/report.json` (`category_counts.source`: every valid
  row of the production logs the prompt set was drawn from), not the `prompts/train` mix: the
  prompts step lifts rare categories to `prompts.min_per_category` and the holdout takes at least
  `prompts.holdout_min_per_category` of each, so unchanged production traffic would differ from
  the train mix by design. (Where the report has no source counts: the train mix.) Lengths
  against the training prompts, which are the production prompts less duplicates.
- `replay:holdout` (`distill-ray replay`): the held-out prompts the replay sends (the same fixed
  sample of `prompts/holdout` every run, `serve.replay_requests`), for mix and length. The holdout
  is stratified, so against the production mix its own replay read as a moved mix (PSI 0.436 in
  the bundled example) although nothing moved. A replay cannot move its own mix: there this check
  says that the logs hold what was sent (a category whose requests failed shows up). The
  informative checks for replayed traffic are the vocabulary and the shadow agreement.
- any other origin: counted, not checked (there is no reference for it).
The checks, per origin:
- category mix: population stability index (PSI) over the categories (`drift.max_category_psi`);
- prompt length: relative change of the median user-text length in words (`max_length_shift`);
- vocabulary: the share of served words never seen in the training prompts, digits folded so that
  new order numbers are not new words (`max_unseen_token_rate`); always against `prompts/train`,
  for replayed held-out prompts too: they are real traffic the student never trained on;
- shadow agreement per slice, from shadow-mode requests (`min_shadow_agreement`).
Lines of failed requests (`status` other than 200) are counted apart and left out of the checks.
An origin's verdict is `drift` with a reason per failed check, `ok`, or `not_enough_traffic` (below
`MIN_REQUESTS` answered requests); the overall verdict is `drift` when any origin with enough
traffic drifted. Written to `drift/report.json`: per origin under `origins`, and at the top level
`verdict`, `reasons` (each named by its origin), `served_requests`, `error_requests`,
`train_prompts` and `checks` (those of client traffic, else of the origin with the most requests,
named by `checks_origin`). The same logs are the next prompt set: `distill-ray redistill`
(`distill_ray.flywheel`) distils again from their client traffic, leaving out the replayed holdout
and the failed requests.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distill_ray.config.schema import PipelineConfig
from distill_ray.serve.logs import read_logs
from distill_ray.serve.replay import ORIGIN as REPLAY_ORIGIN
from distill_ray.serve.replay import replay_sample
from distill_ray.storage import Workdir
from distill_ray.teacher.errors import MissingInput

MIN_REQUESTS = 20
MIN_SLICE_REQUESTS = 5
CLIENT = "client"  # the report's name for lines without an origin: ordinary client traffic
_WORD = re.compile(r"\w+")
EPS = 1e-4


@dataclass
class Reference:
    """What one traffic origin should look like: its category mix and its prompts' lengths."""

    name: str  # for the report: where the figures come from
    mix: Counter
    texts: list[str]


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


def answered(line: dict[str, Any]) -> bool:
    """A line of a request that got an answer (older logs have no `status`)."""
    return line.get("status") in (None, 200)


def compare(train: list[dict[str, Any]], served: list[dict[str, Any]], config: PipelineConfig,
            reference: Reference | None = None) -> dict[str, Any]:
    """The checks, their figures and the verdict for one group of answered log lines.

    Args:
        train: the training prompts, {category, text}: the vocabulary, and the reference when
            `reference` is None.
        served: log lines of one traffic origin.
        config: the pipeline config (`drift:` thresholds).
        reference: the mix and lengths this traffic should have; None: those of `train`.

    Returns:
        {verdict, reasons, served_requests, train_prompts, checks}.
    """
    d = config.drift
    if reference is None:
        reference = Reference("prompts/train", Counter(r["category"] for r in train), [r["text"] for r in train])
    checks: dict[str, Any] = {}
    reasons: list[str] = []
    mix_ref = reference.mix
    mix_served = Counter(r.get("category") or "unknown" for r in served)
    value = psi(mix_ref, mix_served)
    checks["category_psi"] = {"value": round(value, 4), "max": d.max_category_psi,
                              "reference_mix": _shares(mix_ref), "served_mix": _shares(mix_served)}
    if value > d.max_category_psi:
        n_ref = sum(mix_ref.values()) or 1
        moved = sorted(set(mix_ref) | set(mix_served),
                       key=lambda c: -abs(mix_served[c] / max(1, len(served)) - mix_ref[c] / n_ref))[:3]
        reasons.append(f"category mix moved (PSI {value:.3f} > {d.max_category_psi}; most: {', '.join(moved)})")
    len_ref = statistics.median(len(words(t)) for t in reference.texts) if reference.texts else 0
    texts = [user_text(r.get("prompt") or []) for r in served]
    len_served = statistics.median(len(words(t)) for t in texts) if texts else 0
    shift = abs(len_served - len_ref) / len_ref if len_ref else 0.0
    checks["length_shift"] = {"value": round(shift, 4), "max": d.max_length_shift, "reference_median_words": len_ref,
                              "served_median_words": len_served}
    if shift > d.max_length_shift:
        reasons.append(f"prompt length changed by {shift:.0%} (median {len_ref} -> {len_served} words)")
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


def compare_origins(train: list[dict[str, Any]], lines: list[dict[str, Any]], config: PipelineConfig,
                    references: dict[str, Reference]) -> dict[str, Any]:
    """Each traffic origin against its own reference; the overall verdict and the report.

    Args:
        train: the training prompts, {category, text} (the vocabulary of every origin).
        lines: every log line; a line's `origin` None is client traffic.
        config: the pipeline config.
        references: origin -> its reference; an origin without one is counted, not checked.

    Returns:
        The report: the overall figures at the top level (see the module docstring), per origin
        under `origins`.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        groups[line.get("origin") or CLIENT].append(line)
    origins: dict[str, dict[str, Any]] = {}
    for origin in sorted(groups, key=lambda o: (o != CLIENT, o)):
        ok = [r for r in groups[origin] if answered(r)]
        errors = Counter(str(r.get("status")) for r in groups[origin] if not answered(r))
        if origin in references:
            ref = references[origin]
            entry = {**compare(train, ok, config, ref), "reference": ref.name,
                     "reference_prompts": sum(ref.mix.values())}
        else:
            entry = {"verdict": "no_reference", "reasons": [], "served_requests": len(ok)}
        origins[origin] = {**entry, "error_requests": sum(errors.values()), "errors_by_status": dict(errors)}
    checked = [o for o, g in origins.items() if g["verdict"] in ("ok", "drift")]
    verdict = ("drift" if any(origins[o]["verdict"] == "drift" for o in checked)
               else "ok" if checked else "not_enough_traffic")
    with_checks = [o for o, g in origins.items() if "checks" in g]
    main = CLIENT if CLIENT in with_checks else max(with_checks, key=lambda o: origins[o]["served_requests"],
                                                     default=None)
    errors = sum((Counter(g["errors_by_status"]) for g in origins.values()), Counter())
    return {"verdict": verdict,
            "reasons": [f"{o}: {reason}" for o in checked for reason in origins[o]["reasons"]],
            "served_requests": sum(g["served_requests"] for g in origins.values()),
            "error_requests": sum(errors.values()), "errors_by_status": dict(errors),
            "train_prompts": len(train), "checks_origin": main, "checks": origins[main]["checks"] if main else {},
            "origins": origins}


def references(workdir: Workdir, config: PipelineConfig, train: list[dict[str, Any]],
               origins: set[str]) -> dict[str, Reference]:
    """The reference of each origin there is one for (see the module docstring for why these)."""
    out = {}
    if CLIENT in origins:
        train_texts = [r["text"] for r in train]
        report = workdir.read_json("prompts", "report.json") or {}
        source = (report.get("category_counts") or {}).get("source")
        if source:
            out[CLIENT] = Reference("the production mix (prompts/report.json) and the lengths of prompts/train",
                                    Counter(source), train_texts)
        else:
            out[CLIENT] = Reference("prompts/train", Counter(r["category"] for r in train), train_texts)
    if REPLAY_ORIGIN in origins:
        sent = replay_sample(workdir.read_table("prompts", "holdout").to_pylist(), config.serve.replay_requests)
        out[REPLAY_ORIGIN] = Reference(f"the replayed sample of prompts/holdout ({len(sent)} prompts)",
                                       Counter(r["category"] for r in sent), [user_text(r["messages"]) for r in sent])
    return out


def run_drift(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    workdir = Workdir(config.workdir)
    if not workdir.exists("prompts", "manifest.json"):
        raise MissingInput(f"no prompt set in {workdir.uri_of('prompts')}: run `distill-ray prompts` first")
    lines = read_logs(workdir)
    if not lines:
        raise MissingInput(f"no request logs in {workdir.uri_of('serve', 'logs')}: serve some traffic first")
    train = [{"category": r["category"], "text": user_text(r["messages"])}
             for r in workdir.read_table("prompts", "train").to_pylist()]
    refs = references(workdir, config, train, {line.get("origin") or CLIENT for line in lines})
    report = {**compare_origins(train, lines, config, refs), "time": time.time()}
    workdir.write_json(report, "drift", "report.json")
    echo(f"drift: {report['verdict']} over {report['served_requests']} answered requests "
         f"({report['error_requests']} failed ones left out) against {report['train_prompts']} training prompts")
    for origin, g in report["origins"].items():
        if "checks" not in g:
            echo(f"  {origin}: {g['served_requests']} requests, not checked (no reference for this origin)")
            continue
        c = g["checks"]
        echo(f"  {origin}: {g['verdict']}, {g['served_requests']} requests against {g['reference']}: category PSI "
             f"{c['category_psi']['value']}, length shift {c['length_shift']['value']:.0%}, unseen words "
             f"{c['unseen_token_rate']['value']:.1%}")
    for reason in report["reasons"]:
        echo(f"  - {reason}")
    if report["origins"].get(CLIENT, {}).get("verdict") == "drift":
        echo("  next: distill again from the served traffic: `distill-ray redistill` (client traffic only, new "
             "prompts in the served mix, the teacher answers already paid for reused)")
    echo(f"drift: report in {workdir.uri_of('drift', 'report.json')}")
    return report


def _shares(counts: Counter) -> dict[str, float]:
    n = sum(counts.values()) or 1
    return {k: round(v / n, 4) for k, v in sorted(counts.items())}
