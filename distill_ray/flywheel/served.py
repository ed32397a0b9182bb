"""The next round's prompts: served client traffic that no earlier prompt set holds, in the served mix.

Served traffic is the request log lines of client requests that were answered: `status` 200 and no
`origin` (the pipeline's replay of its own holdout, `origin: replay:holdout`, is not a client's
request, and its prompts are the holdout's anyway). A round reads only the log files that no earlier
round read.

A served prompt is new when no earlier prompt set (the parent's train and holdout, and every earlier
round's) holds it: not equal after normalisation (`prompts.normalize` of its turns) and not a near
duplicate — it shares a MinHash LSH band with an earlier prompt, with the `prompts:` settings
(`near_threshold`, `num_perm`, `shingle_size`), as the prompts step decides. The new prompts (one per
normalised text: its first request) are sampled to `prompts.size` with each category at its share of
the served traffic (`prompts.sample.allocate`, capped by what the category has), so a category whose
prompts were mostly seen before keeps its weight. The earlier sets are held in the driver's memory
(a few thousand prompts each), as are the new log files' lines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distill_ray.config.schema import Prompts
from distill_ray.prompts.minhash import band_keys, lsh_params, signatures
from distill_ray.prompts.normalize import normalize, seeded_rank
from distill_ray.prompts.sample import allocate


def conversation_text(messages: Iterable[dict[str, Any]]) -> str:
    """The normalised text of a prompt's turns: what "the same prompt" means across prompt sets (the
    parent's, from text or messages, and the served logs')."""
    return normalize("\n".join(f"{m['role']}: {m['content']}" for m in messages))


def served_prompt(line: dict[str, Any]) -> list[dict[str, str]] | None:
    """The logged prompt as chat turns (a trailing assistant turn dropped), or None when it has no user text."""
    turns = [{"role": m["role"], "content": m["content"]} for m in line.get("prompt") or []
             if isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)]
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns if any(m["role"] == "user" and m["content"].strip() for m in turns) else None


def client_traffic(lines: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The lines of answered client requests (each with its parsed `turns`), and the others by reason."""
    kept, skipped = [], Counter()
    for line in lines:
        if line.get("status") != 200:
            skipped["error"] += 1
        elif line.get("origin"):
            skipped[f"origin {line['origin']}"] += 1
        elif (turns := served_prompt(line)) is None:
            skipped["no_prompt"] += 1
        else:
            kept.append({**line, "turns": turns})
    return kept, skipped


class SeenPrompts:
    """Earlier prompt sets, asked whether a prompt is an exact or near duplicate of one of theirs."""

    def __init__(self, texts: Iterable[str], cfg: Prompts):
        self.cfg = cfg
        self.texts = set(texts)
        self.bands, self.rows = lsh_params(cfg.near_threshold, cfg.num_perm)
        self.keys: set[int] = set()
        if self.texts:
            self.keys = set(self._band_keys(sorted(self.texts)).reshape(-1).tolist())

    def _band_keys(self, texts: list[str]) -> np.ndarray:
        return band_keys(signatures(texts, self.cfg.num_perm, self.cfg.shingle_size), self.bands, self.rows)

    def classify(self, texts: list[str]) -> list[str | None]:
        """Per text: "exact", "near" (shares a band with an earlier prompt, unless dedupe is not near) or None."""
        if not texts:
            return []
        near = self.cfg.dedupe == "near"
        keys = self._band_keys(texts) if near and self.keys else None
        out: list[str | None] = []
        for i, text in enumerate(texts):
            if text in self.texts:
                out.append("exact")
            elif keys is not None and any(int(k) in self.keys for k in keys[i]):
                out.append("near")
            else:
                out.append(None)
        return out


@dataclass
class Selection:
    """What a round takes from the served traffic, and the counts that explain it."""

    lines_read: int
    client_requests: int
    skipped: dict[str, int]
    unique_prompts: int
    seen_before: dict[str, int]  # exact / near duplicates of an earlier prompt set
    new_prompts: int
    served_mix: dict[str, int]  # client requests per category
    new_by_category: dict[str, int]
    quotas: dict[str, int]
    chosen: list[dict[str, Any]] = field(default_factory=list)  # prompt-source rows: prompt, category, request_id

    def counts(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "chosen"} | {"chosen": len(self.chosen)}


def select_new_prompts(lines: list[dict[str, Any]], seen: SeenPrompts, cfg: Prompts) -> Selection:
    """The round's prompts from the new log lines: new prompts only, in the served mix, `cfg.size` at most.

    Args:
        lines: request log lines (any kind: errors and replayed lines are counted and left out).
        seen: the earlier prompt sets.
        cfg: the parent's `prompts:` (size, min_per_category, seed and the near-duplicate settings).
    """
    client, skipped = client_traffic(lines)
    first: dict[str, dict[str, Any]] = {}
    for line in client:
        first.setdefault(conversation_text(line["turns"]), line)
    texts = list(first)
    verdicts = seen.classify(texts)
    new = {text: first[text] for text, verdict in zip(texts, verdicts, strict=True) if verdict is None}
    served_mix = Counter(str(line.get("category") or "unknown") for line in client)
    available = Counter(str(line.get("category") or "unknown") for line in new.values())
    quotas = allocate(dict(served_mix), dict(available), cfg.size, cfg.min_per_category)
    ranked = sorted(new.items(), key=lambda kv: seeded_rank(cfg.seed, "flywheel", kv[0]))
    taken: Counter[str] = Counter()
    chosen = []
    for _, line in ranked:
        category = str(line.get("category") or "unknown")
        if taken[category] < quotas.get(category, 0):
            taken[category] += 1
            chosen.append({"prompt": line["turns"], "category": category, "request_id": line.get("request_id")})
    return Selection(
        lines_read=len(lines), client_requests=len(client), skipped=dict(skipped), unique_prompts=len(first),
        seen_before=dict(Counter(v for v in verdicts if v)), new_prompts=len(new), served_mix=dict(served_mix),
        new_by_category=dict(available), quotas={c: q for c, q in quotas.items() if q}, chosen=chosen)
