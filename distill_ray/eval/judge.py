"""The LLM-judge metric (`task.metric: llm_judge`), for open-ended tasks no string metric can score.

A teacher (`eval.judge_teacher`, default the first) is asked, for each pair to score, whether the
candidate answers the user's message as well as the reference (the log's label, or the teacher's
own answer): "1" or "0". The calls go through the same machinery as generate — Ray Data workers
under the teacher's rate limiter, one preflight call, every verdict durable in
`<workdir>/eval/judge/<teacher>/` on arrival — so a rerun of eval pays for nothing twice. Pairs
whose answers are equal after normalisation score 1 without a call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from distill_ray.config.schema import PipelineConfig, Teacher
from distill_ray.metrics import normalize_answer
from distill_ray.storage import Workdir
from distill_ray.teacher.cache import answer_key

DEFAULT_RUBRIC = (
    "You grade answers for this task: {instructions}\n"
    "You get a user's message, a reference answer and a candidate answer. Reply 1 if the candidate answers "
    "the message as well as the reference does (the same facts and decision; wording may differ), otherwise 0. "
    "Reply with the digit only."
)
_VERDICT = re.compile(r"[01]")


def judge_teacher(config: PipelineConfig) -> Teacher:
    """The judging teacher: its endpoint, key, limits and prices; greedy, short, no logprobs."""
    return config.judge_teacher.model_copy(update={"temperature": 0.0, "max_tokens": config.eval.judge_max_tokens, "logprobs": False,
                                   "top_logprobs": 0, "samples": 1})


def judge_messages(config: PipelineConfig, prompt: list[dict[str, str]], candidate: str, reference: str
                   ) -> list[dict[str, str]]:
    rubric = config.eval.judge_instructions or DEFAULT_RUBRIC
    system = rubric.replace("{instructions}", config.task.instructions or "(none given)")
    message = "\n".join(m["content"] for m in prompt if m["role"] == "user")
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Message:\n{message}\n\nReference answer:\n{reference}\n\n"
                                        f"Candidate answer:\n{candidate}"}]


def parse_verdict(text: str | None) -> float | None:
    """1.0 or 0.0 from the judge's reply (its first 0/1 digit), None when it gave neither."""
    found = _VERDICT.search(text or "")
    return float(found.group(0)) if found else None


class LLMJudge:
    """Scores (answer, target) pairs of holdout rows with a teacher; `prepare` asks, `score` reads.

    `score(answer, target, row)` has the row (the user's message) that string metrics do not need.
    """

    needs_row = True

    def __init__(self, config: PipelineConfig, workdir: Workdir, echo: Callable[[str], None] = print):
        self.config, self.workdir, self.echo = config, workdir, echo
        self.teacher = judge_teacher(config)
        self.verdicts: dict[str, float | None] = {}
        self.stats = {"calls": 0, "cached": 0, "unparsed": 0, "errors": 0, "equal_without_call": 0, "cost_usd": 0.0}

    def _key(self, row: dict[str, Any], answer: str, target: str) -> tuple[str, list[dict[str, str]]]:
        messages = judge_messages(self.config, row["prompt"], answer, target)
        return answer_key(self.teacher, messages, 0), messages

    def prepare(self, pairs: list[tuple[dict[str, Any], str | None, str | None]]) -> None:
        """Ask the judge about every pair not already judged (and not trivially equal)."""
        from distill_ray.teacher.ask import ask_teacher

        work, seen = [], set()
        for row, answer, target in pairs:
            if answer is None or target is None or normalize_answer(answer) == normalize_answer(target):
                continue
            key, messages = self._key(row, answer, target)
            if key not in seen:
                seen.add(key)
                work.append({"key": key, "sample": 0, "request": json.dumps(messages, ensure_ascii=False)})
        if not work:
            return
        asked = ask_teacher(self.teacher, work, self.workdir, self.config.generate, self.config.budget_usd, self.echo,
                            label=f"eval judge[{self.teacher.name}]", step="eval_judge",
                            other_teachers=[t.name for t in self.config.teachers if t.name != self.teacher.name],
                            cache_parts=("eval", "judge", self.teacher.name))
        answers, results = asked["answers"], asked["results"]
        self.stats["cached"] += asked["cached_before"]
        self.stats["calls"] += len(results)
        self.stats["errors"] += sum(1 for r in results.values() if r["error"])
        for w in work:
            answer = answers.get(w["key"])
            verdict = parse_verdict(answer.get("completion")) if answer else None
            if answer is not None and verdict is None:
                self.stats["unparsed"] += 1
            self.verdicts[w["key"]] = verdict
        self.stats["cost_usd"] = round(sum(a.get("cost_usd") or 0.0 for a in answers.values()), 6)

    def __call__(self, answer: str | None, target: str | None, row: dict[str, Any]) -> float:
        if answer is None or target is None:
            return 0.0
        if normalize_answer(answer) == normalize_answer(target):
            return 1.0
        key, _ = self._key(row, answer, target)
        verdict = self.verdicts.get(key)
        return 0.0 if verdict is None else verdict  # no verdict (an error, or an unreadable reply): not a match
