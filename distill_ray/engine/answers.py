"""What an engine answers: a whole completion (`Answer`) or a streamed piece of one (`Delta`). Their own
module so that each backend can import them without importing the package that picks the backend."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Answer:
    """One completion: its text, the logprob of each token, why it stopped and its token counts."""

    text: str
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def confidence(self) -> float | None:
        """The mean token logprob (None for an empty answer)."""
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None


@dataclass
class Delta:
    """A piece of a streamed answer: its new text and the logprobs of the tokens that made it."""

    text: str
    logprobs: list[float] = field(default_factory=list)
