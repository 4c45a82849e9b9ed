"""StreamPool: sessions spread over a device's compute streams; on CPU, no streams and plain calls."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.cuda import StreamPool
from djinn.drivers.errors import BadArgument


def test_on_cpu_there_are_no_streams_and_calls_pass_through() -> None:
    pool = StreamPool(torch.device("cpu"), 4)
    assert pool.acquire() is None and pool.stream(None) is None
    pool.release(None)
    assert pool.call_on(None, lambda a, b: a + b, 2, 3) == 5
    assert pool.snapshot() == {"streams": 0, "sessions_per_stream": []}


def test_a_pool_needs_a_stream() -> None:
    with pytest.raises(BadArgument, match="at least one stream"):
        StreamPool(torch.device("cpu"), 0)


@pytest.mark.gpu
def test_sessions_go_to_the_least_used_stream() -> None:
    pool = StreamPool(torch.device("cuda"), 3)
    got = [pool.acquire() for _ in range(5)]
    assert got == [0, 1, 2, 0, 1] and pool.users == [2, 2, 1]
    pool.release(0)
    pool.release(0)
    assert pool.acquire() == 0 and pool.users == [1, 2, 1]
    assert pool.snapshot() == {"streams": 3, "sessions_per_stream": [1, 2, 1]}


@pytest.mark.gpu
def test_call_on_makes_the_stream_current_and_puts_the_callers_back() -> None:
    pool = StreamPool(torch.device("cuda"), 2)
    side = torch.cuda.Stream()
    for caller in (torch.cuda.default_stream(), side):
        with torch.cuda.stream(caller):
            for i in range(2):
                assert pool.call_on(i, torch.cuda.current_stream) == pool.streams[i]
                assert torch.cuda.current_stream() == caller
            with pytest.raises(ZeroDivisionError):
                pool.call_on(1, lambda: 1 / 0)
            assert torch.cuda.current_stream() == caller


@pytest.mark.gpu
def test_work_on_a_pool_stream_is_ordered_on_it() -> None:
    pool = StreamPool(torch.device("cuda"), 2)
    x = torch.zeros(1 << 20, device="cuda")
    torch.cuda.synchronize()

    def work() -> float:
        torch.cuda._sleep(20_000_000)  # a long kernel first: the add must still see it done
        x.add_(1)
        return float(x.sum())  # .item() waits for the current stream: the pool's

    assert pool.call_on(1, work) == float(1 << 20)


@pytest.mark.gpu
def test_current_stream_id_names_the_current_stream() -> None:
    from djinn.drivers.cuda import current_stream_id

    dev = torch.device("cuda")
    side = torch.cuda.Stream()
    main = current_stream_id(dev)
    assert current_stream_id(dev) == main
    with torch.cuda.stream(side):
        assert current_stream_id(dev) != main
        assert current_stream_id(torch.device("cuda", torch.cuda.current_device())) == current_stream_id(dev)
    assert current_stream_id(dev) == main
