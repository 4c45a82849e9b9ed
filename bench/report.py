"""python -m bench report: render the committed JSON-lines results as markdown tables.

Rules: every number in the report comes from a record under bench/results/; nothing
is typed by hand. For each benchmark, device and model, the latest full (non-quick)
run is shown, with its stamp (commit, versions, device) and the fields all its
records share (the run's configuration); then one table per kind of record, one
row per record, and the figures the benchmark drew for that model. Earlier full
runs of the same commit are not hidden: their records that carry a target follow,
one row per record, so a figure that varies from run to run shows it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.agents import slug
from bench.common import REPO_ROOT

# The signals modes whose densities the targets compare; a run of other modes is a variant of its own.
SIGNALS_DEFAULT_MODES = frozenset(("proactive", "reactive", "none", "recompute"))
LEADING = ["metric", "mode", "model", "layer", "nbytes"]  # columns shown first when a record has them
STAMP_KEYS = ("bench", "run_id", "quick", "git_commit", "torch", "transformers", "cuda", "python", "device", "host",
              "time_unix")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results", help="where the .jsonl files are")
    p.add_argument("--write", type=Path, default=None, help="write the markdown here (default: print it)")
    p.add_argument("--include-quick", action="store_true", help="also show --quick runs")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    if isinstance(v, (dict, list)):
        text = json.dumps(v, sort_keys=True)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(v)


Key = tuple[str, str, str, str]  # (bench, device, model of the run or "", variant of the run or "")


def _run_model(records: list[dict[str, Any]]) -> str:
    """The one model a run's records name, or "" when they name none or several."""
    models = {rec["model"] for rec in records if isinstance(rec.get("model"), str)}
    return models.pop() if len(models) == 1 else ""


def _run_variant(records: list[dict[str, Any]]) -> str:
    """How the run differs from the benchmark's default way of running: "" for the default. So far: a
    client that busy-polls for replies (client_busy_poll_us > 0); in runs kept from when djinnd had
    the option, a device worker that polled for its next call (daemon_worker_spin_us); a signals run of
    modes other than the four its targets compare (proactive-lazy against proactive, say)."""
    parts = []
    polls = {rec.get("client_busy_poll_us") or 0 for rec in records}
    if len(polls) == 1 and 0 not in polls:
        parts.append(f"client busy-polls {polls.pop():g} us")
    spins = {rec.get("daemon_worker_spin_us") for rec in records}
    if len(spins) == 1 and None not in spins:
        parts.append(f"djinnd --worker-spin-us {spins.pop():g}")
    modes = {rec["mode"] for rec in records if rec.get("kind") == "probe" and isinstance(rec.get("mode"), str)}
    if modes and modes != SIGNALS_DEFAULT_MODES:  # a signals run of other modes than the four compared
        parts.append("modes " + ",".join(sorted(modes)))
    return ", ".join(parts)


def _runs(results: Path, include_quick: bool) -> dict[Key, list[tuple[float, list[dict[str, Any]]]]]:
    """(bench, device, model, variant) -> (time, records) of each of that key's runs, oldest first."""
    runs: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(results.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("quick") and not include_quick:
                continue
            runs[(rec.get("bench", path.stem), rec.get("device", "?"))][rec.get("run_id", "?")].append(rec)
    keyed: dict[Key, list[tuple[float, list[dict[str, Any]]]]] = defaultdict(list)
    for (bench, device), by_run in runs.items():
        for records in by_run.values():
            key = (bench, device, _run_model(records), _run_variant(records))
            keyed[key].append((max(x.get("time_unix", 0) for x in records), records))
    for found in keyed.values():
        found.sort(key=lambda run: run[0])
    return keyed


def load(results: Path, include_quick: bool) -> dict[Key, list[dict[str, Any]]]:
    """(bench, device, model, variant) -> the records of that key's latest run. Runs of one bench on
    one device with different models (signals on llama-1b and on llama-8b), or run differently (a
    busy-polling client), are kept apart."""
    return {key: found[-1][1] for key, found in _runs(results, include_quick).items()}


def earlier_of_commit(results: Path, include_quick: bool) -> dict[Key, list[list[dict[str, Any]]]]:
    """(bench, device, model, variant) -> the records of the runs before the latest one that measured the
    same commit, oldest first (keys without such runs are left out)."""
    out: dict[Key, list[list[dict[str, Any]]]] = {}
    for key, found in _runs(results, include_quick).items():
        commit = found[-1][1][0].get("git_commit")
        same = [records for _, records in found[:-1] if records[0].get("git_commit") == commit]
        if same:
            out[key] = same
    return out


def _shared(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields (stamp aside) every record has, with one value in all of them."""
    first = records[0]
    return {k: v for k, v in first.items()
            if k not in STAMP_KEYS and all(k in rec and rec[k] == v for rec in records[1:])}


def _table(records: list[dict[str, Any]], skip: dict[str, Any], stamp: tuple[str, ...] = ()) -> list[str]:
    """One row per record; no stamp column but those in `stamp`, which lead; no column in `skip`."""
    columns: list[str] = []
    for rec in records:
        for k in rec:
            if (k not in STAMP_KEYS or k in stamp) and k not in skip and k not in columns:
                columns.append(k)
    lead = [*stamp, *LEADING]
    columns.sort(key=lambda c: (c not in lead, lead.index(c) if c in lead else 0))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(rec.get(c, "")) for c in columns) + " |" for rec in records]
    return lines + [""]


def render(latest: dict[Key, list[dict[str, Any]]], figures: list[str] = (),
           earlier: dict[Key, list[list[dict[str, Any]]]] | None = None) -> str:
    """Markdown: one section per (bench, device, model): the fields its records share, one table per
    record kind (`kind` or `metric`), the records with a target of `earlier` runs of the same commit,
    then links to the figures (`figures`: file names under the results dir) the bench wrote for that model."""
    out = ["# Benchmark results", "",
           "Generated by `python -m bench report` from `bench/results/*.jsonl`; do not edit by hand.", ""]
    for (bench, device, model, variant), records in sorted(latest.items()):
        first = records[0]
        out.append(f"## {bench} on {device}" + (f", {model}" if model else "") + (f" ({variant})" if variant else ""))
        out.append("")
        out.append(f"commit `{first.get('git_commit')}`, torch {first.get('torch')}, transformers "
                   f"{first.get('transformers')}, CUDA {first.get('cuda')}, run `{first.get('run_id')}`"
                   + (" (quick)" if first.get("quick") else ""))
        out.append("")
        shared = _shared(records) if len(records) > 1 else {}
        for k, v in shared.items():
            out.append(f"- {k}: `{json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v}`")
        if shared:
            out.append("")
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rec in records:
            groups[str(rec.get("kind", rec.get("metric", "")))].append(rec)
        for kind, group in groups.items():
            if len(groups) > 1:
                out += [f"**{kind}**", ""]
            out += _table(group, shared)
        before = [rec for records in (earlier or {}).get((bench, device, model, variant), []) for rec in records
                  if "target" in rec]
        if before:
            out += [f"**earlier runs of this commit** ({len({rec.get('run_id') for rec in before})}; "
                    "the records with a target)", ""]
            out += _table(before, {}, stamp=("run_id",))
        short = slug(model) if model else ""
        for name in () if variant else figures:  # a figure's file is named by bench and model: the default run's
            if name.startswith(f"{bench}_") and (not short or name.removesuffix(".svg").endswith(f"_{short}")):
                out += [f"![{name}](../bench/results/{name})", ""]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    figures = sorted(p.name for p in args.results.glob("*.svg"))
    text = render(load(args.results, args.include_quick), figures, earlier_of_commit(args.results, args.include_quick))
    if args.write:
        args.write.write_text(text + "\n")
        print(f"wrote {args.write}")
    else:
        print(text)
    return 0
