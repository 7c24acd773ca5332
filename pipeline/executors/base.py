"""What an executor is: something that runs stages somewhere and tells the runner what happens, as
typed events. The runner decides what runs when (the graph, the cache, what a failure blocks); an
executor decides only where: a local process per lane, this process, or a cluster's workers.

An executor is built for one run with the lanes that run's stages need, takes stages with `submit`,
answers with `next_event` (a Result for every stage submitted, sooner or later), and is closed once.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..stage_run import Stage, StageResult


@dataclass(frozen=True)
class Started:
    stage: str


@dataclass(frozen=True)
class LogLine:
    stage: str
    text: str


@dataclass(frozen=True)
class Progress:
    stage: str
    done: float
    total: float
    note: str = ""


@dataclass(frozen=True)
class Finished:
    """The stage's work is over (its progress bar goes); its Result follows."""
    stage: str


@dataclass(frozen=True)
class Note:
    """A line about the run rather than one stage (a cache entry found changed and rebuilt)."""
    text: str


@dataclass(frozen=True)
class Result:
    result: StageResult


Event = Union[Started, LogLine, Progress, Finished, Note, Result]


class Executor(ABC):
    """Runs the stages of one run that have a lane; stages without one run in the runner's process."""

    name: str = ""

    def __init__(self, lanes: set[str], cache_root: Path, log_dir: Path, on_event=None):
        # on_event: the runner's handler, for an executor that runs stages in the runner's own thread
        # and so can show their lines as they come rather than after the stage
        self.lanes, self.cache_root, self.log_dir = set(lanes), Path(cache_root), Path(log_dir)
        self.on_event = on_event

    @abstractmethod
    def submit(self, stage: Stage, force: bool) -> None:
        """Start `stage` (its inputs are in the cache); `force` runs it even where an entry exists."""

    @abstractmethod
    def next_event(self, in_flight: dict[str, Stage]) -> Event:
        """Block until something happens to one of the stages in flight."""

    def log_of(self, lane: str | None) -> Path | None:
        """Where a lane's own output went, shown beside a failure; None when it went nowhere apart."""
        return None

    def close(self) -> None:
        """Release what the executor holds; called once, after the last Result or on an error."""


class EventRelay:
    """An EventSink that turns run_stage's calls into events for `put` (a queue's, a list's append)."""

    def __init__(self, put, at_most_per_s: float = 10.0):
        self.put = put
        self._gap = 1.0 / at_most_per_s
        self._last: dict[str, float] = {}

    def line(self, name: str, msg: str) -> None:
        self.put(LogLine(name, msg))

    def start(self, name: str) -> None:
        self.put(Started(name))

    def progress(self, name: str, done: float, total: float, note: str) -> None:
        now = time.monotonic()
        if done < total and now - self._last.get(name, 0.0) < self._gap:
            return  # a bar needs no more than ten updates a second
        self._last[name] = now
        self.put(Progress(name, done, total, note))

    def finish(self, name: str) -> None:
        self.put(Finished(name))
