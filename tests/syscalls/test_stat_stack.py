"""The Stack segment in `stat` on a CPU daemon: a request's stack use is the figure of the plan it was admitted on."""

from __future__ import annotations

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11]


def _stack(k) -> dict:
    return k.stat()["memory"]["segments"]["stack"]


def test_forward_feeds_the_stack_on_cpu(djinnd, kernel):
    before = _stack(kernel)
    with kernel.open_session(max_tokens=64) as s:
        s.forward(PROMPT)
        after = _stack(kernel)
    model = djinnd.kernel.models.get("demo").model
    plan = djinnd.call_in_loop(djinnd.kernel.worker.run, model.plan, "forward", len(PROMPT), 0)
    assert plan.peak_nbytes > 0
    assert after["used_nbytes"] == plan.peak_nbytes  # the last request's peak
    assert after["peak_nbytes"] >= plan.peak_nbytes
    assert after["free_nbytes"] == after["capacity_nbytes"] - plan.peak_nbytes
    assert after["requests"] > before["requests"]
