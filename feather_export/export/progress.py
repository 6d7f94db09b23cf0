"""Export progress: one line per segment and per layer, with an ETA from the bytes written.

On a terminal (standard error is a TTY and no ``say`` callback was given) the per-layer line is a
bar redrawn in place; otherwise every line is printed (or handed to ``say``) as plain text, which
is what logs and CI want. The ETA extrapolates the bytes written so far against the artifact's
estimated size (the same estimate the free-disk check uses).
"""
from __future__ import annotations

import sys
import time
from typing import Callable

BAR_WIDTH = 24


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ExportProgress:
    def __init__(self, total_bytes: int, say: Callable[[str], None] | None = None, stream=None):
        self.total = max(1, int(total_bytes))
        self.stream = stream or sys.stderr
        self.bar = say is None and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.say = say or self._print
        self.start = time.monotonic()
        self.finished_bytes = 0
        self.store = None
        self.label, self.layers, self.layers_done = "", 0, 0

    def _print(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def message(self, msg: str) -> None:
        if self.bar:
            self.stream.write("\r\033[K")
        self.say(msg)

    def segment(self, index: int, count: int, label: str, name: str, layers: int, store) -> None:
        """Segment ``index`` of ``count`` starts; ``layers`` of it report through ``layer``."""
        self.store, self.label, self.layers, self.layers_done = store, name, layers, 0
        suffix = f" ({layers} layer{'s' if layers > 1 else ''})" if layers else ""
        self.message(f"[{label} {index}/{count}] exporting {name}{suffix}")

    def layer(self, _index: int | None = None) -> None:
        self.layers_done += 1
        done = self.done_bytes()
        unit, scale = ("GB", 1e9) if self.total >= 1e9 else ("MB", 1e6)
        line = (f"  {self.label} layer {self.layers_done}/{self.layers}  "
                f"{done / scale:.2f}/{self.total / scale:.2f} {unit}  {self.eta(done)}")
        if self.bar:
            filled = int(BAR_WIDTH * min(1.0, done / self.total))
            self.stream.write(f"\r\033[K[{'#' * filled}{'-' * (BAR_WIDTH - filled)}]{line}")
            self.stream.flush()
        else:
            self.say(line)

    def end_segment(self) -> None:
        if self.store is not None:
            self.finished_bytes += self.store.tensor_bytes
        self.store = None
        if self.bar:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def done_bytes(self) -> int:
        return self.finished_bytes + (self.store.tensor_bytes if self.store is not None else 0)

    def eta(self, done: int) -> str:
        elapsed = time.monotonic() - self.start
        if done <= 0:
            return "ETA --"
        return f"ETA {format_seconds(elapsed * max(0, self.total - done) / done)}"
