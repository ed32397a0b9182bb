"""Batched generation with transformers: one worker thread decodes queued requests together (the
transformers engine of serve and eval, the offline teacher's `--engine transformers` server, and
training's in-loop check on the weights it holds).

Prompts of a batch that start with the same chat history (the system line and few-shot turns of a
distillation task) share one key/value cache of that history, computed once and kept for the next
batches: only each request's own last message is prefilled. `offline.py` puts HTTP in front of it.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from aiohttp import web
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MAX_TOKENS = 256
MAX_TOP_LOGPROBS = 20
MIN_SHARED_PREFIX = 32  # tokens; below this a separate prefix pass costs more than it saves
PREFIX_CACHE_SIZE = 4
ENGINE = web.AppKey("engine", "BatchGenerator")  # the app's batch worker, for callers that want its stats


@dataclass
class GenerationRequest:
    """One prompt to complete; ``history_len`` prompt tokens are the shareable chat history."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0
    history_len: int = 0


@dataclass
class GenerationResult:
    """The completion of one request: tokens, their logprobs (raw logits) and top alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"


class BatchGenerator:
    """Decodes queued requests in batches on one worker thread.

    Args:
        model: a causal LM (eval mode).
        tokenizer: its tokenizer.
        max_batch: most requests decoded together.
        batch_wait_ms: how long the first request of a batch waits for others to join it.
        reuse_prefix: share (and keep) the key/value cache of a chat history common to a batch.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_batch: int = 8,
                 batch_wait_ms: float = 10, reuse_prefix: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait_s, self.reuse_prefix = max_batch, batch_wait_ms / 1000, reuse_prefix
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.max_context = getattr(model.config, "max_position_embeddings", None) or 2048
        # transformers >= 5.x names the forward argument `cache` (earlier: `past_key_values`)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {"requests": 0, "batches": 0, "batch_sizes": Counter(), "prompt_tokens": 0,
                                       "completion_tokens": 0, "prefix_hits": 0, "prefix_misses": 0, "errors": 0}

    # ---------------------------------------------------------------------------------------- worker
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="offline-teacher-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the batch in progress, then stop the worker; queued requests fail."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                job[1].set_exception(RuntimeError("the offline teacher is shutting down"))

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        """Queue a request; the future resolves to its GenerationResult."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((request, future))
        return future

    def stats(self) -> dict[str, Any]:
        """Counters since start: requests, batches, batch size histogram, tokens, prefix cache hits."""
        with self._lock:
            out = dict(self._stats)
            out["batch_sizes"] = {str(k): v for k, v in sorted(self._stats["batch_sizes"].items())}
        out["queued"] = self._queue.qsize()
        return out

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, deadline, stopping = [first], time.monotonic() + self.batch_wait_s, False
            while len(batch) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            batch = [job for job in batch if job[1].set_running_or_notify_cancel()]
            if batch:
                self._answer(batch)
            if stopping:
                return

    def _answer(self, batch: list[tuple[GenerationRequest, concurrent.futures.Future]]) -> None:
        requests = [request for request, _ in batch]
        try:
            results = self.generate(requests)
        except Exception as err:  # noqa: BLE001 - not swallowed: every waiting request gets the error
            with self._lock:
                self._stats["errors"] += len(batch)
            for _, future in batch:
                future.set_exception(err)
            return
        with self._lock:
            self._stats["requests"] += len(batch)
            self._stats["batches"] += 1
            self._stats["batch_sizes"][len(batch)] += 1
            self._stats["prompt_tokens"] += sum(len(r.prompt_ids) for r in requests)
            self._stats["completion_tokens"] += sum(len(r.token_ids) for r in results)
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)

    # ------------------------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Decode a batch (synchronously, on the calling thread).

        Rows are laid out as ``[shared history][left padding][own tokens]``; with no shared history this
        is plain left padding. Position ids follow the attention mask, so padding changes nothing.

        Args:
            requests: the prompts and their sampling settings.

        Returns:
            One result per request, in order.
        """
        device = self.model.device
        n = len(requests)
        shared, cached_kv = self._shared_prefix(requests)
        tails = [r.prompt_ids[shared:] for r in requests]
        width = max(len(t) for t in tails)
        input_ids = torch.tensor([[self.pad_id] * (width - len(t)) + t for t in tails], device=device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in cached_kv]) \
            if cached_kv else DynamicCache()
        generators = [self._generator(r) for r in requests]
        top_k = max(r.top_logprobs for r in requests)
        tokens: list[list[int]] = [[] for _ in requests]
        logprobs: list[list[float]] = [[] for _ in requests]
        tops: list[list[list[tuple[int, float]]]] = [[] for _ in requests]
        finish: list[str | None] = [None] * n
        texts = [""] * n
        for _ in range(max(r.max_tokens for r in requests)):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache})
            logits = out.logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1)
            chosen = self._choose(logits, requests, generators)
            chosen_logp = logp.gather(1, chosen[:, None])[:, 0].tolist()
            top_vals, top_ids = logp.topk(top_k, dim=-1) if top_k else (None, None)
            for i, request in enumerate(requests):
                if finish[i] is not None:
                    continue
                token = int(chosen[i])
                if token in self.eos_ids:
                    finish[i] = "stop"
                    continue
                tokens[i].append(token)
                logprobs[i].append(chosen_logp[i])
                if request.top_logprobs:
                    tops[i].append(list(zip(top_ids[i, : request.top_logprobs].tolist(),
                                            top_vals[i, : request.top_logprobs].tolist(), strict=True)))
                if request.stop:
                    finish[i] = self._apply_stop(i, request, tokens, logprobs, tops, texts)
                if finish[i] is None and len(tokens[i]) >= request.max_tokens:
                    finish[i] = "length"
            if all(f is not None for f in finish):
                break
            input_ids = chosen[:, None]
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            positions = positions[:, -1:] + 1
        return [GenerationResult(tokens[i], logprobs[i], tops[i], texts[i] if requests[i].stop else
                                 self.tokenizer.decode(tokens[i], skip_special_tokens=True), finish[i] or "length")
                for i in range(n)]

    def _shared_prefix(self, requests: list[GenerationRequest]) -> tuple[int, list]:
        """The number of leading tokens whose key/values are shared, and those key/values (batch 1)."""
        if not self.reuse_prefix:
            return 0, []
        histories = [r.prompt_ids[: r.history_len] for r in requests]
        common = min(min(len(h) for h in histories), min(len(r.prompt_ids) for r in requests) - 1)
        for h in histories[1:]:
            common = next((j for j, (a, b) in enumerate(zip(histories[0][:common], h[:common], strict=True)) if a != b), common)
        if common < MIN_SHARED_PREFIX:
            return 0, []
        key = tuple(histories[0][:common])
        kv = self._prefixes.get(key)
        with self._lock:
            self._stats["prefix_hits" if kv is not None else "prefix_misses"] += 1
        if kv is None:
            cache = DynamicCache()
            self.model(input_ids=torch.tensor([key], device=self.model.device), use_cache=True, logits_to_keep=1,
                       **{self._cache_kw: cache})
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            self._prefixes[key] = kv
            while len(self._prefixes) > PREFIX_CACHE_SIZE:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(key)
        return common, kv

    @staticmethod
    def _generator(request: GenerationRequest) -> torch.Generator | None:
        if request.temperature <= 0:
            return None
        generator = torch.Generator()
        if request.seed is not None:
            generator.manual_seed(request.seed)
        else:
            generator.seed()
        return generator

    @staticmethod
    def _choose(logits: torch.Tensor, requests: list[GenerationRequest],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        chosen = logits.argmax(dim=-1)
        for i, (request, generator) in enumerate(zip(requests, generators, strict=True)):
            if generator is None:
                continue
            probs = torch.softmax(logits[i] / request.temperature, dim=-1).cpu()
            if request.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest set whose mass reaches top_p (always at least the top token)
                drop = sorted_probs.cumsum(0) - sorted_probs >= request.top_p
                drop[0] = False
                probs = probs.scatter(0, order[drop], 0.0)
            chosen[i] = torch.multinomial(probs, 1, generator=generator).item()
        return chosen

    def _apply_stop(self, i: int, request: GenerationRequest, tokens: list[list[int]],
                    logprobs: list[list[float]], tops: list[list], texts: list[str]) -> str | None:
        """Cut row i at the first stop string: the text before it, and the tokens that make up that text."""
        text = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
        hits = [text.find(s) for s in request.stop if s and s in text]
        texts[i] = text
        if not hits:
            return None
        cut = min(hits)
        texts[i] = text[:cut]
        keep = next(k for k in range(len(tokens[i]) + 1)
                    if len(self.tokenizer.decode(tokens[i][:k], skip_special_tokens=True)) >= cut)
        del tokens[i][keep:], logprobs[i][keep:], tops[i][keep:]
        return "stop"


# ------------------------------------------------------------------------------------------ HTTP layer
