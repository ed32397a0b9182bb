"""The tiny models the tests build in-process (seconds, no download): in `distill_ray.testing.tiny_models`,
where bench/ finds them too (bench imports no test module)."""

from distill_ray.testing.tiny_models import (
    MESSAGES,
    SHOTS,
    SYSTEM,
    save_tiny_student,
    save_tiny_vllm_folder,
    tiny_model,
    tiny_tokenizer,
    tiny_vllm_model,
)

__all__ = ["MESSAGES", "SHOTS", "SYSTEM", "save_tiny_student", "save_tiny_vllm_folder", "tiny_model", "tiny_tokenizer", "tiny_vllm_model"]
