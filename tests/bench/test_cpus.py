"""bench/cpus.py: the CPU probe, the placement it makes, and the pinning it does."""

from __future__ import annotations

import os

from bench.cpus import Placement, placement, rank_cpus
from tests.fakes import requires_affinity

pytestmark = requires_affinity


def test_rank_cpus_times_every_cpu_fastest_first_and_restores_the_mask():
    mine = os.sched_getaffinity(0)
    ranked = rank_cpus(passes=1)
    assert sorted(cpu for cpu, _ in ranked) == sorted(mine)
    times = [t for _, t in ranked]
    assert times == sorted(times) and all(t > 0 for t in times)
    assert os.sched_getaffinity(0) == mine


def test_placement_is_off_on_cpu_and_when_asked():
    assert not placement("auto", "cpu").on
    assert not placement("off", "cuda").on
    assert Placement().daemon_flags() == [] and Placement().record()["cpus_work"] is None


def test_a_placement_pins_the_calling_thread_for_the_block_and_names_djinnd_flags():
    mine = os.sched_getaffinity(0)
    cpu = max(mine)
    p = Placement(work=cpu, loop=min(mine), client=cpu, probe_us={cpu: 1.0})
    assert p.daemon_flags() == ["--worker-cpus", str(cpu), "--loop-cpus", str(min(mine))]
    with p.as_work():
        assert os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == mine
    with Placement().as_client():
        assert os.sched_getaffinity(0) == mine
    assert p.record()["cpu_probe_us"] == {str(cpu): 1.0}


def test_a_server_spawned_by_a_pinned_thread_gets_every_cpu(tmp_path):
    import sys

    from bench.common import spawn_server, stop_server

    mine = os.sched_getaffinity(0)
    path = str(tmp_path / "s.sock")
    server = ("import contextlib, os, socket, sys\n"
              "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
              "while True:\n"
              "    c, _ = s.accept()\n"
              "    with contextlib.suppress(OSError):  # spawn_server's probe has gone already\n"
              "        c.sendall(repr(sorted(os.sched_getaffinity(0))).encode())\n"
              "    c.close()\n")
    with Placement(work=min(mine), loop=min(mine), client=min(mine)).as_client():
        proc = spawn_server([sys.executable, "-c", server, path], path)
    try:
        import socket

        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            assert c.recv(4096).decode() == repr(sorted(mine))
    finally:
        stop_server(proc)
