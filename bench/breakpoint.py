"""python -m bench breakpoint: pause/resume, checkpoints, steering and a second session during a pause.

Definitions (dummy:gpt2, 512 random tokens; every djinnd figure is wall clock at the client):
- reference: an uninterrupted `forward(ids)` in a fresh session, then `generate` of G greedy tokens after it.
- accuracy, per layer L and trial: `forward(ids, pause_at=L)` + `resume()` in a fresh session, then the same
  G-token continuation (it runs on the KV cache the paused forward left on the server). Tokens compared:
  the greedy next token at each of the 512 positions (argmax of return_logits="all") and the G continuation
  tokens; accuracy is the % identical to the reference. `bitwise` says whether all logits were equal.
- pause+resume time: forward(pause_at=L) + resume() (two syscalls) against one uninterrupted forward, both
  return_logits="last", fresh sessions, in back-to-back pairs whose order alternates. extra = the median of the
  pairs' differences (target <= 0.5 ms): the two sides of a pair run within milliseconds of each other, so a
  drift of the host's speed between pairs cancels, where it does not in a difference of two p50s (kept too, as
  `extra_p50_diff_ms`: the uninterrupted forward's p50 alone has moved by several ms from one layer's samples
  to the next on the lent VM). Where the extra goes, from half as many pairs again with `stat` read just
  before and after each side's timed syscalls, each a median of the pairs' differences: at the client
  (`extra_client_ms`), inside djinnd from dispatch until the loop is done with each request
  (`extra_in_djinnd_ms`), and on the device worker (`extra_on_worker_ms`, the model steps and their replies).
  Client minus djinnd is about the wire, the client library and the wake-ups; djinnd minus worker, about the
  dispatch and the hand-offs to the worker and back (medians of differences do not add up exactly).
- checkpoint (paused at the steering layer): dispatch = the `checkpoint` syscall as the client sees it
  (baseline: a `nop`); copy done = from dispatch until `checkpoint_status(wait=True)` returns (baseline: a
  device-to-host copy of the same bytes into pinned memory in this process); restore = the `restore`
  syscall (baseline: the host-to-device copy). The restore target is a session paused at layer 0; its
  resume must give bitwise the logits the checkpointed session's resume gave. (Restoring a checkpoint taken
  while paused into a READY session, or forking it, is probed once; the `restore` record says what happened.)
- steering at layer 6, scale 0.9, two ways: (a) pause with return_activation="all", resume with the
  activation times 0.9 (in the model dtype); (b) set_steering(6, "scale", 0.9) and a plain forward (it also
  steers the continuation's decode steps). Against the reference: % of the 512 greedy tokens that change,
  % of the continuation that changes, max |logit change| and relative L2 (||steered - ref|| / ||ref||).
- concurrency: session A paused at layer 6 and paged out (`page_out`); what the data segment gives back
  (stat memory.segments.data.used_nbytes before and after); session B's forward latency while A waits,
  against B alone before and after (target: within 10%); A's resume afterwards must be bitwise exact.
- CPUs (bench/cpus.py): on CUDA djinnd's device worker runs on the fastest CPU by the run's probe, its loop and
  this process's client on the next two (the native copy baselines run on the worker's CPU); `--cpus off`
  leaves every thread to the scheduler.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Iterator

import torch

from bench._models import (add_model_args, daemon_flags, make_setup, print_table, random_ids, rel_l2, stats_ms,
                           time_native, timed)
from bench.common import Recorder, add_busy_poll_arg, daemon, paired_median_diff, percentile, progress

__all__ = ["add_args", "run"]


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_busy_poll_arg(p)
    p.add_argument("--model", default=None, help="model (default dummy:gpt2; demo with --quick)")
    p.add_argument("--tokens", type=int, default=None, help="input tokens (default 512; 128 with --quick)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="pause layers (default 0 3 6 9 11)")
    p.add_argument("--trials", type=int, default=3, help="accuracy trials per layer")
    p.add_argument("--timing-n", type=int, default=None, help="timing pairs per layer (default 100)")
    p.add_argument("--gen-tokens", type=int, default=None, help="greedy continuation tokens (default 32)")
    p.add_argument("--steer-layer", type=int, default=6)
    p.add_argument("--steer-scale", type=float, default=0.9)
    p.add_argument("--ckpt-trials", type=int, default=None, help="checkpoint/restore trials (default 10)")
    p.add_argument("--conc-n", type=int, default=None, help="B forwards per phase (default 30)")


class _Bench:
    """The daemon connection and the fixed inputs of one run."""

    def __init__(self, k: Any, ids: torch.Tensor, gen_tokens: int) -> None:
        self.k, self.ids, self.g = k, ids, gen_tokens
        self.max_tokens = int(ids.numel()) + gen_tokens + 2

    def session(self, max_tokens: int | None = None) -> Any:
        return self.k.open_session(max_tokens=max_tokens or self.max_tokens)

    def continuation(self, s: Any, logits_all: torch.Tensor) -> list[int]:
        """Greedy tokens after the forward: the last position's argmax, then G-1 decoded on the server's KV."""
        nxt = int(logits_all[-1].argmax())
        return [nxt] + [int(t) for t in s.generate([nxt], self.g - 1)] if self.g > 1 else [nxt]


def _reference(b: _Bench) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    s = b.session()
    r = s.forward(b.ids, return_logits="all")
    cont = b.continuation(s, r.logits)
    s.close()
    s = b.session()
    last = s.forward(b.ids, return_logits="last").logits
    s.close()
    return r.logits, cont, last


def _accuracy(b: _Bench, layer: int, trials: int, ref: torch.Tensor, ref_cont: list[int]) -> dict[str, Any]:
    pos_same = cont_same = 0
    max_abs = 0.0
    for _ in range(trials):
        s = b.session()
        s.forward(b.ids, pause_at=layer)
        logits = s.resume(return_logits="all").logits
        cont = b.continuation(s, logits)
        s.close()
        pos_same += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        cont_same += sum(x == y for x, y in zip(cont, ref_cont))
        max_abs = max(max_abs, float((logits - ref).abs().max()))
    n_pos, n_cont = trials * ref.shape[0], trials * len(ref_cont)
    return {"token_accuracy_pct": 100 * (pos_same + cont_same) / (n_pos + n_cont),
            "positions_identical_pct": 100 * pos_same / n_pos, "continuation_identical_pct": 100 * cont_same / n_cont,
            "logits_max_abs_diff": max_abs, "bitwise": max_abs == 0.0, "trials": trials}


def _pairs(n: int) -> Iterator[bool]:
    """The sides of n back-to-back pairs, False the uninterrupted forward, True the pause+resume; which goes
    first alternates from pair to pair."""
    for i in range(n):
        yield from ((False, True) if i % 2 == 0 else (True, False))


def _side(b: _Bench, s: Any, layer: int, paused: bool) -> tuple[float, float]:
    """One side of a pair on session `s`: (seconds to the forward's reply, seconds of the resume after it;
    0.0 for the uninterrupted forward)."""
    t0 = time.perf_counter()
    if not paused:
        s.forward(b.ids, return_logits="last")
        return time.perf_counter() - t0, 0.0
    s.forward(b.ids, pause_at=layer)
    t1 = time.perf_counter()
    s.resume(return_logits="last")
    return t1 - t0, time.perf_counter() - t1


def _pause_timing(b: _Bench, layer: int, n: int) -> dict[str, list[float]]:
    """n pairs, each an uninterrupted forward and a pause+resume back to back; entry i of every list belongs
    to pair i."""
    out: dict[str, list[float]] = {"uninterrupted": [], "pause_resume": [], "pause": [], "resume": []}
    for paused in _pairs(n):
        s = b.session()
        first, then = _side(b, s, layer, paused)
        s.close()
        if paused:
            out["pause"].append(first)
            out["resume"].append(then)
            out["pause_resume"].append(first + then)
        else:
            out["uninterrupted"].append(first)
    return out


def _extra_split(b: _Bench, layer: int, n: int) -> dict[str, Any]:
    """Where the pause+resume's extra goes: n more pairs (as in _pause_timing), each side with djinnd's `stat`
    read just before and after its timed syscalls (the session is opened before and closed after, untimed).
    Per side and pair: the client's time, djinnd's (dispatch until the loop is done with the request, summed
    over the forward and resume syscalls) and the device worker's busy time; each extra is the median of the
    pairs' differences (pause+resume minus forward)."""
    parts: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for paused in _pairs(n):
        s = b.session()
        before = b.k.stat()
        client = sum(_side(b, s, layer, paused))
        after = b.k.stat()
        s.close()
        daemon = sum(after["syscalls"].get(c, {}).get("total_s", 0.0)
                     - before["syscalls"].get(c, {}).get("total_s", 0.0) for c in ("forward", "resume"))
        parts[paused].append((client, daemon, after["worker"]["busy_s"] - before["worker"]["busy_s"]))
    names = ("extra_client_ms", "extra_in_djinnd_ms", "extra_on_worker_ms")
    out: dict[str, Any] = {name: 1e3 * paired_median_diff([p[i] for p in parts[True]], [p[i] for p in parts[False]])
                           for i, name in enumerate(names)}
    out["split_n"] = n
    return out


def _layer(b: _Bench, layer: int, trials: int, timing_n: int, ref: torch.Tensor, ref_cont: list[int],
           rec: Recorder, rows: list[list[Any]]) -> None:
    acc = _accuracy(b, layer, trials, ref, ref_cont)
    tm = _pause_timing(b, layer, timing_n)
    un, pr = percentile(tm["uninterrupted"], 50), percentile(tm["pause_resume"], 50)
    paired = paired_median_diff(tm["pause_resume"], tm["uninterrupted"])
    split = _extra_split(b, layer, max(2, timing_n // 2))
    rec.record(metric="pause_resume_accuracy", layer=layer, unit="%", djinn=acc["token_accuracy_pct"],
               baseline="uninterrupted forward", baseline_value=100.0, ratio=acc["token_accuracy_pct"] / 100,
               tokens_compared_per_trial=ref.shape[0] + len(ref_cont), target="100%", **acc)
    rec.record(metric="pause_resume_extra", layer=layer, unit="ms", djinn=pr * 1e3,
               baseline="uninterrupted forward", baseline_value=un * 1e3, ratio=pr / un, extra_ms=paired * 1e3,
               extra_p50_diff_ms=(pr - un) * 1e3, extra_estimate="median of back-to-back pairs' differences",
               pause_ms=percentile(tm["pause"], 50) * 1e3, resume_ms=percentile(tm["resume"], 50) * 1e3,
               djinn_p99_ms=percentile(tm["pause_resume"], 99) * 1e3,
               baseline_p99_ms=percentile(tm["uninterrupted"], 99) * 1e3, n=timing_n, target="extra <= 0.5 ms",
               **split)
    rows.append([f"layer {layer}: token accuracy % (bitwise={acc['bitwise']})", acc["token_accuracy_pct"], 100.0,
                 acc["token_accuracy_pct"] / 100, "100%"])
    rows.append([f"layer {layer}: pause+resume ms, extra {1e3 * paired:.3f} ms", pr * 1e3, un * 1e3, pr / un,
                 "extra <= 0.5 ms"])


def _copy_baselines(nbytes: int, su: Any) -> tuple[float, float]:
    """p50 seconds of a native device->host and host->device copy of `nbytes` (pinned host memory on CUDA)."""
    dev = su.torch_device
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    d2h = [time_native(lambda: host.copy_(src, non_blocking=True), dev)[0] for _ in range(20)]
    h2d = [time_native(lambda: src.copy_(host, non_blocking=True), dev)[0] for _ in range(20)]
    return percentile(d2h[2:], 50), percentile(h2d[2:], 50)


def _checkpoints(b: _Bench, layer: int, trials: int, su: Any, rec: Recorder, rows: list[list[Any]]) -> None:
    k = b.k
    for _ in range(50):
        k.syscall("nop")
    nop = percentile([timed(lambda: k.syscall("nop"))[0] for _ in range(200)], 50)
    dispatch, done, server_copy, restore, exact = [], [], [], [], []
    nbytes = 0
    for _ in progress(range(trials), "checkpoint/restore"):
        a = b.session()
        a.forward(b.ids, pause_at=layer)
        t0 = time.perf_counter()
        ck = a.checkpoint()
        t1 = time.perf_counter()
        st = ck.wait()
        t2 = time.perf_counter()
        dispatch.append(t1 - t0)
        done.append(t2 - t0)
        server_copy.append(float(st["seconds"] or 0.0))
        nbytes = int(st["nbytes"])
        la = a.resume(return_logits="last").logits
        target = b.session()
        target.forward(b.ids, pause_at=0)
        restore.append(timed(lambda: target.restore(ck))[0])
        lb = target.resume(return_logits="last").logits
        exact.append(bool(torch.equal(la, lb)))
        ck.free()
        a.close()
        target.close()
    probe = _paused_checkpoint_probe(b, layer)
    with su.cpus.as_work():  # where djinnd's worker issues its copies
        d2h, h2d = _copy_baselines(max(nbytes, 1), su)
    dp, dn, rs = percentile(dispatch, 50), percentile(done, 50), percentile(restore, 50)
    rec.record(metric="checkpoint_dispatch", layer=layer, unit="ms", nbytes=nbytes, djinn=dp * 1e3,
               djinn_p99_ms=percentile(dispatch, 99) * 1e3, baseline="null syscall (nop) round trip",
               baseline_value=nop * 1e3, ratio=dp / nop, n=trials, target="reported (asynchronous: the copy goes on)")
    rec.record(metric="checkpoint_copy_done", layer=layer, unit="ms", nbytes=nbytes, djinn=dn * 1e3,
               djinn_p99_ms=percentile(done, 99) * 1e3, server_copy_ms=percentile(server_copy, 50) * 1e3,
               baseline="native device->host copy of the same bytes (pinned)", baseline_value=d2h * 1e3,
               ratio=dn / d2h, n=trials, target="reported")
    rec.record(metric="restore", layer=layer, unit="ms", nbytes=nbytes, djinn=rs * 1e3,
               djinn_p99_ms=percentile(restore, 99) * 1e3, baseline="native host->device copy of the same bytes",
               baseline_value=h2d * 1e3, ratio=rs / h2d, restore_exact=all(exact), n=trials,
               restore_paused_into_ready=probe["restore"], fork_of_paused=probe["fork"], target="reported")
    rows.append([f"checkpoint dispatch (ms, vs nop), {nbytes / 2**20:.1f} MiB", dp * 1e3, nop * 1e3, dp / nop, ""])
    rows.append(["checkpoint copy done (ms, vs native D2H)", dn * 1e3, d2h * 1e3, dn / d2h, ""])
    rows.append([f"restore (ms, vs native H2D), exact={all(exact)}", rs * 1e3, h2d * 1e3, rs / h2d, ""])


def _paused_checkpoint_probe(b: _Bench, layer: int) -> dict[str, str]:
    """Whether a checkpoint taken while paused can be restored into a READY session, and forked."""
    from djinn.kernel.errors import KernelError

    a = b.session()
    a.forward(b.ids, pause_at=layer)
    ck = a.checkpoint()
    ck.wait()
    out = {}
    r = b.session()
    try:
        r.restore(ck)
        r.resume(return_logits="none")
        out["restore"] = "ok"
        r.close()
    except KernelError as e:
        out["restore"] = f"{type(e).__name__}: {e}"
    try:
        f = b.k.fork(ck)
        f.resume(return_logits="none")
        out["fork"] = "ok"
        f.close()
    except KernelError as e:
        out["fork"] = f"{type(e).__name__}: {e}"
    ck.free()
    a.close()
    return out


def _steering(b: _Bench, layer: int, scale: float, ref: torch.Tensor, ref_cont: list[int], n: int,
              rec: Recorder, rows: list[list[Any]]) -> None:
    # (a) resume with the activation scaled by the client
    s = b.session()
    act = s.forward(b.ids, pause_at=layer, return_activation="all").activation
    steered = act * torch.tensor(scale, dtype=act.dtype)
    la = s.resume(activation=steered, return_logits="all").logits
    cont_a = b.continuation(s, la)
    s.close()
    # (b) set_steering, then a plain forward (the continuation's decode steps are steered too)
    s = b.session()
    s.set_steering(layer, "scale", scale)
    lb = s.forward(b.ids, return_logits="all").logits
    cont_b = b.continuation(s, lb)
    s.close()
    # latency: plain resume against resume with a replacement activation (fetched with the pause)
    plain, with_act, unint, cycle = [], [], [], []
    for _ in range(n):
        s = b.session()
        unint.append(timed(lambda: s.forward(b.ids, return_logits="last"))[0])
        s.close()
        s = b.session()
        s.forward(b.ids, pause_at=layer)
        plain.append(timed(lambda: s.resume(return_logits="last"))[0])
        s.close()
        s = b.session()
        t0 = time.perf_counter()
        a = s.forward(b.ids, pause_at=layer, return_activation="all").activation
        a = a * torch.tensor(scale, dtype=a.dtype)
        t1 = time.perf_counter()
        s.resume(activation=a, return_logits="last")
        t2 = time.perf_counter()
        with_act.append(t2 - t1)
        cycle.append(t2 - t0)
        s.close()
    for how, logits, cont in (("resume_activation", la, cont_a), ("set_steering", lb, cont_b)):
        div = 100 * float((logits.argmax(-1) != ref.argmax(-1)).float().mean())
        cdiv = 100 * sum(x != y for x, y in zip(cont, ref_cont)) / len(ref_cont)
        delta = (logits - ref).abs()
        rec.record(metric="steering", mode=how, layer=layer, scale=scale, unit="%", djinn=div,
                   baseline="uninterrupted, unsteered forward", baseline_value=0.0, token_divergence_pct=div,
                   continuation_divergence_pct=cdiv, logit_change_max_abs=float(delta.max()),
                   logit_change_rel_l2=rel_l2(logits, ref), output_changed=bool(delta.max() > 0),
                   a_vs_b_max_abs_diff=float((la - lb).abs().max()), target="output changes")
        rows.append([f"steering {how}: prompt tokens changed %", div, 0.0, float("nan"), "> 0"])
        rows.append([f"steering {how}: continuation changed %", cdiv, 0.0, float("nan"), ""])
        rows.append([f"steering {how}: max |logit change|", float(delta.max()), 0.0, float("nan"), ""])
        rows.append([f"steering {how}: relative L2 of the logits", rel_l2(logits, ref), 0.0, float("nan"), ""])
    p, w = percentile(plain, 50), percentile(with_act, 50)
    u, c = percentile(unint, 50), percentile(cycle, 50)
    nbytes = int(act.numel() * act.element_size())
    rec.record(metric="steered_resume", layer=layer, unit="ms", djinn=w * 1e3, baseline="plain resume (no activation)",
               baseline_value=p * 1e3, ratio=w / p, activation_nbytes=nbytes, n=n,
               steer_cycle_ms=c * 1e3, uninterrupted_ms=u * 1e3, steer_cycle_extra_ms=(c - u) * 1e3,
               target="reported")
    rows.append([f"resume with activation (ms, vs plain), {nbytes / 2**10:.0f} KiB", w * 1e3, p * 1e3, w / p, ""])
    rows.append(["pause+fetch+scale+resume (ms, vs uninterrupted)", c * 1e3, u * 1e3, c / u, ""])


def _concurrency(b: _Bench, layer: int, n: int, ref_last: torch.Tensor, rec: Recorder, rows: list[list[Any]]) -> None:
    k = b.k
    ids_b = b.ids.flip(0)
    t_b = int(ids_b.numel())

    def b_forward() -> float:
        s = b.session(t_b)
        dt, _ = timed(lambda: s.forward(ids_b, return_logits="last"))
        s.close()
        return dt

    for _ in range(3):
        b_forward()
    alone = [b_forward() for _ in progress(range(n), "B alone")]
    a = b.session(int(b.ids.numel()))
    a.forward(b.ids, pause_at=layer)

    def data_used() -> tuple[int, dict[str, Any]]:
        st = k.stat()
        entry = next(x for x in st["sessions"] if x["id"] == a.id)
        return int(st["memory"]["segments"]["data"]["used_nbytes"]), entry

    used_before, entry_before = data_used()
    po = a.page_out()
    used_after, entry_after = data_used()
    during = [b_forward() for _ in progress(range(n), "B while A is paused and paged out")]
    resume_s, r = timed(lambda: a.resume(return_logits="last"))
    exact = bool(torch.equal(r.logits, ref_last))
    a.close()
    alone += [b_forward() for _ in progress(range(n), "B alone again")]
    al, du = stats_ms(alone), stats_ms(during)
    given = used_before - used_after
    rec.record(metric="concurrent_b_latency", layer=layer, unit="ms", djinn=du["p50_ms"],
               baseline="session B alone (before and after)", baseline_value=al["p50_ms"],
               ratio=du["p50_ms"] / al["p50_ms"], djinn_p99_ms=du["p99_ms"], baseline_p99_ms=al["p99_ms"], n=n,
               target="ratio <= 1.10")
    rec.record(metric="paused_memory_given_back", layer=layer, unit="bytes", djinn=given,
               baseline="data segment used before page_out", baseline_value=used_before,
               data_used_before_nbytes=used_before, data_used_after_nbytes=used_after,
               a_arena_nbytes=int(entry_before.get("arena_nbytes", 0)),
               a_arena_used_nbytes=int(entry_before.get("arena_used_nbytes", 0)),
               a_residency_after=entry_after.get("residency"), a_state_after=entry_after.get("state"),
               page_out_nbytes=int(po["nbytes"]), page_out_ms=float(po["seconds"]) * 1e3,
               a_resume_after_page_out_ms=resume_s * 1e3, a_resume_exact=exact, target="> 0, and A exact")
    rows.append(["B forward while A paged out (ms, vs alone)", du["p50_ms"], al["p50_ms"],
                 du["p50_ms"] / al["p50_ms"], "<= 1.10"])
    rows.append([f"A paged out: data segment MiB given back, exact={exact}", given / 2**20, used_before / 2**20,
                 given / max(used_before, 1), "> 0"])


def run(args: argparse.Namespace) -> int:
    import djinn

    su = make_setup(args)
    spec = args.model or ("demo" if args.quick else "dummy:gpt2")
    n_tokens = args.tokens or (128 if args.quick else 512)
    timing_n = args.timing_n or (6 if args.quick else 100)
    gen_tokens = args.gen_tokens or (8 if args.quick else 32)
    ckpt_trials = args.ckpt_trials or (3 if args.quick else 10)
    conc_n = args.conc_n or (6 if args.quick else 30)
    trials = 2 if args.quick else args.trials
    rec = Recorder("breakpoint", args.output_dir, quick=args.quick, tags={"client_busy_poll_us": args.busy_poll_us})
    rows: list[list[Any]] = []
    t_start = time.perf_counter()
    with (daemon(*daemon_flags(su, spec)) as path,
          djinn.connect(path, busy_poll_us=args.busy_poll_us) as k, su.cpus.as_client()):
        info = k.syscall("models")["models"][0]
        n_layers, vocab = int(info["layers"]), int(info["vocab_size"])
        layers = sorted({min(x, n_layers - 1) for x in (args.layers or [0, 3, 6, 9, 11])})
        steer_layer = args.steer_layer if args.steer_layer < n_layers else n_layers // 2
        rec.record(metric="config", model=spec, tokens=n_tokens, layers=layers, trials=trials, timing_n=timing_n,
                   gen_tokens=gen_tokens, steer_layer=steer_layer, steer_scale=args.steer_scale,
                   ckpt_trials=ckpt_trials, conc_n=conc_n, n_layers=n_layers, **su.as_record())
        b = _Bench(k, random_ids(n_tokens, vocab, seed=4), gen_tokens)
        ref, ref_cont, ref_last = _reference(b)
        for _ in range(3):  # warm the daemon's kernels for the pause path
            s = b.session()
            s.forward(b.ids, pause_at=layers[0])
            s.resume(return_logits="last")
            s.close()
        for layer in progress(layers, "layers"):
            _layer(b, layer, trials, timing_n, ref, ref_cont, rec, rows)
        _checkpoints(b, steer_layer, ckpt_trials, su, rec, rows)
        _steering(b, steer_layer, args.steer_scale, ref, ref_cont, max(3, timing_n // 2), rec, rows)
        _concurrency(b, steer_layer, conc_n, ref_last, rec, rows)

    print_table(f"breakpoint: {spec}, {n_tokens} tokens, {su.device} {su.dtype} (p50; ratio = djinnd / baseline)",
                ["figure", "djinnd", "baseline", "ratio", "target"], rows)
    print(f"results: {rec.path} ({len(rec.records)} records, {time.perf_counter() - t_start:.0f} s)")
    return 0
