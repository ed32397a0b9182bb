"""Peak memory of the training loop per rank, measured on CPU for the 135M student and checked against the memory
plan's formula (SCALING.md, "Memory plan for big students"); the plan's table for 1B and 8B students.

    .venv/bin/python bench/train_memory.py --keep /tmp/train-memory   # the 11 cases below (35 minutes here)
    .venv/bin/python bench/train_memory.py --cases 2r-z2 2r-z3-ckpt    # some of them
    .venv/bin/python bench/train_memory.py report --keep /tmp/train-memory   # the table again
    .venv/bin/python bench/train_memory.py activations                # saved activations per token and layer
    .venv/bin/python bench/train_memory.py plan                       # the plan's table (1B / 8B, 80 GB GPUs)

A case is `<ranks>r-z<stage>[-lora][-ckpt]`: SmolLM2-135M-Instruct (fp32, gloo), micro-batch 8, rows of the
bundled example's log (jobs/data/support_orders.jsonl, malformed lines skipped) cut to 256 tokens, 3 steps, one
eval (holdout loss on 8 rows, no generation) and one checkpoint at the end. Each rank runs the loop unchanged
(`standalone.run_bundle`: 1 rank in one process, 2 ranks under torch.distributed.run) in a process whose probes,
wrapped around a few of the loop's functions by this script (no library file is touched), read
/proc/self/status: VmRSS (resident now) and VmHWM (its peak). At each phase the probes hand freed heap memory
back (malloc_trim) and reset the peak (5 to /proc/self/clear_refs), so the loop's own `host_peak_rss_gb` is the
eval phase's peak in these runs; glibc's mallinfo2 gives the memory malloc has handed out and not had back.
Phases: imports, process group and rows ("overhead"); model loaded (LoRA wrapped); deepspeed.initialize; each
training step (before and after the forward, after the step); eval + export + checkpoint. `--keep DIR` keeps
each case's bundle and rank<r>.json; `python -m distill_ray.train.standalone DIR/<case> --checkpoint-dir
$(mktemp -d)` (torch.distributed.run --nproc-per-node 2 ... for a 2-rank case) runs it again without probes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GB = 1e9
INSTRUCTIONS = ("Extract the order number from the customer's message. Reply with the order number only, or NONE if "
                "the message has no order number.")
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
CASES = [f"{r}r-z{z}{lora}{ckpt}" for r, z in ((1, 2), (1, 3), (2, 2), (2, 3)) for lora in ("", "-lora")
         for ckpt in ("", "-ckpt") if r == 2 or not (lora or ckpt)]
MICRO, STEPS, SEQ = 8, 3, 256
BUCKET = 50_000_000  # reduce_bucket_size (and ZeRO-3's prefetch bucket) in the zero2 / zero3 presets, elements
SUB_GROUP = 1e9  # ZeRO-3's sub_group_size (DeepSpeed's default): the optimizer steps the partition in pieces this big

# Llama shapes: hidden h, layers L, intermediate i, attention heads, key/value heads, head dim, vocab V, tied.
SHAPES = {
    "SmolLM2-135M": dict(h=576, L=30, i=1536, heads=9, kv_heads=3, head_dim=64, V=49152, tied=True),
    "Llama-3.2-1B": dict(h=2048, L=16, i=8192, heads=32, kv_heads=8, head_dim=64, V=128256, tied=True),
    "Llama-3.1-8B": dict(h=4096, L=32, i=14336, heads=32, kv_heads=8, head_dim=128, V=128256, tied=False),
}


# ----------------------------------------------------------------------------------------------- the formula

def _linears(s: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder layer's projections."""
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    return {"q": (s["h"], q), "k": (s["h"], kv), "v": (s["h"], kv), "o": (q, s["h"]),
            "gate": (s["h"], s["i"]), "up": (s["h"], s["i"]), "down": (s["i"], s["h"])}


def params(s: dict) -> int:
    """Every parameter: embeddings (twice when the LM head is not tied), the layers' projections and norms."""
    layer = sum(a * b for a, b in _linears(s).values()) + 2 * s["h"]
    return s["V"] * s["h"] * (1 if s["tied"] else 2) + s["L"] * layer + s["h"]


def lora_params(s: dict, rank: int = 16) -> int:
    """LoRA's A (r x in) and B (out x r) on the 7 projections of every layer."""
    return s["L"] * sum(rank * (a + b) for a, b in _linears(s).values())


def layer_activation_bytes(s: dict, T: int, e: int, lora_rank: int = 0) -> int:
    """Bytes one Llama decoder layer saves for the backward, per token (transformers' LlamaDecoderLayer, SDPA
    attention, what `activations` measures): each RMSNorm keeps its input in fp32 (4h), its rstd (4) and two
    h-wide tensors (normalised, times the weight); attention keeps q, k and v repeated to every head (GQA),
    its output (4 x h) and a logsumexp per head (fp32) and its B x T x T mask (e per token and key); the
    SwiGLU MLP keeps 4 intermediate-wide tensors (gate, silu(gate), up, their product). LoRA (frozen norms)
    drops the normalised tensor each norm keeps for its weight's gradient and adds its rank-wide intermediate
    on each of the 7 projections. e: bytes per element (2 bf16, 4 fp32)."""
    h, i = s["h"], s["i"]
    lora = 7 * lora_rank * e - 2 * e * h if lora_rank else 0
    return 2 * (4 * h + 2 * e * h + 4) + 4 * e * h + 4 * s["heads"] + 4 * e * i + e * T + lora


def activation_bytes(s: dict, B: int, T: int, window: int, e: int, ckpt: bool, lora_rank: int = 0,
                     forward: bool = False) -> int:
    """Peak activations of one micro-batch (B rows of T tokens, logits on the last `window` positions):
    without checkpointing every layer's saved tensors plus one layer's worth of gradients in flight; with it
    each layer's input (e x h per token) plus one layer recomputed and its gradients; the final norm (4h + 2eh)
    on every token; and on the window the logits (e), their fp32 copy and log-softmax (4 + 4) and the
    logits' gradient (4 + e) per vocabulary entry. `forward`: what is held at the end of the forward (no
    layer in flight, no gradients; fp32 logits need no copy)."""
    layer = layer_activation_bytes(s, T, e, lora_rank)
    own = s["L"] * e * s["h"] if ckpt else s["L"] * layer
    kept = own if forward else own + (2 if ckpt else 1) * layer
    logits = (e + 8 if e < 4 else 8) if forward else 2 * e + 12
    return B * T * (kept + 4 * s["h"] + 2 * e * s["h"]) + B * window * s["V"] * logits


def state_bytes(P: int, A: int, N: int, zero3: bool, *, weight: int, grad: int, optimizer: int) -> float:
    """Weights, gradients and optimizer state per rank: P parameters of the model, A of them trained (A = P), or
    A adapters beside the frozen P (LoRA, A < P); ZeRO-2 shards gradients and optimizer state over N ranks,
    ZeRO-3 the weights too."""
    held = P if A == P else P + A
    return weight * held / (N if zero3 else 1) + (grad + optimizer) * A / N


# ------------------------------------------------------------------------------------- measuring one rank

def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024 / GB
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> float:
    """GB that malloc has handed out and not had back (glibc's main arena and its mmapped blocks): live memory,
    without the freed memory that glibc keeps resident."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / GB


def _reset_peak() -> None:
    """Hand freed heap memory back (glibc keeps it otherwise: what is resident would count dead tensors) and
    start a new peak."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def rank_main(bundle: str, out_dir: str) -> None:
    """One rank of a case: the loop, unchanged, with probes around its functions; writes rank<r>.json."""
    marks: dict[str, dict] = {"imports": None}
    import deepspeed  # noqa: F401 - counted in the imports
    import torch
    import transformers  # noqa: F401

    from distill_ray.train import loop, runtime
    from distill_ray.train.kd import answer_window
    from distill_ray.train.standalone import run_bundle

    marks["imports"] = _status()
    steps: list[dict] = []

    def around(owner, name, before=None, after=None):
        original = getattr(owner, name)

        def probe(*args, **kwargs):
            if before:
                before(*args, **kwargs)
            result = original(*args, **kwargs)
            if after:
                after(result, *args, **kwargs)
            return result
        setattr(owner, name, probe)

    around(runtime.TorchRuntime, "__init__", after=lambda *_, **__: marks.__setitem__("overhead", _status()))

    def step_done(*_, **__):
        steps[-1]["step_peak"] = _status()["VmHWM"]
        _reset_peak()
        steps[-1]["after_step"] = _status()["VmRSS"]  # live: the state, no activations
        steps[-1]["heap_after_step"] = _heap_in_use()

    def engine_made(result, *args, **kwargs):
        marks["engine"] = _status()
        engine = result[0]
        around(engine, "backward", after=lambda *_, **__: steps[-1].__setitem__("after_backward", _status()["VmRSS"]))
        around(engine, "step", after=step_done)
        _reset_peak()

    def before_init(*args, **kwargs):
        marks["model"] = _status()  # loaded (LoRA-wrapped, checkpointing on), before DeepSpeed
        _reset_peak()

    around(deepspeed, "initialize", before=before_init, after=engine_made)

    def before_forward(engine, tensors, *args, **kwargs):
        _reset_peak()
        labels = tensors["labels"]
        steps.append({"shape": list(labels.shape), "window": answer_window(labels), "before": _status()["VmRSS"],
                      "heap_before": _heap_in_use()})

    def after_forward(*_, **__):
        steps[-1].update(after_forward=_status()["VmRSS"], heap_after_forward=_heap_in_use())

    around(loop, "student_loss", before=before_forward, after=after_forward)

    def before_eval(*args, **kwargs):
        marks["trained"] = _status()
        _reset_peak()

    around(loop, "_evaluate_and_checkpoint", before=before_eval,
           after=lambda *_, **__: marks.__setitem__("evaluated", _status()))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    state = run_bundle(bundle)
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "marks": marks, "steps": steps, "loop_record": state["history"][-1],
              "model_elements_on_rank": state["history"][-1]["model_elements_on_rank"]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)


def baseline_main(out: str) -> None:
    """A process that imports torch, transformers and DeepSpeed, then loads the student (fp32): its RSS."""
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    marks = {"imports": _status()}
    from distill_ray.models import load_causal_lm

    model, _ = load_causal_lm("smollm2")
    marks["model"] = _status()
    marks["elements"] = sum(p.numel() for p in model.parameters())
    with open(out, "w", encoding="utf-8") as f:
        json.dump(marks, f)


# -------------------------------------------------------------------------------------------------- cases

def example_rows(tokenizer, limit: int) -> list[dict]:
    from distill_ray.chat import student_messages
    from distill_ray.config.schema import Task
    from distill_ray.train.data import tokenize

    task = Task(instructions=INSTRUCTIONS, metric="normalized_match")
    rows = []
    with open(ROOT / "jobs" / "data" / "support_orders.jsonl", encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the example log carries a few malformed lines on purpose
            example = {"messages": student_messages(task, [{"role": "user", "content": record["text"]}]),
                       "completion": record.get("order_id") or "NONE"}
            rows.append(tokenize(tokenizer, example, SEQ))
            if len(rows) == limit:
                break
    return rows


def write_case(folder: Path, case: str, rows: list[dict]) -> None:
    from distill_ray.config.schema import DeepSpeed, Train
    from distill_ray.models import model_folder
    from distill_ray.train.deepspeed_config import deepspeed_config
    from distill_ray.train.settings import LoopSettings
    from distill_ray.train.standalone import write_bundle

    world, stage = int(case[0]), int(case.split("-z")[1][0])
    train = Train(deepspeed=DeepSpeed(zero_stage=stage), learning_rate=2e-4, num_workers=world)
    settings = LoopSettings(
        name="mem", init_uri=model_folder("smollm2"), workdir=str(folder / "work"), out_parts=("students", "mem"),
        deepspeed=deepspeed_config(train, micro_batch=MICRO, world_size=world, total_steps=STEPS),
        micro_batch=MICRO, global_batch=MICRO * world, total_steps=STEPS, eval_every_steps=STEPS,
        holdout_tokens=rows[-8:], eval_prompts=[], metric_name="normalized_match", max_new_tokens=8,
        gradient_checkpointing="-ckpt" in case, lora=LORA if "-lora" in case else None)
    train_rows = rows[: MICRO * world * STEPS]
    write_bundle(str(folder), settings, [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in train_rows])


def run_case(folder: Path, case: str) -> list[dict]:
    world = int(case[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1" if world > 1 else "2"}
    env.pop("RANK", None)
    me = [str(Path(__file__).resolve()), "_rank", str(folder), str(folder)]
    command = ([sys.executable, *me] if world == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), *me])
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{case}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


def predict(case: str, rank: dict) -> dict[str, float]:
    """The plan's formula in fp32 (weights 4, gradients 4, Adam 8 bytes per trained parameter) plus what
    DeepSpeed keeps beside it (read from its code), for this rank's measured batch shapes; GB."""
    s = SHAPES["SmolLM2-135M"]
    world, zero3, lora, ckpt = int(case[0]), "-z3" in case, "-lora" in case, "-ckpt" in case
    P = params(s)
    A = lora_params(s) if lora else P
    weights_and_adam = state_bytes(P, A, world, zero3, weight=4, grad=0, optimizer=8)
    # Kept between steps: ZeRO-2 clones its fp32 partition for the optimizer even when the model is fp32;
    # ZeRO-3 does not, but keeps its fp32 gradient partition allocated; both stage gradients in a reduce
    # bucket of up to reduce_bucket_size elements.
    live = weights_and_adam + 4 * A / world + 4 * min(BUCKET, A)
    grads = 0 if zero3 else 4 * A / world  # ZeRO-2's partition of the gradients, from backward to step
    shapes = [(st["shape"][0], st["shape"][1], st["window"]) for st in rank["steps"]]
    acts = max(activation_bytes(s, B, T, W, 4, ckpt, 16 if lora else 0) for B, T, W in shapes)
    forward = max(activation_bytes(s, B, T, W, 4, ckpt, 16 if lora else 0, forward=True) for B, T, W in shapes)
    # ZeRO-3 gathers the weights for the forward and keeps them to the backward, up to
    # stage3_max_live_parameters (1e9): all of a small model.
    gathered = 4 * min(P, 1e9) if zero3 else 0
    # PyTorch's AdamW on DeepSpeed's one flat fp32 partition: two temporaries of its size (sqrt, division);
    # ZeRO-3 also flattens the sub-group's gradients into a new fp32 tensor for it.
    step = 12 * min(A / world, SUB_GROUP) if zero3 else 8 * A / world
    return {k: v / GB for k, v in {
        "live": live, "grads": grads, "forward": forward + gathered, "activations": acts + gathered, "step": step,
        # The steps' temporaries reuse the activations' freed memory (PyTorch's CUDA caching allocator can)...
        "peak": live + grads + max(acts + gathered, step),
        # ... or they do not (glibc keeps freed small blocks on its heap; the step's are new mappings).
        "peak_sum": live + grads + acts + gathered + step}.items()}


def measured(rank: dict) -> dict[str, float]:
    """GB: overhead = after imports, process group and rows; live = resident after the last step (freed heap
    handed back), less the overhead; activations = the largest rise over a forward; peak = VmHWM of the
    training steps less the overhead."""
    m, steps = rank["marks"], rank["steps"]
    overhead = m["overhead"]["VmRSS"]
    return {
        "overhead": overhead, "model": m["model"]["VmRSS"] - overhead, "init_peak": m["engine"]["VmHWM"],
        "live": steps[-1]["after_step"] - overhead, "heap_live": steps[-1].get("heap_after_step", float("nan")),
        "activations": max(st["after_forward"] - st["before"] for st in steps),
        "heap": max(st.get("heap_after_forward", float("nan")) - st.get("heap_before", 0) for st in steps),
        "peak": max(st["step_peak"] for st in steps) - overhead, "process_peak": max(st["step_peak"] for st in steps),
        "eval_peak": m["evaluated"]["VmHWM"], "shapes": sorted({f"{st['shape'][0]}x{st['shape'][1]}" for st in steps}),
        "elements_on_rank": rank["model_elements_on_rank"],
    }


def table_line(case: str, rank: dict) -> str:
    """One rank's row of the table (markdown, as SCALING.md shows it): measured against the formula, GB."""
    got, want = measured(rank), predict(case, rank)
    return (f"| {case} | {rank['rank']} | {got['live']:.2f} / {want['live']:.2f} | {got['activations']:.2f} / "
            f"{got['heap']:.2f} / {want['forward']:.2f} | {got['peak']:.2f} / {want['peak']:.2f} / {want['peak_sum']:.2f} "
            f"| {got['peak'] - want['peak']:+.2f} / {got['peak'] - want['peak_sum']:+.2f} | {got['process_peak']:.2f} "
            f"| {got['eval_peak']:.2f} |")


def print_header(base: dict) -> None:
    print(f"baseline process: imports (torch, transformers, deepspeed) {base['imports']['VmRSS']:.2f} GB RSS; "
          f"+ the fp32 student loaded {base['model']['VmRSS']:.2f} GB ({base['elements'] / 1e6:.1f}M parameters, "
          f"{4 * base['elements'] / GB:.2f} GB in fp32)")
    print("GB (1e9 bytes) per rank. live: resident between steps; forward: rise over a forward (the largest) of the "
          "RSS and of malloc's memory in use (glibc's mallinfo2: without the freed memory glibc keeps); peak: VmHWM "
          "of the steps; these less the process's RSS after imports, process group and rows. Formula peak: max = "
          "the step's temporaries reuse the activations' freed memory, sum = they do not. Process peaks: VmHWM of "
          "the steps, of eval + export + checkpoint.")
    print("| case | rank | live: measured / formula | forward: RSS / malloc in use / formula | peak: measured / "
          "formula max / sum | difference to max / sum | process peak, steps | process peak, eval |")
    print("|---|---|---|---|---|---|---|---|")


def measure(cases: list[str], keep: str | None) -> None:
    from transformers import AutoTokenizer

    from distill_ray.models import model_folder

    tokenizer = AutoTokenizer.from_pretrained(model_folder("smollm2"))
    rows = example_rows(tokenizer, MICRO * 2 * STEPS + 8)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="train-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, __file__, "_baseline", str(root / "baseline.json")], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print_header(json.loads((root / "baseline.json").read_text()))
    for case in cases:
        folder = root / case
        write_case(folder, case, rows)
        for rank in run_case(folder, case):
            print(table_line(case, rank), flush=True)
        if not keep:
            import shutil

            shutil.rmtree(folder)


def report(root: str) -> None:
    """The table again from a --keep folder's baseline.json and rank<r>.json files."""
    folder = Path(root)
    print_header(json.loads((folder / "baseline.json").read_text()))
    for case in CASES:
        for path in sorted((folder / case).glob("rank*.json")):
            print(table_line(case, json.loads(path.read_text())))


# ------------------------------------------------------------------------------------- activations, plan

def activations_main() -> None:
    """Bytes saved for the backward per token and decoder layer, counted with saved-tensor hooks on 1- and
    2-layer models of each shape (the difference is one layer), against `layer_activation_bytes`."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill_ray.train.lora import lora_config

    def saved(model, B, T):
        own = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in own:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 1000, (B, T))
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :5] = 0  # left padding: the mask is passed to SDPA, as in training
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        return sum(storages.values())

    def model(s, layers, dtype, lora):
        config = LlamaConfig(hidden_size=s["h"], intermediate_size=s["i"], num_attention_heads=s["heads"],
                             num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], vocab_size=s["V"],
                             num_hidden_layers=layers, tie_word_embeddings=s["tied"], attn_implementation="sdpa")
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)
        try:
            built = LlamaForCausalLM(config).train()
        finally:
            torch.set_default_dtype(torch.float32)
        if lora:
            # PEFT makes fp32 adapters on a bf16 base; DeepSpeed then casts every parameter to bf16.
            built = get_peft_model(built, lora_config(LORA)).to(dtype)
        return built

    B, T = 2, 128
    for name, s in SHAPES.items():
        # bf16 only for 8B: its 2-layer model is 3 GB in bf16 (built in that dtype), 6 GB in fp32; LoRA on the 135M.
        for dtype, e in ((torch.bfloat16, 2),) if name == "Llama-3.1-8B" else ((torch.float32, 4), (torch.bfloat16, 2)):
            for lora in (False, True) if name == "SmolLM2-135M" else (False,):
                sizes = [saved(model(s, layers, dtype, lora), B, T) for layers in (1, 2)]
                got = (sizes[1] - sizes[0]) / (B * T)
                print(f"{name:<14}{str(dtype):<16}{' LoRA' if lora else '':<6} measured {got:>8.0f} B/token/layer = "
                      f"{got / s['h']:.1f} x hidden; formula {layer_activation_bytes(s, T, e, 16 if lora else 0):>8.0f}")


def plan_rows(gpus: int = 8, B: int = 8, T: int = 512, window: int = 128) -> list[dict]:
    """The plan's cases in bf16 mixed precision: weights 2, gradients 2, fp32 master + Adam 12 bytes per
    trained parameter; LoRA: the frozen base 2 bytes per parameter, the adapters 16. GB per GPU."""
    rows = []
    for name in ("Llama-3.2-1B", "Llama-3.1-8B"):
        s = SHAPES[name]
        P = params(s)
        for zero3 in (False, True):
            for lora in (False, True):
                for ckpt in (False, True):
                    A = lora_params(s) if lora else P
                    state = state_bytes(P, A, gpus, zero3, weight=2, grad=2, optimizer=12)
                    acts = activation_bytes(s, B, T, window, 2, ckpt, 16 if lora else 0)
                    # The optimizer step, once the activations are gone: the partition's gradients in fp32 and
                    # PyTorch AdamW's two temporaries on DeepSpeed's flat fp32 partition (ZeRO-3 steps it in
                    # sub-groups of sub_group_size, 1e9 elements by default).
                    step = 12 * (min(A / gpus, SUB_GROUP) if zero3 else A / gpus)
                    # Reduce and all-gather buckets (5e7 elements, up to 4 bytes); ZeRO-3: the weights gathered
                    # at once, up to stage3_max_live_parameters (1e9 by default: 2 GB) or the whole model.
                    buffers = 2 * 4 * BUCKET + (2 * min(1e9, P) if zero3 else 0)
                    context = 2 * GB  # CUDA context, NCCL, allocator fragmentation: an allowance, not measured
                    train = state + buffers + context + max(acts, step)
                    # ZeRO-3's eval on rank 0: a bf16 copy of the whole model beside the training state, and the
                    # holdout batch's logits (2 x micro-batch rows, bf16 and fp32).
                    evaluation = state + buffers + context + 2 * P + 2 * B * window * s["V"] * 6 if zero3 else 0
                    rows.append({"model": name, "zero": 3 if zero3 else 2, "lora": lora, "ckpt": ckpt,
                                 "state": state / GB, "activations": acts / GB, "step": step / GB,
                                 "buffers": (buffers + context) / GB, "train": train / GB,
                                 "eval_rank0": evaluation / GB, "peak": max(train, evaluation) / GB})
    return rows


def smallest_gpus(name: str, zero: int, lora: bool, ckpt: bool, headroom: float = 8.0) -> tuple[int, dict, dict]:
    """The fewest 80 GB GPUs on which the case's peak leaves `headroom` GB; that row and the one of a GPU less."""
    def row(gpus):
        return next(r for r in plan_rows(gpus) if (r["model"], r["zero"], r["lora"], r["ckpt"]) == (name, zero, lora, ckpt))
    gpus = next(n for n in range(1, 65) if row(n)["peak"] <= 80 - headroom)
    return gpus, row(gpus), row(max(gpus - 1, 1))


def plan_main() -> None:
    for name, s in SHAPES.items():
        print(f"{name}: {params(s) / 1e9:.3f}B parameters, LoRA r=16 on 7 projections: {lora_params(s) / 1e6:.2f}M; "
              f"activations {layer_activation_bytes(s, 512, 2):,} B/token/layer in bf16 at T=512")
    print("8 GPUs, micro-batch 8 x 512 tokens, logits on the last 128 positions; GB per GPU")
    print("| student | ZeRO | LoRA | checkpointing | weights + grads + optimizer | activations | optimizer step "
          "| buffers + context | training | eval on rank 0 | peak | fits 80 GB (headroom) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in plan_rows():
        evaluation = f"{r['eval_rank0']:.1f}" if r["zero"] == 3 else "-"
        fits = f"yes ({80 - r['peak']:.0f} GB)" if r["peak"] <= 80 else f"no ({r['peak'] - 80:.0f} GB over)"
        print(f"| {r['model']} | {r['zero']} | {'yes' if r['lora'] else 'no'} | {'yes' if r['ckpt'] else 'no'} "
              f"| {r['state']:.1f} | {r['activations']:.1f} | {r['step']:.1f} | {r['buffers']:.1f} | {r['train']:.1f} "
              f"| {evaluation} | {r['peak']:.1f} | {fits} |")
    print("Llama-3.1-8B: the fewest 80 GB GPUs that keep 8 GB free (micro-batch 8 x 512)")
    for zero in (2, 3):
        for lora in (False, True):
            for ckpt in (False, True):
                n, fits, fewer = smallest_gpus("Llama-3.1-8B", zero, lora, ckpt)
                print(f"  ZeRO-{zero}, LoRA {'yes' if lora else 'no'}, checkpointing {'yes' if ckpt else 'no'}: {n} "
                      f"(peak {fits['peak']:.1f} GB" + (f"; on {n - 1}: {fewer['peak']:.1f} GB)" if n > 1 else ")"))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_rank":
        rank_main(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_baseline":
        baseline_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="measure", choices=["measure", "activations", "plan", "report"])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--keep", help="keep each case's bundle and measurements under this folder (report reads it)")
    args = parser.parse_args()
    if args.what == "activations":
        activations_main()
    elif args.what == "plan":
        plan_main()
    elif args.what == "report":
        report(args.keep)
    else:
        measure(args.cases, args.keep)


if __name__ == "__main__":
    main()
