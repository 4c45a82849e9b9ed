"""to_device: host tensors to the device, without a host wait on CUDA."""

from __future__ import annotations

import pytest
import torch

from djinn.drivers.cuda import to_device


def test_on_the_cpu_it_is_the_plain_way():
    t = torch.arange(6).reshape(2, 3)
    assert to_device(t, torch.device("cpu")) is t
    out = torch.zeros(2, 3, dtype=torch.long)
    assert to_device(t, torch.device("cpu"), out=out) is out and torch.equal(out, t)


@pytest.mark.gpu
def test_an_upload_queues_behind_the_stream_without_waiting_for_it():
    dev = torch.device("cuda", torch.cuda.current_device())
    ids = torch.arange(512)
    stream = torch.cuda.current_stream(dev)
    torch.cuda._sleep(500_000_000)  # a long kernel queued ahead (a few hundred ms)
    got = to_device(ids, dev)
    out = torch.empty(1, 512, dtype=torch.long, device=dev)
    to_device(ids.reshape(1, 512), dev, out=out)
    assert not stream.query(), "to_device waited for the stream"
    ids.fill_(-1)  # the caller may reuse its tensor at once: the bytes were staged
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), torch.arange(512)) and torch.equal(out.cpu()[0], torch.arange(512))
    on_device = torch.arange(4, device=dev)
    assert torch.equal(to_device(on_device, dev), on_device)
