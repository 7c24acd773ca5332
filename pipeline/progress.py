"""What a run shows while it works: one line per stage event, and on a terminal a live bar for each
stage that reports progress (training epochs). Off a terminal (CI logs, pipes) only the lines appear.

The live display uses rich, imported on the first progress report, so a cached run never loads it.
"""
from __future__ import annotations

import os
import sys


class Display:
    def __init__(self, live: bool | None = None):
        if live is None:
            live = sys.stdout.isatty() and not os.environ.get("PIPELINE_NO_PROGRESS")
        self.live = live
        self._bars = None          # rich.progress.Progress, created on the first progress report
        self._tasks: dict[str, int] = {}

    def line(self, name: str, msg: str) -> None:
        self._print(f"  {name:<24} {msg}")

    def note(self, text: str) -> None:
        self._print(f"note: {text}")

    def error(self, text: str) -> None:
        if self._bars is not None:
            self._bars.console.print(text, markup=False, highlight=False, style="red")
        else:
            print(text, file=sys.stderr, flush=True)

    def start(self, name: str) -> None:
        pass  # a bar appears only once a stage reports progress

    def progress(self, name: str, done: float, total: float, note: str = "") -> None:
        if not self.live:
            return
        if self._bars is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._bars = Progress(TextColumn("  {task.fields[stage]:<24}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(), transient=True)
            self._bars.start()
        if name not in self._tasks:
            self._tasks[name] = self._bars.add_task("", total=total, stage=name, note=note)
        self._bars.update(self._tasks[name], completed=done, total=total, note=note)

    def finish(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            self._bars.remove_task(task)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
            self._tasks.clear()

    def _print(self, text: str) -> None:
        if self._bars is not None:
            self._bars.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)
