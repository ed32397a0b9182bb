"""The chat format: what the teacher is sent, what the student is asked, and how a student's tokenizer
turns a conversation into prompt tokens.

- The teacher gets the task's instructions (as the system turn), its few-shot turns, then the prompt
  (`teacher_messages`): generate, the flywheel's answers and serve's replay all send this.
- The student gets the instructions and the prompt, without the few-shot turns (`student_messages`):
  it learns, and is evaluated, answering the way a client will call it. A client that still sends the
  few-shot turns (as it did to the teacher) has them taken out before the student answers
  (`strip_few_shot`).
- A student's prompt is its tokenizer's chat template applied with the generation prompt
  (`prompt_ids`); a tokenizer without a template gets the configured one or ChatML
  (`ensure_chat_template`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distill_ray.config.schema import Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]

# For tokenizers without a chat template: ChatML, which SmolLM2, Qwen and many others use.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def few_shot_turns(task: Task) -> Messages:
    """The task's few-shot examples as alternating user and assistant turns."""
    return [m for turn in task.few_shot for m in ({"role": "user", "content": turn.user},
                                                  {"role": "assistant", "content": turn.assistant})]


def teacher_messages(task: Task, prompt: Messages) -> Messages:
    """What the teacher is sent: the task's instructions, its few-shot turns, then the prompt."""
    return _instructions(task) + few_shot_turns(task) + _plain(prompt)


def student_messages(task: Task, prompt: Messages) -> Messages:
    """What the student is asked: the task's instructions as the system turn, then the prompt."""
    return _instructions(task) + _plain(prompt)


def strip_few_shot(messages: Messages, few_shot: Messages) -> Messages:
    """The conversation without the task's few-shot turns (`few_shot_turns`), where a client still sends
    them (as it did to the teacher): the student was trained without them and answers from the message
    alone."""
    n = len(few_shot)
    if not n:
        return messages
    for start in range(len(messages) - n + 1):
        if messages[start:start + n] == few_shot:
            return messages[:start] + messages[start + n:]
    return messages


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> None:
    """Give the tokenizer `template` (a student's `chat_template`), or ChatML when it has none of its own."""
    if template:
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """The student's prompt: the chat template applied to `messages`, ending with the assistant's turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _instructions(task: Task) -> Messages:
    return [{"role": "system", "content": task.instructions}] if task.instructions else []


def _plain(prompt: Messages) -> Messages:
    """The prompt's turns with their role and content only (a stored row may carry more)."""
    return [{"role": m["role"], "content": m["content"]} for m in prompt]
