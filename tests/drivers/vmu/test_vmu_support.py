"""stat() from another thread, sizes from config, the stack scope, torch OOM conversion, devices."""

from __future__ import annotations

import threading

import pytest
import torch

from djinn.drivers.errors import BadArgument, Busy, OutOfMemory
from djinn.drivers.vmu import VMU, oom_from_torch, parse_size, resolve_device, resolve_size, translating_oom
from djinn.drivers.vmu.sizes import host_available_nbytes
from tests.drivers.vmu.fakes import MiB, fill, make_vmu

SEG_KEYS = {"capacity_nbytes", "used_nbytes", "free_nbytes", "largest_free_nbytes"}


def test_stat_shape(small_vmu: VMU) -> None:
    a = small_vmu.alloc_arena("s1", 64 * 1024)
    fill(a, 100, seed=1)
    s = small_vmu.stat()
    assert set(s["segments"]) == {"text", "data", "stack", "host"}
    for seg in s["segments"].values():
        assert SEG_KEYS <= set(seg)
        assert seg["used_nbytes"] + seg["free_nbytes"] == seg["capacity_nbytes"]
    for direction in ("out", "in"):
        assert set(s["swap"][direction]) == {"bytes", "ops", "seconds"}
    assert s["arenas"] == [{"session": "s1", "nbytes": 64 * 1024, "used_nbytes": 100, "residency": "device",
                            "generation": 0}]
    assert "arenas" not in small_vmu.stat(arenas=False)


def test_stat_from_another_thread_while_the_worker_allocates() -> None:
    with make_vmu(data=8 * MiB, host=8 * MiB) as vmu:
        stop = threading.Event()
        errors: list[BaseException] = []
        seen: list[int] = []

        def reader() -> None:
            try:
                while not stop.is_set():
                    s = vmu.stat()
                    data = s["segments"]["data"]
                    assert data["used_nbytes"] + data["free_nbytes"] == data["capacity_nbytes"]
                    assert data["largest_free_nbytes"] <= data["free_nbytes"]
                    assert sum(a["nbytes"] for a in s["arenas"] if a["residency"] == "device") \
                        == data["used_nbytes"] - data["pending_free_nbytes"]
                    seen.append(len(s["arenas"]))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=reader)
        t.start()
        arenas = []
        for i in range(2000):
            if len(arenas) < 20:
                arenas.append(vmu.alloc_arena(f"s{i}", (i % 7 + 1) * 16 * 1024))
            else:
                vmu.free_arena(arenas.pop(i * 7 % len(arenas)))
            if i % 50 == 0 and arenas:
                fill(arenas[0], 1000, seed=i)
                vmu.page_out(arenas[0])
                vmu.page_in(arenas[0])
        stop.set()
        t.join()
        assert not errors, errors[0]
        assert seen


@pytest.mark.parametrize("spec, expected", [
    (4096, 4096), ("4096", 4096), ("4GiB", 4 << 30), ("4096MB", 4 << 30), ("4096 MiB", 4 << 30), ("2k", 2048),
    ("1.5GiB", 3 << 29), ("0.5", 0.5), (0.25, 0.25), ("50%", 0.5), ("1.0", 1.0), (0, 0),
])
def test_parse_size(spec: object, expected: object) -> None:
    assert parse_size(spec) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["", "abc", "4 parsecs", "1.5", -1, 2.0, True, "150%", None])
def test_parse_size_rejects(spec: object) -> None:
    with pytest.raises(BadArgument):
        parse_size(spec)  # type: ignore[arg-type]


def test_resolve_size_against_free_memory() -> None:
    assert resolve_size("0.5", available_nbytes=1000) == 500
    assert resolve_size("4KiB", available_nbytes=1000) == 4096
    assert host_available_nbytes() > 0


def test_fractions_resolve_against_memory_at_boot() -> None:
    with VMU("cpu", text_nbytes=0, data_nbytes="0.001", stack_nbytes=0, host_nbytes="0.001") as vmu:
        assert 0 < vmu.data.capacity_nbytes <= host_available_nbytes()
        assert vmu.host.capacity_nbytes > 0


def test_resolve_device() -> None:
    dev, name = resolve_device("cpu")
    assert dev == torch.device("cpu") and name == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto")[0] == torch.device("cpu")
        with pytest.raises(BadArgument, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(BadArgument):
        resolve_device("tpu:3")


def test_stack_scope_accounts_peak_on_cpu(small_vmu: VMU) -> None:
    with small_vmu.stack_scope(reserve_nbytes=1000) as scope:
        scope.account(600_000)
        scope.release(500_000)
        scope.account(100_000)
        with pytest.raises(Busy):  # scopes do not nest: entering a second one fails
            small_vmu.stack_scope().__enter__()
    assert scope.peak_nbytes == 600_000
    with small_vmu.stack_scope(reserve_nbytes=2 * MiB) as big:
        assert big.peak_nbytes == 2 * MiB  # the reservation counts from the start
    s = small_vmu.stat()
    assert s["segments"]["stack"]["used_nbytes"] == 2 * MiB
    assert s["stack"]["requests"] == 2 and s["stack"]["over_budget"] == 1 and s["stack"]["peak_nbytes"] == 2 * MiB
    assert small_vmu.stack_budget_nbytes == 1 * MiB


def test_the_stack_refuses_to_close_inside_a_scope_and_closes_once(small_vmu: VMU) -> None:
    stack = small_vmu.stack
    with small_vmu.stack_scope():
        with pytest.raises(Busy):
            stack.close()
    small_vmu.close()
    small_vmu.close()  # idempotent
    assert stack.pool is None and not stack.measured


def test_stack_reserve_keeps_the_largest_plan(small_vmu: VMU) -> None:
    with small_vmu.stack_scope() as scope:
        scope.reserve(300_000)
        scope.reserve(200_000)  # a smaller plan in the same request lowers nothing
        scope.account(100_000)
    assert scope.reserve_nbytes == 300_000 and scope.peak_nbytes == 300_000
    assert small_vmu.stat()["segments"]["stack"]["used_nbytes"] == 300_000


def test_oom_from_torch_on_cpu() -> None:
    try:
        torch.empty(1 << 62, dtype=torch.uint8)
    except RuntimeError as e:
        err = oom_from_torch(e, "scratch")
        assert isinstance(err, OutOfMemory) and err.requested_nbytes == 1 << 62 and err.errno == "ENOMEM"
    else:  # pragma: no cover - an allocator that accepts 4 EiB
        pytest.skip("the allocator accepted an absurd size")
    with pytest.raises(OutOfMemory) as info:
        with translating_oom("data segment", requested_nbytes=123):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert info.value.requested_nbytes == 123 and "data segment" in str(info.value)
    cuda_like = oom_from_torch(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)"), "x")
    assert cuda_like.requested_nbytes == 2 << 30
    with pytest.raises(ValueError):
        with translating_oom("x"):
            raise ValueError("not an OOM")


def test_segment_too_large_for_the_machine_is_out_of_memory() -> None:
    with pytest.raises(OutOfMemory):
        VMU("cpu", text_nbytes=0, data_nbytes=1 << 62, stack_nbytes=0, host_nbytes=0)
