"""Concurrent generate calls through the daemon: their decode steps run in batches, and each session
gets the tokens it would have got alone (greedy and seeded sampling, GPT-2 and Llama).

A helper keeps the device worker busy with short sleeps while the sessions generate, so their steps
queue up behind it and meet, as they do behind other sessions' work on a loaded daemon.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

import djinn
from tests.daemon import LiveDaemon, daemon_config
from tests.fakes import save_tiny

PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1], list(range(30, 60)), [250, 1]]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("batch-models")
    return {kind: str(save_tiny(kind, Path(root / kind))) for kind in ("gpt2", "llama")}


def _busy_worker(d: LiveDaemon, stop: threading.Event, nap_s: float = 0.02) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            asyncio.run_coroutine_threadsafe(d.kernel.worker.run(time.sleep, nap_s), d.loop).result(10)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def _concurrently(d: LiveDaemon, name: str, n_new: int, **kw) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in PROMPTS]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with djinn.connect(d.path) as k, k.open_session(name, max_tokens=128) as s:
                out[i] = s.generate(PROMPTS[i], max_new_tokens=n_new, **kw)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_concurrent_sessions_decode_in_batches_with_their_own_results(models, kind):
    d = LiveDaemon(daemon_config()).start()
    try:
        with djinn.connect(d.path) as k:
            k.load_model(models[kind], name="m")
            alone = []
            for p in PROMPTS:
                with k.open_session("m", max_tokens=128) as s:
                    alone.append(s.generate(p, max_new_tokens=10))
            seeded = []
            for p in PROMPTS:
                with k.open_session("m", max_tokens=128) as s:
                    seeded.append(s.generate(p, max_new_tokens=10, temperature=0.8, seed=11))
        assert d.kernel.batcher.snapshot()["batches"] == 0  # one session at a time never batches
        stop = threading.Event()
        busy = _busy_worker(d, stop)
        try:
            together = _concurrently(d, "m", 10)
            together_seeded = _concurrently(d, "m", 10, temperature=0.8, seed=11)
        finally:
            stop.set()
            busy.join(10)
        assert together == alone
        assert together_seeded == seeded
        with djinn.connect(d.path) as k:
            st = k.stat()
        batching = st["worker"]["decode_batching"]
        assert batching["batches"] > 0 and batching["largest"] >= 2 and batching["fallbacks"] == 0
        assert batching["batched_steps"] <= batching["steps"]
        model = next(m for m in st["models"] if m["name"] == "m")
        assert model["batched_decode"]["steps"] == batching["batches"]
        assert model["batched_decode"]["sequences"] == batching["batched_steps"]
    finally:
        d.stop()


def test_decode_batch_1_runs_every_step_alone(models):
    d = LiveDaemon(daemon_config(decode_batch=1)).start()
    try:
        with djinn.connect(d.path) as k:
            k.load_model(models["gpt2"], name="m")
        stop = threading.Event()
        busy = _busy_worker(d, stop)
        try:
            _concurrently(d, "m", 6)
        finally:
            stop.set()
            busy.join(10)
        with djinn.connect(d.path) as k:
            batching = k.stat()["worker"]["decode_batching"]
        assert batching["max_batch"] == 1 and batching["batches"] == 0 and batching["steps"] > 0
    finally:
        d.stop()


def test_a_client_gone_during_the_prefill_leaves_its_session_usable(models):
    """The prefill runs in the call that makes the generation; a client that goes away while it runs
    must not leave the state reserved: reconnected within the grace period, the session generates."""
    d = LiveDaemon(daemon_config(grace_s=30.0)).start()
    try:
        with djinn.connect(d.path) as k:
            k.load_model(models["gpt2"], name="m")
        model = d.kernel.models.get("m").model
        entered, release = threading.Event(), threading.Event()
        real = model._prefill

        def slow_prefill(state, ids):
            entered.set()
            release.wait(10)
            return real(state, ids)

        model._prefill = slow_prefill
        k1 = djinn.connect(d.path)
        s = k1.open_session("m", max_tokens=64)
        k1.submit("generate", session=s.id, input_ids=PROMPTS[0], max_new_tokens=4)
        assert entered.wait(10)
        k1.close()  # gone while the prefill runs
        time.sleep(0.2)
        release.set()
        model._prefill = real
        with djinn.connect(d.path) as k2:
            again = k2.session(s.id).generate(PROMPTS[1], max_new_tokens=4)
            assert len(again) == 4
            k2.session(s.id).close()
    finally:
        d.stop()
