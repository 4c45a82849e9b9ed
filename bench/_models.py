"""Shared plumbing for the model benchmarks (os-tax, plan-cache, breakpoint).

Rules:
- djinnd and its in-process baseline run in the same run, on the same device, dtype and attention
  implementation (SDPA; `load_model` switches cuDNN's SDPA backend off process-wide on CUDA, in the
  daemon and in this process alike), and with the same number of CPU threads on the CPU.
- Native work is timed with `torch.cuda.synchronize()` before and after; djinnd is timed by wall
  clock at the client, from just before the request is sent to the decoded reply.
- On CUDA the native work and djinnd's device worker run on the same CPU, the fastest one, djinnd's loop
  and this process's client calls on the next two (bench/cpus.py; `--cpus off` leaves it to the scheduler);
  torch then has one CPU thread on both sides.
- Quick mode runs on the CPU with the `demo` model and short inputs; the full run expects CUDA.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bench.common import percentile
from bench.cpus import Placement, add_cpus_arg, placement

__all__ = ["Setup", "add_model_args", "make_setup", "daemon_flags", "sync", "time_native", "timed", "stats_ms",
           "random_ids", "vocab_of", "save_one_layer", "quiet_transformers", "load_native", "hf_last_logits",
           "DeviceArena", "driver_last_logits", "rel_l2", "print_table"]


@dataclass(frozen=True, slots=True)
class Setup:
    """Where both sides run: `device` ("cpu" / "cuda"), `dtype` (a torch dtype name), CPU `threads`."""

    device: str
    dtype: str
    threads: int
    quick: bool
    cpus: Placement = field(default_factory=Placement)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def as_record(self) -> dict[str, Any]:
        return {"device_kind": self.device, "dtype": self.dtype, "cpu_threads": self.threads, **self.cpus.record()}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where both sides run (default: cuda when available, cpu with --quick)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype on both sides (default: float32 on cpu, bfloat16 on cuda)")
    add_cpus_arg(p)


def make_setup(args: argparse.Namespace) -> Setup:
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    dtype = args.dtype or ("float32" if device == "cpu" else
                           "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    cpus = placement(getattr(args, "cpus", "off"), device)
    if cpus.on:
        # Every thread of the run sits on one CPU of its own, and so would torch's CPU threads, which
        # inherit it: more than one would only take turns there, and idle ones spin before they sleep,
        # against the thread that started them (a client's CPU-side torch op then cost it milliseconds).
        threads = 1
        torch.set_num_threads(1)
    else:
        # The daemon keeps one core for its event loop; the baseline gets the same number of threads.
        threads = max(1, (os.cpu_count() or 2) - 1)
        if device == "cpu":
            torch.set_num_threads(threads)
    return Setup(device, dtype, threads, bool(args.quick), cpus)


def daemon_flags(su: Setup, model: str, *, text: str = "2GiB", data: str = "2GiB", stack: str = "2GiB",
                 host: str = "1GiB", max_tokens: int = 1024) -> list[str]:
    """djinnd flags with explicit segment sizes, so the daemon leaves the GPU to the in-process baseline."""
    if su.quick:
        text, data, stack, host = "256MiB", "512MiB", "256MiB", "512MiB"
    return ["--model", model, "--device", su.device, "--dtype", su.dtype, "--vmu-text", text, "--vmu-data", data,
            "--vmu-stack", stack, "--vmu-host", host, "--max-tokens", str(max_tokens), "--grace-s", "0",
            "--cpu-threads", str(su.threads), *su.cpus.daemon_flags()]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_native(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """(seconds, result) of `fn()` with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of a blocking client call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def stats_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """n, p50/p99/mean/min in milliseconds."""
    ms = [x * 1e3 for x in samples_s]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": sum(ms) / len(ms) if ms else float("nan"), "min_ms": min(ms) if ms else float("nan")}


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """[n] int64 token ids, reproducible, avoiding the top ids (special tokens in the byte tokenizer)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(2, vocab - 8), (n,), generator=gen, dtype=torch.long)


def vocab_of(spec: str) -> int:
    """The vocabulary size of a built-in spec or a local HF directory, without loading weights."""
    from djinn.drivers.model.presets import PRESETS

    if spec in PRESETS:
        return int(PRESETS[spec].make_config().vocab_size)
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(spec, local_files_only=True).vocab_size)


def save_one_layer(base_spec: str, path: Path) -> Path:
    """Save a one-layer model of `base_spec`'s shapes (same hidden, heads, vocab, positions) with HF's random
    init, as a local HF directory that djinnd and `load_model` both read."""
    from transformers import AutoModelForCausalLM

    from djinn.drivers.model.presets import PRESETS

    quiet_transformers()
    cfg = PRESETS[base_spec].make_config()
    cfg.num_hidden_layers = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg)
    hf.save_pretrained(str(path))
    return path


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_native(spec: str, su: Setup) -> Any:
    """The same model djinnd loads, loaded in this process by the model driver (same dtype, same weights:
    dummy models are filled from a fixed seed on the device)."""
    from djinn.drivers.model import load_model

    quiet_transformers()

    return load_model(spec, device=su.device, dtype=su.dtype)


def hf_last_logits(hf: Any, ids_cpu: torch.Tensor, device: torch.device, *,
                   inference_mode: bool = False) -> torch.Tensor:
    """Plain transformers forward of `ids_cpu` with a fresh KV cache, last-token logits as float32 on the host:
    the same inputs and outputs a djinnd forward with return_logits="last" has. Under no_grad, as transformers'
    own generate() runs, or with `inference_mode`, as djinnd's model driver runs."""
    with torch.inference_mode() if inference_mode else torch.no_grad():
        ids = ids_cpu.to(device).unsqueeze(0)
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float().cpu()


class DeviceArena:
    """A plain device buffer with the VMU Arena's contract (view / touch / mark_used / generation / residency), so
    the model driver can run in this process without a VMU."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.nbytes, self.used_nbytes, self.generation, self.residency = nbytes, 0, 0, "device"
        self.data = torch.zeros(nbytes, dtype=torch.uint8, device=device)

    def view(self, dtype: torch.dtype, shape: Sequence[int], offset: int = 0) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        return self.data.narrow(0, offset, n * dtype.itemsize).view(dtype).view(tuple(shape))

    def touch(self) -> None:
        """Nothing to order: no copy ever runs into this buffer."""

    def mark_used(self, end_offset: int) -> None:
        self.used_nbytes = max(self.used_nbytes, end_offset)


def driver_last_logits(lm: Any, arena: DeviceArena, ids_cpu: torch.Tensor) -> torch.Tensor:
    """djinnd's own model code (layer-split forward, KV into an arena) run in this process: a fresh state over
    `arena`, last-token logits on the host. The difference to djinnd is the syscall path alone."""
    state = lm.new_state(arena, int(ids_cpu.numel()))
    return lm.forward(state, ids_cpu, return_logits="last").logits.cpu()


def rel_l2(changed: torch.Tensor, base: torch.Tensor) -> float:
    """||changed - base|| / ||base||, in float64."""
    c, b = changed.double(), base.double()
    return float((c - b).norm() / b.norm())


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout; floats with 3 significant decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
