"""python -m bench os-tax (ablation 1): the same work native in-process and through djinnd, cold and warm.

Definitions (every ratio is djinnd / native, both measured in this run on the same device and dtype):
- micro-op: no syscall runs a single tensor op, so djinnd cannot run `torch.add` at all. The row reports
  native `torch.add` of two 1024-element tensors (synchronised) against the least a remote op could cost
  through djinnd: one null syscall (`nop`) round trip plus the same native add. `echo_ms` adds what
  shipping both operands and getting them back costs (`echo` of the two tensors).
- one layer: djinnd runs `forward` on a one-layer model with GPT-2 124M's shapes (saved to a temporary
  directory, loaded by name). The same-work baseline is that model's plain transformers forward in this
  process (embedding, the one block, final norm, last-token head). `bare_layer_ms` is one GPT2Block
  forward on a [1, T, hidden] state, for scale; it is not the ratio's denominator, because djinnd's
  forward also embeds the tokens and runs the head.
- full forward: `forward(ids, return_logits="last")` on dummy:gpt2 against GPT2LMHeadModel's forward in
  this process with the same weights (both fill dummy weights from one seed), a fresh DynamicCache and
  `logits_to_keep=1`. Both sides start from token ids in host memory and end with float32 last-token
  logits in host memory; djinnd also writes the KV cache into the session arena.
- driver: djinnd's own model code (layer-split forward, KV into an arena) run in this process, so
  djinnd / driver is the syscall path's share alone and driver / native the model driver's. On CUDA the
  driver, in djinnd and in this process alike, replays a fresh sequence's forward as a prefill plan (a
  CUDA graph captured the second time its shape comes, drivers/model/prefill.py); transformers runs it
  eagerly. Every warm forward here is such a repeat, so the warm djinnd / native ratio includes that plan;
  djinnd / driver does not.
- native after a sleep: the same plain native forward, each one started right after this thread slept
  SLEEP_BEFORE_S (not timed). djinnd's device worker sleeps on its queue between requests, and on a VM a thread
  that slept runs its next stretch of Python slower (its CPU idled meanwhile); this side measures what that alone
  costs the native forward, in this run. The target's baseline stays the back-to-back native forward.
- native under inference_mode: the same transformers forward under torch.inference_mode instead of no_grad.
  djinnd's driver runs under inference_mode, so `ratio_vs_native_inference_mode` compares like with like;
  the target's baseline stays the plain no_grad forward, as transformers' own generate() runs it.
- cold: the first forward on a freshly loaded model (djinnd: `load_model` under a new name, so its plan
  is measured on the meta device; native: a fresh `load_model` in this process); trial 0 also pays the
  process's first-use costs on both sides. warm: steady state after warm-up, native and djinnd in
  alternating blocks. Every djinnd forward runs in a fresh session (opening and closing it untimed), since
  a session's KV cache only grows.
- where the time goes (warm): from `stat` before and after the warm rounds, the daemon's mean time per forward
  (dispatch to reply written) and the device worker's busy time per forward; with the client's mean they split
  the overhead into the client and wire, the daemon around the worker, and the worker itself. The worker's mean
  wait per call (submission to start) is mostly the hand-off to its thread.
- CPUs (bench/cpus.py): on CUDA the native sides and djinnd's device worker run on one CPU, the fastest by the
  run's probe, djinnd's loop and this process's client calls on the next two, so that neither side is timed on a
  slower CPU than the other; `--cpus off` leaves every thread to the scheduler.
Targets (warm): full forward <= 1% over native, one layer <= 5%; the micro-op is reported as it is.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from bench._models import (DeviceArena, add_model_args, daemon_flags, driver_last_logits, hf_last_logits,
                           load_native, make_setup, print_table, random_ids, save_one_layer, stats_ms, time_native,
                           timed)
from bench.common import Recorder, add_busy_poll_arg, daemon, progress

__all__ = ["add_args", "run"]

MICRO_NUMEL = 1024
SLEEP_BEFORE_S = 0.001  # the "native after a sleep" side's pause before each forward


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_busy_poll_arg(p)
    p.add_argument("--model", default=None, help="full-forward model (default dummy:gpt2; demo with --quick)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per forward (default 512; 128 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="alternating native/djinnd rounds (default 12)")
    p.add_argument("--block", type=int, default=10, help="forwards per side per round")
    p.add_argument("--cold-trials", type=int, default=None, help="fresh-model first forwards per side (default 3)")
    p.add_argument("--micro-n", type=int, default=None, help="micro-op samples per side (default 2000)")


def _djinn_forward(k: Any, model: str, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One timed forward in a fresh session of `model` (open and close untimed)."""
    s = k.open_session(model=model, max_tokens=int(ids.numel()))
    try:
        dt, r = timed(lambda: s.forward(ids, return_logits="last"))
    finally:
        s.close()
    return dt, r.logits


def _micro(k: Any, su: Any, n: int, rec: Recorder, native_cold_s: float, a: torch.Tensor, b: torch.Tensor,
           rows: list[list[Any]]) -> None:
    dev = su.torch_device
    with su.cpus.as_work():
        add = [time_native(lambda: torch.add(a, b), dev)[0] for _ in progress(range(n), "native torch.add")]
    ops = [a.cpu(), b.cpu()]
    with su.cpus.as_client():
        nop_cold, _ = timed(lambda: k.syscall("nop"))
        for _ in range(200):
            k.syscall("nop")
        nop = [timed(lambda: k.syscall("nop"))[0] for _ in progress(range(n), "djinnd nop")]
        for _ in range(20):
            k.syscall("echo", data=ops)
        echo = [timed(lambda: k.syscall("echo", data=ops))[0] for _ in range(max(50, n // 10))]
    add_s, nop_s, echo_s = stats_ms(add), stats_ms(nop), stats_ms(echo)
    definition = "djinn = nop round trip + native add (no syscall runs one op)"
    for mode, native_ms, null_ms, when in (
            ("cold", native_cold_s * 1e3, nop_cold * 1e3, "the process's first add; the connection's first nop"),
            ("warm", add_s["p50_ms"], nop_s["p50_ms"], "p50 after warm-up")):
        djinn_ms = null_ms + native_ms
        rec.record(metric="micro_op", mode=mode, unit="ms", djinn=djinn_ms, djinn_null_syscall_ms=null_ms,
                   baseline="native torch.add, synchronised", baseline_value=native_ms, ratio=djinn_ms / native_ms,
                   overhead_pct=100 * (djinn_ms / native_ms - 1), echo_operands_ms=echo_s["p50_ms"],
                   native_p99_ms=add_s["p99_ms"] if mode == "warm" else None,
                   djinn_null_p99_ms=nop_s["p99_ms"] if mode == "warm" else None,
                   numel=MICRO_NUMEL, n=n if mode == "warm" else 1, definition=definition, when=when,
                   target="reported as is")
        rows.append([f"micro-op torch.add ({mode})", native_ms, float("nan"), djinn_ms, djinn_ms / native_ms])


def _workload(k: Any, su: Any, args: argparse.Namespace, rec: Recorder, rows: list[list[Any]], *, metric: str,
              spec: str, model_label: str, ids: torch.Tensor, target: str,
              bare_layer: Callable[[Any], float] | None) -> None:
    """Cold trials (fresh model on both sides), then warm alternating blocks; one record per mode."""
    dev = su.torch_device
    label = metric.replace("_", " ")
    cold_native: list[float] = []
    cold_djinn: list[float] = []
    for t in progress(range(args.cold_trials), f"{label}: cold trials"):
        with su.cpus.as_work():
            lm = load_native(spec, su)
            dt, _ = time_native(lambda: hf_last_logits(lm.arch.hf, ids, dev), dev)
            cold_native.append(dt)
            lm.unload()
            del lm
        name = f"{metric}-cold-{t}"
        with su.cpus.as_client():
            k.load_model(spec, name=name, dtype=su.dtype)
            try:
                cold_djinn.append(_djinn_forward(k, name, ids)[0])
            finally:
                k.syscall("unload_model", name=name)

    lm = load_native(spec, su)
    hf = lm.arch.hf
    arena = DeviceArena(lm.arena_nbytes(int(ids.numel())), dev)
    name = f"{metric}-warm"
    k.load_model(spec, name=name, dtype=su.dtype)
    # (where this process runs it, the timed call): the native sides on the work CPU, djinnd's side on the
    # client's (its worker is on the work CPU)
    sides: list[tuple[Callable[[], Any], Callable[[], float]]] = [
        (su.cpus.as_work, lambda: time_native(lambda: hf_last_logits(hf, ids, dev), dev)[0]),
        (su.cpus.as_work, lambda: time_native(lambda: driver_last_logits(lm, arena, ids), dev)[0]),
        (su.cpus.as_client, lambda: _djinn_forward(k, name, ids)[0]),
        (su.cpus.as_work, lambda: time_native(lambda: hf_last_logits(hf, ids, dev, inference_mode=True), dev)[0]),
        (su.cpus.as_work, lambda: _after_sleep(lambda: time_native(lambda: hf_last_logits(hf, ids, dev), dev)[0])),
    ]
    for _ in range(5):
        for place, side in sides:
            with place():
                side()
    native: list[float] = []
    driver: list[float] = []
    djinn: list[float] = []
    native_im: list[float] = []
    native_slept: list[float] = []
    samples = (native, driver, djinn, native_im, native_slept)
    before = _daemon_counters(k)
    for r in progress(range(args.rounds), f"{label}: warm rounds"):
        for i in range(len(sides)):  # rotate which side goes first
            j = (r + i) % len(sides)
            place, side = sides[j]
            with place():
                for _ in range(args.block):
                    samples[j].append(side())
    inside = _daemon_means_ms(before, _daemon_counters(k), len(djinn))
    native_logits = hf_last_logits(hf, ids, dev)
    djinn_logits = _djinn_forward(k, name, ids)[1]
    same_work_diff = float((native_logits - djinn_logits).abs().max())
    with su.cpus.as_work():
        bare = bare_layer(lm) if bare_layer is not None else None
    k.syscall("unload_model", name=name)
    lm.unload()

    n_s, d_s, v_s, im_s = stats_ms(native), stats_ms(djinn), stats_ms(driver), stats_ms(native_im)
    sl_s = stats_ms(native_slept)
    cn, cd = stats_ms(cold_native), stats_ms(cold_djinn)
    common = dict(unit="ms", model=model_label, tokens=int(ids.numel()),
                  baseline="native transformers forward, same work", same_work_max_abs_logit_diff=same_work_diff,
                  target=target)
    if bare is not None:
        common["bare_layer_ms"] = bare
    rec.record(metric=metric, mode="cold", djinn=cd["p50_ms"], baseline_value=cn["p50_ms"],
               ratio=cd["p50_ms"] / cn["p50_ms"], overhead_pct=100 * (cd["p50_ms"] / cn["p50_ms"] - 1),
               djinn_first_ms=cold_djinn[0] * 1e3, native_first_ms=cold_native[0] * 1e3, n=len(cold_djinn), **common)
    rec.record(metric=metric, mode="warm", djinn=d_s["p50_ms"], baseline_value=n_s["p50_ms"],
               ratio=d_s["p50_ms"] / n_s["p50_ms"], overhead_pct=100 * (d_s["p50_ms"] / n_s["p50_ms"] - 1),
               djinn_p99_ms=d_s["p99_ms"], native_p99_ms=n_s["p99_ms"], djinn_mean_ms=d_s["mean_ms"],
               native_mean_ms=n_s["mean_ms"], ratio_mean=d_s["mean_ms"] / n_s["mean_ms"],
               overhead_ms=d_s["p50_ms"] - n_s["p50_ms"], driver_inprocess_ms=v_s["p50_ms"],
               ratio_vs_driver_inprocess=d_s["p50_ms"] / v_s["p50_ms"], native_inference_mode_ms=im_s["p50_ms"],
               ratio_vs_native_inference_mode=d_s["p50_ms"] / im_s["p50_ms"], native_after_sleep_ms=sl_s["p50_ms"],
               ratio_vs_native_after_sleep=d_s["p50_ms"] / sl_s["p50_ms"], n=len(djinn), **inside, **common)
    rows.append([f"{label} (cold)", cn["p50_ms"], float("nan"), cd["p50_ms"], cd["p50_ms"] / cn["p50_ms"]])
    rows.append([f"{label} (warm)", n_s["p50_ms"], v_s["p50_ms"], d_s["p50_ms"], d_s["p50_ms"] / n_s["p50_ms"]])
    print(f"{label} (warm), means in ms: client {d_s['mean_ms']:.3f}, in djinnd {inside['daemon_forward_mean_ms']:.3f}, "
          f"device worker {inside['worker_per_forward_mean_ms']:.3f}, hand-off to the worker per call "
          f"{inside['worker_wait_per_call_mean_ms']:.3f} (in-process driver p50 {v_s['p50_ms']:.3f}, "
          f"native under inference_mode p50 {im_s['p50_ms']:.3f}, native after a {SLEEP_BEFORE_S * 1e3:g} ms sleep "
          f"p50 {sl_s['p50_ms']:.3f})")
    if bare is not None:
        rows.append(["  one bare block, native", bare, float("nan"), float("nan"), float("nan")])


def _after_sleep(timed_side: Callable[[], float]) -> float:
    """`timed_side()`'s time, the calling thread having slept SLEEP_BEFORE_S first (untimed)."""
    time.sleep(SLEEP_BEFORE_S)
    return timed_side()


class _Counters(NamedTuple):
    """djinnd's counters that split a warm forward's time, from one `stat`."""

    forwards: int
    forward_s: float
    worker_calls: int
    worker_busy_s: float
    worker_wait_s: float


def _daemon_counters(k: Any) -> _Counters:
    st = k.stat()
    fwd, worker = st["syscalls"].get("forward", {}), st["worker"]
    return _Counters(int(fwd.get("count", 0)), float(fwd.get("total_s", 0.0)), int(worker["calls"]),
                     float(worker["busy_s"]), float(worker["wait_s"]))


def _daemon_means_ms(before: _Counters, after: _Counters, n_forwards: int) -> dict[str, float]:
    """Where the warm djinnd forwards' time went, as means over the warm rounds (the bench is djinnd's only client):
    the daemon's own time per forward (dispatch to reply written) and the device worker's busy time per forward
    (which also holds the untimed open and close of each forward's session). The client's mean minus the
    daemon's is the wire, the client library and the wake-ups on both ends; the daemon's minus the worker's is
    dispatch, the hand-offs to the worker and back, and the reply. The worker's wait per call is mostly the
    hand-off to its thread: this bench is the only client, though a call may also wait for the tail of the one
    before it, whose reply left early."""
    forwards = after.forwards - before.forwards
    if forwards != n_forwards:
        raise RuntimeError(f"djinnd counted {forwards} forwards in the warm rounds, the bench made {n_forwards}")
    calls = after.worker_calls - before.worker_calls
    return {"daemon_forward_mean_ms": (after.forward_s - before.forward_s) / forwards * 1e3,
            "worker_per_forward_mean_ms": (after.worker_busy_s - before.worker_busy_s) / forwards * 1e3,
            "worker_calls_per_forward": calls / forwards,
            "worker_wait_per_call_mean_ms": (after.worker_wait_s - before.worker_wait_s) / max(1, calls) * 1e3}


def _bare_layer_ms(su: Any, n_tokens: int, n: int) -> Callable[[Any], float]:
    def measure(lm: Any) -> float:
        dev = su.torch_device
        block = lm.arch.layers[0]
        hidden = torch.randn(1, n_tokens, lm.hidden_size, device=dev, dtype=su.torch_dtype,
                             generator=torch.Generator(device=dev).manual_seed(0))
        with torch.no_grad():
            for _ in range(5):
                block(hidden)
            samples = [time_native(lambda: block(hidden), dev)[0] for _ in range(n)]
        return stats_ms(samples)["p50_ms"]

    return measure


def run(args: argparse.Namespace) -> int:
    import djinn

    su = make_setup(args)
    spec = args.model or ("demo" if args.quick else "dummy:gpt2")
    n_tokens = args.tokens or (128 if args.quick else 512)
    args.rounds = args.rounds or (4 if args.quick else 12)
    args.block = 5 if args.quick else args.block
    args.cold_trials = args.cold_trials or (2 if args.quick else 3)
    micro_n = args.micro_n or (300 if args.quick else 2000)
    rec = Recorder("os_tax", args.output_dir, quick=args.quick, tags={"client_busy_poll_us": args.busy_poll_us})
    rows: list[list[Any]] = []
    t_start = time.perf_counter()

    dev = su.torch_device
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(MICRO_NUMEL, device=dev, generator=gen)
    b = torch.randn(MICRO_NUMEL, device=dev, generator=gen)
    native_add_cold, _ = time_native(lambda: torch.add(a, b), dev)  # the process's first add

    one_layer_label = f"{spec} shapes, 1 layer (saved with HF init)"
    rec.record(metric="config", model=spec, one_layer_model=one_layer_label, tokens=n_tokens,
               rounds=args.rounds, block=args.block, cold_trials=args.cold_trials, micro_n=micro_n,
               attention="sdpa", **su.as_record())
    with tempfile.TemporaryDirectory(prefix="djinn-bench-") as tmp:
        one_layer_dir = save_one_layer(spec, Path(tmp) / "one-layer")
        with (daemon(*daemon_flags(su, spec)) as path,
              djinn.connect(path, busy_poll_us=args.busy_poll_us) as k):
            vocab = int(k.syscall("models")["models"][0]["vocab_size"])
            ids = random_ids(n_tokens, vocab, seed=1)
            _micro(k, su, micro_n, rec, native_add_cold, a, b, rows)
            _workload(k, su, args, rec, rows, metric="one_layer", spec=str(one_layer_dir), model_label=one_layer_label,
                      ids=ids, target="warm overhead <= 5%", bare_layer=_bare_layer_ms(su, n_tokens, 50))
            _workload(k, su, args, rec, rows, metric="full_forward", spec=spec, model_label=spec, ids=ids,
                      target="warm overhead <= 1%", bare_layer=None)

    print_table(f"os-tax: {spec}, {n_tokens} tokens, {su.device} {su.dtype} (p50 ms; ratio = djinnd / native)",
                ["workload", "native ms", "driver ms", "djinnd ms", "ratio"], rows)
    print(f"results: {rec.path} ({len(rec.records)} records, {time.perf_counter() - t_start:.0f} s)")
    return 0
