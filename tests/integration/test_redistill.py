"""`distill-ray redistill`, the flywheel, on a real local Ray against the scripted fake teacher.

The pipeline's student learnt from shipping and refund messages, all with an order number. The served
traffic then shifts: three quarters are account messages (no order number: the teacher answers NONE),
a category the student never saw. The request logs follow the serve app's contract, and the teacher
answers in them come from the same fake teacher over its real HTTP API, sent as the router sends them:
some as generate would have asked (reusable), some with the client's smaller max_tokens (cut), its own
temperature, or without the task's instructions (not reusable), most with no teacher call at all
(served by the student). What the fake teacher bills is what the tests count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from distill_ray.chat import teacher_messages
from distill_ray.cli import main
from distill_ray.config import load_config
from distill_ray.config.schema import Prompts, Teacher
from distill_ray.flywheel.answers import FROM_LOGS, reuse_verdict
from distill_ray.flywheel.served import SeenPrompts, conversation_text, select_new_prompts
from distill_ray.flywheel.step import current_student
from distill_ray.storage import Workdir
from distill_ray.teacher.cache import AnswerCache, messages_digest
from distill_ray.teacher.client import cost_usd
from distill_ray.teacher.errors import MissingInput
from distill_ray.teacher.ledger import read_spend
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig, prompt_key
from tests.helpers.models import save_tiny_student

KEY_ENV = "DISTILL_TEST_TEACHER_KEY"
LEADS = {"shipping": "my parcel is late, order", "refund": "refund please for order",
         "account": "cannot log in to my account"}


def message(rng: random.Random, category: str, order: int | None) -> str:
    """A support message: its category's opening, the order number if any, then five made-up words, so that
    two messages are never near duplicates by accident."""
    number = f" ORD-{order}" if order is not None else ""
    words = " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(5))
    return f"{LEADS[category]}{number} {words}"


def reuse_teacher() -> Teacher:
    return Teacher(name="fake", base_url="http://127.0.0.1:9/v1", model="fake-teacher", temperature=0.0, max_tokens=8)


@pytest.mark.parametrize(("change", "verdict"), [
    ({}, None),
    ({"max_tokens": 64}, None),  # the client allowed more; the answer stopped within generate's limit anyway
    ({"finish_reason": "length", "max_tokens": 2, "completion_tokens": 2}, "not_finished"),
    ({"completion_tokens": 9, "max_tokens": 64}, "over_max_tokens"),  # longer than generate would have allowed
    ({"temperature": 0.7}, "other_sampling"),
    ({"params": {"top_p": 0.5}}, "other_sampling"),
    ({"params": {"seed": 7}}, None),  # a seed does not change what is drawn
    ({"messages_sha256": "0" * 64}, "other_messages"),
    ({"model": "gpt-other"}, "other_teacher"),
    ({"error": "HTTP 500", "answer": None}, "error"),
])
def test_a_logged_answer_is_reused_only_when_generate_would_have_paid_for_it(change, verdict):
    messages = teacher_messages(load_config(None, []).task, [{"role": "user", "content": "where is ORD-123456?"}])
    logged = {"name": "fake", "model": "fake-teacher", "answer": "ORD-123456", "finish_reason": "stop",
              "max_tokens": 8, "temperature": 0.0, "messages_sha256": messages_digest(messages), "params": {},
              "prompt_tokens": 30, "completion_tokens": 3, "cached_tokens": 0, "cost_usd": 0.001, **change}
    assert reuse_verdict(logged, reuse_teacher(), messages_digest(messages)) == verdict


def test_new_prompts_are_taken_in_the_served_mix_and_never_from_earlier_sets():
    rng = random.Random(3)
    old = [message(rng, "shipping", 100000 + i) for i in range(30)]
    cfg = Prompts(size=20, min_per_category=0, seed=0)
    seen = SeenPrompts([conversation_text([{"role": "user", "content": t}]) for t in old], cfg)

    def line(text: str, category: str, **extra) -> dict:
        return {"status": 200, "origin": None, "category": category, "request_id": uuid.uuid4().hex,
                "prompt": [{"role": "user", "content": text}], **extra}

    # Served: 60% shipping, of which the repeats of earlier prompts are not new; 40% account, all new.
    lines = [line(t, "shipping") for t in old[:20]]
    lines += [line(old[20] + "!", "shipping"), line(old[21].upper(), "shipping")]  # normalised repeats
    lines += [line(message(rng, "shipping", 200000 + i), "shipping") for i in range(8)]
    lines += [line(message(rng, "account", None), "account") for i in range(20)]
    lines += [line(old[0], "shipping", origin="replay:holdout"), line("hello", "account", status=502)]
    selection = select_new_prompts(lines, seen, cfg)
    assert selection.client_requests == 50 and selection.skipped == {"origin replay:holdout": 1, "error": 1}
    assert selection.seen_before == {"exact": 22} and selection.new_prompts == 28
    # 20 prompts at the served shares (60/40): shipping has only 8 new ones, the rest go to account.
    assert selection.quotas == {"shipping": 8, "account": 12}
    assert len(selection.chosen) == 20
    assert not {conversation_text(c["prompt"]) for c in selection.chosen} & seen.texts


def test_the_current_student_is_the_served_one_wherever_it_was_trained(tmp_path):
    workdir = Workdir(str(tmp_path / "run"))
    config = load_config(None, [f"workdir={workdir.uri}", "students=[{name: mini, base_model: smollm2}]",
                                "serve.student=mini"])
    done = {"status": "complete"}
    workdir.write_json(done, "students", "mini", "manifest.json")
    # Nothing served yet: the student serve would pick.
    assert current_student(config, workdir) == {"student": "mini", "checkpoint": workdir.uri_of("students", "mini", "best"),
                                                "source": "serve.student"}
    # Promoted by round 1, not deployed yet.
    round_1 = Workdir(workdir.uri_of("flywheel", "round-1"))
    round_1.write_json({"round": 1, "log_files": []}, "round.json")
    round_1.write_json(done, "students", "mini-r1", "manifest.json")
    workdir.write_json({"student": "mini-r1", "checkpoint": round_1.uri_of("students", "mini-r1", "best")},
                       "flywheel", "promoted.json")
    assert current_student(config, workdir)["checkpoint"] == round_1.uri_of("students", "mini-r1", "best")
    # Deployed, then rolled back to mini: what the app serves wins.
    for served in ("mini-r1", "mini"):
        workdir.write_json({"current": {"student": served, "mode": "shadow"}}, "serve", "rollout.json")
        found = current_student(config, workdir)
        assert found["student"] == served and found["source"] == "serve/rollout.json"
        assert found["checkpoint"] == (round_1 if served == "mini-r1" else workdir).uri_of("students", served, "best")
    workdir.write_json({"current": {"student": "gone"}}, "serve", "rollout.json")
    with pytest.raises(MissingInput, match="student 'gone' has no finished training"):
        current_student(config, workdir)


# -- the flywheel end to end ---------------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(workdir: Path, log: Path, teacher_url: str, student: Path) -> dict:
    return {
        "name": "flywheel-test", "workdir": str(workdir),
        "task": {"instructions": "Reply with the order number or NONE.", "metric": "normalized_match",
                 "bar": {"min_relative_quality": 0.5, "min_slice_relative_quality": 0.0, "max_p95_latency_ms": 60000,
                         "max_cost_per_1k_requests_usd": 10.0, "min_slice_holdout_rows": 1}},
        "prompts": {"source": str(log), "text_field": "text", "category_field": "category", "dedupe": "near",
                    "holdout_fraction": 0.2, "holdout_min_per_category": 3, "min_per_category": 0},
        "teachers": [{"name": "fake", "base_url": teacher_url, "model": "fake-teacher", "api_key_env": KEY_ENV,
                      "requests_per_minute": 60000, "max_concurrency": 8, "max_retries": 2, "retry_backoff_s": 0.01,
                      "max_tokens": 8, "temperature": 0.0, "price_per_1m_input_tokens": 100.0,
                      "price_per_1m_output_tokens": 200.0}],
        "budget_usd": 50,
        "generate": {"num_workers": 1, "batch_size": 16, "progress_every_s": 5},
        "filters": [{"kind": "regex", "pattern": "^(ORD-\\d{6}|NONE)$"}],
        "students": [{"name": "mini", "base_model": str(student)}],
        "train": {"num_workers": 2, "deepspeed": {"zero_stage": 2}, "epochs": 6, "batch_size": 8, "learning_rate": 3e-3,
                  "max_seq_len": 128, "eval_every_steps": 12, "eval_sample_size": 4, "early_stopping_patience": 0},
        "eval": {"engine": {"backend": "transformers"}, "num_workers": 1, "batch_size": 4, "latency_samples": 2},
        # The served student; no app is live at the port (the promoted student is then left to the next `serve`).
        "serve": {"student": "mini", "port": _free_port(), "admin_token_env": "DISTILL_TEST_ADMIN_TOKEN"},
    }


def _router_call(teacher: FakeTeacher, cfg: Teacher, messages: list[dict], max_tokens: int, temperature: float) -> dict:
    """The teacher as the serve app's router calls it (no logprobs), and what it logs of the call."""
    body = {"model": cfg.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    request = urllib.request.Request(f"{teacher.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {os.environ[KEY_ENV]}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        data = json.loads(response.read())
    choice, usage = data["choices"][0], data["usage"]
    return {"name": cfg.name, "model": cfg.model, "answer": choice["message"]["content"],
            "finish_reason": choice["finish_reason"], "max_tokens": max_tokens, "temperature": temperature,
            "messages_sha256": messages_digest(messages), "params": {}, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"], "cached_tokens": 0,
            "cost_usd": cost_usd(cfg, usage["prompt_tokens"], usage["completion_tokens"])}


def _log_line(text: str, category: str, teacher: dict | None, status: int = 200, origin: str | None = None) -> dict:
    line = {"request_id": uuid.uuid4().hex[:24], "time": time.time(), "user": f"user-{uuid.uuid4().hex[:6]}",
            "category": category, "origin": origin, "mode": "shadow" if teacher else "canary",
            "prompt": [{"role": "user", "content": text}], "status": status,
            "served_by": "teacher" if teacher else "student", "fallback_reason": None,
            "answer": teacher["answer"] if teacher else "NONE", "student_answer": None, "student_confidence": -0.1,
            "shadow_agreement": None, "teacher": teacher}
    if status != 200:
        line.update({"error": "teacher_failed", "answer": None})
    return line


def _write_logs(workdir: Path, name: str, lines: list[dict]) -> None:
    folder = workdir / "serve" / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"requests-{name}-test-000001.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _billed(teacher: FakeTeacher) -> dict[str, int]:
    return dict(teacher.stats()["billed_per_prompt"])


@pytest.mark.slow  # a whole pipeline, then a round that trains and evaluates again (about 100 s here)
@pytest.mark.usefixtures("ray_local")
def test_redistill_asks_only_for_unanswered_prompts_and_the_new_student_wins_the_shifted_traffic(tmp_path, capsys,
                                                                                                monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_ADMIN_TOKEN", uuid.uuid4().hex)
    rng = random.Random(0)
    parent = [{"text": message(rng, ["shipping", "refund"][i % 2], 100000 + i), "category": ["shipping", "refund"][i % 2]}
              for i in range(40)]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in parent))
    workdir = tmp_path / "run"
    student = save_tiny_student(tmp_path / "tiny-student")
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV])) as teacher:
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(_config(workdir, log, teacher.base_url, student)))
        config = load_config(str(path), [])
        t0 = time.perf_counter()
        assert main(["run", str(path), "--steps", "prompts,generate,filter,train"]) == 0
        capsys.readouterr()
        t_parent = time.perf_counter() - t0

        # Nothing served yet: nothing to do, exit 0 (as a step of `run`).
        assert main(["redistill", str(path)]) == 0
        assert "no request logs" in capsys.readouterr().out

        # The served traffic, first file: a replayed holdout prompt, an error and a few new prompts: too few.
        task, cfg = config.task, config.teachers[0]
        holdout = Workdir(str(workdir)).read_table("prompts", "holdout").to_pylist()
        account = [message(rng, "account", None) for _ in range(48)]
        shipping = [message(rng, "shipping", 200000 + i) for i in range(16)]
        first = [_log_line(holdout[0]["messages"][0]["content"], holdout[0]["category"], None, origin="replay:holdout"),
                 _log_line(message(rng, "account", None), "account", None, status=502)]
        first += [_log_line(text, "account", None) for text in account[:6]]
        _write_logs(workdir, "20260101T000000", first)
        assert main(["redistill", str(path)]) == 0
        out = capsys.readouterr().out
        assert "not enough new served traffic (6 new prompts" in out and not (workdir / "flywheel" / "round-1").exists()

        # Second file: the shift. Answers the router paid for as generate would have asked (shadow mode, and a
        # client allowing more tokens), and ones it cannot stand for: cut at the client's max_tokens, the
        # client's own temperature, a client that sent no instructions.
        def shadow(text: str, max_tokens: int = 8, temperature: float = 0.0, instructions: bool = True) -> dict:
            prompt = [{"role": "user", "content": text}]
            return _router_call(teacher, cfg, teacher_messages(task, prompt) if instructions else prompt,
                                max_tokens, temperature)

        reusable = account[6:26] + shipping[:6] + account[26:28]
        lines = [_log_line(t, "account", shadow(t)) for t in account[6:26]]
        lines += [_log_line(t, "shipping", shadow(t)) for t in shipping[:6]]
        lines += [_log_line(t, "account", shadow(t, max_tokens=64)) for t in account[26:28]]
        lines += [_log_line(t, "shipping", shadow(t, max_tokens=2)) for t in shipping[6:9]]  # "ORD", "-": cut
        lines += [_log_line(t, "account", shadow(t, temperature=0.7)) for t in account[28:30]]
        lines += [_log_line(t, "account", shadow(t, instructions=False)) for t in account[30:32]]
        lines += [_log_line(t, "account", None) for t in account[32:]]  # served by the student: no teacher call
        lines += [_log_line(t, "shipping", None) for t in shipping[9:]]
        lines += [_log_line(t, "account", None) for t in account[6:10]]  # asked again by their clients
        lines += [_log_line(r["text"], r["category"], None) for r in parent[:6]]  # seen: in the prompt set
        lines += [_log_line(parent[6]["text"] + " ok", parent[6]["category"], None)]  # a near duplicate of one
        rng.shuffle(lines)
        _write_logs(workdir, "20260101T000100", lines)
        before = _billed(teacher)
        t0 = time.perf_counter()
        assert main(["redistill", str(path)]) == 0
        t_round = time.perf_counter() - t0
        out = capsys.readouterr().out
        summary = [x for x in out.splitlines() if x.startswith(("redistill", "  ", "    "))][-12:]
        billed_now = {k: v - before.get(k, 0) for k, v in _billed(teacher).items() if v != before.get(k, 0)}

        round_dir = Workdir(str(workdir / "flywheel" / "round-1"))
        report = json.loads((workdir / "flywheel" / "round-1" / "report.json").read_text())
        selection = report["selection"]
        assert selection["client_requests"] == 6 + len(lines) and selection["skipped"] == {
            "origin replay:holdout": 1, "error": 1}
        assert selection["seen_before"]["exact"] == 6 and selection["seen_before"].get("near") == 1
        assert selection["new_prompts"] == selection["chosen"] == 64

        # The teacher was asked exactly for the round's prompts it never answered, each once.
        prompts = [r for split in ("train", "holdout") for r in round_dir.read_table("prompts", split).to_pylist()]
        texts = {r["messages"][0]["content"] for r in prompts}
        assert texts == set(account) | set(shipping)
        expected = {prompt_key(teacher_messages(task, r["messages"])): 1 for r in prompts
                    if r["messages"][0]["content"] not in reusable}
        assert billed_now == expected and len(expected) == 64 - len(reusable) == 36
        counts = report["teacher"]["fake"]
        assert (counts["from_logs"], counts["from_cache"], counts["asked"]) == (len(reusable), 0, 36)
        assert counts["logs_not_reusable"] == {"not_finished": 3, "other_sampling": 2, "other_messages": 2}
        assert f"{len(reusable)} reused from the request logs, 0 from the teacher cache, 36 asked" in out
        cached = AnswerCache(Workdir(str(workdir)), "fake").load()
        assert sum(1 for r in cached.values() if r["node"] == FROM_LOGS) == len(reusable)
        # The round's spend is on the pipeline's one ledger, under budget_usd with every other step's.
        spend = read_spend(Workdir(str(workdir)), "fake")["by_step"]
        assert spend["redistill"]["requests"] == 36 and spend["redistill"]["spent_usd"] > 0 and "generate" in spend

        # The new student starts from the served one and beats it on the shifted holdout.
        assert report["current"]["student"] == "mini" and report["current"]["source"] == "serve.student"
        assert report["current"]["checkpoint"] == str(workdir / "students" / "mini" / "best")
        init = json.loads((workdir / "flywheel" / "round-1" / "students" / "mini-r1" / "init" /
                           "distill_ray_init.json").read_text())
        assert init["source"]["base_model"] == report["current"]["checkpoint"]
        quality = report["quality"]
        new_slices, current_slices = report["new"]["quality"]["slices"], report["current"]["quality"]["slices"]
        assert set(new_slices) == {"account", "shipping"} and new_slices["account"]["rows"] >= 3
        assert quality["new"] > quality["current"] + 0.3
        assert new_slices["account"]["student"] > current_slices["account"]["student"]
        assert report["promoted"] is True and "decision: PROMOTED mini-r1" in out
        promoted = json.loads((workdir / "flywheel" / "promoted.json").read_text())
        assert promoted["student"] == "mini-r1" and promoted["round"] == 1
        assert promoted["checkpoint"] == str(workdir / "flywheel" / "round-1" / "students" / "mini-r1" / "best")
        assert promoted["passed"] == report["new"]["passed"] and promoted["quality"]["gain"] == quality["gain"]

        # Run again: no new served traffic, nothing asked.
        before = _billed(teacher)
        assert main(["redistill", str(path)]) == 0
        assert "no served traffic since round 1" in capsys.readouterr().out
        assert _billed(teacher) == before
    print("\n".join(summary))
    print(f"parent pipeline {t_parent:.0f}s, redistill round {t_round:.0f}s; new {quality['new']:.3f} vs current "
          f"{quality['current']:.3f}")
    shutil.rmtree(workdir, ignore_errors=True)
