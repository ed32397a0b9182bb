"""The fake teacher's rate limiter: requests and tokens per sliding 60 s window, as OpenAI's per-minute limits."""

from __future__ import annotations

import time

from distill_ray.testing.fake_teacher.config import WINDOW_S


class RateWindow:
    """Admission into the rate-limit window of ``FakeTeacherServer`` (its state: ``window``, ``pending``)."""

    # The rate limiter. Admitted requests hold a slot while pending, so concurrent requests cannot
    # overshoot the limit, and billed answers hold theirs for 60 s from the moment they were answered:
    # then no 60 s window of `answered_timestamps` ever holds more than `rpm` answers.

    def _admit(self, tokens: int) -> float | None:
        """Reserve a slot; None when admitted, else the seconds until enough of the window frees up."""
        now = time.monotonic()
        while self.window and self.window[0][0] <= now - WINDOW_S:
            self.window_tokens -= self.window.popleft()[1]
        rpm, tpm = self.config.rpm, self.config.tpm
        # Each occupant frees its slot 60 s after its answer; pending ones are guessed to answer after latency.
        pending_free_at = now + self.config.latency_s + WINDOW_S
        wait = 0.0
        if rpm is not None and len(self.window) + self.pending >= rpm:
            surplus = len(self.window) + self.pending - rpm  # the (surplus+1)-th occupant to leave frees a slot
            wait = self.window[surplus][0] + WINDOW_S - now if surplus < len(self.window) else pending_free_at - now
        excess = 0 if tpm is None else self.window_tokens + self.pending_tokens + tokens - tpm
        if excess > 0:
            wait_tokens = WINDOW_S if tokens > tpm else pending_free_at - now  # too large: never fits
            for at, used in self.window:
                excess -= used
                if excess <= 0:
                    wait_tokens = at + WINDOW_S - now
                    break
            wait = max(wait, wait_tokens)
        if wait > 0:
            return wait
        self.pending += 1
        self.pending_tokens += tokens
        return None

    def _release(self, tokens: int, billed: bool) -> None:
        self.pending -= 1
        self.pending_tokens -= tokens
        if billed:
            self.window.append((time.monotonic(), tokens))
            self.window_tokens += tokens
