"""A LoRA student served as its base plus adapter (`serve.student_adapter: true`) answers as its merged
export does, both in vLLM.

The student is the tests' tiny Llama with LoRA adapters trained here for a few steps (`lora.wrap`,
then `lora.export` writes `best/` merged and `best/adapter/`), no Ray Train. A vLLM start is most of
a test's time (40-60 s here, more when two start at once on 2 cores), so:
- the engine layer (default suite, one vLLM start): `VllmEngine` on `init/` with the adapter on every
  request (the LoRA settings the served student gets, `engine.vllm.lora_kwargs`) against the merged
  export in the transformers engine;
- the Serve app (slow, about 100 s: `ray.serve.llm` deploys in 60-80 s here): the adapter served the
  way `distill-ray serve` serves it, asked through the app's OpenAI endpoint in full mode (the
  student answers every request), against the merged export in vLLM (a `VllmEngine` started meanwhile).
Engines run in fp32, so the comparison is exact (bf16 would round the merged weights and the
adapter's path apart, which can flip a greedy token of a barely trained model).
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

import openai
import pytest
import torch

from distill_ray.config import load_config
from distill_ray.config.schema import Engine, Lora
from distill_ray.manifest import StepRecord, write_manifest
from distill_ray.storage import Workdir
from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
from distill_ray.train import lora
from distill_ray.train.data import collate, tokenize
from tests.helpers.models import tiny_model, tiny_tokenizer

TOKEN_ENV, ADMIN_ENV = "DISTILL_TEST_LORA_TOKEN", "DISTILL_TEST_LORA_ADMIN"
TOKEN, ADMIN = "test-lora-token-not-a-secret", "test-lora-admin-not-a-secret"  # noqa: S105 - loopback test tokens
SETTINGS = Lora(rank=8, alpha=16)  # the default targets: every linear layer of a Llama block
PROMPTS = ["Hi, my parcel ORD-730215 never arrived.", "Where is my order ORD-512874?", "Refund please!",
           "any news on ORD-268193?", "My card was declined.", "Hello, I sent back the blender last week."]
CONVERSATIONS = [[{"role": "user", "content": p}] for p in PROMPTS]
MAX_TOKENS = 12
FP32 = Engine(dtype="float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A workdir holding the LoRA student `tiny`."""
    root = tmp_path_factory.mktemp("lora-serve") / "run"
    _lora_student(root, "tiny")
    return root


def _lora_student(workdir: Path, name: str) -> None:
    """`students/<name>/init`, `best/` and `best/adapter/` as `distill-ray train` leaves a LoRA student:
    the tiny Llama, its adapters trained for 30 steps to answer order numbers."""
    tokenizer = tiny_tokenizer()
    folder = workdir / "students" / name
    model = tiny_model(len(tokenizer), tokenizer.eos_token_id)
    model.save_pretrained(folder / "init")
    tokenizer.save_pretrained(folder / "init")
    model = lora.wrap(model, SETTINGS, name).train()
    rng = random.Random(0)
    rows = [tokenize(tokenizer, {"messages": [{"role": "user", "content": f"Where is ORD-{n}? It is late."}],
                                 "completion": f"ORD-{n}"}, 128)
            for n in (rng.randint(100000, 999999) for _ in range(16))]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    torch.manual_seed(0)
    for step in range(30):
        batch = collate(rows[step * 4 % 16:step * 4 % 16 + 4], tokenizer.pad_token_id)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lora.export(weights, str(folder / "init"), SETTINGS, str(folder / "best"), str(folder / "best" / "adapter"))
    tokenizer.save_pretrained(folder / "best")
    wd = Workdir(str(workdir))
    write_manifest(wd, StepRecord(f"students/{name}", {}, {}))
    wd.write_json({"students": {name: {"student": name, "passed": True, "parameters": 1000,
                                       "quality": {"overall": {"relative_quality": 1.0}}}}}, "eval", "metrics.json")


class _Starting(threading.Thread):
    """An engine started in a thread (while another starts elsewhere); `engine()` waits for it."""

    def __init__(self, start):
        super().__init__(daemon=True)
        self.start_engine, self.result, self.error = start, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.start_engine()
        except Exception as exc:  # noqa: BLE001 - handed to the test's thread by engine()
            self.error = exc

    def engine(self):
        self.join(timeout=300)
        if self.error is not None:
            raise self.error
        return self.result


def _answers(engine) -> list[str]:
    try:
        return [a.text.strip() for a in engine.generate_batch(CONVERSATIONS, MAX_TOKENS)]
    finally:
        engine.close()


def _the_adapter_did_something(workdir: Path, answers: list[str]) -> None:
    """The base alone (fp32, transformers) answers otherwise; the adapter's answers look like order numbers."""
    from distill_ray.engine.transformers import TransformersEngine

    base = TransformersEngine(str(workdir / "students" / "tiny" / "init"), Engine(backend="transformers"))
    base_answers = [a.text.strip() for a in base.generate_batch(CONVERSATIONS, MAX_TOKENS)]
    assert sum(a != b for a, b in zip(base_answers, answers, strict=True)) >= len(PROMPTS) // 2, base_answers
    assert sum(a.startswith("OR") for a in answers) >= len(PROMPTS) // 2, answers


def test_the_adapter_in_vllm_answers_as_the_merged_export(workdir):
    """One vLLM engine: the base with the adapter on every request, against the merged export in the
    transformers engine (fp32 both; a second vLLM start would double this test's time)."""
    from distill_ray.engine.transformers import TransformersEngine
    from distill_ray.engine.vllm import VllmEngine

    student = workdir / "students" / "tiny"
    adapter = VllmEngine(str(student / "init"), FP32, adapter=str(student / "best" / "adapter"))
    assert adapter.llm.vllm_config.lora_config.max_lora_rank == 8
    assert adapter.info()["adapter"].endswith("best/adapter")
    adapter_answers = _answers(adapter)
    assert adapter_answers == _answers(TransformersEngine(str(student / "best"), Engine(backend="transformers")))
    _the_adapter_did_something(workdir, adapter_answers)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_the_served_adapter_answers_as_the_merged_model(workdir):
    from ray import serve

    from distill_ray.engine.vllm import VllmEngine
    from distill_ray.serve.step import _reset_control, deploy

    merged = _Starting(lambda: VllmEngine(str(workdir / "students" / "tiny" / "best"), FP32))
    os.environ[TOKEN_ENV], os.environ[ADMIN_ENV] = TOKEN, ADMIN
    try:
        with FakeTeacher(FakeTeacherConfig()) as teacher:
            config = load_config(None, [
                f"workdir={workdir}", f"teachers.0.base_url={teacher.base_url}", "teachers.0.launch=null",
                "teachers.0.max_tokens=8", "students=[{name: tiny, base_model: unused, lora: {rank: 8, alpha: 16}}]",
                "serve.student=tiny", "serve.student_adapter=true", "serve.engine.dtype=float32",
                f"serve.port={_free_port()}", f"serve.auth_token_env={TOKEN_ENV}", f"serve.admin_token_env={ADMIN_ENV}",
                "serve.mode=full", "serve.min_confidence=-1000", "serve.latency_budget_ms=60000", "serve.max_tokens=64"])
            deployed = deploy(config, echo=print)
            client = openai.OpenAI(base_url=deployed["url"], api_key=TOKEN, max_retries=0, timeout=60)
            served = []
            for messages in CONVERSATIONS:
                raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages,
                                                                       max_tokens=MAX_TOKENS, temperature=0)
                assert raw.headers["x-served-by"] == "student", raw.headers
                served.append(raw.parse().choices[0].message.content)
    finally:
        serve.delete("distill")
        serve.shutdown()
        _reset_control()
        os.environ.pop(TOKEN_ENV, None)
        os.environ.pop(ADMIN_ENV, None)
    assert served == _answers(merged.engine())
    _the_adapter_did_something(workdir, served)
