"""One `budget_usd` for the whole pipeline: generate, eval's LLM judge and serve's teacher calls draw
on the teacher's one ledger, and what the provider bills never goes above it.

As a user hits it: one config, one workdir, one budget; generate fits, the judge runs the budget
down, and serve's shadow calls spend what is left until clients get OpenAI's 429 insufficient_quota.
What is counted is what the fake teacher billed, priced at the teacher's prices.
"""

from __future__ import annotations

import json
import os
import time

import openai
import pytest
import ray

from distill_ray.cli import main
from distill_ray.config import load_config
from distill_ray.storage import Workdir
from distill_ray.teacher.ledger import NAMESPACE, ledger_name, read_spend
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
from tests.helpers.net import free_port as _free_port
from tests.helpers.serve import ADMIN, ADMIN_ENV, TOKEN, TOKEN_ENV
from tests.helpers.serve import save_student as _student
from tests.helpers.steps import KEY_ENV, N_PROMPTS
from tests.helpers.steps import prompts_workdir as _workdir
from tests.helpers.steps import read_answers as _answers
from tests.helpers.steps import teacher_config_file as _config_file

pytestmark = pytest.mark.usefixtures("ray_local")
# At $1000 / $2000 per 1M input / output tokens a generate answer costs about $0.025 (all 40: $1),
# a judge call about $0.11, a serve call about $0.013.
BUDGET_USD = 2.0
JUDGE_PAIRS = 30  # about $3 of judging: more than is left after generate
# The judge's estimate (its prompt plus judge_max_tokens, reserved per call) is far above what a
# verdict costs, so what the judge leaves unspent (less than one estimate, more than one estimate
# less one verdict: about $0.2-0.3) still pays for some serve calls (each estimated at about $0.02).
JUDGE_MAX_TOKENS = 100
MAX_SERVE_REQUESTS = 50


def _billed_usd(stats: dict, teacher: dict) -> float:
    """What the provider bills: its token ledger at the teacher's prices."""
    return (stats["prompt_tokens"] * teacher["price_per_1m_input_tokens"]
            + stats["completion_tokens"] * teacher["price_per_1m_output_tokens"]) / 1e6


def test_generate_judge_and_serve_never_spend_above_one_budget(prompt_set, tmp_path):  # noqa: F811
    from ray import serve

    from distill_ray.eval.judge import LLMJudge
    from distill_ray.serve.step import deploy

    workdir_path = _workdir(prompt_set, tmp_path)
    workdir = Workdir(str(workdir_path))
    _student(workdir_path)
    timings: dict[str, float] = {}
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV])) as fake:
        path = _config_file(tmp_path, workdir_path, fake.base_url)
        config_dict = json.loads(path.read_text())
        teacher = config_dict["teachers"][0]
        port = _free_port()
        config_dict.update({
            "budget_usd": BUDGET_USD,
            "task": {"metric": "llm_judge"},
            "eval": {"judge_max_tokens": JUDGE_MAX_TOKENS},
            "students": [{"name": "mini", "base_model": "unused"}],
            "serve": {"student": "mini", "mode": "shadow", "port": port, "auth_token_env": TOKEN_ENV,
                      "admin_token_env": ADMIN_ENV,
                      "log_batch_size": 4, "engine": {"backend": "transformers"}},
        })
        path.write_text(json.dumps(config_dict))

        # 1. generate: the budget is large enough for every prompt.
        t0 = time.perf_counter()
        assert main(["generate", str(path)]) == 0
        timings["generate"] = time.perf_counter() - t0
        assert len(_answers(workdir_path)) == N_PROMPTS
        spent_generate = read_spend(workdir, teacher["name"])["spent_usd"]
        assert 0 < spent_generate < BUDGET_USD
        billed = _billed_usd(fake.stats(), teacher)
        assert billed == pytest.approx(spent_generate, rel=1e-6)

        # 2. eval's LLM judge: more pairs than the rest of the budget pays for.
        t0 = time.perf_counter()
        config = load_config(str(path), [])
        judge = LLMJudge(config, workdir, echo=lambda _: None)
        pairs = [({"prompt": [{"role": "user", "content": f"Where is my order ORD-3{i:05d}? It is {i + 2} days late."}]},
                  f"ORD-3{i:05d} ships on day {i}", f"Order ORD-3{i:05d} is delayed by {i + 1} days")
                 for i in range(JUDGE_PAIRS)]
        judge.prepare(pairs)
        timings["judge"] = time.perf_counter() - t0
        verdicts = list(judge.verdicts.values())
        assert len(verdicts) == JUDGE_PAIRS
        judged = [v for v in verdicts if v is not None]
        assert judged and len(judged) < JUDGE_PAIRS, judge.stats  # some fit, not all
        assert judge.stats["errors"] == JUDGE_PAIRS - len(judged), judge.stats  # the others: budget errors
        after_judge = read_spend(workdir, teacher["name"])
        spent_judge = after_judge["by_step"]["eval_judge"]["spent_usd"]
        assert spent_judge > 0 and after_judge["spent_usd"] == pytest.approx(spent_generate + spent_judge)
        assert spent_generate + spent_judge <= BUDGET_USD
        assert _billed_usd(fake.stats(), teacher) <= BUDGET_USD + 1e-9
        left = BUDGET_USD - after_judge["spent_usd"]

        # 3. serve in shadow mode, same workdir and budget: the teacher answers until the budget is spent.
        t0 = time.perf_counter()
        os.environ[TOKEN_ENV], os.environ[ADMIN_ENV] = TOKEN, ADMIN
        try:
            deployed = deploy(config, echo=lambda _: None)
            timings["serve_deploy"] = time.perf_counter() - t0
            client = openai.OpenAI(base_url=deployed["url"], api_key=TOKEN, max_retries=0, timeout=60)
            answered, refusal = 0, None
            t0 = time.perf_counter()
            slowest = 0.0
            for i in range(MAX_SERVE_REQUESTS):
                sent = time.perf_counter()
                try:
                    raw = client.chat.completions.with_raw_response.create(
                        model="m", messages=[{"role": "user", "content": f"Where is ORD-4{i:05d}?"}], max_tokens=4,
                        user=f"user-{i}")
                except openai.RateLimitError as err:
                    refusal = err
                    break
                assert raw.headers["x-served-by"] == "teacher"
                answered += 1
                slowest = max(slowest, time.perf_counter() - sent)
            timings["serve_requests"] = time.perf_counter() - t0
            assert refusal is not None, f"{answered} requests answered, none refused (${left:.4f} was left)"
            assert refusal.code == "insufficient_quota" and refusal.body["type"] == "insufficient_quota"
            assert answered > 0, f"the judge left ${left:.4f}: not one serve call"
        finally:
            serve.delete("distill")
            serve.shutdown()
            os.environ.pop(TOKEN_ENV, None)
            os.environ.pop(ADMIN_ENV, None)
        spend = read_spend(workdir, teacher["name"])  # as written when serve stopped
        ray.kill(ray.get_actor(ledger_name(teacher["name"], workdir.uri), namespace=NAMESPACE))

        stats = fake.stats()
        billed = _billed_usd(stats, teacher)
        print(f"\nbudget ${BUDGET_USD}: generate ${spent_generate:.4f}, judge ${spent_judge:.4f} "
              f"({len(judged)}/{JUDGE_PAIRS} verdicts), serve ${spend['by_step']['serve_fallback']['spent_usd']:.4f} "
              f"({answered} answered, the slowest in {slowest:.1f}s, then 429); ledger ${spend['spent_usd']:.4f}, billed ${billed:.4f}; "
              + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        assert set(spend["by_step"]) == {"generate", "eval_judge", "serve_fallback"}
        assert spend["by_step"]["serve_fallback"]["answered"] == answered
        assert spend["spent_usd"] <= BUDGET_USD
        assert billed <= BUDGET_USD + 1e-9
        assert spend["spent_usd"] == pytest.approx(billed, rel=1e-6)  # the ledger counts what is billed
