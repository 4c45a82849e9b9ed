"""CUDA fences' bookkeeping, with a stand-in event (runs without a GPU): a fence seen done never asks the
device again, and its event goes back to its stream's pool when the fence goes."""

from __future__ import annotations

from djinn.drivers.vmu import streams
from djinn.drivers.vmu.streams import _CudaFence


class FakeEvent:
    def __init__(self, done_after: int = 0) -> None:
        self.queries = 0
        self.syncs = 0
        self.done_after = done_after

    def query(self) -> bool:
        self.queries += 1
        return self.queries > self.done_after

    def synchronize(self) -> None:
        self.syncs += 1


def test_a_fence_seen_done_asks_no_more() -> None:
    event = FakeEvent(done_after=2)
    fence = _CudaFence(event)
    assert not fence.query() and not fence.query() and not fence.done
    assert fence.query() and fence.done
    assert fence.query() and fence.query()
    assert event.queries == 3
    fence.wait()
    assert event.syncs == 0  # already known done


def test_wait_marks_done_once() -> None:
    event = FakeEvent(done_after=10)
    fence = _CudaFence(event)
    fence.wait()
    fence.wait()
    assert event.syncs == 1 and fence.done and fence.query() and event.queries == 0


def test_the_event_goes_back_to_its_pool_when_the_fence_goes() -> None:
    pool: list[object] = []
    event = FakeEvent()
    fence = _CudaFence(event, pool)
    other = fence  # a second reference keeps it
    del fence
    assert pool == []
    del other
    assert pool == [event]
    _CudaFence(FakeEvent())  # no pool given: nothing to give back
    assert pool == [event]


def test_the_pool_is_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(streams, "_EVENT_POOL_MAX", 2)
    pool: list[object] = []
    for _ in range(5):
        _CudaFence(FakeEvent(), pool)
    assert len(pool) == 2


def test_sleep_waits_on_the_blocking_event_and_both_go_back_to_their_pools() -> None:
    events: list[object] = []
    sleepers: list[object] = []
    event, sleeper = FakeEvent(done_after=10), FakeEvent(done_after=10)
    fence = _CudaFence(event, events, sleeper, sleepers)
    fence.sleep()
    fence.sleep()
    assert (sleeper.syncs, event.syncs) == (1, 0) and fence.done and fence.query() and event.queries == 0
    del fence
    assert events == [event] and sleepers == [sleeper]


def test_sleep_without_a_blocking_event_waits_on_the_fence_itself() -> None:
    event = FakeEvent(done_after=10)
    fence = _CudaFence(event)
    fence.sleep()
    assert event.syncs == 1 and fence.done
