"""Compute streams: a CUDA daemon spreads its sessions over a pool of them, with the results of one stream;
a CPU daemon has none."""

from __future__ import annotations

import threading

import pytest
import torch

import djinn
from tests.daemon import LiveDaemon, daemon_config

IDS = list(range(3, 67))


def test_a_cpu_daemon_has_no_streams(kernel) -> None:  # type: ignore[no-untyped-def]
    s = kernel.open_session(max_tokens=32)
    try:
        worker = kernel.stat()["worker"]
        assert worker["streams"] == 0 and worker["sessions_per_stream"] == []
        assert s.forward([1, 2, 3]).logits.shape[0] > 0
    finally:
        s.close()


@pytest.fixture(scope="module")
def cuda_daemons():  # type: ignore[no-untyped-def]
    daemons = [LiveDaemon(daemon_config(device="cuda", dtype="float32", cuda_streams=n)).start() for n in (1, 3)]
    try:
        yield daemons
    finally:
        for d in daemons:
            d.stop()


def workload(path: str) -> dict[str, torch.Tensor]:
    """Forward, pause/resume, checkpoint/restore, fork and generate, in sessions that interleave."""
    out: dict[str, torch.Tensor] = {}
    with djinn.connect(path) as k:
        a, b, c = (k.open_session(max_tokens=128) for _ in range(3))
        out["a"] = a.forward(IDS).logits
        assert b.forward(IDS, pause_at=1).paused
        ck = a.checkpoint()
        out["c"] = c.forward(IDS[:32], return_logits="all").logits
        out["b"] = b.resume().logits
        out["a2"] = a.forward([5, 6, 7]).logits
        a.restore(ck)
        out["a3"] = a.forward([5, 6, 7]).logits
        child = k.fork(ck)
        out["child"] = child.forward([5, 6, 7]).logits
        out["gen"] = torch.tensor(c.generate([9, 10], max_new_tokens=8))
        for s in (a, b, c, child):
            s.close()
    return out


@pytest.mark.gpu
def test_sessions_are_spread_over_the_streams(cuda_daemons: list[LiveDaemon]) -> None:
    d = cuda_daemons[1]
    with djinn.connect(d.path) as k:
        sessions = [k.open_session(max_tokens=64) for _ in range(4)]
        st = k.stat()["worker"]
        assert st["streams"] == 3 and sorted(st["sessions_per_stream"]) == [1, 1, 2]
        kernel = d.kernel
        for s in sessions:
            live = kernel.sessions.find(s.id)
            current = d.call_in_loop(kernel.on_stream, live, torch.cuda.current_stream)
            assert current == kernel.memory.streams.stream(live.stream)
        for s in sessions:
            s.close()
        assert k.stat()["worker"]["sessions_per_stream"] == [0, 0, 0]


@pytest.mark.gpu
def test_many_streams_give_the_results_of_one(cuda_daemons: list[LiveDaemon]) -> None:
    one, many = (workload(d.path) for d in cuda_daemons)
    assert torch.equal(one["a2"], one["a3"]) and torch.equal(one["a3"], one["child"])
    assert torch.equal(one["a"], one["b"])  # pause/resume is bitwise an uninterrupted forward
    for key in one:
        torch.testing.assert_close(many[key], one[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.gpu
def test_clients_in_parallel_on_many_streams(cuda_daemons: list[LiveDaemon]) -> None:
    ref = workload(cuda_daemons[0].path)
    results: list[dict[str, torch.Tensor]] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            results.append(workload(cuda_daemons[1].path))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        for key in ref:
            torch.testing.assert_close(r[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
