"""Synthetic "production log" of customer-support messages for the order-number extraction example.

Task: given the customer's message, reply with the order number it mentions (exactly as written, e.g.
``ORD-482913``), or ``NONE`` when it mentions none.

Each line of the log is a JSON object::

    {"ts": "2025-03-03T08:14:05Z", "ticket_id": "T-0100231", "user_id": "u01234",
     "channel": "email", "category": "shipping", "text": "Hi, where is order ORD-482913? ...",
     "order_id": "ORD-482913"}

``order_id`` is the reference answer. Like a real log, only some tickets were labelled by agents: it is a
string for about 60% of the rows (``"NONE"`` when the message has no order number) and null or absent for
the rest. The log also holds what real logs hold: exact and near duplicates (customers re-sending), a
skewed category mix with rare edge cases, distractor numbers (phones, amounts, dates, zip codes, tracking
numbers), typos, and about 0.5% of bad lines (truncated JSON, missing, empty or non-string ``text``) plus a
couple of blank lines.

The output is a pure function of ``(n_rows, seed)``; 200,000 rows take a few seconds. Order numbers are
``ORD-`` + 6 digits: the offline teacher (SmolLM2-135M-Instruct) extracts these far better than ``#1234567``
numbers, which it confuses with phone and card numbers (``order_format="HASH"`` is kept for that comparison;
see bench/example_task_teacher.py and jobs/data/README.md).

    python -m distill_ray.examples.support_orders --rows 3000 --seed 0 --out jobs/data/support_orders.jsonl
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from distill_ray.examples.support_texts import (
    CITIES,
    DISTRACTORS,
    EXTRAS,
    FILLERS,
    FIRST,
    GREETINGS,
    LAST,
    MONTHS,
    PRODUCTS,
    SIGNATURES,
    STREETS,
    TEMPLATES,
    WEEKDAYS,
)

# --------------------------------------------------------------------------------------------------
# Shares. CATEGORY_WEIGHTS sum to 1; P_ORDER is the chance that a message of the category mentions an
# order number (about 71% overall, so ~29% of messages have none).
# --------------------------------------------------------------------------------------------------
CATEGORY_WEIGHTS = {
    "shipping": 0.38,
    "refund": 0.22,
    "billing": 0.15,
    "account": 0.12,
    "product_question": 0.09,
    "damaged_item": 0.03,
    "fraud_report": 0.01,
}
P_ORDER = {
    "shipping": 0.90,
    "refund": 0.85,
    "billing": 0.70,
    "account": 0.20,
    "product_question": 0.25,
    "damaged_item": 0.90,
    "fraud_report": 0.50,
}
CHANNEL_WEIGHTS = {"email": 0.45, "chat": 0.35, "web_form": 0.20}

P_EXACT_DUP = 0.08  # same text as an earlier line, new ts / ticket_id
P_NEAR_DUP = 0.05  # earlier text with a small edit (case, spacing, punctuation, one word)
P_BAD = 0.005  # malformed lines
N_BLANK = 2  # blank lines somewhere in the file
P_LABELLED = 0.60  # order_id present and non-null
P_LABEL_NULL = 0.20  # order_id: null (the remaining 20%: key absent)

# edge cases, per message
P_LOWER_ORD = 0.03  # 'ord-482913'
P_DISTRACTOR = 0.12  # an extra sentence with a phone number, amount, zip, tracking number ...
P_RAMBLING = 0.03  # long rambling message
P_TYPOS = 0.06  # one to three typos
P_EXTRA = 0.35  # an extra context sentence (no number)

ORDER_FORMATS = ("ORD", "HASH")
START = datetime(2025, 3, 3, 6, 0, 0, tzinfo=UTC)
_OID = "\x00"  # placeholder for the order number while the text is being styled

_SLOT = re.compile(r"\{(\w+)\}")


def _compile(templates: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    return [(t, tuple(sorted(set(_SLOT.findall(t)) - {"oid"}))) for t in templates]


_T_WITH = {c: _compile(w) for c, (w, _) in TEMPLATES.items()}
_T_WITHOUT = {c: _compile(wo) for c, (_, wo) in TEMPLATES.items()}
_EXTRAS = {c: _compile(x) for c, x in EXTRAS.items()}
_DISTRACTORS = _compile(DISTRACTORS)
_GREETINGS = {c: _compile(x) for c, x in GREETINGS.items()}
_SIGNATURES = {c: _compile(x) for c, x in SIGNATURES.items()}
_dumps = json.JSONEncoder(ensure_ascii=False).encode
_q = json.encoder.encode_basestring  # a str as a JSON string literal (what json.dumps(ensure_ascii=False) uses)
_MISSING = object()
_CATS = list(CATEGORY_WEIGHTS)
_CAT_CUM = [sum(list(CATEGORY_WEIGHTS.values())[: i + 1]) for i in range(len(_CATS))]
_CHANNELS = list(CHANNEL_WEIGHTS)
_CHAN_CUM = [sum(list(CHANNEL_WEIGHTS.values())[: i + 1]) for i in range(len(_CHANNELS))]


def _ch(r: random.Random, seq):
    """r.choice, but cheaper (a single r.random() call)."""
    return seq[int(r.random() * len(seq))]


def _ri(r: random.Random, a: int, b: int) -> int:
    """r.randint, but cheaper."""
    return a + int(r.random() * (b - a + 1))


def _pick_cum(r: random.Random, items: list[str], cum: list[float]) -> str:
    return items[min(bisect.bisect_right(cum, r.random() * cum[-1]), len(items) - 1)]


def _slot(r: random.Random, name: str) -> str:
    if name == "product":
        return _ch(r, PRODUCTS)
    if name == "name":
        return _ch(r, FIRST)
    if name == "last":
        return _ch(r, LAST)
    if name == "city":
        return _ch(r, CITIES)
    if name == "days":
        return str(_ri(r, 3, 21))
    if name == "date":
        k = int(r.random() * 4)
        if k == 0:
            return f"{_ch(r, MONTHS)} {_ri(r, 1, 28)}"
        if k == 1:
            return f"{_ri(r, 1, 12)}/{_ri(r, 1, 28)}"
        if k == 2:
            return f"2025-{_ri(r, 1, 12):02d}-{_ri(r, 1, 28):02d}"
        return f"last {_ch(r, WEEKDAYS)}"
    if name == "fdate":  # a date in the near future
        k = int(r.random() * 3)
        if k == 0:
            return f"{_ch(r, MONTHS)} {_ri(r, 1, 28)}"
        if k == 1:
            return f"next {_ch(r, WEEKDAYS)}"
        return _ch(r, WEEKDAYS)
    if name in ("amount", "amount2"):
        k = int(r.random() * 4)
        v = f"{_ri(r, 5, 400)}.{_ch(r, ('99', '00', '49', '95', str(_ri(r, 10, 99))))}"
        return ("$" + v, "$" + v, v + " USD", "\u20ac" + v)[k]
    if name == "phone":
        a, b, c = _ri(r, 200, 989), _ri(r, 200, 999), _ri(r, 1000, 9999)
        return (f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"+1 {a} {b} {c}")[int(r.random() * 3)]
    if name == "zip":
        return f"{_ri(r, 1000, 99999):05d}"
    if name == "tracking":
        k = int(r.random() * 3)
        if k == 0:
            return "1Z" + "".join(_ch(r, "0123456789ABCDEFGHJKLMNPRSTVWXY") for _ in range(16))
        if k == 1:
            return f"{_ri(r, 10**11, 10**12 - 1)}"
        return f"94{_ri(r, 0, 10**20 - 1):020d}"
    if name == "last4":
        return f"{_ri(r, 0, 9999):04d}"
    if name == "email":
        return f"{_ch(r, FIRST).lower()}.{_ch(r, LAST).lower()}{_ri(r, 1, 99)}@{_ch(r, ('gmail.com', 'yahoo.com', 'outlook.com', 'hotmail.com'))}"
    if name == "ticketref":
        return f"CS-{_ri(r, 10000, 99999)}"
    if name == "year":
        return str(_ri(r, 2012, 2024))
    if name == "street":
        return f"{_ri(r, 1, 9999)} {_ch(r, STREETS)}"
    raise KeyError(name)


def _fill(r: random.Random, tpl: tuple[str, tuple[str, ...]], who: tuple[str, str]) -> str:
    """Fill a template; ``who`` is the customer's (first, last) name, the same all through a message."""
    text, names = tpl
    if not names:
        return text.replace("{oid}", _OID) if "{oid}" in text else text
    vals = {n: who[0] if n == "name" else who[1] if n == "last" else _slot(r, n) for n in names}
    vals["oid"] = _OID
    return text.format(**vals)


def _order_number(r: random.Random, fmt: str) -> str:
    if fmt == "ORD":
        return f"ORD-{_ri(r, 100000, 999999)}"
    if fmt == "HASH":
        return f"#{_ri(r, 1000000, 99999999)}"
    raise ValueError(f"unknown order format {fmt!r}; expected one of {ORDER_FORMATS}")


def _typos(r: random.Random, text: str) -> str:
    words = text.split(" ")
    idx = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    for i in r.sample(idx, min(len(idx), _ri(r, 1, 3))):
        w = words[i]
        j = r.randrange(1, len(w) - 1)
        k = r.randrange(3)
        if k == 0:  # swap
            w = w[: j - 1] + w[j] + w[j - 1] + w[j + 1:]
        elif k == 1:  # drop
            w = w[:j] + w[j + 1:]
        else:  # double
            w = w[:j] + w[j] + w[j:]
        words[i] = w
    return " ".join(words)


def _message(r: random.Random, cat: str, channel: str, fmt: str) -> tuple[str, str]:
    """One fresh message and its reference answer."""
    has_order = r.random() < P_ORDER[cat]
    who = (_ch(r, FIRST), _ch(r, LAST))
    core = _fill(r, _ch(r, _T_WITH[cat] if has_order else _T_WITHOUT[cat]), who)
    sentences = [core]
    if r.random() < P_EXTRA:
        sentences.append(_fill(r, _ch(r, _EXTRAS[cat]), who))
    if r.random() < P_DISTRACTOR:
        sentences.insert(int(r.random() * (len(sentences) + 1)), _fill(r, _ch(r, _DISTRACTORS), who))
    if r.random() < P_RAMBLING:
        for f in r.sample(FILLERS, _ri(r, 3, 6)):
            sentences.insert(r.randrange(len(sentences) + 1), f)

    joiner = "\n\n" if channel == "email" and len(sentences) > 2 and r.random() < 0.5 else " "
    body = joiner.join(sentences)
    if channel == "chat" and r.random() < 0.35:
        body = body.lower()
    if r.random() < P_TYPOS:
        body = _typos(r, body)

    parts = []
    p_greet, p_sign = {"email": (0.8, 0.75), "chat": (0.3, 0.15), "web_form": (0.4, 0.4)}[channel]
    if r.random() < p_greet:
        parts.append(_fill(r, _ch(r, _GREETINGS[channel]), who))
    parts.append(body)
    if r.random() < p_sign:
        parts.append(_fill(r, _ch(r, _SIGNATURES[channel]), who))
    sep = "\n\n" if channel == "email" else ("\n" if channel == "web_form" else " ")
    text = sep.join(parts)

    if not has_order:
        return text, "NONE"
    oid = _order_number(r, fmt)
    if fmt == "ORD" and r.random() < P_LOWER_ORD:
        oid = oid.lower()
    return text.replace(_OID, oid), oid


_SWAPS = [("Hi", "Hello"), ("Hello", "Hi"), ("Thanks", "Thank you"), ("please", "pls"), ("Please", "Pls"),
          ("I'm", "Im"), ("don't", "dont"), ("can't", "cant"), ("my", "the"), ("still", "")]


def _near_dup(r: random.Random, text: str, oid: str) -> tuple[str, str]:
    k = r.randrange(4)
    if k == 0:  # case
        new = text.lower() if r.random() < 0.7 else text.upper()
    elif k == 1:  # spacing
        words = text.split(" ")
        i = r.randrange(len(words))
        words[i] = words[i] + " "
        new = (" " if r.random() < 0.5 else "") + " ".join(words) + ("  " if r.random() < 0.5 else "\n")
    elif k == 2:  # punctuation
        if text.rstrip()[-1:] in ".?!":
            new = text.rstrip()[:-1] + _ch(r, ("", "!", "!!", "??", "..."))
        else:
            new = text.rstrip() + _ch(r, ("!", "?", "."))
        new = new.replace(",", "", 1) if r.random() < 0.5 else new
    else:  # one-word edit
        new = text
        for a, b in r.sample(_SWAPS, len(_SWAPS)):
            m = re.search(r"\b" + re.escape(a) + r"\b", text)
            if m:
                new = text[: m.start()] + b + text[m.end():]
                new = new.replace("  ", " ")
                break
        if new == text:
            new = text + " " + _ch(r, ("Thanks.", "Thanks!", "Please help.", "Any update?"))
    if oid != "NONE":  # the reference is the order number exactly as written in the new text
        i = new.lower().find(oid.lower())
        oid = new[i: i + len(oid)] if i >= 0 else oid
    return new, oid


_DAYS: dict[int, str] = {}


def _iso(seconds: float) -> str:
    """START + seconds as 'YYYY-MM-DDTHH:MM:SSZ' (START has whole minutes); cheaper than strftime."""
    s = int(seconds) + START.hour * 3600 + START.minute * 60
    d, s = divmod(s, 86400)
    day = _DAYS.get(d)
    if day is None:
        day = _DAYS[d] = (START + timedelta(days=d)).strftime("%Y-%m-%d")
    return f"{day}T{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}Z"


def make_log(n_rows: int, seed: int = 0, *, order_format: str = "ORD") -> Iterator[str]:
    """Yield ``n_rows`` JSONL lines (no trailing newline), bad and blank lines included.

    The output depends only on ``(n_rows, seed, order_format)``.
    """
    if order_format not in ORDER_FORMATS:
        raise ValueError(f"unknown order format {order_format!r}; expected one of {ORDER_FORMATS}")
    r = random.Random(f"support_orders:{seed}")
    blanks = set(r.sample(range(1, n_rows), min(N_BLANK, n_rows - 1))) if n_rows >= 50 else set()
    heavy = [f"u{_ri(r, 0, 99999):05d}" for _ in range(15)]
    history: list[tuple[str, str, str, str, str]] = []  # (text, answer, category, channel, user)
    t = 0.0
    ticket = 100000
    n_bad = 0
    for i in range(n_rows):
        if i in blanks:
            yield ""
            continue
        t += r.expovariate(1 / 240.0)
        ticket += 1 + int(r.random() * 3)
        x = r.random()
        if history and x < P_EXACT_DUP:
            text, answer, cat, channel, user = history[-1 - int(r.random() * min(500, len(history)))]
        elif history and x < P_EXACT_DUP + P_NEAR_DUP:
            text, answer, cat, channel, user = history[-1 - int(r.random() * min(500, len(history)))]
            text, answer = _near_dup(r, text, answer)
        else:
            cat = _pick_cum(r, _CATS, _CAT_CUM)
            channel = _pick_cum(r, _CHANNELS, _CHAN_CUM)
            user = _ch(r, heavy) if r.random() < 0.12 else f"u{_ri(r, 0, 99999):05d}"
            text, answer = _message(r, cat, channel, order_format)
            history.append((text, answer, cat, channel, user))
        row: dict = {"ts": _iso(t), "ticket_id": f"T-{ticket:07d}", "user_id": user, "channel": channel,
                     "category": cat, "text": text}
        y = r.random()
        if y < P_LABELLED:
            row["order_id"] = answer
        elif y < P_LABELLED + P_LABEL_NULL:
            row["order_id"] = None
        if r.random() < P_BAD:  # the five kinds of bad line take turns, so even a small log has each
            k = n_bad % 5
            n_bad += 1
            if k == 0:  # truncated JSON
                line = _dumps(row)
                yield line[: r.randrange(10, max(11, len(line) - 5))]
                continue
            if k == 1:
                del row["text"]
            elif k == 2:
                row["text"] = _ch(r, ("", " ", "   \n", "\t"))
            elif k == 3:
                row["text"] = _ch(r, (0, 12345, 3.5, _ri(r, 100000, 999999)))
            else:
                row["text"] = [text] if r.random() < 0.5 else text.split(". ")
        if type(row.get("text")) is str:  # the common case, by hand: same bytes as json.dumps, cheaper
            oid = row.get("order_id", _MISSING)
            tail = "}" if oid is _MISSING else ', "order_id": null}' if oid is None else f', "order_id": {_q(oid)}}}'
            yield (f'{{"ts": "{row["ts"]}", "ticket_id": "{row["ticket_id"]}", "user_id": "{user}", '
                   f'"channel": "{channel}", "category": "{cat}", "text": {_q(row["text"])}{tail}')
        else:
            yield _dumps(row)


def write_log(path: str, n_rows: int, seed: int = 0, *, order_format: str = "ORD") -> int:
    """Write the log to ``path`` (one JSON object a line) and return the number of lines written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for line in make_log(n_rows, seed, order_format=order_format):
            f.write(line + "\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=3000, help="lines to write, bad and blank lines included")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="jobs/data/support_orders.jsonl")
    p.add_argument("--order-format", choices=ORDER_FORMATS, default="ORD",
                   help="ORD: 'ORD-482913' (default); HASH: '#4829137'")
    a = p.parse_args(argv)
    n = write_log(a.out, a.rows, a.seed, order_format=a.order_format)
    print(f"wrote {n} lines to {a.out}")


if __name__ == "__main__":
    main()
