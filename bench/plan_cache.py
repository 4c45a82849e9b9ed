"""python -m bench plan-cache (ablation 3): per-token decode latency on cold plans against warm ones, and
djinnd's warm decode rate against transformers' `generate` in this process.

Definitions:
- A decode step is one `forward` of one token with return_logits=1 (the client reads the top-1 id: greedy),
  timed at the client. Each trial loads a fresh copy of the model under a new name, so its plan cache
  starts empty, opens a session, prefills `--prompt-tokens`, then decodes `--n-tokens` steps.
- cold step: one that must build something first. `plan`: the step's plan key (op, 1 token, power-of-two
  bucket of the tokens before it) was never seen by this model copy, so the kernel's admission measures it
  on the meta device. `graph` (CUDA only): the step's key-length bucket (256, 512, ...) has no captured
  CUDA graph in this session yet, so it is captured. warm step: neither; a dict lookup and a graph replay.
  The classification follows the driver's bucket rules (plans.bucket_up, graphs.StaticDecoder.bucket).
- Trial 0 runs first and is left out of the figures: it pays the process's first-use costs (kernel
  loading, the allocator's first blocks), which are not the plan cache's.
- Decode rate: `generate` of N new tokens from the same prompt, greedy, in a fresh djinnd session
  (non-streamed, one reply) and with transformers' `model.generate` in this process (same weights and
  dtype, SDPA, its default DynamicCache, `min_new_tokens=N` so both make N tokens). The steady rate is
  (N - 2) / (T(N) - T(2)), medians of alternating runs: prefill and the first decode step (djinnd's graph
  capture) cancel out. e2e is N / T(N), everything included.
- CPUs (bench/cpus.py): on CUDA transformers' generate and djinnd's device worker run on one CPU, the fastest
  by the run's probe, djinnd's loop and this process's client calls on the next two; `--cpus off` leaves
  every thread to the scheduler.
Targets: warm step >= 5x faster than a cold one; djinnd's steady decode tokens/s >= transformers'.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench._models import (add_model_args, daemon_flags, load_native, make_setup, print_table, random_ids,
                           stats_ms, time_native, timed, vocab_of)
from bench.common import Recorder, daemon, percentile, progress

__all__ = ["add_args", "run"]


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--models", nargs="+", default=None,
                   help="model specs (default: dummy:gpt2 dummy:llama-1b; demo with --quick)")
    p.add_argument("--n-tokens", type=int, default=None, help="decode steps per trial (default 100; 40 quick)")
    p.add_argument("--n-trials", type=int, default=None, help="trials, each on a fresh model copy (default 3)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prefill before the decode steps (default 200, so the steps cross the 256 bucket)")
    p.add_argument("--gen-tokens", type=int, default=None, help="new tokens per generate (default 128)")
    p.add_argument("--gen-prompt", type=int, default=64, help="prompt tokens for generate")
    p.add_argument("--gen-trials", type=int, default=None, help="generate runs per side and length (default 5)")


def _graph_bucket(position: int, max_tokens: int) -> int:
    from djinn.drivers.model.graphs import MIN_BUCKET

    b = MIN_BUCKET
    while b < position + 1:
        b *= 2
    return min(b, max_tokens)


def _decode_trial(k: Any, spec: str, name: str, su: Any, prompt: torch.Tensor, n_tokens: int,
                  max_tokens: int) -> list[dict[str, Any]]:
    """One fresh model copy, one session: prefill, then n_tokens timed decode steps, each classified."""
    from djinn.drivers.model.plans import bucket_up

    graphs = su.device == "cuda"
    k.load_model(spec, name=name, dtype=su.dtype)
    steps: list[dict[str, Any]] = []
    try:
        s = k.open_session(model=name, max_tokens=max_tokens)
        try:
            r = s.forward(prompt, return_logits=1)
            tok = int(r.topk_ids[0])
            seen_plans: set[int] = set()
            seen_graphs: set[int] = set()
            for i in range(n_tokens):
                past = int(prompt.numel()) + i
                dt, r = timed(lambda: s.forward([tok], return_logits=1))
                tok = int(r.topk_ids[0])
                pb, gb = bucket_up(past), _graph_bucket(past, max_tokens)
                plan_cold, graph_cold = pb not in seen_plans, graphs and gb not in seen_graphs
                seen_plans.add(pb)
                seen_graphs.add(gb)
                steps.append({"past": past, "s": dt, "plan_cold": plan_cold, "graph_cold": graph_cold})
        finally:
            s.close()
    finally:
        k.syscall("unload_model", name=name)
    return steps


def _cold_warm(k: Any, spec: str, su: Any, args: argparse.Namespace, rec: Recorder, rows: list[list[Any]]) -> None:
    prompt = random_ids(args.prompt_tokens, vocab_of(spec), seed=2)
    max_tokens = 1024
    trials = []
    for t in progress(range(args.n_trials + 1), f"{spec}: decode trials (trial 0 warms the process)"):
        trials.append(_decode_trial(k, spec, f"{spec}#{t}", su, prompt, args.n_tokens, max_tokens))
    steps = [st for trial in trials[1:] for st in trial]
    cold = [st["s"] for st in steps if st["plan_cold"] or st["graph_cold"]]
    warm = [st["s"] for st in steps if not (st["plan_cold"] or st["graph_cold"])]
    plan_only = [st["s"] for st in steps if st["plan_cold"] and not st["graph_cold"]]
    graph_only = [st["s"] for st in steps if st["graph_cold"] and not st["plan_cold"]]
    both = [st["s"] for st in steps if st["plan_cold"] and st["graph_cold"]]
    c, w = stats_ms(cold), stats_ms(warm)
    cold_positions = sorted({st["past"] for st in steps if st["plan_cold"] or st["graph_cold"]})
    rec.record(metric="decode_step_cold_vs_warm", model=spec, unit="ms", djinn=c["p50_ms"],
               baseline="warm decode step (same run)", baseline_value=w["p50_ms"], ratio=c["p50_ms"] / w["p50_ms"],
               cold_p50_ms=c["p50_ms"], cold_mean_ms=c["mean_ms"], cold_n=c["n"], warm_p50_ms=w["p50_ms"],
               warm_p99_ms=w["p99_ms"], warm_mean_ms=w["mean_ms"], warm_n=w["n"],
               plan_only_p50_ms=stats_ms(plan_only)["p50_ms"], plan_only_n=len(plan_only),
               graph_only_p50_ms=stats_ms(graph_only)["p50_ms"], graph_only_n=len(graph_only),
               plan_and_graph_p50_ms=stats_ms(both)["p50_ms"], plan_and_graph_n=len(both),
               process_first_step_ms=trials[0][0]["s"] * 1e3, cold_positions=cold_positions,
               n_tokens=args.n_tokens, n_trials=args.n_trials, prompt_tokens=args.prompt_tokens,
               target="ratio (cold / warm) >= 5")
    rows.append([f"{spec}: decode step cold / warm (ms)", c["p50_ms"], w["p50_ms"], c["p50_ms"] / w["p50_ms"], ">= 5"])
    if plan_only:
        rows.append([f"{spec}:   plan miss only (ms)", stats_ms(plan_only)["p50_ms"], w["p50_ms"],
                     stats_ms(plan_only)["p50_ms"] / w["p50_ms"], ""])
    if graph_only:
        rows.append([f"{spec}:   graph capture only (ms)", stats_ms(graph_only)["p50_ms"], w["p50_ms"],
                     stats_ms(graph_only)["p50_ms"] / w["p50_ms"], ""])


class _HFGenerate:
    """transformers' generate in this process, greedy, exactly `n` new tokens."""

    def __init__(self, spec: str, su: Any) -> None:
        self.lm = load_native(spec, su)
        self.hf = self.lm.arch.hf
        self.device = su.torch_device

    def __call__(self, prompt: torch.Tensor, n: int) -> list[int]:
        ids = prompt.to(self.device).unsqueeze(0)
        with torch.no_grad():
            out = self.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, pad_token_id=0)
        return [int(t) for t in out[0, ids.shape[1]:].tolist()]

    def close(self) -> None:
        self.lm.unload()


def _djinn_generate(k: Any, name: str, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    s = k.open_session(model=name, max_tokens=int(prompt.numel()) + n + 1)
    try:
        return timed(lambda: s.generate(prompt, n))
    finally:
        s.close()


def _decode_rate(k: Any, spec: str, su: Any, args: argparse.Namespace, rec: Recorder, rows: list[list[Any]]) -> None:
    name = f"{spec}@gen"
    vocab = int(k.load_model(spec, name=name, dtype=su.dtype)["vocab_size"])
    prompt = random_ids(args.gen_prompt, vocab, seed=3)
    n = args.gen_tokens
    native = _HFGenerate(spec, su)
    dev = su.torch_device
    try:
        for _ in range(2):
            native(prompt, 8)
            _djinn_generate(k, name, prompt, 8)
        t: dict[tuple[str, int], list[float]] = {("hf", 2): [], ("hf", n): [], ("djinn", 2): [], ("djinn", n): []}
        toks: dict[str, list[int]] = {}
        for i in progress(range(args.gen_trials), f"{spec}: generate, alternating"):
            for side in (("hf", "djinn") if i % 2 == 0 else ("djinn", "hf")):
                for m in (2, n):
                    if side == "hf":
                        with su.cpus.as_work():
                            dt, out = time_native(lambda: native(prompt, m), dev)
                    else:
                        with su.cpus.as_client():
                            dt, out = _djinn_generate(k, name, prompt, m)
                    t[(side, m)].append(dt)
                    if m == n:
                        toks[side] = out
    finally:
        native.close()
        k.syscall("unload_model", name=name)
    med = {key: percentile(v, 50) for key, v in t.items()}
    steady = {side: (n - 2) / (med[(side, n)] - med[(side, 2)]) for side in ("hf", "djinn")}
    e2e = {side: n / med[(side, n)] for side in ("hf", "djinn")}
    same = sum(a == b for a, b in zip(toks["djinn"], toks["hf"]))
    prefix = next((i for i, (a, b) in enumerate(zip(toks["djinn"], toks["hf"])) if a != b), n)
    rec.record(metric="decode_tokens_per_s", model=spec, mode="steady", unit="tokens/s", djinn=steady["djinn"],
               baseline="transformers generate in-process (DynamicCache, SDPA)", baseline_value=steady["hf"],
               ratio=steady["djinn"] / steady["hf"], djinn_step_ms=1e3 / steady["djinn"],
               baseline_step_ms=1e3 / steady["hf"], gen_tokens=n, prompt_tokens=args.gen_prompt,
               trials=args.gen_trials, same_tokens_frac=same / n, same_prefix_tokens=prefix,
               target="ratio >= 1")
    rec.record(metric="decode_tokens_per_s", model=spec, mode="e2e", unit="tokens/s", djinn=e2e["djinn"],
               baseline="transformers generate in-process (DynamicCache, SDPA)", baseline_value=e2e["hf"],
               ratio=e2e["djinn"] / e2e["hf"], djinn_total_ms=med[("djinn", n)] * 1e3,
               baseline_total_ms=med[("hf", n)] * 1e3, gen_tokens=n, prompt_tokens=args.gen_prompt,
               trials=args.gen_trials, same_tokens_frac=same / n,
               target="reported (includes prefill and, for djinnd, the graph capture)")
    rows.append([f"{spec}: steady decode tokens/s", steady["djinn"], steady["hf"], steady["djinn"] / steady["hf"],
                 ">= 1"])
    rows.append([f"{spec}: e2e generate tokens/s", e2e["djinn"], e2e["hf"], e2e["djinn"] / e2e["hf"], ""])


def run(args: argparse.Namespace) -> int:
    import djinn

    su = make_setup(args)
    models = args.models or (["demo"] if args.quick else ["dummy:gpt2", "dummy:llama-1b"])
    args.n_tokens = args.n_tokens or (40 if args.quick else 100)
    args.n_trials = args.n_trials or (2 if args.quick else 3)
    args.prompt_tokens = args.prompt_tokens or (20 if args.quick else 200)
    args.gen_tokens = args.gen_tokens or (32 if args.quick else 128)
    args.gen_prompt = min(args.gen_prompt, 16) if args.quick else args.gen_prompt
    args.gen_trials = args.gen_trials or (2 if args.quick else 5)
    rec = Recorder("plan_cache", args.output_dir, quick=args.quick)
    rec.record(metric="config", models=models, n_tokens=args.n_tokens, n_trials=args.n_trials,
               prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, gen_prompt=args.gen_prompt,
               gen_trials=args.gen_trials, decode_mode="graph" if su.device == "cuda" else "dynamic",
               **su.as_record())
    rows: list[list[Any]] = []
    t_start = time.perf_counter()
    failed = 0
    with daemon(*daemon_flags(su, "none", text="10GiB", data="2GiB", stack="2GiB")) as path, \
            djinn.connect(path) as k:
        for spec in models:
            try:
                with su.cpus.as_client():
                    _cold_warm(k, spec, su, args, rec, rows)
                _decode_rate(k, spec, su, args, rec, rows)
            except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others' figures
                if args.quick:
                    raise
                failed += 1
                rec.record(metric="error", model=spec, error=f"{type(e).__name__}: {e}")
                rows.append([f"{spec}: FAILED ({type(e).__name__})", float("nan"), float("nan"), float("nan"), ""])

    print_table(f"plan-cache: {su.device} {su.dtype} (p50; ratio = djinnd figure / baseline)",
                ["figure", "djinnd", "baseline", "ratio", "target"], rows)
    print(f"results: {rec.path} ({len(rec.records)} records, {time.perf_counter() - t_start:.0f} s)")
    return 1 if failed else 0
