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

# --------------------------------------------------------------------------------------------------
# Templates. {oid} is the order number; other slots are filled at random. TEMPLATES[cat] = (with order
# number, without).
# --------------------------------------------------------------------------------------------------
TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "shipping": (
        [
            "Where is my order {oid}? It was supposed to arrive on {date}.",
            "I ordered a {product} last week (order {oid}) and the tracking hasn't updated in {days} days.",
            "Order {oid} still shows 'processing'. Can you tell me when it will ship?",
            "{oid} - not delivered yet. Please advise.",
            "My package for order {oid} says delivered but I never got it. I checked with my neighbors and the front desk.",
            "Can I change the shipping address on {oid}? I'm moving to {city} next week.",
            "I need order {oid} by {fdate} for a birthday. Is expedited shipping possible?",
            "The carrier gave me tracking number {tracking} but it doesn't work on their site. My order number is {oid}.",
            "any update on {oid}?",
            "It's been {days} days since I placed order {oid} and nothing has arrived.",
            "I only received part of my order. The {product} from {oid} is missing from the box.",
            "Please hold the shipment for {oid} if it hasn't left the warehouse yet, I'll be away until {fdate}.",
            "Why is {oid} being shipped from overseas? The site said {days}-day delivery.",
            "Order number: {oid}\nThe status page is blank. Is something wrong?",
            "my tracking says the {product} is stuck in {city} since {date}. order is {oid}",
            "Could you check on {oid} for me? The estimated delivery keeps moving.",
            "The driver left a note saying they couldn't deliver {oid}. How do I reschedule?",
        ],
        [
            "How long does standard shipping usually take to {city}?",
            "I placed an order this morning but never got a confirmation email. Did it go through?",
            "Do you ship to PO boxes? My zip code is {zip}.",
            "The tracking number {tracking} hasn't moved since {date}. Can you check it?",
            "My package was supposed to come yesterday and it didn't. What should I do?",
            "Can you deliver on weekends? I'm not home during the week.",
            "Do you offer free shipping on orders over {amount}?",
        ],
    ),
    "refund": (
        [
            "I'd like a refund for order {oid}. The {product} doesn't fit.",
            "I returned {oid} on {date} and still haven't seen the refund of {amount}.",
            "Please refund {oid}, I cancelled it within the hour.",
            "How do I start a return for order {oid}?",
            "You refunded {amount} for {oid} but I paid {amount2}. Where is the rest?",
            "refund status for {oid}??",
            "I sent back the {product} (order {oid}) two weeks ago. The carrier confirms you received it on {date}.",
            "Can I get store credit instead of a refund for {oid}?",
            "The return label for order {oid} isn't working. Can you send a new one?",
            "I was told my refund for {oid} would take 5-7 business days. It has been {days}.",
            "{oid}: the item arrived after I needed it, I want my money back please",
            "My order {oid} was cancelled on your side but I was still charged {amount}.",
            "Is it too late to return the {product} from order {oid}? It arrived on {date}.",
        ],
        [
            "What is your return policy for opened items?",
            "I want to return a gift but I don't have the order number. Is that possible?",
            "How long do refunds take to show up on a credit card?",
            "I returned something last month and never got my {amount} back. Please help.",
            "Can I return an item bought in a store to the online shop?",
            "Do I have to pay for return shipping?",
        ],
    ),
    "billing": (
        [
            "I was charged twice for order {oid}. Both charges are {amount}.",
            "The invoice for {oid} shows the wrong billing address.",
            "Can you send me a VAT invoice for order {oid}?",
            "My card ending in {last4} was charged {amount} for {oid} but the total at checkout was {amount2}.",
            "Why was I charged a shipping fee on {oid}? I have free shipping.",
            "Please apply my promo code to {oid}, it didn't go through at checkout.",
            "payment for {oid} failed but the money left my account",
            "I need a receipt for {oid} for my expense report.",
            "The tax on order {oid} looks too high, {amount} for a {product}?",
            "I paid with PayPal for {oid} and now I see a second charge on my Visa ending {last4}.",
            "Order {oid} was supposed to be paid with my gift card balance, not my credit card.",
            "Can I change the payment method on {oid}? It hasn't shipped yet.",
        ],
        [
            "There's a charge of {amount} from you on my statement from {date} that I don't recognize.",
            "How do I update the credit card on file?",
            "Do you accept Apple Pay?",
            "My card ending in {last4} keeps getting declined at checkout.",
            "Can I split a payment between two cards?",
            "Where can I download my invoices?",
        ],
    ),
    "account": (
        [
            "I can't see order {oid} in my account history.",
            "I placed {oid} as a guest. Can you link it to my account {email}?",
            "After the password reset my order {oid} disappeared from the orders page.",
            "Please move order {oid} to my new account, the old one was {email}.",
        ],
        [
            "I can't log in. The password reset email never arrives.",
            "How do I change the email address on my account to {email}?",
            "Please delete my account and all my data.",
            "My account got locked after too many login attempts.",
            "I want to unsubscribe from the marketing emails.",
            "How do I change my phone number? The new one is {phone}.",
            "The two-factor codes are being sent to my old number {phone}.",
            "Can I merge my two accounts? One of them uses {email}.",
            "someone changed my password?? i didnt do it",
            "Where can I update the address in my profile? My new zip is {zip}.",
            "The app keeps logging me out every few minutes.",
            "I never got the verification link for my new account.",
            "How do I stop the site from saving my card details?",
        ],
    ),
    "product_question": (
        [
            "I ordered the {product} ({oid}). Does it come with batteries?",
            "Is the {product} in order {oid} the new model or the older one?",
            "Order {oid}: the manual for the {product} is missing, where can I download it?",
            "Can I still add a warranty to the {product} I bought in {oid}?",
        ],
        [
            "Is the {product} waterproof?",
            "Does the {product} come in blue?",
            "When will the {product} be back in stock?",
            "What is the warranty on the {product}?",
            "Is the {product} compatible with an iPhone 15?",
            "What are the dimensions of the {product}? It has to fit on a 30 inch shelf.",
            "Can I buy a replacement charger for the {product}?",
            "Do you sell gift cards?",
            "The {product} is {amount} right now. Will the price drop for Black Friday?",
            "Is the {product} made in the USA?",
            "How do I clean the {product}?",
            "Does the {product} work with 220V outlets?",
        ],
    ),
    "damaged_item": (
        [
            "The {product} from order {oid} arrived with a cracked screen.",
            "The box was crushed and the {product} inside is broken. Order {oid}.",
            "Order {oid} arrived damaged. I attached photos.",
            "My {product} stopped working after {days} days. Order number {oid}.",
            "{oid} - the {product} arrived dented, I want a replacement not a refund",
            "Half of the items in {oid} are wet, the package was left in the rain.",
            "The glass on the {product} I got (order {oid}) was shattered.",
            "Received the wrong color and it's scratched too. Order: {oid}",
            "the {product} in {oid} has a big scratch on the side",
            "The seal on the {product} was broken when it arrived, order {oid}.",
            "The {product} I received was damaged in transit. The order number is {oid}, delivered {date}.",
            "It arrived in pieces. {oid}.",
        ],
        [
            "My {product} arrived broken. I don't have the order number handy, it was delivered {date}.",
            "The box was soaking wet when it arrived. What do I do?",
        ],
    ),
    "fraud_report": (
        [
            "I did not place order {oid}. Someone is using my account!",
            "There's an order {oid} on my account shipping to {city} that I never made.",
            "Please cancel {oid} immediately, my card was stolen.",
            "I got a confirmation email for {oid} but I didn't order anything.",
            "Fraud alert: order {oid} was placed with my card ending {last4}.",
            "URGENT - unauthorized order {oid}, please stop it",
        ],
        [
            "I got a text from {phone} claiming to be you and asking for my password. Is that real?",
            "Someone changed the email on my account and placed orders I didn't make.",
            "I received a phishing email that looks like it's from your company.",
            "My bank flagged a charge of {amount} from your store that I didn't make.",
            "Is this a scam? Someone called me from {phone} saying I won a gift card.",
            "There are orders in my history I never placed. Please lock my account.",
        ],
    ),
}

# Extra sentences without any order number, per category (context a customer adds).
EXTRAS = {
    "shipping": [
        "I really need it before the weekend.",
        "This is the second time this has happened.",
        "The tracking page just says 'label created'.",
        "I've been waiting at home all day.",
    ],
    "refund": [
        "I've already printed the label.",
        "The item is unused and still in the original packaging.",
        "I'd prefer the money back on my original card.",
        "Honestly I'm pretty disappointed.",
    ],
    "billing": [
        "Please fix this as soon as possible.",
        "My bank says the charge is still pending.",
        "I need this sorted before my statement closes.",
        "I checked my statement twice.",
    ],
    "account": [
        "I've tried on both the app and the website.",
        "I cleared my cookies already.",
        "This is really frustrating.",
        "Please get back to me by email.",
    ],
    "product_question": [
        "I'm thinking of buying two.",
        "The product page doesn't say.",
        "It's meant to be a gift.",
        "Thanks in advance for your help.",
    ],
    "damaged_item": [
        "I have pictures if you need them.",
        "The outer box looked fine.",
        "I'd like this resolved quickly.",
        "I've kept all the packaging.",
    ],
    "fraud_report": [
        "I've already called my bank.",
        "Please treat this as urgent.",
        "I changed my password just now.",
        "I am very worried about this.",
    ],
}

# Sentences carrying numbers that are NOT order numbers.
DISTRACTORS = [
    "You can reach me at {phone}.",
    "I paid {amount} for it.",
    "My zip code is {zip}, in case that matters.",
    "The tracking number is {tracking}.",
    "Call me on {phone} after 5pm.",
    "My previous ticket was {ticketref}.",
    "I've been a customer since {year}.",
    "It was delivered on {date}.",
    "The total came to {amount}.",
    "I live at {street}.",
]

FILLERS = [
    "I hope you're having a good day.",
    "I'm sorry for the long message but I want to explain everything.",
    "I've shopped with you for years and never had a problem before.",
    "My sister recommended your store to me.",
    "I already tried the help center but it didn't answer my question.",
    "I also chatted with someone last week but the chat disconnected.",
    "To be honest I almost gave up on this.",
    "I work nights so email is best for me.",
    "It's not a huge deal but I'd like to understand what happened.",
    "The website was really slow when I was checking out, not sure if that's related.",
    "Anyway, I appreciate any help you can give.",
    "I'm not very good with computers so bear with me.",
]

GREETINGS = {
    "email": ["Hi,", "Hello,", "Hi there,", "Good morning,", "Dear Support,", "Dear Sir or Madam,",
              "To whom it may concern,", "Hello team,", "Hi {name} here.", "Good afternoon,"],
    "chat": ["hi", "hello", "hey", "Hi!", "hi there,", "Hello,", "hi,", "Hey!", "good morning"],
    "web_form": ["Hi,", "Hello,", "Hi team,", "Dear customer service,"],
}
SIGNATURES = {
    "email": ["Thanks,\n{name}", "Regards,\n{name} {last}", "Thank you!\n{name}", "Best,\n{name}",
              "Sent from my iPhone", "Cheers,\n{name}", "Many thanks,\n{name} {last}\n{phone}",
              "Kind regards,\n{name} {last}", "- {name}", "Thanks in advance."],
    "chat": ["thanks", "thx", "ty", "thank you", "thanks!"],
    "web_form": ["Thanks, {name}", "{name} {last}", "Thank you.", "{name} {last}, {phone}"],
}

FIRST = ["Emma", "Liam", "Olivia", "Noah", "Ava", "Lucas", "Mia", "Ethan", "Sofia", "Mason", "Chloe",
         "James", "Grace", "Daniel", "Priya", "Omar", "Hannah", "Wei", "Carlos", "Fatima", "Jonas", "Aisha",
         "Marco", "Yuki", "Peter", "Linda", "Karen", "Raj", "Nina", "Tom"]
LAST = ["Smith", "Garcia", "Nguyen", "Muller", "Johnson", "Kowalski", "Rossi", "Patel", "Kim", "Brown",
        "Lopez", "Schmidt", "Dubois", "Okafor", "Silva", "Tanaka", "Martin", "Evans"]
PRODUCTS = ["wireless headphones", "coffee grinder", "yoga mat", "desk lamp", "phone case", "air fryer",
            "running shoes", "backpack", "smart watch", "blender", "winter jacket", "bluetooth speaker",
            "standing desk", "electric kettle", "gaming mouse", "throw blanket", "water bottle",
            "baby monitor", "robot vacuum", "office chair", "camping tent", "hair dryer", "mechanical keyboard",
            "kids' bike", "cast iron pan"]
CITIES = ["Chicago", "Austin", "Denver", "Seattle", "Boston", "Atlanta", "Phoenix", "Portland", "Miami",
          "Toronto", "Dublin", "Manchester", "Lyon", "Hamburg"]
STREETS = ["Oak Street", "Maple Ave", "Main St", "Pine Road", "Elm Street", "Lake Drive", "Hill Lane"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

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
