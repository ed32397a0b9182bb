"""The fake teacher's knobs (FakeTeacherConfig), its default answer and stand-in tokenizer, and the ledger's key."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_S = 60.0  # the rate-limit window, as OpenAI's per-minute limits
ERROR_FAULTS = {"500": 500, "503": 503, "408": 408, "409": 409, "400": 400, "404": 404}
BODY_FAULTS = ("malformed", "truncated", "empty_choices")
FAULT_KINDS = ("429", *ERROR_FAULTS, "timeout", *BODY_FAULTS, "reset", "ok")
BATCH_ENDPOINT = "/v1/chat/completions"
AZURE_BATCH_ENDPOINTS = (BATCH_ENDPOINT, "/chat/completions")  # Azure's batch files name the path without /v1
BATCH_WINDOW_S = 24 * 3600  # completion_window "24h"; batches never expire in the fake

_ORDER_NUMBER = re.compile(r"ORD-\d{6}", re.IGNORECASE)
# Words and punctuation, each with the whitespace before it (as BPE tokens carry a leading space);
# the tokens of a text join back to exactly that text.
_TOKEN = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")


def answer_order_number(text: str) -> str:
    """The default teacher: the first ``ORD-`` + 6 digits order number in ``text``, upper-cased, or ``NONE``."""
    match = _ORDER_NUMBER.search(text)
    return match.group(0).upper() if match else "NONE"


def tokenize(text: str) -> list[str]:
    """A deterministic stand-in tokenizer: words and punctuation marks, each with its leading whitespace."""
    return _TOKEN.findall(text)


def prompt_key(messages: list) -> str:
    """The ledger's key for a request: sha256 of its ``messages`` as compact JSON with sorted keys."""
    text = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def text_of(content) -> str:
    # Content is a string or a list of parts ({"type": "text", "text": ...}); other parts carry no text.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def last_user_text(messages: list) -> str:
    """The text of the last ``user`` message ('' when there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


@dataclass
class FakeTeacherConfig:
    """The fake teacher's behaviour. JSON-serialisable (``to_json``/``from_json``), so it crosses processes.

    Attributes:
        latency_s: Seconds each request waits before it is answered (faults included, 429s excepted).
        rpm: Global limit: at most this many billed answers in any sliding 60 s window; beyond it, 429.
        tpm: Global limit on prompt + completion tokens of billed answers in any sliding 60 s window.
        api_key: When set, requests need ``Authorization: Bearer <api_key>``, else 401.
        faults: Scripted faults: a substring of the last user message (or ``"*"`` for any prompt) mapped to
            the faults for that prompt's successive attempts (attempt n = the n-th request with the same
            ``messages``). A prompt uses the first key it contains, ``"*"`` last; past the list's end, "ok".
        fault_rate: Chance that an attempt with no scripted fault gets a random one from ``fault_kinds``,
            drawn deterministically from (seed, prompt, attempt).
        fault_kinds: The faults drawn at random.
        seed: Seed for the random faults.
        low_confidence: Substrings of the last user message (``"*"``: any) whose answers get
            ``low_confidence_logprob`` per token instead of ``token_logprob``.
        token_logprob: Log-probability of each answer token (must be <= 0).
        low_confidence_logprob: Log-probability of each token of a low-confidence answer.
        retry_after_s: ``Retry-After`` of a scripted "429" fault.
        timeout_fault_s: How long a "timeout" fault stalls before answering (longer than the client's timeout).
        model: The model id listed by ``GET /v1/models``; requests may name any model, echoed back.
        bill_abandoned: Bill an answer whose client left before receiving it, as real providers do
            (a client killed mid-request has paid for it).
        honour_idempotency_key: A request repeating the ``Idempotency-Key`` of an answer already billed
            gets that answer again, free (``by_kind["idempotent_replay"]``). Off by default: like most real
            providers, the teacher bills a repeated request again.
        answer_fn: ``"module:function"`` mapping the last user message to the answer; None: order numbers.
        unsupported_params: Body keys a reasoning model rejects (e.g. ``["max_tokens", "temperature"]``): a chat
            request (or batch line) naming one gets a 400 worded as OpenAI's, ``code`` "unsupported_parameter"
            (``by_kind["unsupported_parameter"]``), before any attempt is counted; never billed.
        reasoning_tokens: Hidden reasoning tokens of each answer: counted in ``usage.completion_tokens`` and in
            ``usage.completion_tokens_details.reasoning_tokens``. As OpenAI's ``max_completion_tokens``, the
            answer-length limit bounds reasoning and visible tokens together (the reasoning comes first).
        cached_prompt_tokens: A provider prompt cache: a request whose first message (e.g. the system prompt)
            was seen before reports ``usage.prompt_tokens_details.cached_tokens`` = min(prompt tokens, this).
        batch_max_requests: A batch whose input file has more request lines fails validation.
        batch_max_bytes: A batch whose input file is larger fails validation (OpenAI: 200 MB).
        batch_latency_s: Seconds from a batch's creation to its completion; its lines are answered evenly
            over the first 90 % of it, then it is "finalizing" until the end.
        batch_fail_all: While set, every new batch fails validation with code "batch_failed".
    """

    latency_s: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    api_key: str | None = None
    faults: dict[str, list[str]] = field(default_factory=dict)
    fault_rate: float = 0.0
    fault_kinds: list[str] = field(default_factory=lambda: ["429", "500", "503"])
    seed: int = 0
    low_confidence: list[str] = field(default_factory=list)
    token_logprob: float = -0.01
    low_confidence_logprob: float = -2.0
    retry_after_s: int = 1
    timeout_fault_s: float = 30.0
    model: str = "fake-teacher"
    bill_abandoned: bool = False
    honour_idempotency_key: bool = False
    answer_fn: str | None = None
    unsupported_params: list[str] = field(default_factory=list)
    reasoning_tokens: int = 0
    cached_prompt_tokens: int = 0
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200 * 1024**2
    batch_latency_s: float = 1.0
    batch_fail_all: bool = False

    def __post_init__(self):
        self.faults = {str(key): [str(kind) for kind in kinds] for key, kinds in self.faults.items()}
        self.fault_kinds = [str(kind) for kind in self.fault_kinds]
        for where, kinds in [*((f"faults[{key!r}]", kinds) for key, kinds in self.faults.items()),
                             ("fault_kinds", self.fault_kinds)]:
            for kind in kinds:
                if kind not in FAULT_KINDS:
                    raise ValueError(f"{where}: unknown fault {kind!r}; valid: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate: {self.fault_rate} is not between 0 and 1")
        if self.fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_kinds: empty, but fault_rate > 0 needs at least one fault to draw")
        for name in ("rpm", "tpm"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1, or None for no limit")
        for name in ("token_logprob", "low_confidence_logprob"):
            if getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)} is a log-probability and must be <= 0")
        if self.retry_after_s < 1:
            raise ValueError(f"retry_after_s: {self.retry_after_s} must be an integer >= 1")
        if not isinstance(self.unsupported_params, list) or not all(
                isinstance(name, str) and name for name in self.unsupported_params):
            raise ValueError(f"unsupported_params: {self.unsupported_params!r} must be a list of body keys, "
                             "e.g. ['max_tokens']")
        for name in ("reasoning_tokens", "cached_prompt_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be an integer >= 0")
        for name in ("batch_max_requests", "batch_max_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be an integer >= 1")
        if self.batch_latency_s < 0:
            raise ValueError(f"batch_latency_s: {self.batch_latency_s} must be >= 0")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FakeTeacherConfig:
        return cls(**json.loads(text))


def load_answer_fn(path: str | None) -> Callable[[str], str]:
    if path is None:
        return answer_order_number
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"answer_fn: cannot import {path!r} (expected 'module:function')") from exc
