"""The loader's progress bar: bytes done / total and GB/s, one line per storage device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

from ..devices import Device


class _GBps(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed  # bytes/s
        return Text(
            f"{speed / 1e9:.2f} GB/s" if speed else "-.-- GB/s", style="progress.data.speed"
        )


@dataclass
class Meter:
    progress: Progress
    tasks: dict[Device, Any]

    def advance(self, device: Device, nbytes: int) -> None:
        """Count `nbytes` placed on `device` (thread-safe: the read threads call it too)."""
        self.progress.advance(self.tasks[device], nbytes)


@contextlib.contextmanager
def progress_bar(totals: Mapping[Device, int], enabled: bool) -> Iterator[Meter]:
    """A rich progress bar on stderr for `totals` (bytes per storage device)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        _GBps(),
        console=Console(stderr=True),
        disable=not enabled,
    )
    ordered = sorted(totals, key=lambda d: d.sort_key)
    tasks = {d: progress.add_task(f"loading -> {d}", total=totals[d]) for d in ordered}
    with progress:
        yield Meter(progress, tasks)
