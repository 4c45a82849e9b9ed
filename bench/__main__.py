"""python -m bench <name> [--quick] [--output-dir DIR]: run one benchmark.

Each benchmark is a module `bench/<name>.py` (dashes become underscores) with
`add_args(parser)` and `run(args) -> int`. `python -m bench report` renders the
committed results as tables.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bench.common import add_common_args

BENCHES = {
    "rpc": "null syscall round trip and 16 MiB tensor echo against raw-socket floors",
    "arena": "arena alloc+free latency across sizes and live-arena counts (ablation 2)",
    "swap": "page-out/page-in bandwidth against pinned-copy bandwidth; interference",
    "os-tax": "native in-process against djinnd: add, one layer, full forward (ablation 1)",
    "plan-cache": "per-token decode latency, cold against warm plans (ablation 3)",
    "breakpoint": "pause/resume overhead, checkpoints, steering, concurrency",
    "signals": "agent density under proactive/reactive/none/recompute (ablation 4)",
    "top": "CPU cost of djinn-top at 4 Hz with many sessions",
    "report": "render bench/results/*.jsonl as markdown tables",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, help_ in BENCHES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name != "report":  # it runs nothing: it reads --results
            add_common_args(p)
        if name == chosen:
            mod = importlib.import_module(f"bench.{name.replace('-', '_')}")
            mod.add_args(p)
            modules[name] = mod
    args = parser.parse_args(argv)  # only the chosen bench's module is imported, so one broken bench breaks no other
    return int(modules[args.bench].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
