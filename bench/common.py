"""Shared plumbing for benchmarks: the run stamp, JSON-lines output, percentiles, progress.

Rules: every record a benchmark writes carries the stamp (git commit, versions,
device), so a figure can always be traced to the run that produced it. Figures
are reported as ratios to a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import tempfile
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from bench.cpus import unpinned

__all__ = ["stamp", "Recorder", "percentile", "summarize_us", "progress", "add_common_args", "REPO_ROOT",
           "spawn_server", "stop_server", "daemon"]

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def _git_commit() -> str:
    """The commit the code under test comes from. $DJINN_GIT_COMMIT wins: a copy of the tree
    without its git history (a remote GPU machine) gets the commit from whoever sent it."""
    if os.environ.get("DJINN_GIT_COMMIT"):
        return os.environ["DJINN_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=False
        )
        commit = out.stdout.strip()
        if out.returncode != 0 or len(commit) != 40:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("DJINN_GIT_COMMIT", "unknown")


def stamp() -> dict[str, Any]:
    """Who and where: git commit, library versions, device name. Computed once per run."""
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        tf_version = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": device,
        "host": platform.node(),
        "time_unix": time.time(),
    }


@dataclass
class Recorder:
    """Writes one JSON object per line to `<output_dir>/<bench>.jsonl`, each with the run stamp."""

    bench: str
    output_dir: Path
    quick: bool = False
    tags: dict[str, Any] = field(default_factory=dict)  # fields every record of the run carries (its variant)
    _stamp: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._stamp = stamp()
        self.run_id = f"{self.bench}-{int(self._stamp['time_unix'])}"

    @property
    def path(self) -> Path:
        return self.output_dir / f"{self.bench}.jsonl"

    def record(self, **fields: Any) -> dict[str, Any]:
        rec = {"bench": self.bench, "run_id": self.run_id, "quick": self.quick, **self.tags, **fields, **self._stamp}
        self.records.append(rec)
        with self.path.open("a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        return rec


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for an empty list."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def paired_median_diff(a: list[float], b: list[float]) -> float:
    """The median of a[i] - b[i]: what a costs over b, each pair measured back to back, so that a drift of the
    host's speed between pairs cancels (a difference of the two lists' medians keeps it)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    return percentile([x - y for x, y in zip(a, b)], 50)


def summarize_us(samples_s: list[float]) -> dict[str, float]:
    """p50/p99/mean in microseconds from samples in seconds."""
    us = [x * 1e6 for x in samples_s]
    return {
        "n": len(us),
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "mean_us": sum(us) / len(us) if us else float("nan"),
    }


def progress(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """Yield items, printing `label i/total` to stderr at most twice a second."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    last = 0.0
    for i, item in enumerate(items, 1):
        now = time.monotonic()
        if now - last > 0.5 or i == total:
            print(f"\r  {label} {i}/{total if total is not None else '?'}", end="", file=sys.stderr, flush=True)
            last = now
        yield item
    print("", file=sys.stderr)


def add_busy_poll_arg(p: argparse.ArgumentParser) -> None:
    """--busy-poll-us, for benchmarks whose client waits on djinnd with the blocking client."""
    p.add_argument("--busy-poll-us", type=float, default=0.0,
                   help="the client polls for each reply this long before blocking (djinn.connect(busy_poll_us=...); "
                        "default 0: a blocking read). Every record carries it as client_busy_poll_us")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results",
                   help="where the JSON-lines results go (default: bench/results)")
    p.add_argument("--quick", action="store_true", help="a CPU-sized smoke run that finishes within a minute")


def spawn_server(argv: list[str], path: str, timeout_s: float = 300.0) -> subprocess.Popen[str]:
    """Start a server process and wait until its Unix socket at `path` accepts a connection."""
    with unpinned():  # a client pinned to its CPU must not pin the server it starts
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.stderr.read() if proc.stderr else ''}")
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
                return proc
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout_s}s")


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def daemon(*flags: str) -> Iterator[str]:
    """A djinnd process with `flags` (e.g. "--model", "dummy:gpt2") on a fresh socket; yields the socket path."""
    path = os.path.join(tempfile.mkdtemp(prefix="djinn-bench-"), "djinnd.sock")
    proc = spawn_server([sys.executable, "-m", "djinn.kernel.boot", "--socket", path, "--log-level", "warning",
                         *flags], path)
    try:
        yield path
    finally:
        stop_server(proc)
