"""The progress of a job's steps: a tqdm bar when the stream is a terminal; otherwise (a log file, a Ray
job's output) one line every few steps, so a log shows where a long run is without a line per step."""

from __future__ import annotations

import sys
import time
from typing import TextIO

LINES_PER_RUN = 20  # without a terminal: about this many lines over a whole run, and the last step


class Progress:
    def __init__(self, name: str, total: int, initial: int = 0, stream: TextIO | None = None):
        self.name, self.total, self.initial = name, total, initial
        self.stream = stream or sys.stderr
        self.every = max(1, (total - initial) // LINES_PER_RUN)
        self.started = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, file=self.stream, dynamic_ncols=True)

    def update(self, step: int, **stats: float) -> None:
        """`step` steps are done (of `total`); `stats` (loss, tokens/s ...) are shown with the count."""
        shown = {key: f"{value:.4g}" for key, value in stats.items()}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(step - self.bar.n)
        elif (step - self.initial) % self.every == 0 or step == self.total:
            elapsed = time.monotonic() - self.started
            left = elapsed / max(step - self.initial, 1) * (self.total - step)
            values = "".join(f", {key} {value}" for key, value in shown.items())
            print(f"[{self.name}] step {step}/{self.total}{values}, {elapsed:.0f} s elapsed, about {left:.0f} s left",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
