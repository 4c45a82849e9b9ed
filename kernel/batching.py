"""Decode batching: the decode steps of concurrent `generate` calls on one model run as one pass.

A decode step reads every weight of the model to make one token, so the steps of several sessions
cost little more together than one alone (drivers/model/batch.py). Rules:
- Opportunistic: a step never waits for company. The first step to arrive posts one worker call;
  every step that arrives before that call starts joins it. With an idle worker a step runs at once,
  alone; under load, the steps that queued up behind other work run together, at most `max_batch`
  of one model per pass.
- The call groups its steps by model. Generations between decode steps (`batchable`) go through
  `model.decode_batch`; the rest (a prefill, a steered or paused session, a group of one) run alone
  with `next()`, each on its session's stream, as every step did before (on CUDA the model runs a
  plain lone step as a pass of one through the same shared graphs). If a batched pass fails,
  its steps run alone again, so each session gets its own outcome (nothing was committed); a
  sampling failure after the pass is that session's outcome alone.
- A group is cut into passes in order of position, so sequences of like length run together, each
  pass at most `max_batch` steps and at most the Stack budget by `model.batch_nbytes` (a pass of
  one is a lone step).
- A step whose request was cancelled before the call started is skipped.
- The session bookkeeping around a step (page-in, RUNNING, busy) is the caller's: Kernel.decode_step.
- Outcomes go back to the loop in one `call_soon_threadsafe` per pass, not one per step.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .worker import DeviceWorker, set_exception, set_result, settled

__all__ = ["DecodeBatcher"]

Runner = Callable[..., Any]  # runner(stream, fn, *args): fn(*args) on the worker, on `stream`, in a Stack scope


@dataclass(slots=True)
class _Step:
    model: Any
    gen: Any
    stream: int | None
    future: asyncio.Future[Any]


class DecodeBatcher:
    """One per kernel. `await step(model, gen, stream)` is `next(gen, None)` on the worker, batched."""

    def __init__(self, worker: DeviceWorker, runner: Runner, max_batch: int, *,
                 budget: Callable[[], int | None] = lambda: None, stream_of: Callable[[Any], Any] = lambda i: None
                 ) -> None:
        """`budget()`: the Stack budget in bytes (None: no limit); `stream_of(index)`: a session's stream."""
        self._worker, self._runner, self.max_batch = worker, runner, max_batch
        self._budget, self._stream_of = budget, stream_of
        self._lock = threading.Lock()  # the queue and the flag are shared with the worker thread
        self._queue: list[_Step] = []
        self._posted = False  # a call is queued on the worker that has not yet taken the steps
        # figures, written by the worker thread only
        self.passes = 0  # worker calls that took steps
        self.steps = 0  # steps run
        self.batched_steps = 0  # steps run in a batched pass (with at least one other)
        self.batches = 0  # batched passes
        self.largest = 0  # most steps in one batched pass
        self.fallbacks = 0  # batched passes that failed and ran their steps alone

    async def step(self, model: Any, gen: Any, stream: int | None) -> Any:
        """The generation's next id (None when it is done), made in a batch when others wait too."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._queue.append(_Step(model, gen, stream, future))
            post, self._posted = not self._posted, True
        if post:
            try:
                self._worker.post(self._run, loop)
            except BaseException:
                with self._lock:
                    self._queue.clear()
                    self._posted = False
                raise
        return await settled(future, "a generate step")

    def snapshot(self) -> dict[str, Any]:
        return {"max_batch": self.max_batch, "passes": self.passes, "steps": self.steps,
                "batched_steps": self.batched_steps, "batches": self.batches, "largest": self.largest,
                "fallbacks": self.fallbacks}

    # -- on the worker thread ---------------------------------------------------------------------
    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            steps, self._queue, self._posted = self._queue, [], False
        steps = [st for st in steps if not st.future.cancelled()]
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        try:
            groups: dict[int, list[_Step]] = {}
            for st in steps:
                if self.max_batch > 1 and st.gen.batchable:
                    groups.setdefault(id(st.model), []).append(st)
                else:
                    outcomes.append(self._alone(st))
            for group in groups.values():
                for chunk in self._passes(group):
                    outcomes.extend(self._together(chunk))
        except BaseException as exc:  # noqa: BLE001 - a bug here must not leave a step waiting forever
            answered = {id(f) for f, _, _ in outcomes}
            outcomes.extend((st.future, False, exc) for st in steps if id(st.future) not in answered)
        self.passes += 1
        self.steps += len(steps)
        try:
            loop.call_soon_threadsafe(_deliver, outcomes)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for these any more
            pass

    def _alone(self, st: _Step) -> tuple[asyncio.Future[Any], bool, Any]:
        try:
            return st.future, True, self._runner(st.stream, next, st.gen, None)
        except BaseException as exc:  # noqa: BLE001 - crosses back to the awaiting step
            return st.future, False, exc

    def _passes(self, group: list[_Step]) -> list[list[_Step]]:
        """The group cut into passes: by position, at most max_batch each, each within the Stack budget."""
        group = sorted(group, key=lambda st: st.gen.state.position)
        budget = self._budget()
        model = group[0].model
        out: list[list[_Step]] = []
        chunk: list[_Step] = []
        for st in group:
            grown = len(chunk) + 1
            if chunk and (grown > self.max_batch or (
                    budget is not None and model.batch_nbytes(grown, st.gen.state.position) > budget)):
                out.append(chunk)
                chunk = []
            chunk.append(st)
        out.append(chunk)
        return out

    def _together(self, chunk: list[_Step]) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        if len(chunk) == 1:
            return [self._alone(chunk[0])]
        try:
            streams = [self._stream_of(st.stream) for st in chunk]
            ids = self._runner(chunk[0].stream, chunk[0].model.decode_batch, [st.gen for st in chunk], streams)
            outcomes = [(st.future, not isinstance(tok, BaseException), tok)
                        for st, tok in zip(chunk, ids, strict=True)]
        except BaseException:  # noqa: BLE001 - nothing was committed: each step runs alone, with its own outcome
            self.fallbacks += 1
            return [self._alone(st) for st in chunk]
        self.batches += 1
        self.batched_steps += len(chunk)
        self.largest = max(self.largest, len(chunk))
        return outcomes


def _deliver(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in outcomes:
        (set_result if ok else set_exception)(future, value)
