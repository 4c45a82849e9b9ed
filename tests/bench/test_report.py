"""python -m bench report: the latest full run per (bench, device, model), one table per record kind."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import earlier_of_commit, load, render


def _write(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def _rec(run: str, t: float, model: str, kind: str, value: float, quick: bool = False) -> dict:
    return {"bench": "signals", "device": "GPU-X", "run_id": run, "time_unix": t, "quick": quick,
            "git_commit": "abc", "model": model, "kind": kind, "value": value}


def test_latest_run_per_model_with_tables_per_kind_and_figures(tmp_path: Path) -> None:
    _write(tmp_path / "signals.jsonl", [
        _rec("old-1b", 1.0, "dummy:llama-1b", "probe", 1.0),
        _rec("new-1b", 2.0, "dummy:llama-1b", "probe", 2.0),
        _rec("new-1b", 2.0, "dummy:llama-1b", "density", 3.0),
        _rec("only-8b", 1.5, "dummy:llama-8b", "probe", 4.0),
        _rec("quick-8b", 9.0, "dummy:llama-8b", "probe", 5.0, quick=True),
    ])
    latest = load(tmp_path, include_quick=False)
    assert {k: [r["run_id"] for r in v][0] for k, v in latest.items()} == {
        ("signals", "GPU-X", "dummy:llama-1b", ""): "new-1b",
        ("signals", "GPU-X", "dummy:llama-8b", ""): "only-8b",
    }
    text = render(latest, ["signals_cliff_llama-1b.svg", "signals_cliff_llama-8b.svg", "swap_x.svg"])
    one_b = text.split("## signals on GPU-X, dummy:llama-1b")[1].split("## ")[0]
    assert "**probe**" in one_b and "**density**" in one_b
    assert "- model: `dummy:llama-1b`" in one_b  # a field every record of the run shares is shown once
    assert "| 2 |" in one_b and "| 1 |" not in one_b  # the old run's value is not shown
    assert "signals_cliff_llama-1b.svg" in one_b and "llama-8b.svg" not in one_b and "swap_x" not in one_b
    assert load(tmp_path, include_quick=True)[("signals", "GPU-X", "dummy:llama-8b", "")][0]["run_id"] == "quick-8b"


def test_a_run_with_a_busy_polling_client_is_kept_beside_the_default_run(tmp_path: Path) -> None:
    def rec(run: str, t: float, poll: float | None, value: float) -> dict:
        r = _rec(run, t, "dummy:gpt2", "probe", value) | {"bench": "os_tax"}
        return r if poll is None else r | {"client_busy_poll_us": poll}

    _write(tmp_path / "os_tax.jsonl", [rec("before-the-field", 1.0, None, 1.0), rec("default", 2.0, 0.0, 2.0),
                                       rec("polling", 3.0, 5000.0, 3.0)])
    latest = load(tmp_path, include_quick=False)
    assert {k: v[0]["run_id"] for k, v in latest.items()} == {
        ("os_tax", "GPU-X", "dummy:gpt2", ""): "default",  # the newest default run, not the polling one
        ("os_tax", "GPU-X", "dummy:gpt2", "client busy-polls 5000 us"): "polling",
    }
    assert "## os_tax on GPU-X, dummy:gpt2 (client busy-polls 5000 us)" in render(latest)


def test_a_kept_run_whose_worker_polled_is_kept_apart(tmp_path: Path) -> None:
    def rec(run: str, t: float, spin: int | None, poll: float = 0.0) -> dict:
        r = _rec(run, t, "dummy:gpt2", "probe", 1.0) | {"bench": "os_tax", "client_busy_poll_us": poll}
        return r if spin is None else r | {"daemon_worker_spin_us": spin}

    _write(tmp_path / "os_tax.jsonl", [rec("default", 1.0, None), rec("asleep", 2.0, 0), rec("both", 3.0, 0, 500.0)])
    latest = load(tmp_path, include_quick=False)
    assert {k[3]: v[0]["run_id"] for k, v in latest.items()} == {
        "": "default", "djinnd --worker-spin-us 0": "asleep",
        "client busy-polls 500 us, djinnd --worker-spin-us 0": "both"}
    assert "## os_tax on GPU-X, dummy:gpt2 (djinnd --worker-spin-us 0)" in render(latest)


def test_a_signals_run_of_other_modes_is_kept_beside_the_run_of_the_four_compared(tmp_path: Path) -> None:
    def probes(run: str, t: float, modes: tuple[str, ...]) -> list[dict]:
        return [_rec(run, t, "dummy:llama-1b", "probe", 1.0) | {"mode": m} for m in modes]

    _write(tmp_path / "signals.jsonl", probes("full", 1.0, ("proactive", "reactive", "none", "recompute"))
           + probes("lazy", 2.0, ("proactive", "proactive-lazy")))
    latest = load(tmp_path, include_quick=False)
    assert {k[3]: v[0]["run_id"] for k, v in latest.items()} == {"": "full", "modes proactive,proactive-lazy": "lazy"}
    text = render(latest, ["signals_cliff_llama-1b.svg"])
    assert "## signals on GPU-X, dummy:llama-1b (modes proactive,proactive-lazy)" in text
    lazy = text.split("(modes proactive,proactive-lazy)")[1]
    assert "signals_cliff_llama-1b.svg" not in lazy  # the figure is the default run's
    assert "signals_cliff_llama-1b.svg" in text.split("(modes proactive,proactive-lazy)")[0]


def test_earlier_runs_of_the_latest_commit_are_shown_with_their_targets(tmp_path: Path) -> None:
    def rec(run: str, t: float, commit: str, ratio: float, metric: str = "null_round_trip") -> dict:
        r = {"bench": "rpc", "device": "GPU-X", "run_id": run, "time_unix": t, "quick": False,
             "git_commit": commit, "metric": metric, "ratio_p50": ratio}
        if metric == "null_round_trip":
            r["target"] = "ratio_p50 <= 2"
        return r

    _write(tmp_path / "rpc.jsonl", [
        rec("old-commit", 1.0, "aaa", 3.25), rec("first", 2.0, "bbb", 1.75), rec("first", 2.0, "bbb", 7.5, "other"),
        rec("second", 3.0, "bbb", 2.5),
    ])
    key = ("rpc", "GPU-X", "", "")
    earlier = earlier_of_commit(tmp_path, include_quick=False)
    assert [[r["run_id"] for r in records] for records in earlier[key]] == [["first", "first"]]
    text = render(load(tmp_path, include_quick=False), [], earlier)
    latest, before = text.split("**earlier runs of this commit**")
    assert "run `second`" in latest and "| 2.5 |" in latest
    assert "| first |" in before and "| 1.75 |" in before  # the earlier run of the same commit, with its target
    assert "7.5" not in before and "3.25" not in text  # records without a target, and other commits, stay out
