"""Progress reporting for long computations: a rich bar with rate and ETA, shown only when needed."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class Meter:
    """Counts finished work; opens a progress bar once the work is seen to last over `delay` seconds.

    `enabled=None` shows the bar when stderr is a terminal or when EQK_PROGRESS=1.
    """

    def __init__(self, total: int, description: str, *, unit: str = "pairs", enabled: bool | None = True,
                 delay: float = 1.0):
        import os

        if enabled is None:
            enabled = sys.stderr.isatty() or os.environ.get("EQK_PROGRESS") == "1"
        self.total, self.description, self.unit = int(total), description, unit
        self.enabled, self.delay = enabled, delay
        self.done = 0
        self.start = time.perf_counter()
        self._progress: Progress | None = None
        self._task = None

    def advance(self, n: int) -> None:
        self.done += int(n)
        if not self.enabled:
            return
        if self._progress is None:
            elapsed = time.perf_counter() - self.start
            remaining = elapsed / max(self.done, 1) * (self.total - self.done)
            if elapsed + remaining <= self.delay:
                return
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TaskProgressColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, completed=0, rate="")
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"  # slide tiles come a few per second
        self._progress.update(self._task, completed=self.done, rate=f"{shown} {self.unit}/s")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)
