"""The client's session calls against a live daemon: arenas by hand, paging, and fire-and-forget signals.

Each behaviour is asserted for the blocking Session and for its asyncio twin.
"""

from __future__ import annotations

import pytest
import torch

import djinn
import djinn.aio
from tests.daemon import session_row

MiB = 1 << 20
PROMPT = [5, 17, 42, 99, 7, 250, 3, 64]


def test_arena_by_hand_on_a_bare_session(kernel):
    with kernel.open_session(bare=True) as s:
        assert session_row(kernel, s)["residency"] == "none"
        with pytest.raises(djinn.errors.ENOENT):
            s.page_out()
        got = s.alloc_arena(MiB)
        assert got["arena_nbytes"] >= MiB and got["used_nbytes"] == 0
        grown = s.alloc_arena(2 * MiB)
        assert grown["arena_nbytes"] >= 2 * MiB
        with pytest.raises(djinn.errors.EINVAL, match="never shrinks") as e:
            s.alloc_arena(MiB)
        assert e.value.details["argument"] == "nbytes"
        assert session_row(kernel, s)["arena_nbytes"] == grown["arena_nbytes"]  # the refusal changed nothing
        assert s.page_out()["residency"] == "host"
        assert session_row(kernel, s)["state"] == "SWAPPED"
        assert s.page_in()["residency"] == "device"
        assert s.page_in()["nbytes"] == 0  # already resident: nothing moves
        s.free_arena()
        with pytest.raises(djinn.errors.ENOENT, match="no arena"):
            s.free_arena()
        assert session_row(kernel, s)["residency"] == "none"
        assert s.alloc_arena(MiB)["arena_nbytes"] >= MiB  # a freed arena may be reserved again


def test_free_arena_of_a_model_session_is_ebusy(kernel):
    with kernel.open_session(max_tokens=64) as s:
        first = s.forward(PROMPT).logits
        with pytest.raises(djinn.errors.EBUSY, match="close the session"):
            s.free_arena()
        assert s.forward([1]).position == len(PROMPT) + 1  # the KV cache is intact
        assert first is not None


def test_fire_and_forget_signal_phase(djinnd):
    with djinn.connect(djinnd.path) as k:
        with k.open_session(max_tokens=64) as ref:
            ref.forward(PROMPT)
            want = ref.forward([9]).logits
        s = k.open_session(bare=True)
        assert s.signal_phase("IO_WAIT", expected_ms=60_000, wait=False) is None
        assert s.signal_phase("NAPPING", wait=False) is None  # its EINVAL reply is dropped, not raised
        with pytest.raises(djinn.errors.ENOENT):
            s.free_arena()  # the session's requests run in arrival order: both posts were handled before it
        row = session_row(k, s)
        assert row["phase"] == "IO_WAIT" and row["expected_ms"] == 60_000
        s.close()
        with k.open_session(max_tokens=64) as m:
            m.forward(PROMPT)
            for _ in range(3):  # the session may be paged out meanwhile; the next forward pages it in
                m.signal_phase("IO_WAIT", expected_ms=1, wait=False)
                m.signal_phase("COMPUTE", wait=False)
            assert torch.equal(m.forward([9]).logits, want)
        assert k.syscall("echo", data=[1, 2]) == {"data": [1, 2]}
        assert k._inbox == {}, "a posted request left an inbox behind"


async def test_aio_arena_by_hand_and_fire_and_forget(djinnd):
    k = await djinn.aio.connect(djinnd.path)
    try:
        s = await k.open_session(bare=True)
        got = await s.alloc_arena(MiB)
        assert got["arena_nbytes"] >= MiB
        assert (await s.alloc_arena(2 * MiB))["arena_nbytes"] >= 2 * MiB
        with pytest.raises(djinn.errors.EINVAL):
            await s.alloc_arena(MiB)
        assert (await s.page_out())["residency"] == "host"
        assert (await s.page_in())["residency"] == "device"
        await s.free_arena()
        with pytest.raises(djinn.errors.ENOENT):
            await s.free_arena()
        assert await s.signal_phase("IO_WAIT", expected_ms=60_000, wait=False) is None
        assert await s.signal_phase("NAPPING", wait=False) is None
        with pytest.raises(djinn.errors.ENOENT):
            await s.page_in()  # ordered after both posts
        row = next(x for x in (await k.stat())["sessions"] if x["id"] == s.id)
        assert row["phase"] == "IO_WAIT" and row["expected_ms"] == 60_000
        await s.close()

        m = await k.open_session(max_tokens=64)
        ref = await k.open_session(max_tokens=64)
        await ref.forward(PROMPT)
        want = (await ref.forward([9])).logits
        await m.forward(PROMPT)
        with pytest.raises(djinn.errors.EBUSY):
            await m.free_arena()
        await m.signal_phase("IO_WAIT", expected_ms=1, wait=False)
        assert torch.equal((await m.forward([9])).logits, want)
        await m.close()
        await ref.close()
        assert (await k.syscall("echo", data=3)) == {"data": 3}
        assert k._proto.waiters == {}, "a posted request left a waiter behind"
    finally:
        await k.close()
