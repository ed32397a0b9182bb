"""The OpenAI wire format both servers speak (distill_ray.openai_api): one behaviour for content parts,
the error body, and the SSE framing of a streamed answer."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distill_ray.openai_api import RequestError, error_body, parse_messages, parse_sse, sse_chunks, sse_event
from distill_ray.serve.chat_request import parse_chat_request as serve_parse
from distill_ray.teacher.offline import parse_chat_request as offline_parse

PARTS = [{"type": "text", "text": "Where is "}, {"type": "text", "text": "ORD-123456?"}]
IMAGE = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer without a chat template: the offline teacher renders a plain transcript."""
    words = ["[UNK]", "user:", "assistant:", "system:", "Where", "is", "ORD-123456?", "Hi"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]")


def _serve(messages, **extra):
    return serve_parse(json.dumps({"model": "m", "messages": messages, **extra}).encode(), max_bytes=1 << 20)


def _offline(messages, **extra):
    return offline_parse({"model": "m", "messages": messages, **extra}, _tokenizer(), max_context=64)


def test_text_parts_are_joined_the_same_by_both_servers():
    served = _serve([{"role": "user", "content": PARTS}])["messages"]
    assert served == [{"role": "user", "content": "Where is ORD-123456?"}]
    as_string, _, _ = _offline([{"role": "user", "content": "Where is ORD-123456?"}])
    as_parts, _, _ = _offline([{"role": "user", "content": PARTS}])
    assert as_parts.prompt_ids == as_string.prompt_ids  # the teacher sees the same prompt either way


@pytest.mark.parametrize("parse", [_serve, _offline], ids=["serve", "offline teacher"])
def test_a_non_text_part_is_a_400_in_openais_shape_naming_the_part(parse):
    with pytest.raises(RequestError) as caught:
        parse([{"role": "system", "content": "Be brief."}, {"role": "user", "content": IMAGE}])
    err = caught.value
    assert err.status == 400 and err.code == "unsupported_content" and err.param == "messages[1].content[1]"
    assert "'image_url'" in err.message and "text parts only" in err.message
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error",
                                    "param": "messages[1].content[1]", "code": "unsupported_content"}}


@pytest.mark.parametrize("messages, param, says", [
    ([], "messages", "non-empty list"),
    ([{"role": "tool", "content": "x"}], "messages[0].role", "'tool'"),
    ([{"role": "user", "content": 3}], "messages[0].content", "not int"),
    ([{"role": "user", "content": ["a string part"]}], "messages[0].content[0]", "'str'"),
])
def test_bad_messages_name_the_field(messages, param, says):
    with pytest.raises(RequestError) as caught:
        parse_messages({"messages": messages})
    assert caught.value.status == 400 and caught.value.param == param and says in caught.value.message


def test_developer_is_system():
    assert parse_messages({"messages": [{"role": "developer", "content": "Be brief."}]}) == [
        {"role": "system", "content": "Be brief."}]


def test_serve_limits_name_their_setting():
    with pytest.raises(RequestError, match=r"1\.\.64 \(serve\.max_tokens\), not 65"):
        serve_parse(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 65}).encode(),
                    max_bytes=1 << 20, max_tokens_cap=64)
    with pytest.raises(RequestError, match="serve.max_request_bytes") as caught:
        serve_parse(b"{" + b" " * 100 + b"}", max_bytes=50)
    assert caught.value.status == 413


def test_error_body_is_openais():
    assert error_body("no", code="x") == {"error": {"message": "no", "type": "invalid_request_error",
                                                    "param": None, "code": "x"}}


def test_a_whole_answer_streams_as_chunks_that_rebuild_it():
    events = parse_sse(b"".join(sse_chunks("chatcmpl-1", "mini", "Your order ORD-123456 ships today.", "length")))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and {c["id"] for c in chunks} == {"chatcmpl-1"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Your order ORD-123456 ships today."
    assert len(chunks) > 3  # word by word, not one piece
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_a_usage_chunk_has_no_choices():
    raw = sse_event("chatcmpl-1", "mini", 0, None, usage={"total_tokens": 3})
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    assert parse_sse(raw) == [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "mini",
                               "choices": [], "usage": {"total_tokens": 3}}]
