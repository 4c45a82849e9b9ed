"""A model step's reply map: its tensors on the host, the others as they were."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.model.runner import StepResult
from djinn.kernel.execute import _result


def step(device: str) -> StepResult:
    logits = torch.arange(7, dtype=torch.float32, device=device)
    topk_logits, topk_ids = torch.topk(logits, 3)
    act = torch.full((4, 5), 2.5, dtype=torch.bfloat16, device=device)
    return StepResult(logits, topk_ids, topk_logits, act, None, 11, 4)


def test_cpu_tensors_are_the_steps_own() -> None:
    r = step("cpu")
    out = _result(r)
    assert out["logits"] is r.logits and out["activation"] is r.activation
    assert out["topk"]["ids"] is r.topk_ids and out["topk"]["logits"] is r.topk_logits
    assert (out["position"], out["paused_at"]) == (11, None)


def test_a_pause_without_tensors_has_none() -> None:
    assert _result(StepResult(None, None, None, None, 3, 11, 4)) == {"position": 11, "paused_at": 3}


@pytest.mark.gpu
def test_cuda_tensors_arrive_on_the_host_after_the_compute_that_made_them() -> None:
    r = step("cuda")
    torch.cuda._sleep(50_000_000)  # queue a long kernel, then one that writes the activation after it
    r.activation.mul_(2)
    out = _result(r)
    for t in (out["logits"], out["activation"], out["topk"]["ids"], out["topk"]["logits"]):
        assert t.device.type == "cpu" and t.is_pinned()
    assert torch.equal(out["activation"], torch.full((4, 5), 5.0, dtype=torch.bfloat16))
    assert torch.equal(out["logits"], torch.arange(7, dtype=torch.float32))
    assert out["topk"]["ids"].tolist() == [6, 5, 4]
