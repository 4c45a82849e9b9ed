"""DecodeBatcher: which steps run together, which alone, and that each step gets its own outcome.

Fake generations and models (no torch): a generation yields its ids; a model's decode_batch records
the batch it was given. A gate job holds the worker so that steps queue up behind it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from djinn.kernel.batching import DecodeBatcher
from djinn.kernel.errors import ECANCELED, EIO, ENOMEM
from djinn.kernel.worker import DeviceWorker


class FakeState:
    def __init__(self, position: int) -> None:
        self.position = position


class FakeGen:
    def __init__(self, name: str, ids: list[int], batchable: bool = True, position: int = 0) -> None:
        self.name, self._ids, self._batchable = name, list(ids), batchable
        self.state = FakeState(position)

    @property
    def batchable(self) -> bool:
        return self._batchable and bool(self._ids)

    def __next__(self) -> int:
        if not self._ids:
            raise StopIteration
        return self._ids.pop(0)


class FakeModel:
    """decode_batch records each pass; `fail` fails the whole pass, `bad` names generations whose
    sampling fails after it; a pass needs `per_seq` bytes per sequence (batch_nbytes)."""

    def __init__(self, fail: BaseException | None = None, bad: tuple[str, ...] = (), per_seq: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.streams: list[list[Any]] = []
        self.fail, self.bad, self.per_seq = fail, bad, per_seq

    def decode_batch(self, gens: list[FakeGen], streams: list[Any] = ()) -> list[Any]:
        self.batches.append([g.name for g in gens])
        self.streams.append(list(streams))
        if self.fail is not None:
            raise self.fail
        return [ValueError(f"sampling {g.name}") if g.name in self.bad else next(g) for g in gens]

    def batch_nbytes(self, n: int, max_position: int) -> int:
        return n * self.per_seq


def runner(calls: list[Any]):
    def run(stream: Any, fn: Any, *args: Any) -> Any:
        calls.append(stream)
        return fn(*args)
    return run


@pytest.fixture
def worker():
    w = DeviceWorker()
    yield w
    w.close()


async def gated(worker: DeviceWorker, batcher: DecodeBatcher, steps: list[tuple[Any, FakeGen, Any]]) -> list[Any]:
    """Hold the worker until every step is queued, then let it go; the steps' outcomes in order."""
    gate = threading.Event()
    held = asyncio.ensure_future(worker.run(gate.wait, 5.0))
    tasks = [asyncio.ensure_future(batcher.step(m, g, s)) for m, g, s in steps]
    await asyncio.sleep(0.01)
    gate.set()
    await held
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_steps_that_wait_together_run_as_one_batch_per_model(worker):
    streams: list[Any] = []
    b = DecodeBatcher(worker, runner(streams), max_batch=8)
    m1, m2 = FakeModel(), FakeModel()
    gens = [FakeGen(f"g{i}", [10 + i]) for i in range(5)]
    prefill = FakeGen("p", [99], batchable=False)
    out = await gated(worker, b, [(m1, gens[0], 0), (m2, gens[1], 1), (m1, gens[2], 2), (m1, prefill, 3),
                                  (m2, gens[3], 4), (m1, gens[4], 5)])
    assert out == [10, 11, 12, 99, 13, 14]
    assert m1.batches == [["g0", "g2", "g4"]] and m2.batches == [["g1", "g3"]]
    assert sorted(streams) == [0, 1, 3]  # the prefill on its own stream; each batch on its first step's
    assert m1.streams == [[None, None, None]]  # stream_of (none here) of every step in the pass
    assert b.snapshot() == {"max_batch": 8, "passes": 1, "steps": 6, "batched_steps": 5, "batches": 2,
                            "largest": 3, "fallbacks": 0}


async def test_an_idle_worker_runs_a_step_at_once_alone(worker):
    b = DecodeBatcher(worker, runner([]), max_batch=8)
    m = FakeModel()
    assert await b.step(m, FakeGen("a", [1]), None) == 1
    assert await b.step(m, FakeGen("a", []), None) is None  # a finished generation: next(gen, None)
    assert m.batches == [] and b.snapshot()["passes"] == 2


async def test_max_batch_splits_and_one_turns_batching_off(worker):
    m = FakeModel()
    b = DecodeBatcher(worker, runner([]), max_batch=2)
    out = await gated(worker, b, [(m, FakeGen(f"g{i}", [i]), None) for i in range(5)])
    assert out == [0, 1, 2, 3, 4] and m.batches == [["g0", "g1"], ["g2", "g3"]]  # g4 alone
    m2 = FakeModel()
    off = DecodeBatcher(worker, runner([]), max_batch=1)
    assert await gated(worker, off, [(m2, FakeGen(f"g{i}", [i]), None) for i in range(3)]) == [0, 1, 2]
    assert m2.batches == [] and off.snapshot()["batches"] == 0


async def test_a_failed_batch_runs_its_steps_alone_each_with_its_own_outcome(worker):
    m = FakeModel(fail=RuntimeError("batched pass failed"))
    b = DecodeBatcher(worker, runner([]), max_batch=8)

    class Broken(FakeGen):
        def __next__(self) -> int:
            raise ValueError("a driver bug")  # an unexpected error: EIO

    class Full(FakeGen):
        def __next__(self) -> int:
            from djinn.drivers.errors import OutOfMemory
            raise OutOfMemory("stack", requested_nbytes=2, largest_free_nbytes=1, total_free_nbytes=1)

    out = await gated(worker, b, [(m, FakeGen("a", [1]), None), (m, Broken("b", [2]), None),
                                  (m, Full("c", [3]), None)])
    assert out[0] == 1 and isinstance(out[1], EIO) and isinstance(out[2], ENOMEM)
    assert m.batches == [["a", "b", "c"]] and b.snapshot()["fallbacks"] == 1


async def test_a_step_cancelled_while_queued_never_runs(worker):
    m = FakeModel()
    b = DecodeBatcher(worker, runner([]), max_batch=8)
    gate = threading.Event()
    held = asyncio.ensure_future(worker.run(gate.wait, 5.0))
    gone, kept = FakeGen("gone", [1]), FakeGen("kept", [2])
    t1 = asyncio.ensure_future(b.step(m, gone, None))
    t2 = asyncio.ensure_future(b.step(m, kept, None))
    await asyncio.sleep(0.01)
    t1.cancel()
    await asyncio.sleep(0)
    gate.set()
    await held
    assert await t2 == 2
    assert gone._ids == [1] and m.batches == []  # the cancelled step was dropped; the other ran alone


async def test_a_stopped_worker_refuses_steps(worker):
    b = DecodeBatcher(worker, runner([]), max_batch=8)
    worker.close()
    with pytest.raises(ECANCELED):
        await b.step(FakeModel(), FakeGen("a", [1]), None)
    assert b.snapshot()["passes"] == 0


async def test_a_sampling_failure_after_the_pass_is_that_steps_alone(worker):
    m = FakeModel(bad=("b",))
    b = DecodeBatcher(worker, runner([]), max_batch=8)
    out = await gated(worker, b, [(m, FakeGen(n, [i]), None) for i, n in enumerate("abc")])
    assert out[0] == 0 and isinstance(out[1], EIO) and out[2] == 2
    assert m.batches == [["a", "b", "c"]] and b.snapshot()["fallbacks"] == 0


async def test_passes_follow_position_and_the_stack_budget(worker):
    m = FakeModel(per_seq=100)
    b = DecodeBatcher(worker, runner([]), max_batch=8, budget=lambda: 250, stream_of=lambda i: f"stream{i}")
    gens = [FakeGen(f"g{p}", [p], position=p) for p in (40, 10, 30, 20, 50)]
    out = await gated(worker, b, [(m, g, i) for i, g in enumerate(gens)])
    assert out == [40, 10, 30, 20, 50]
    assert m.batches == [["g10", "g20"], ["g30", "g40"]]  # two fit 250 bytes; g50 is left alone
    assert m.streams == [["stream1", "stream3"], ["stream2", "stream0"]]
