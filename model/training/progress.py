"""A live progress line for training in an interactive terminal; silent anywhere else.

    progress = TerminalProgress("pretrain", total_steps=5000)   # writes to stderr if it is a terminal
    progress.step(step, epoch)        # every optimizer step (redraws at most 5 times a second)
    progress.logged(entry)            # on each log entry: loss and chars/s
    progress.close()

    pretrain epoch 3/50 step 1200/5000 [#####.........] 24% loss 1.8421 31,204 chars/s 12:40 left
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class TerminalProgress:
    """One self-overwriting line on a terminal; nothing at all when `stream` is not one (logs, CI, workers)."""

    def __init__(self, label: str, total_steps: int, epochs: int | None = None, stream: TextIO | None = None,
                 min_interval_s: float = 0.2):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label, self.total, self.epochs, self.min_interval_s = label, max(1, total_steps), epochs, min_interval_s
        self.loss: float | None = None
        self.chars_per_s: float | None = None
        self.first_step: int | None = None
        self.started = time.monotonic()
        self.drawn_at = 0.0
        self.width = 0

    def step(self, step: int, epoch: int) -> None:
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step, self.started = step - 1, time.monotonic()
        now = time.monotonic()
        if now - self.drawn_at >= self.min_interval_s or step >= self.total:
            self.drawn_at = now
            self._draw(step, epoch, now)

    def logged(self, entry: dict) -> None:
        self.loss, self.chars_per_s = entry.get("loss"), entry.get("chars_per_s")

    def _draw(self, step: int, epoch: int, now: float) -> None:
        done = min(1.0, step / self.total)
        rate = (step - self.first_step) / max(now - self.started, 1e-9)  # steps/s in this run
        bar = "#" * int(done * 20) + "." * (20 - int(done * 20))
        parts = [self.label, f"epoch {epoch}" + (f"/{self.epochs}" if self.epochs else ""), f"step {step}/{self.total}",
                 f"[{bar}] {done:4.0%}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.chars_per_s:
            parts.append(f"{self.chars_per_s:,.0f} chars/s")
        parts.append(f"{_clock((self.total - step) / rate)} left" if rate > 0 else "")
        line = " ".join(p for p in parts if p)
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def close(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0
