"""`distill-ray redistill`: one turn of the flywheel — distil again from the served traffic.

A round, under `<workdir>/flywheel/round-<n>/` (a workdir of its own: prompts/, teacher/, filtered/,
students/, eval/, each with its manifest, so a killed round resumes where it stopped):

1. prompts: the request log files no earlier round read; client traffic only; prompts that no earlier
   prompt set holds (exact or near duplicates), sampled in the served traffic's category mix
   (`served.py`), written to `served.jsonl`; the prompts step turns them into train and a fresh holdout.
   Fewer than `flywheel.min_new_prompts` new prompts: no round (nothing to do).
2. teacher: answers from the pipeline's teacher cache, then from the answers the serve app already paid
   for (shadow mode, teacher-routed users, fallbacks: put into that cache), and only the rest asked for,
   on the pipeline's one ledger and budget (`answers.py`).
3. filter, then train: the current student (the served one) fine-tuned further on the round's kept
   answers, as the student `<name>-r<n>` (its `train:` settings, its own overrides included).
4. eval: the new student against the teacher on the round's holdout (the eval step and its gate), and
   the current student on the same holdout, scored the same way. The new student is better when its
   relative quality beats the current one's by at least `flywheel.min_gain`; then it is written to
   `flywheel/promoted.json` and handed to the rollout plan.

`flywheel/round-<n>/round.json` freezes a round's inputs when it starts (the log files, the current
student); `report.json` is written when it ends. A round left unfinished (killed, or a step that failed)
is resumed by the next run before any new round starts. Rounds are meant to run one at a time:
nothing locks them against a second `redistill` started at once.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from distill_ray.config.schema import PipelineConfig, Student
from distill_ray.flywheel.answers import round_answers
from distill_ray.flywheel.served import SeenPrompts, conversation_text, select_new_prompts
from distill_ray.manifest import read_manifest
from distill_ray.serve.logs import log_files, read_log_files
from distill_ray.storage import Workdir
from distill_ray.teacher.errors import MissingInput
from distill_ray.teacher.ledger import read_spend

FLYWHEEL = "flywheel"
_ROUND = re.compile(r"^round-(\d+)$")
_SUFFIX = re.compile(r"-r\d+$")


def rounds(workdir: Workdir) -> list[int]:
    """The numbers of the rounds started so far (those with a `round.json`), in order."""
    selector = pafs.FileSelector(posixpath.join(workdir.root, FLYWHEEL), recursive=False, allow_not_found=True)
    found = []
    for info in workdir.fs.get_file_info(selector):
        match = _ROUND.match(posixpath.basename(info.path))
        if match and workdir.exists(FLYWHEEL, match.group(0), "round.json"):
            found.append(int(match.group(1)))
    return sorted(found)


def round_workdir(workdir: Workdir, n: int) -> Workdir:
    return Workdir(workdir.uri_of(FLYWHEEL, f"round-{n}"))


def checkpoint_of(workdir: Workdir, name: str) -> str:
    """The `best/` checkpoint of a student trained in the pipeline or in one of its rounds.

    Raises:
        MissingInput: no finished training of that name.
    """
    for where in [workdir, *(round_workdir(workdir, n) for n in reversed(rounds(workdir)))]:
        manifest = read_manifest(where, f"students/{name}")
        if manifest and manifest.get("status") == "complete":
            return where.uri_of("students", name, "best")
    raise MissingInput(f"student '{name}' has no finished training in {workdir.uri_of('students')} or "
                       f"{workdir.uri_of(FLYWHEEL)}")


def current_student(config: PipelineConfig, workdir: Workdir) -> dict[str, str]:
    """The student now served: `serve/rollout.json`'s, else the last promoted one, else the one serve picks
    (`serve.student`, else the best that passed eval)."""
    rollout = workdir.read_json("serve", "rollout.json") or {}
    name = (rollout.get("current") or {}).get("student")
    if name:
        return {"student": name, "checkpoint": checkpoint_of(workdir, name), "source": "serve/rollout.json"}
    promoted = workdir.read_json(FLYWHEEL, "promoted.json")
    if promoted:
        return {"student": promoted["student"], "checkpoint": promoted["checkpoint"],
                "source": "flywheel/promoted.json"}
    from distill_ray.serve.deployment import pick_student

    name, uri, _ = pick_student(config, workdir, "shadow")
    return {"student": name, "checkpoint": uri, "source": "serve.student" if config.serve.student else "eval/metrics.json"}


def _seen_prompts(config: PipelineConfig, workdir: Workdir, previous: list[int]) -> SeenPrompts:
    """Every earlier prompt set: the pipeline's and each earlier round's, train and holdout."""
    if not read_manifest(workdir, "prompts"):
        raise MissingInput(f"no prompt set in {workdir.uri_of('prompts')}: run `distill-ray prompts` first")
    texts = set()
    for where in [workdir, *(round_workdir(workdir, n) for n in previous)]:
        if read_manifest(where, "prompts"):
            for split in ("train", "holdout"):
                texts.update(conversation_text(r["messages"]) for r in where.read_table("prompts", split).to_pylist())
    return SeenPrompts(texts, config.prompts)


def _start_round(config: PipelineConfig, workdir: Workdir, echo: Callable[[str], None]) -> int | None:
    """Freeze the next round's inputs (round.json, served.jsonl); None when there is nothing to distil."""
    previous = rounds(workdir)
    files = log_files(workdir)
    if not files:
        echo(f"redistill: no request logs in {workdir.uri_of('serve', 'logs')}; nothing to do")
        return None
    read_before = {name for n in previous for name in round_workdir(workdir, n).read_json("round.json")["log_files"]}
    new_files = [name for name in files if name not in read_before]
    if not new_files:
        echo(f"redistill: no served traffic since round {previous[-1]} ({len(files)} log files read); nothing to do")
        return None
    selection = select_new_prompts(read_log_files(workdir, new_files), _seen_prompts(config, workdir, previous),
                                   config.prompts)
    echo(_selection_line(selection.counts(), len(new_files)))
    if selection.new_prompts < config.flywheel.min_new_prompts:
        echo(f"redistill: not enough new served traffic ({selection.new_prompts} new prompts; a round needs "
             f"flywheel.min_new_prompts {config.flywheel.min_new_prompts}); nothing to do")
        return None
    n = (previous[-1] if previous else 0) + 1
    where = round_workdir(workdir, n)
    current = current_student(config, workdir)
    where.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in selection.chosen).encode(),
                      "served.jsonl")
    where.write_json({"round": n, "started_at": time.time(), "log_files": new_files, "current": current,
                      "selection": selection.counts()}, "round.json")
    return n


def _selection_line(s: dict[str, Any], files: int) -> str:
    """One line on what the new log files held (`Selection.counts()`)."""
    seen = ", ".join(f"{k} {v}" for k, v in sorted(s["seen_before"].items())) or "none"
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(s["skipped"].items())) or "none"
    mix = ", ".join(f"{c} {100 * v / max(1, s['client_requests']):.0f}%" for c, v in
                    sorted(s["served_mix"].items(), key=lambda kv: -kv[1]))
    return (f"redistill: {s['lines_read']} request log lines in {files} new files: {s['client_requests']} client "
            f"requests (not served traffic: {skipped}); {s['unique_prompts']} unique prompts, seen in an earlier "
            f"prompt set: {seen}; {s['new_prompts']} new, {s['chosen']} taken in the served mix ({mix})")


def round_config(config: PipelineConfig, where: Workdir, n: int, current: dict[str, str], prompts: int,
                 budget_left: float | None) -> PipelineConfig:
    """The config the existing steps run with in round n: its workdir, its prompt source and student."""
    base_name = _SUFFIX.sub("", current["student"])
    base = next((s for s in config.students if s.name == base_name), None)
    student = Student(name=f"{base_name}-r{n}", base_model=current["checkpoint"],
                      chat_template=base.chat_template if base else None, train=base.train if base else None)
    data = config.model_dump(mode="json", by_alias=True)
    data.update({
        "workdir": where.uri, "students": [student.model_dump(mode="json")],
        # Steps that call a teacher inside the round's workdir (eval's LLM judge) get what is left of the budget.
        "budget_usd": budget_left,
        "prompts": {**data["prompts"], "source": where.uri_of("served.jsonl"), "format": "jsonl", "text_field": None,
                    "messages_field": "prompt", "category_field": "category", "size": max(1, prompts),
                    "min_per_category": 0, "limit": None},
    })
    data["serve"]["student"] = None
    return PipelineConfig.model_validate(data)


def _budget_left(config: PipelineConfig, workdir: Workdir) -> float | None:
    if config.budget_usd is None:
        return None
    spent = sum(read_spend(workdir, t.name)["spent_usd"] for t in config.teachers)
    return max(config.budget_usd - spent, 1e-9)


def run_redistill(config: PipelineConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the next round of the flywheel (or resume an unfinished one); returns its report, or
    {"round": None, ...} when there is nothing to distil.

    Raises:
        MissingInput: no prompt set, or the current student has no checkpoint (exit 2).
        BudgetReached: budget_usd stopped the teacher (resumable; exit 1).
    """
    from distill_ray.filters.step import run_filter
    from distill_ray.prompts.step import run_prompts
    from distill_ray.train.step import run_train

    workdir = Workdir(config.workdir)
    started = rounds(workdir)
    if started and not round_workdir(workdir, started[-1]).exists("report.json"):
        n = started[-1]
        echo(f"redistill: resuming round {n}")
    else:
        n = _start_round(config, workdir, echo)
        if n is None:
            return {"round": None, "promoted": False}
    where = round_workdir(workdir, n)
    state = where.read_json("round.json")
    current = state["current"]
    rc = round_config(config, where, n, current, state["selection"]["chosen"], _budget_left(config, workdir))
    echo(f"redistill: round {n} in {where.uri}: {rc.students[0].name} starts from the current student "
         f"{current['student']} ({current['source']}: {current['checkpoint']})")
    run_prompts(rc, echo)
    teacher = round_answers(rc, workdir, read_log_files(workdir, log_files(workdir)), config.budget_usd, echo)
    run_filter(rc, echo)
    run_train(rc, echo)
    new, current_quality = _evaluate(rc, where, current, echo)
    report = _report(n, where, state, rc, teacher, current, current_quality, new)
    where.write_json(report, "report.json")
    echo(summary(report))
    if report["promoted"]:
        promoted = {"student": new["student"], "checkpoint": new["checkpoint"], "round": n, "passed": new["passed"],
                    "quality": report["quality"], "time": time.time()}
        workdir.write_json(promoted, FLYWHEEL, "promoted.json")
        _hand_over(config, promoted, echo)
    return report


def _evaluate(config: PipelineConfig, where: Workdir, current: dict[str, str], echo: Callable[[str], None]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The new student's eval result (the eval step, gate included) and the current student's quality
    on the same holdout rows, scored the same way (kept in `eval/current.json`)."""
    from distill_ray.eval.step import GateFailed, run_eval

    try:
        run_eval(config, echo)
    except GateFailed as exc:
        echo(f"redistill: the new student does not meet task.bar on the round's holdout ({exc})")
    eval_manifest = read_manifest(where, "eval")
    new = where.read_json("eval", "metrics.json")["students"][config.students[0].name]
    saved = where.read_json("eval", "current.json")
    if saved and saved["eval"] == eval_manifest["fingerprint"] and saved["checkpoint"] == current["checkpoint"]:
        return new, saved["quality"]
    quality = score_student(config, where, current["checkpoint"], echo)
    where.write_json({"student": current["student"], "checkpoint": current["checkpoint"],
                      "eval": eval_manifest["fingerprint"], "quality": quality}, "eval", "current.json")
    return new, quality


def score_student(config: PipelineConfig, where: Workdir, checkpoint: str, echo: Callable[[str], None]) -> dict[str, Any]:
    """A student's quality on the round's holdout rows that eval scored (a reference, or a teacher answer
    the filters kept), with the task's metric: what eval reports for a student it trained."""
    from distill_ray.eval.scoring import pairs_to_score, quality, score_rows
    from distill_ray.eval.step import holdout_rows, predict_holdout, scorer
    from distill_ray.metrics import holdout_target

    rows = [r for r in holdout_rows(config, where) if r["teacher"] is not None and holdout_target(r) is not None]
    predictions, _ = predict_holdout(config, checkpoint, rows)
    answered = [{**r, **predictions[r["id"]]} for r in rows]
    score, judge = scorer(config, where, echo)
    if judge is not None:
        judge.prepare(pairs_to_score(answered))
    return quality(score_rows(answered, score))


def _report(n: int, where: Workdir, state: dict[str, Any], config: PipelineConfig, teacher: dict[str, Any],
            current: dict[str, str], current_quality: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    gain = new["quality"]["overall"]["relative_quality"] - current_quality["overall"]["relative_quality"]
    prompts = where.read_json("prompts", "report.json")
    filtered = where.read_json("filtered", "report.json")
    no_logprobs = sum(1 for r in where.read_table("filtered", "rows").to_pylist()
                      if (r["drop_reason"] or "").endswith("the teacher returned no logprobs"))
    return {
        "round": n, "workdir": where.uri, "log_files": len(state["log_files"]), "selection": state["selection"],
        "prompts": {"train": prompts["train"], "holdout": prompts["holdout"],
                    "category_counts": {k: prompts["category_counts"][k] for k in ("train", "holdout")}},
        "teacher": teacher["counts"]["teachers"],
        "filtered": {"kept": filtered["kept"], "rows": filtered["rows"], "dropped_by_reason": filtered["dropped_by_reason"],
                     "dropped_without_logprobs": no_logprobs},
        "current": {**current, "quality": current_quality},
        "new": {"student": new["student"], "checkpoint": new["checkpoint"], "passed": new["passed"],
                "failed": new["failed"], "quality": new["quality"]},
        "quality": {"new": new["quality"]["overall"]["relative_quality"],
                    "current": current_quality["overall"]["relative_quality"], "gain": round(gain, 4),
                    "holdout_rows": new["quality"]["overall"]["rows"], "metric": config.task.metric},
        "rule": f"promoted when the new student's relative quality on the round's holdout beats the current "
                f"student's by at least flywheel.min_gain {config.flywheel.min_gain}",
        "promoted": gain >= config.flywheel.min_gain, "time": time.time(),
    }


def _hand_over(config: PipelineConfig, promoted: dict[str, Any], echo: Callable[[str], None]) -> None:
    """Hand the promoted student to the rollout plan (the serve app's, when it has a way to take it)."""
    from distill_ray.serve import step as serving

    hand_to_rollout = getattr(serving, "hand_to_rollout", None)
    if hand_to_rollout is not None:
        hand_to_rollout(config, promoted["student"], promoted["checkpoint"], echo)
    else:
        echo(f"redistill: to serve {promoted['student']}, deploy again: distill-ray serve CONFIG (serve reads "
             "flywheel/promoted.json)")


def summary(report: dict[str, Any]) -> str:
    """The round's one-screen summary."""
    lines = [_selection_line(report["selection"], report["log_files"]),
             f"redistill: round {report['round']}: {report['prompts']['train']} train + {report['prompts']['holdout']} "
             f"holdout prompts from served traffic in {report['workdir']}"]
    for name, t in report["teacher"].items():
        refused = ", ".join(f"{k} {v}" for k, v in sorted(t["logs_not_reusable"].items()))
        lines.append(f"  teacher {name}: {t['answers_needed']} answers needed: {t['from_logs']} reused from the request "
                     f"logs, {t['from_cache']} from the teacher cache, {t['asked']} asked (${t['spent_usd_this_run']:.4f})"
                     + (f"; logged answers not reusable: {refused}" if refused else ""))
    f = report["filtered"]
    lines.append(f"  filter: kept {f['kept']} of {f['rows']}"
                 + (f" (dropped: {', '.join(f'{k} {v}' for k, v in f['dropped_by_reason'].items())})"
                    if f["dropped_by_reason"] else "")
                 + (f"; {f['dropped_without_logprobs']} of the drops: answers without logprobs (reused from the logs)"
                    if f["dropped_without_logprobs"] else ""))
    q, new, cur = report["quality"], report["new"], report["current"]
    lines.append(f"  on the round's holdout ({q['holdout_rows']} rows, {q['metric']}): current {cur['student']} "
                 f"relative quality {q['current']:.3f}, new {new['student']} {q['new']:.3f} (gain {q['gain']:+.3f}; "
                 f"eval gate {'PASS' if new['passed'] else 'FAIL: ' + ', '.join(new['failed'])})")
    slices = sorted(set(new["quality"]["slices"]) | set(cur["quality"]["slices"]))
    for s in slices:
        a, b = cur["quality"]["slices"].get(s, {}), new["quality"]["slices"].get(s, {})
        lines.append(f"    {s:<18} rows {b.get('rows', a.get('rows', 0)):>4}  current {a.get('student', 0):.3f}  "
                     f"new {b.get('student', 0):.3f}  teacher {b.get('teacher', a.get('teacher', 0)):.3f}")
    lines.append(f"  decision: {'PROMOTED ' + new['student'] if report['promoted'] else 'kept ' + cur['student']} "
                 f"({report['rule']}); report in {report['workdir']}/report.json")
    return "\n".join(lines)
