"""The in-process executor: every stage runs in the runner's own process, one after another, sharing
one memo (a trained model handed from train to reference without a reload). The choice for a
debugger, a notebook, or a machine where spawning processes costs more than it saves."""
from __future__ import annotations

from collections import deque

from ..cache import Cache
from ..stage_run import Stage, StageFailed, run_stage
from .base import Event, EventRelay, Executor, Note, Result


class InProcess(Executor):
    name = "inprocess"

    def __init__(self, lanes, cache_root, log_dir, on_event=None):
        from .. import lanes as lane_env
        from ..spec import SpecError
        foreign = lane_env.foreign(lanes)
        if foreign:
            raise SpecError(f"executor inprocess: the {', '.join(foreign)} lane{'s' if len(foreign) > 1 else ''} "
                            f"need{'' if len(foreign) > 1 else 's'} a process of {'their' if len(foreign) > 1 else 'its'} "
                            f"own ({', '.join(f'{k}={v}' for l in foreign for k, v in lane_env.environment(l).items())}, "
                            f"read once when Keras is first imported); expected the local or ray executor for "
                            f"a spec with such models")
        super().__init__(lanes, cache_root, log_dir, on_event)
        self.cache = Cache(self.cache_root)
        self.memo: dict = {}
        self.events: deque[Event] = deque()  # what next_event hands out: notes and results
        self.relay = EventRelay(on_event or self.events.append, at_most_per_s=1e9)

    def submit(self, stage: Stage, force: bool) -> None:
        try:
            result = run_stage(stage, self.cache, self.memo, force, self.relay)
        except StageFailed as e:
            result = e.result
        self.events.extend(Note(line) for line in self.cache.changed)
        self.cache.changed.clear()
        self.events.append(Result(result))

    def next_event(self, in_flight: dict[str, Stage]) -> Event:
        if not self.events:
            raise RuntimeError(f"in-process executor: no event left, yet {sorted(in_flight)} are in flight")
        return self.events.popleft()


EXECUTOR = InProcess
